"""Replaying one decoder layer on inputs captured from a forward pass.

Ablation scoring and sequential compensation both run the model once, keep every decoder layer's input
(``Capture``), and then call single layers again on other hidden states (``layer_call``), with the batch
tiled when several variants run side by side (``replicate``). Both need it, so it lives with the model
rather than in either of them (it was ``scoring.ablation``'s, which made compensation import scoring).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def hidden_of(captured: tuple[tuple, dict]) -> torch.Tensor:
    """The hidden states a decoder layer was called with (its first argument, or the ``hidden_states`` keyword)."""
    args, kwargs = captured
    return args[0] if args else kwargs["hidden_states"]


def replicate(x: Any, batch: int, copies: int) -> Any:
    """Tile batch-shaped tensors ``copies`` times (copy-major), recursing into tuples/lists/dicts.

    Tensors whose leading axis is 1 broadcast and are left alone (rotary tables, shared masks).
    """
    if isinstance(x, torch.Tensor):
        if batch > 1 and x.dim() >= 2 and x.shape[0] == batch:
            return x.repeat(copies, *([1] * (x.dim() - 1)))
        return x
    if isinstance(x, tuple):
        return tuple(replicate(v, batch, copies) for v in x)
    if isinstance(x, list):
        return [replicate(v, batch, copies) for v in x]
    if isinstance(x, dict):
        return {k: replicate(v, batch, copies) for k, v in x.items()}
    return x


class Capture:
    """Forward pre-hooks that keep every decoder layer's input (args and kwargs) of one forward."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.inputs: dict[int, tuple[tuple, dict]] = {}
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs[i] = (args, dict(kwargs))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def layer_call(layer: nn.Module, captured: tuple[tuple, dict], hidden: torch.Tensor, batch: int, copies: int) -> torch.Tensor:
    args, kwargs = captured
    kwargs = replicate(kwargs, batch, copies)
    if args:
        args = (hidden, *replicate(args[1:], batch, copies))
    else:
        kwargs["hidden_states"] = hidden
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


__all__ = ["Capture", "layer_call", "replicate"]
