"""``calibrate()``: one pass over the data scores every head with every forward score function.

Statistics stream out of the attention function per layer as ``(B, H)`` per-sequence values; nothing
per-token outlives the layer. ``grad`` (Michel et al.) is an opt-in second pass with a backward.
The same pass accumulates the moments of every layer's ``o_proj`` input (``moments=True``, the default),
which compensation is solved from, and the ``lsq_error`` scores are computed from them.
Under ``accelerate launch`` / ``torchrun`` each process takes every ``world``-th sample and the
per-sample values are gathered, so the result equals a single-process run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_heads.data import DataSpec, as_token_lists, batches
from prune_heads.errors import DataError
from prune_heads.finite import STATS_ADVICE, require_finite
from prune_heads.model.adapters import get_adapter
from prune_heads.model.attention import HeadControl, attach, refuse_sliced
from prune_heads.model.fingerprint import fingerprint
from prune_heads.scoring.distributed import gather_rows, rank_and_world
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.scoring.score_defs import (
    ABLATION,
    COMPENSATION,
    CUSTOM_SCORES,
    FORWARD_SCORES,
    GRADIENT,
    RAW_FORWARD,
    derive,
    validate_score_ids,
)


def default_scores() -> list[str]:
    """Every forward-pass score (``lsq_error`` is added on request, or computed from the moments when a
    selector ranks by it)."""
    return list(FORWARD_SCORES)


class ScoreCollector:
    """Receives one layer's raw per-sequence stats at a time and keeps ``(B, L, H)`` per raw score."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.layers: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, layer_idx: int, stats: dict[str, torch.Tensor]) -> None:
        self.layers[layer_idx] = {k: v.detach().float().cpu() for k, v in stats.items() if k in RAW_FORWARD}

    def take(self) -> dict[str, torch.Tensor]:
        if len(self.layers) != self.num_layers:
            raise RuntimeError(f"statistics came from {len(self.layers)} of {self.num_layers} layers")
        raw = {k: torch.stack([self.layers[i][k] for i in range(self.num_layers)], dim=1) for k in self.layers[0]}
        self.layers = {}
        return raw


def _model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embedding's device (with ``device_map="auto"`` layers may sit elsewhere)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _context(model: nn.Module) -> int | None:
    return getattr(get_adapter(model).text_config(model.config), "max_position_embeddings", None)


def _normalise_data(data: Any, tokenizer: Any, spec: DataSpec | None, model: nn.Module) -> tuple[list[list[int]], dict[str, Any]]:
    ctx = _context(model)
    if isinstance(data, str):
        if tokenizer is None:
            raise DataError("a text data spec needs a tokenizer (tokenizer=...)")
        spec = spec or DataSpec(source=data)
        spec.source = data
        from prune_heads.data import calibration_sequences

        documents: list[str] = []  # recorded, so ppl:/kl: evaluations of this source can leave them out
        seqs = calibration_sequences(spec, tokenizer, model, documents=documents)
        return seqs, {**spec.to_dict(), "documents": documents}
    seqs = as_token_lists(data)
    if spec is not None:
        if ctx is not None and spec.seq_len > ctx:
            raise DataError(f"seq_len {spec.seq_len} is beyond the model's context of {ctx} tokens")
        seqs = [s[: spec.seq_len] for s in seqs][: spec.num_samples or None]
    longest = max(len(s) for s in seqs)
    if ctx is not None and longest > ctx:
        raise DataError(f"a calibration sequence has {longest} tokens, beyond the model's context of {ctx}; "
                        f"truncate it (seq_len={ctx})")
    return seqs, {"source": "pre-tokenised", "num_samples": len(seqs)}


