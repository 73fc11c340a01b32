"""Measured head importance: what zeroing a head does to the model's next-token distribution.

The paper's scores are proxies; ``ablation_kl`` / ``ablation_loss`` measure the effect directly.
Done naively that is one full forward pass per head. Three things make it cheap, without changing
the numbers:

- many ablations share one pass: the batch is replicated along a "copy" axis and each copy zeroes a
  different head (``HeadControl.scale[layer]`` is a ``(copies * B, H)`` multiplier);
- the reference log-probabilities are computed once per batch;
- zeroing a head in layer ``l`` changes nothing before ``l``: the hidden states (and every keyword
  argument: masks, rotary embeddings) entering each decoder layer are captured once, and only layers
  ``l..L-1``, the final norm and the LM head are run for the copies;
- the KL needs no per-copy log-softmax over the vocabulary: with a linear LM head it follows from
  the hidden-state difference in one elementwise pass (``logit_shift``), as accurately as the direct
  formula. Families whose ``forward`` changes the LM head's output (``adapter.logit_transform``: Gemma's
  soft-cap) keep the direct formula.

The prefix reuse calls the decoder layers directly, so it is checked once per call against a full
forward; if a family does something between layers that the check catches, the code falls back to
replicated full forwards (still batched) with a warning.

Under compensation (``compensation=`` a ``prune_heads.compensation.Compensator``) each copy's removal is
compensated: the already-removed heads get their compensation in every layer, and in the layer a copy's
unit lives in, that copy gets the compensation of the removed heads plus its unit (a per-copy correction
at ``o_proj``, in the same replicated pass).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_heads.data import batches
from prune_heads.errors import PruneHeadsError
from prune_heads.model.adapters import get_adapter
from prune_heads.model.attention import HeadControl, attach
from prune_heads.model.replay import Capture, layer_call
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.scoring.logit_shift import LinearHeadReference
from prune_heads.scoring.score_defs import ABLATION

Head = tuple[int, int]
Unit = list[Head]

#: memory (bytes) the automatic ``heads_per_pass`` lets one pass use on CPU
CPU_PASS_BUDGET = 3 * 2**30


@dataclass
class AblationCost:
    """Work done, in units that compare with the naive loop (one full forward per head per sequence)."""

    passes: int = 0  # tail or full passes run
    layer_rows: float = 0.0  # sequences x decoder layers evaluated (replicated copies included)
    num_layers: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def forward_equivalents(self) -> float:
        """Sequence-forwards: ``layer_rows / L`` (a full forward of one sequence = 1)."""
        return self.layer_rows / self.num_layers

    def to_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "forward_equivalents": round(self.forward_equivalents, 2), **self.extra}


# ---- helpers ----------------------------------------------------------------------------------

def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """LM head plus whatever the family's ``forward`` does after it (``adapter.logit_transform``)."""
    return get_adapter(model).final_logits(model, hidden).float()


