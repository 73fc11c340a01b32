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


def preflight_line(line: str) -> None:
    """A command's estimated peak memory (``sequential_engine.engine_for``'s ``estimate``), on stderr before any
    slow work, as ``prune-heads run`` prints one for every stage; stdout keeps the command's result lines."""
    click.echo(line, err=True)


def output_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--overwrite", is_flag=True, help="Replace an existing output.")(f)
        return click.option("-o", "--output", required=True, type=click.Path(), help=help)(f)

    return apply


def local_path(spec: str | None) -> str | None:
    """The file or folder behind a data or task spec (``mc:F``, ``ppl:F``, ``F#field``, ``F@split``), if any."""
    if not spec or spec.startswith("passkey:"):
        return None
    for prefix in ("mc:", "ppl:", "kl:"):
        if spec.startswith(prefix):
            spec = spec[len(prefix):]
    return spec.split("#", 1)[0].split("@", 1)[0] or None


def check_output(output: Any, overwrite: bool, inputs: tuple[Any, ...] = (), *, kind: str = "directory") -> None:
    """Before any work: refuse an existing output without --overwrite, and an output that is, holds or lies
    inside one of the command's inputs (model, scores, plan, data and task files)."""
    from prune_heads.io_utils import check_output_dir

    check_output_dir(output, overwrite, inputs=[i for i in inputs if i], kind=kind)


def check_sources(model: ModelConfig | None = None, *, lengths: tuple[tuple[str, int | None], ...] = (),
                  data: tuple[str | None, ...] = (), tasks: tuple[str | None, ...] = ()) -> None:
    """Before loading the model: the recipe runner's preflight (``pipeline.preflight.check_sources``): the
    model resolves, ``lengths`` (``(option, tokens)``) fit its context, every data spec yields a document and
    every task exists, so a typo or a binary file is found in seconds, not after a model load."""
    from prune_heads.pipeline.preflight import check_sources as preflight

    preflight(model, lengths=lengths, data=[("--data", d) for d in data], tasks=[("--task", t) for t in tasks])
