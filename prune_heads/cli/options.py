"""What several commands share: the model options (generated from ``ModelConfig``) and output checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from prune_heads.model.config import ModelConfig
from prune_heads.schema import click_options, from_cli

#: the ModelConfig fields, as click passes them to a command
MODEL_FIELDS = ("dtype", "device", "device_map", "revision", "gguf_file", "trust_remote_code")


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--dtype, --device, --device-map, --revision, --gguf-file, --trust-remote-code."""
    return click_options(ModelConfig)(f)


def model_config(model_id: str, kw: dict[str, Any], fields: tuple[str, ...] = MODEL_FIELDS) -> ModelConfig:
    """The ``ModelConfig`` of ``model_id`` and the model options, popped from a command's keyword arguments."""
    return from_cli(ModelConfig, {k: kw.pop(k) for k in fields if k in kw}, id=model_id)


def output_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--overwrite", is_flag=True, help="Replace an existing output.")(f)
        return click.option("-o", "--output", required=True, type=click.Path(), help=help)(f)

    return apply


def check_output(output: Any, overwrite: bool, inputs: tuple[Any, ...] = ()) -> None:
    """Refuse an existing output without --overwrite, and an output that is, holds or lies in an input."""
    from prune_heads import io_utils

    guard = getattr(io_utils, "check_output_path", None)
    if guard is not None:
        guard(output, overwrite=overwrite, inputs=[i for i in inputs if i])
        return
    from pathlib import Path

    from prune_heads.errors import OutputExistsError, PruneHeadsError

    out = Path(output)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    o = out.resolve()
    for i in inputs:
        if not i:
            continue
        p = Path(i).resolve()
        if o == p or o in p.parents or p in o.parents:
            raise PruneHeadsError(f"the output {out} would overwrite the input {i}; choose another -o")
