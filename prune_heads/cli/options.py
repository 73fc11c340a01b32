"""Options shared by several commands (model loading)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--dtype, --device, --device-map, --gguf-file, --revision, --trust-remote-code."""
    opts = [
        click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16, float16 or auto."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)."),
        click.option("--device-map", default=None, help="'auto' to spread a large model over GPUs (accelerate)."),
        click.option("--gguf-file", default=None, help="GGUF file name inside MODEL's directory."),
        click.option("--revision", default=None, help="Hub revision of MODEL."),
        click.option("--trust-remote-code", is_flag=True, help="Allow modelling code from the checkpoint."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def load_from_options(model: str, dtype: str, device: str | None, device_map: str | None, gguf_file: str | None,
                      revision: str | None, trust_remote_code: bool):
    import torch

    from prune_heads.model.loading import load_model

    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(model, dtype=dtype, device=device, device_map=device_map, gguf_file=gguf_file,
                      revision=revision, trust_remote_code=trust_remote_code)
