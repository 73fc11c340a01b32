"""Fold a ``Compensation`` into the weights as the tensors stream: ``o_proj`` kept columns and bias.

For a layer that lost heads, ``o_proj.weight`` becomes ``W T`` (kept columns ``W_K + W_R A``, removed
columns 0) before the format's slicing rule runs, and ``o_proj.bias`` becomes ``b + W_R c``; where the
source has no ``o_proj.bias`` a new tensor is written right after the weight. Formats whose stock class
gets the bias from a config switch that biases q/k/v as well (``attention_bias``) also get zero q/k/v
biases. Each fold is computed in float64 from the source tensor and cast back to its dtype.

The bias needs ``W_R``; when a checkpoint lists ``o_proj.bias`` before ``o_proj.weight`` the weight is
read from its shard on demand, so memory stays at one tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from prune_heads.compensation.record import Compensation
from prune_heads.export.streaming import SourceCheckpoint
from prune_heads.model.adapters import FamilyAdapter, HeadLayout

Rule = Any


class CompensationFold:
    """Rules and extra tensors that fold ``comp`` into a streamed checkpoint."""

    def __init__(self, adapter: FamilyAdapter, layout: HeadLayout, comp: Compensation, src: SourceCheckpoint, *,
                 bias_every_layer: bool, zero_biases: tuple[str, ...] = ()) -> None:
        self.adapter, self.layout, self.comp, self.src = adapter, layout, comp, src
        self.bias_every_layer = bias_every_layer
        self.zero_biases = zero_biases
        self._delta: dict[int, torch.Tensor] = {}
        self.added_params = 0
        self._o_weight = {self._name(i, adapter.o_name, "weight"): i for i in range(layout.num_layers)}
        self._zero_weight = {self._name(i, proj, "weight"): (i, proj) for i in range(layout.num_layers)
                             for proj in zero_biases}

    def _name(self, layer: int, proj: str, kind: str) -> str:
        return f"{self.adapter.attn_prefix(layer)}{proj}.{kind}"

    def _has(self, name: str) -> bool:
        return name in self.src.weight_map

    # ---- the fold ---------------------------------------------------------------------------------
    def delta(self, layer: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``W_R c`` of ``layer`` (float64), from ``weight`` or read from the source."""
        if layer not in self._delta:
            if weight is None:
                from safetensors import safe_open

                name = self._name(layer, self.adapter.o_name, "weight")
                with safe_open(str(self.src.path / self.src.weight_map[name]), framework="pt") as f:
                    weight = f.get_tensor(name)
            self._delta[layer] = self.comp.layers[layer].bias_delta(weight)
        return self._delta[layer]

    def wrap(self, rules: dict[str, Rule]) -> dict[str, Rule]:
        """``rules`` with the compensated layers' ``o_proj`` weight (and existing bias) folded first."""
        out = dict(rules)
        for i in self.comp.layers:
            w_name = self._name(i, self.adapter.o_name, "weight")
            b_name = self._name(i, self.adapter.o_name, "bias")
            out[w_name] = self._weight_rule(i, rules.get(w_name))
            if self._has(b_name):
                out[b_name] = self._bias_rule(i, rules.get(b_name))
        return out

    def _weight_rule(self, layer: int, inner: Rule | None) -> Rule:
        lc = self.comp.layers[layer]

        def rule(t: torch.Tensor) -> torch.Tensor | None:
            self.delta(layer, t)
            folded = lc.fold(t)[0].to(t.dtype)
            return inner(folded) if inner is not None else folded

        return rule

    def _bias_rule(self, layer: int, inner: Rule | None) -> Rule:
        def rule(b: torch.Tensor) -> torch.Tensor | None:
            new = (b.double() + self.delta(layer).to(b.device)).to(b.dtype)
            return inner(new) if inner is not None else new

        return rule

    # ---- new tensors ------------------------------------------------------------------------------
    def extras(self, name: str, written: torch.Tensor | None, source: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors to write after ``name`` (the source tensor ``source``; ``written`` is what was written)."""
        layer = self._o_weight.get(name)
        if layer is not None:
            b_name = self._name(layer, self.adapter.o_name, "bias")
            if not self._has(b_name) and (layer in self.comp.layers or self.bias_every_layer):
                if layer in self.comp.layers:
                    bias = self.delta(layer, source).to(source.dtype)
                else:
                    bias = torch.zeros(source.shape[0], dtype=source.dtype)
                self.added_params += bias.numel()
                yield b_name, bias
        hit = self._zero_weight.get(name)
        if hit is not None and written is not None:
            b_name = self._name(hit[0], hit[1], "bias")
            if not self._has(b_name):
                self.added_params += written.shape[0]
                yield b_name, torch.zeros(written.shape[0], dtype=written.dtype)


def provenance(comp: Compensation | None) -> dict[str, Any]:
    """What ``prune_heads.json`` (and the model card) record about the folded compensation."""
    if comp is None or not comp.spec.active:
        return {"mode": "none"}
    return {**comp.record(), "fingerprint": comp.fingerprint(), "layers": sorted(comp.layers),
            "o_proj_bias": "added" if comp.layers else "none"}
