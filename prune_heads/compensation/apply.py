"""Apply a ``Compensation`` to a model: live through ``o_proj`` pre-hooks, or folded into a model's weights.

The live form never touches a weight: a forward pre-hook on each ``o_proj`` replaces the removed heads'
slots of its input by their prediction, ``x_R := A x_K + c``; leaving the ``with`` block removes the
hooks. Because ``o_proj(x') = W_K x_K + W_R (A x_K + c) + b``, this is exactly the folded model of the
export, and it composes with the static mask (the mask zeroes ``x_R`` first; the hook overwrites it).

Batched ablation runs many copies of a batch in one pass, each removing another unit; ``set_rows`` gives
one layer a different correction per copy (rows are copy-major, ``B`` rows per copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from prune_heads.compensation.record import Compensation, LayerCompensation
from prune_heads.errors import PruneHeadsError


def _check_geometry(model: nn.Module, comp: Compensation) -> None:
    from prune_heads.model.adapters import get_adapter

    layout = get_adapter(model).layout(model.config)
    if (layout.num_layers, layout.num_heads, layout.head_dim) != (comp.num_layers, comp.num_heads, comp.head_dim):
        raise PruneHeadsError(
            f"the compensation is for {comp.num_layers} layers x {comp.num_heads} heads of size {comp.head_dim}, the "
            f"model has {layout.num_layers} x {layout.num_heads} x {layout.head_dim}: it was made for another model")


class CompensationHooks:
    """``o_proj`` forward pre-hooks whose per-layer corrections can be changed between forwards."""

    def __init__(self, model: nn.Module) -> None:
        from prune_heads.model.adapters import get_adapter

        adapter = get_adapter(model)
        self.model = model
        self.base: dict[int, LayerCompensation] = {}
        self.rows: dict[int, tuple[list[LayerCompensation | None], int]] = {}
        self._handles = [adapter.o_proj(adapter.attention(layer)).register_forward_pre_hook(self._hook(i))
                         for i, layer in enumerate(adapter.layers(model))]

    def set(self, comp: Compensation | None) -> None:
        """Apply ``comp`` to every row (None: no correction); clears per-copy corrections."""
        if comp is not None:
            _check_geometry(self.model, comp)
        self.base = dict(comp.layers) if comp is not None else {}
        self.rows = {}

    def set_rows(self, layer: int, per_copy: Sequence[LayerCompensation | None], batch: int) -> None:
        """Copy ``c`` (rows ``c*batch:(c+1)*batch``) of ``layer`` gets ``per_copy[c]`` instead of the base."""
        self.rows[layer] = (list(per_copy), batch)

    def clear_rows(self) -> None:
        self.rows = {}

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if i in self.rows:
                per_copy, batch = self.rows[i]
                if x.shape[0] != batch * len(per_copy):
                    raise RuntimeError(f"layer {i}: {x.shape[0]} rows for {len(per_copy)} copies of {batch}")
                parts = [lc.apply(x[c * batch:(c + 1) * batch]) if lc is not None else x[c * batch:(c + 1) * batch]
                         for c, lc in enumerate(per_copy)]
                return (torch.cat(parts, 0), *args[1:])
            lc = self.base.get(i)
            if lc is None:
                return None
            return (lc.apply(x), *args[1:])

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def apply_compensation(model: nn.Module, comp: Compensation | None) -> Iterator[CompensationHooks]:
    """Run ``model`` with ``comp`` applied at every ``o_proj`` inside the block (weights untouched)."""
    hooks = CompensationHooks(model)
    try:
        hooks.set(comp)
        yield hooks
    finally:
        hooks.remove()


@torch.no_grad()
def fold_into_model(model: nn.Module, comp: Compensation) -> nn.Module:
    """Fold ``comp`` into ``model``'s ``o_proj`` weights in place (a bias is added where there is none).

    The weights change for good: use it on a copy (verification builds its reference this way).
    """
    from prune_heads.model.adapters import get_adapter

    _check_geometry(model, comp)
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers(model)):
        lc = comp.layers.get(i)
        if lc is not None:
            fold_into_layer(adapter.o_proj(adapter.attention(layer)), lc)
    return model


def fold_into_layer(o: nn.Linear, lc: LayerCompensation) -> None:
    """Fold one layer's correction into its ``o_proj`` in place (the layer-sequential verification's step)."""
    w, b = lc.fold(o.weight, o.bias)
    o.weight.copy_(w.to(o.weight.dtype))
    if o.bias is None:
        o.bias = nn.Parameter(b.to(o.weight.dtype), requires_grad=False)
    else:
        o.bias.copy_(b.to(o.bias.dtype))