def _per_seq(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over real next-token positions of each sequence."""
    return (values * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _bytes_per_copy(model: nn.Module, batch: int, width: int) -> int:
    """Rough peak activation memory of one replicated copy in a tail pass (float32)."""
    cfg = get_adapter(model).text_config(model.config)
    layout = get_adapter(model).layout(model.config)
    inter = int(getattr(cfg, "intermediate_size", 4 * layout.hidden_size) or 4 * layout.hidden_size)
    per_token = 8 * layout.hidden_size + 3 * inter + 2 * layout.num_heads * width
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    return 4 * batch * width * per_token + 4 * batch * width * vocab // 4


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        import os

        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(min(CPU_PASS_BUDGET, avail * 0.25))
    except (ValueError, OSError, AttributeError):
        return CPU_PASS_BUDGET


# ---- the measurement --------------------------------------------------------------------------

class _Measurer:
    """One batch's reference, captured prefix, and the passes that measure units on it."""

    def __init__(self, model: nn.Module, removed: torch.Tensor, compensation: Any = None) -> None:
        self.model = model
        self.compensation = compensation
        self.hooks: Any = None
        self.base_comp = None
        self.seq_moments = None
        if compensation is not None and compensation.spec.active:
            if compensation.spec.sequential:
                self.base_comp, self.seq_moments = compensation.sequential(removed)
            else:
                self.base_comp = compensation(removed)
        adapter = get_adapter(model)
        self.layout = adapter.layout(model.config)
        self.layers = adapter.decoder(model).layers
        self.norm = adapter.final_norm(model)
        self.removed = removed
        self.control = HeadControl()
        self.base_scale = {i: (~removed[i]).float() for i in range(removed.shape[0]) if removed[i].any()}
        self.prefix_ok: bool | None = None

    @contextlib.contextmanager
    def compensating(self):
        """The ``o_proj`` hooks that apply the compensation, when there is one."""
        if self.base_comp is None:
            yield
            return
        from prune_heads.compensation.apply import CompensationHooks

        self.hooks = CompensationHooks(self.model)
        try:
            yield
        finally:
            self.hooks.remove()
            self.hooks = None

    def _pruned(self, on: bool) -> None:
        """Switch between the reference (nothing removed) and the pruned, compensated prefix."""
        self.control.scale = dict(self.base_scale) if on else {}
        if self.hooks is not None:
            self.hooks.set(self.base_comp if on else None)

    def _copy_comp(self, layer: int, unit: Unit):
        """The compensation of one copy's layer: removed heads of ``layer`` plus the unit's."""
        heads = set(self.removed[layer].nonzero().flatten().tolist()) | {h for i, h in unit if i == layer}
        if not heads:
            return None
        return self.compensation.layer(layer, sorted(heads), moments=self.seq_moments)

    def record(self, cost: AblationCost) -> None:
        """What the cost record says about how the measurement ran."""
        cost.extra["prefix_reuse"] = bool(self.prefix_ok)
        if self.compensation is not None:
            cost.extra["compensation"] = self.compensation.spec.mode

    def reset(self) -> None:
        self.control.scale = {}
        if self.hooks is not None:
            self.hooks.set(None)

    # reference + capture for one batch (called inside ``attach``)
    def prepare(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask
        self.batch = ids.shape[0]
        self.valid = (mask[:, 1:] * mask[:, :-1]).float()
        target = ids[:, 1:]
        self._pruned(False)
        cap = Capture(self.layers) if not self.removed.any() else None
        normed: list[torch.Tensor] = []
        grab = self.norm.register_forward_hook(lambda _m, _a, out: normed.append(out))
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        finally:
            grab.remove()
            if cap is not None:
                cap.remove()
        ref_lp = torch.log_softmax(logits, -1)
        self.ref_nll = _per_seq(-ref_lp.gather(-1, target[..., None]).squeeze(-1), self.valid)
        adapter = get_adapter(self.model)
        head = adapter.lm_head(self.model)
        self.linear_head = (adapter.logit_transform(self.model.config) is None and isinstance(head, nn.Linear)
                            and len(normed) == 1)
        if self.linear_head:
            hidden = normed[0][:, :-1]
            self.shift = LinearHeadReference.build(head.weight, hidden.reshape(-1, hidden.shape[-1]),
                                                   ref_lp.reshape(-1, ref_lp.shape[-1]))
        else:
            self.ref_lp, self.ref_p = ref_lp, ref_lp.exp()
        self.start_logits = logits
        if cap is None:  # the pruned model's prefix differs from the reference's
            cap = Capture(self.layers)
            self._pruned(True)
            try:
                self.start_logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            finally:
                cap.remove()
        self.captured = cap.inputs
        if len(self.captured) != len(self.layers):
            self.prefix_ok = False

    def _effects(self, hidden: torch.Tensor, want: list[str]) -> dict[str, torch.Tensor]:
        """Per-sequence KL / loss increase of one copy from its final normed hidden states ``(B, T, d)``."""
        target = self.ids[:, 1:, None]
        if not self.linear_head:
            lp = torch.log_softmax(_final_logits(self.model, hidden), -1)
            out = {}
            if "ablation_kl" in want:
                out["ablation_kl"] = _per_seq((self.ref_p * (self.ref_lp - lp)).sum(-1), self.valid)
            if "ablation_loss" in want:
                out["ablation_loss"] = _per_seq(-lp.gather(-1, target).squeeze(-1), self.valid) - self.ref_nll
            return out
        B, T, D = hidden.shape
        kl, dloss = self.shift.effects(hidden.reshape(B * T, D), target.reshape(B * T))
        per_pos = {"ablation_kl": kl.view(B, T).float(), "ablation_loss": dloss.view(B, T).float()}
        return {w: _per_seq(per_pos[w], self.valid) for w in want}

    def check_prefix(self) -> bool:
        """Does running layers 0..L-1 from the captured inputs reproduce the full forward?"""
        if self.prefix_ok is None:
            self._pruned(True)
            hidden = self.captured[0][0][0] if self.captured[0][0] else self.captured[0][1]["hidden_states"]
            for j in range(len(self.layers)):
                hidden = layer_call(self.layers[j], self.captured[j], hidden, self.batch, 1)
            logits = _final_logits(self.model, self.norm(hidden)[:, :-1])
            tol = 1e-4 * max(1.0, float(self.start_logits.abs().max()))
            self.prefix_ok = bool(((logits - self.start_logits).abs() * self.valid[..., None]).max() <= tol)
            if not self.prefix_ok:
                warnings.warn(
                    "ablation: running decoder layers from cached inputs does not reproduce this model's forward; "
                    "falling back to replicated full forward passes (correct, slower)", stacklevel=3)
        return self.prefix_ok

    def _scales(self, units: Sequence[Unit], start: int) -> dict[int, torch.Tensor]:
        k, B, H = len(units), self.batch, self.layout.num_heads
        scale: dict[int, torch.Tensor] = {j: s for j, s in self.base_scale.items() if j >= start}
        touched = sorted({layer for u in units for layer, _ in u})
        for j in touched:
            m = torch.ones(k, H) if j not in self.base_scale else self.base_scale[j].repeat(k, 1)
            for c, u in enumerate(units):
                for layer, h in u:
                    if layer == j:
                        m[c, h] = 0.0
            scale[j] = m.repeat_interleave(B, dim=0).to(self.ids.device)
            if self.hooks is not None:
                self.hooks.set_rows(j, [self._copy_comp(j, u) for u in units], B)
        return scale

    def run(self, units: Sequence[Unit], want: Iterable[str], cost: AblationCost) -> dict[str, torch.Tensor]:
        """``(copies, B)`` per-sequence values for ``units`` (each unit's heads zeroed together)."""
        k, B = len(units), self.batch
        start = min(layer for u in units for layer, _ in u)
        if not self.check_prefix():
            start = 0
        self._pruned(True)
        self.control.scale = self._scales(units, start)
        if start == 0 and not self.prefix_ok:
            ids = self.ids.repeat(k, 1)
            hidden = get_adapter(self.model).decoder(self.model)(input_ids=ids, attention_mask=self.mask.repeat(k, 1), use_cache=False).last_hidden_state
        else:
            args, kwargs = self.captured[start]
            hidden = (args[0] if args else kwargs["hidden_states"]).repeat(k, 1, 1)
            for j in range(start, len(self.layers)):
                hidden = layer_call(self.layers[j], self.captured[j], hidden, B, k)
            hidden = self.norm(hidden)
        cost.passes += 1
        cost.layer_rows += k * B * (len(self.layers) - start)
        want = list(want)
        out: dict[str, list[torch.Tensor]] = {w: [] for w in want}
        for c in range(k):  # the LM head one copy at a time bounds the (B, T, V) memory
            for w, v in self._effects(hidden[c * B:(c + 1) * B, :-1], want).items():
                out[w].append(v)
        self.reset()
        return {w: torch.stack(v) for w, v in out.items()}


def _group_by_start(units: Sequence[Unit]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(min(layer for layer, _ in u), []).append(i)
    return groups


def _checked_inputs(model: nn.Module, seqs: Sequence[Sequence[int]], units: Sequence[Unit], scores: Iterable[str],
                    removed: torch.Tensor | None, heads_per_pass: int | None) -> tuple[list[str], torch.Tensor]:
    """The requested ablation ids and the ``(L, H)`` removed mask, after refusing bad input before any work
    (each error names what to change)."""
    want = [s for s in scores if s in ABLATION]
    if not want:
        raise PruneHeadsError(f"ablation scores are {', '.join(ABLATION)}; got {list(scores)}")
    if not seqs:
        raise PruneHeadsError("ablation needs at least one calibration sequence")
    if any(len(s) < 2 for s in seqs):
        raise PruneHeadsError("ablation needs sequences of at least 2 tokens (one next-token prediction)")
    layout = get_adapter(model).layout(model.config)
    removed = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.bool) if removed is None else removed.bool().cpu()
    if tuple(removed.shape) != (layout.num_layers, layout.num_heads):
        raise PruneHeadsError(f"removed mask has shape {tuple(removed.shape)}, expected ({layout.num_layers}, {layout.num_heads})")
    for u in units:
        if not u:
            raise PruneHeadsError("an ablation unit has no heads")
        for layer, h in u:
            if not (0 <= layer < layout.num_layers and 0 <= h < layout.num_heads):
                raise PruneHeadsError(f"head [{layer}, {h}] is outside the model ({layout.num_layers} x {layout.num_heads})")
    if heads_per_pass is not None and heads_per_pass < 1:
        raise PruneHeadsError(f"heads_per_pass must be >= 1, got {heads_per_pass}")
    return want, removed


def _smaller_pass(error: BaseException, heads_per_pass: int, auto: bool, batch_size: int,
                  measurer: _Measurer, device: torch.device) -> int:
    """After running out of memory: half the ablations per pass when the size was guessed (``auto``: the
    activation estimate is rough), else the error that says what to set. Frees what the failed pass held."""
    measurer.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if auto and heads_per_pass > 1:
        return max(1, heads_per_pass // 2)
    raise PruneHeadsError(
        f"ablation ran out of memory with heads_per_pass={heads_per_pass}, batch_size={batch_size}: "
        f"set heads_per_pass (--heads-per-pass) to {max(1, heads_per_pass // 2)} or lower, "
        "or lower batch_size") from error


def measure_units(model: nn.Module, seqs: Sequence[Sequence[int]], units: Sequence[Unit], *,
                  scores: Iterable[str] = ABLATION, removed: torch.Tensor | None = None, batch_size: int = 8,
                  pad_id: int = 0, heads_per_pass: int | None = None, progress: bool = True,
                  desc: str = "ablation", compensation: Any = None) -> tuple[dict[str, torch.Tensor], AblationCost]:
    """Per-sequence effect ``(N, U)`` of zeroing each unit (a set of heads) on top of ``removed``.

    The reference is always the unpruned model: ``ablation_kl`` is ``KL(original || removed+unit)``
    and ``ablation_loss`` the LM-loss increase over the original, so values under different
    ``removed`` sets stay on one scale. With ``compensation`` (a ``Compensator``) every removal, the
    unit's included, is compensated instead of only zeroed.
    """
    want, removed = _checked_inputs(model, seqs, units, scores, removed, heads_per_pass)
    layout = get_adapter(model).layout(model.config)
    device = _device(model)
    groups = _group_by_start(units)
    width = max(len(s) for s in seqs)
    bsz = min(batch_size, len(seqs))
    auto = heads_per_pass is None
    if auto:
        biggest = max(len(g) for g in groups.values()) if groups else 1
        heads_per_pass = max(1, min(biggest, _memory_budget(device) // max(1, _bytes_per_copy(model, bsz, width))))
    result = {w: torch.full((len(seqs), len(units)), math.nan) for w in want}
    cost = AblationCost(num_layers=layout.num_layers)
    measurer = _Measurer(model, removed, compensation)
    bar = tqdm(total=len(units) * len(seqs), desc=desc, unit="head-seq", disable=not progress)
    with attach(model, measurer.control), measurer.compensating(), torch.no_grad():
        for idx, ids, mask in batches(seqs, batch_size, pad_id):
            measurer.prepare(ids.to(device), mask.to(device))
            cost.layer_rows += len(idx) * layout.num_layers * (2 if removed.any() else 1)
            for _, members in sorted(groups.items()):
                pos = 0
                while pos < len(members):
                    chunk = members[pos:pos + heads_per_pass]
                    try:
                        vals = measurer.run([units[i] for i in chunk], want, cost)
                    except (RuntimeError, torch.OutOfMemoryError) as e:
                        if not _is_oom(e):
                            raise
                        heads_per_pass = _smaller_pass(e, heads_per_pass, auto, batch_size, measurer, device)
                        continue
                    for w in want:
                        for c, ui in enumerate(chunk):
                            result[w][idx, ui] = vals[w][c].float().cpu()
                    pos += len(chunk)
                    bar.update(len(chunk) * len(idx))
    bar.close()
    cost.extra["heads_per_pass"] = heads_per_pass
    measurer.record(cost)
    return result, cost


def ablation_scores(model: nn.Module, seqs: Sequence[Sequence[int]], *, scores: Iterable[str] = ABLATION,
                    batch_size: int = 8, pad_id: int = 0, candidates: Iterable[Head] | None = None,
                    removed: torch.Tensor | None = None, heads_per_pass: int | None = None,
                    progress: bool = True, compensation: Any = None) -> HeadScores:
    """Leave-one-out ablation scores of single heads, as ``HeadScores`` (per-sample ``(N, L, H)``).

    Args:
        candidates: measure only these heads (e.g. a proxy's shortlist); the rest are NaN.
        removed: ``(L, H)`` bool, heads already zeroed; each score is then the effect of zeroing the
            head *in addition* (still relative to the unpruned model). Removed heads are NaN.
        heads_per_pass: ablations per replicated pass (memory); default: as many as fit.
        compensation: a ``Compensator``; each head's removal (and the ``removed`` ones) is compensated.
    """
    scores = list(scores)
    layout = get_adapter(model).layout(model.config)
    rm = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.bool) if removed is None else removed.bool().cpu()
    if candidates is None:
        heads = [(i, h) for i in range(layout.num_layers) for h in range(layout.num_heads)]
    else:
        heads = sorted({(int(i), int(h)) for i, h in candidates})
    heads = [x for x in heads if not (0 <= x[0] < rm.shape[0] and 0 <= x[1] < rm.shape[1] and rm[x])]
    seqs = [list(map(int, s)) for s in seqs]
    vals, cost = measure_units(model, seqs, [[x] for x in heads], scores=scores, removed=rm, batch_size=batch_size,
                               pad_id=pad_id, heads_per_pass=heads_per_pass, progress=progress,
                               compensation=compensation)
    per_sample = {}
    for sid, v in vals.items():
        full = torch.full((len(seqs), layout.num_layers, layout.num_heads), math.nan)
        for j, (i, h) in enumerate(heads):
            full[:, i, h] = v[:, j]
        per_sample[sid] = full
    meta = {
        "num_layers": layout.num_layers,
        "num_heads": layout.num_heads,
        "num_samples": len(seqs),
        "num_tokens": int(sum(len(s) for s in seqs)),
        "ablation": {
            "measured_heads": len(heads),
            "removed": [list(x) for x in rm.nonzero().tolist()],
            "reference": "unpruned model",
            "cost": cost.to_dict(),
            "naive_forward_equivalents": len(heads) * len(seqs),
            "compensation": compensation.record() if compensation is not None else {"mode": "none"},
        },
    }
    return HeadScores(per_sample, meta)