def calibrate(
    model: nn.Module,
    data: str | Iterable[Sequence[int] | torch.Tensor],
    *,
    scores: Iterable[str] | None = None,
    batch_size: int = 8,
    tokenizer: Any = None,
    num_samples: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    block_size: int | None = None,
    progress: bool = True,
    model_name: str | None = None,
    revision: str | None = None,
    moments: bool = True,
    moments_offload: bool = False,
    moments_relative: bool = True,
    ablation_compensation: Any = None,
) -> HeadScores:
    """Score every head of ``model`` on ``data``.

    Args:
        data: a data spec string (see ``prune_heads.data``; needs ``tokenizer``) or an iterable of
            token-id sequences (lists or 1-D tensors), each one sample.
        scores: score ids; default every forward-pass score. ``grad`` adds a backward pass;
            ``ablation_kl``/``ablation_loss`` run the batched ablation (see ``prune_heads.scoring.ablation``);
            ``lsq_error``/``lsq_error_group`` come from the moments (``prune_heads.compensation.greedy``).
        moments: accumulate the mean and covariance of every layer's ``o_proj`` input in the same pass
            (``HeadScores.moments``, saved as ``moments.safetensors``); compensation is solved from them.
        moments_offload: keep the float64 accumulators on the CPU instead of on each layer's device.
        moments_relative: also keep the sums weighted by ``1 / |h|^2`` (``lsq_error`` ranks best with them;
            twice the memory).
        ablation_compensation: measure the ablation scores with each head's removal compensated
            (``"lsq"``, ``"mean"`` or a ``CompensationSpec``, solved from these moments); default: zeroed.
    """
    wanted = validate_score_ids(scores or default_scores())
    if not moments and any(s in COMPENSATION for s in wanted):
        raise DataError(f"{', '.join(COMPENSATION)} are computed from the moments: calibrate with moments=True")
    refuse_sliced(model, "scoring the heads of")
    adapter = get_adapter(model)
    layout = adapter.layout(model.config)
    spec = None
    if num_samples is not None and num_samples < 1:
        raise DataError(f"num_samples must be at least 1, got {num_samples}")
    if isinstance(data, str) or num_samples is not None or seq_len is not None:
        default_n = 128 if isinstance(data, str) else None
        spec = DataSpec(source=data if isinstance(data, str) else "pre-tokenised",
                        num_samples=num_samples if num_samples is not None else default_n,
                        seq_len=seq_len or min(512, _context(model) or 512), seed=seed)
    seqs, data_meta = _normalise_data(data, tokenizer, spec, model)
    pad_id = 0
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        pad_id = int(tokenizer.pad_token_id)

    forward_ids = [s for s in wanted if s not in GRADIENT and s not in ABLATION and s not in COMPENSATION]
    rank, world = rank_and_world()
    mine = list(range(rank, len(seqs), world))
    my_seqs = [seqs[i] for i in mine]
    per_sample: dict[str, list[tuple[int, torch.Tensor]]] = {}
    stats = None
    model_fingerprint = fingerprint(model)  # before the pass: it also refuses NaN/Inf weights, naming the tensor
    if forward_ids or moments:
        per_sample, stats = _forward_pass(model, my_seqs, mine, forward_ids, batch_size=batch_size, pad_id=pad_id,
                                          block_size=block_size, moments=moments, offload=moments_offload,
                                          relative=moments_relative, progress=progress and rank == 0)

    if "grad" in wanted:
        g = gradient_scores(model, my_seqs, batch_size=batch_size, pad_id=pad_id, progress=progress and rank == 0)
        per_sample["grad"] = [(mine[r], g[r]) for r in range(len(my_seqs))]

    per_sample = gather_rows(per_sample)
    stacked = {k: torch.stack([t for _, t in sorted(rows, key=lambda r: r[0])]) for k, rows in per_sample.items()}
    for k, v in stacked.items():
        require_finite(v, f"score {k}", STATS_ADVICE, axis_names=("sample", "layer", "head"))
    meta = {
        "model": model_name or getattr(model.config, "name_or_path", None),
        "revision": revision,
        "model_type": model.config.model_type,
        "family": adapter.name,
        "fingerprint": model_fingerprint,
        "num_layers": layout.num_layers,
        "num_heads": layout.num_heads,
        "num_kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "data": data_meta,
        "num_samples": len(seqs),
        "num_tokens": int(sum(len(s) for s in seqs)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "world_size": world,
    }
    result = HeadScores(stacked, meta)
    if stats is not None:
        from prune_heads.compensation.moments import model_meta

        stats.meta.update({**model_meta(model), "data": data_meta, "num_samples": len(seqs)})
        result.moments = stats
        _add_lsq_scores(model, result, wanted)
    if any(s in ABLATION for s in wanted):
        from prune_heads.scoring.ablation import ablation_scores

        compensator = None
        if ablation_compensation is not None:
            from prune_heads.compensation.plans import compensator_for

            compensator = compensator_for(ablation_compensation, moments=stats)
        abl = ablation_scores(model, seqs, scores=[s for s in wanted if s in ABLATION], batch_size=batch_size,
                              pad_id=pad_id, progress=progress, compensation=compensator)
        result = result.merged(abl)  # also when no forward score was asked: merged() keeps the moments and records
    return result


def _forward_pass(model: nn.Module, seqs: list[list[int]], index: list[int], forward_ids: list[str], *,
                  batch_size: int, pad_id: int, block_size: int | None, moments: bool, offload: bool,
                  relative: bool, progress: bool) -> tuple[dict[str, list[tuple[int, torch.Tensor]]], Any]:
    """One pass: per-sample forward scores (through the attention function) and, optionally, the moments."""
    from prune_heads.compensation.moments import MomentsCollector

    layout = get_adapter(model).layout(model.config)
    device = _model_device(model)
    per_sample: dict[str, list[tuple[int, torch.Tensor]]] = {}
    collector = ScoreCollector(layout.num_layers)
    control = None
    if forward_ids:
        control = HeadControl(sink=collector, block_size=block_size,
                              need_fhon=any(s.startswith("fhon") for s in forward_ids) or bool(CUSTOM_SCORES))
    stats = MomentsCollector(model, offload=offload, relative=relative) if moments else None
    bar = tqdm(total=len(seqs), desc="calibrating", unit="seq", disable=not progress)
    try:
        with attach(model, control) if control is not None else contextlib.nullcontext(), torch.no_grad():
            for idx, ids, mask in batches(seqs, batch_size, pad_id):
                if stats is not None:
                    stats.set_mask(mask)
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
                if control is not None:
                    for sid, v in derive(collector.take(), forward_ids).items():
                        per_sample.setdefault(sid, []).extend((index[i], v[r]) for r, i in enumerate(idx))
                bar.update(len(idx))
    finally:
        bar.close()
        if stats is not None:
            stats.remove()
    return per_sample, (stats.result() if stats is not None else None)


def _add_lsq_scores(model: nn.Module, result: HeadScores, wanted: list[str]) -> None:
    """The requested ``lsq_error`` scores (whole-set values, no per-sample rows) from the moments."""
    want = [s for s in wanted if s in COMPENSATION]
    if not want:
        return
    from prune_heads.compensation.greedy import lsq_error_scores

    values, record = lsq_error_scores(model, result.moments)
    for sid in want:
        result.means[sid] = values[sid]
    result.meta["lsq_error"] = record


def gradient_scores(model: nn.Module, seqs: list[list[int]], *, batch_size: int, pad_id: int, progress: bool = True) -> torch.Tensor:
    """``|∂L/∂ξ_h|`` per sequence for a gate ``ξ_h = 1`` on each head's output (Michel et al., 2019).

    The gates are per batch row, so one backward gives every sequence's own gradient.
    """
    adapter = get_adapter(model)
    layout = adapter.layout(model.config)
    device = _model_device(model)
    if not seqs:  # a data-parallel rank with no sample of its own
        return torch.zeros(0, layout.num_layers, layout.num_heads)
    rows: list[torch.Tensor] = []
    bar = tqdm(total=len(seqs), desc="gradient scores", unit="seq", disable=not progress)
    for _, ids, mask in batches(seqs, batch_size, pad_id):
        bsz = ids.shape[0]
        gates = {i: torch.ones(bsz, layout.num_heads, device=device, requires_grad=True) for i in range(layout.num_layers)}
        with attach(model, HeadControl(scale=dict(gates))), torch.enable_grad():
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            valid = (mask[:, 1:] * mask[:, :-1]).float()
            loss_per_seq = (nll * valid).sum(-1) / valid.sum(-1).clamp_min(1)
            grads = torch.autograd.grad(loss_per_seq.sum(), [gates[i] for i in range(layout.num_layers)])
        rows.extend(torch.stack([g.abs().detach().float().cpu() for g in grads], dim=1))  # (B, L, H)
        bar.update(bsz)
    bar.close()
    return torch.stack(rows)
