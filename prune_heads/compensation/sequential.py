"""Sequential compensation (SparseGPT / GPTQ order): layer ``l`` is solved from the statistics of the model
whose layers before ``l`` are already pruned and compensated.

One pass, layer by layer, over cached hidden states: the inputs of every decoder layer (masks, rotary
tables) are captured from one ordinary forward per batch; then for ``l = 0 .. L-1`` layer ``l`` runs on the
current hidden states to collect its ``o_proj`` statistics (only when it loses heads), its compensation is
solved, and it runs again compensated to give layer ``l + 1``'s inputs. Layers that lose nothing run once.
Cost: about one forward, plus one extra attention-and-MLP pass of each pruned layer; memory: the hidden
states of all calibration tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_heads.compensation.apply import CompensationHooks
from prune_heads.compensation.moments import Moments, MomentsCollector, model_meta
from prune_heads.compensation.record import Compensation, sequences_sha
from prune_heads.compensation.spec import CompensationSpec
from prune_heads.errors import PruneHeadsError
from prune_heads.model.replay import hidden_of

#: relative tolerance of the check that running layers one by one reproduces the model's forward
REPLAY_TOL = 1e-4


def _strip(captured: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """Drop the captured hidden states (only the other inputs are reused): L x activations saved."""
    args, kwargs = captured
    if args:
        return (None, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": None}


def _capture(model: nn.Module, layers: nn.ModuleList, seqs: list[list[int]], batch_size: int, pad_id: int
             ) -> list[tuple[torch.Tensor, dict[int, tuple[tuple, dict]], torch.Tensor]]:
    from prune_heads.data import batches
    from prune_heads.model.replay import Capture, layer_call

    device = next(model.parameters()).device
    cached = []
    for b, (_, ids, mask) in enumerate(batches(seqs, batch_size, pad_id)):
        ids, mask = ids.to(device), mask.to(device)
        cap = Capture(layers)
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        finally:
            cap.remove()
        if len(cap.inputs) != len(layers):
            raise PruneHeadsError("sequential compensation could not capture every decoder layer's input")
        if b == 0:  # the replay must reproduce the model: check one layer step per layer on this batch
            for j in range(len(layers) - 1):
                got = layer_call(layers[j], cap.inputs[j], hidden_of(cap.inputs[j]), ids.shape[0], 1)
                want = hidden_of(cap.inputs[j + 1])
                keep = mask.bool()
                err = float((got[keep] - want[keep]).abs().max())
                if err > REPLAY_TOL * max(1.0, float(want[keep].abs().max())):
                    raise PruneHeadsError(
                        f"sequential compensation: running decoder layer {j} from its cached inputs does not "
                        f"reproduce this model's forward (max difference {err:.2e}); use non-sequential compensation")
        hidden = hidden_of(cap.inputs[0])
        cached.append((mask, {j: _strip(c) for j, c in cap.inputs.items()}, hidden))
    return cached


@torch.no_grad()
def sequential_compensation(model: nn.Module, seqs: Sequence[Sequence[int]], removed: torch.Tensor,
                            spec: CompensationSpec, *, batch_size: int = 8, pad_id: int = 0, progress: bool = False,
                            cache: dict[str, Any] | None = None) -> tuple[Compensation, Moments]:
    """The sequential ``Compensation`` of ``removed`` (``(L, H)`` bool) and the statistics it used (each
    layer solved with the same ``solve_layer`` as the non-sequential mode)."""
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.replay import layer_call

    adapter = get_adapter(model)
    layout = adapter.layout(model.config)
    layers = adapter.layers(model)
    removed = removed.bool().cpu()
    seqs = [list(map(int, s)) for s in seqs]
    if not seqs:
        raise PruneHeadsError("sequential compensation needs calibration sequences")
    if cache is not None and "captured" in cache:
        cached = cache["captured"]
    else:
        cached = _capture(model, layers, seqs, batch_size, pad_id)
        if cache is not None:
            cache["captured"] = cached
    hidden = [h for _, _, h in cached]
    collector = MomentsCollector(model)
    hooks = CompensationHooks(model)  # registered after the collector: the collector sees the raw input
    comps: dict[int, Any] = {}
    bar = tqdm(total=layout.num_layers, desc="sequential compensation", unit="layer", disable=not progress)
    try:
        for j in range(layout.num_layers):
            heads = removed[j].nonzero().flatten().tolist()
            if heads:
                for (mask, caps, _), h in zip(cached, hidden):
                    collector.set_mask(mask)
                    layer_call(layers[j], caps[j], h, mask.shape[0], 1)
                collector.enabled = False
                stats = _layer_moments(collector, j)
                comps[j] = _solve(spec, stats, j, heads, layout)
                hooks.base[j] = comps[j]
            new_hidden = []
            for (mask, caps, _), h in zip(cached, hidden):
                collector.set_mask(mask)
                new_hidden.append(layer_call(layers[j], caps[j], h, mask.shape[0], 1))
            collector.enabled = True
            hidden = new_hidden
            bar.update(1)
    finally:
        bar.close()
        collector.remove()
        hooks.remove()
    moments = collector.result({**model_meta(model), "sequential": True, "removed": removed.nonzero().tolist(),
                                "data": {"source": "pre-tokenised", "num_samples": len(seqs)}}, reduce=False)
    stats = {**moments.summary(), "sequential": True, "num_sequences": len(seqs), "sequences_sha256": sequences_sha(seqs)}
    comp = Compensation(spec, comps, layout.num_layers, layout.num_heads, layout.head_dim, stats)
    return comp, moments


def _layer_moments(collector: MomentsCollector, layer: int) -> Moments:
    """A one-layer ``Moments`` view of what the collector has for ``layer`` so far."""
    c = collector
    return Moments(c.count[layer].reshape(1).cpu(), [c.sums[layer]], [c.grams[layer]],
                   c.resid_sq[layer].reshape(1).cpu(), c.resid_inv[layer].reshape(1).cpu())


def _solve(spec: CompensationSpec, stats: Moments, layer: int, heads: list[int], layout: Any):
    from prune_heads.compensation.solve import precision, solve_layer

    prec = precision(stats.covariance(0), spec.ridge, layer=layer) if spec.mode == "lsq" else None
    return solve_layer(stats.mean(0), prec, heads, layout.num_heads, layout.head_dim, spec.mode)
