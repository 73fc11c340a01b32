"""Tie plans to the statistics they were compensated with, and refuse every mismatch with a clear message.

A plan records ``compensation = {mode, sequential, ridge, moments: {fingerprint, num_tokens, data}}``.
Whatever later applies the plan (``eval --plan``, export, verification) rebuilds the same ``Compensation``
from the same moments, and refuses moments that are missing, from another model or data set, or of the
wrong shape.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prune_heads.compensation.moments import MOMENTS_FILE, Moments
from prune_heads.compensation.solve import Compensation, Compensator
from prune_heads.compensation.spec import CompensationSpec, as_spec
from prune_heads.errors import ModelMismatchError, PruneHeadsError

#: the compensation a plan was selected with, written beside the plan file (``plan.json`` ->
#: ``plan.compensation.safetensors``) so export and evaluation apply exactly it, sequential or not
SIDECAR_SUFFIX = ".compensation.safetensors"

RECALIBRATE = ("recompute them with `prune-heads calibrate MODEL --data DATA -o {where}` "
               "(calibration collects the moments by default)")


def load_moments(source: Any) -> Moments | None:
    """Moments from a ``Moments``, a ``HeadScores`` (its ``moments``), a scores directory or a file; None if absent."""
    if source is None or isinstance(source, Moments):
        return source
    if hasattr(source, "per_sample_values"):  # HeadScores
        return getattr(source, "moments", None)
    p = Path(source)
    f = p / MOMENTS_FILE if p.is_dir() else p
    return Moments.load(f) if f.is_file() else None


def _where(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return "SCORES_DIR"


def require_moments(source: Any, spec: CompensationSpec) -> Moments:
    moments = load_moments(source)
    if moments is None:
        where = _where(source)
        raise PruneHeadsError(
            f"compensation {spec.mode!r} needs the calibration moments, but {where} has no {MOMENTS_FILE}; "
            + RECALIBRATE.format(where=where))
    return moments


def compensator_for(spec: CompensationSpec | str | dict | None, *, scores: Any = None, moments: Any = None,
                    model: Any = None, seqs: Sequence[Sequence[int]] | None = None, batch_size: int = 8,
                    pad_id: int = 0) -> Compensator | None:
    """The ``Compensator`` selection and evaluation use for ``spec`` (None for ``none``).

    ``scores`` is a ``HeadScores`` or a scores directory (its ``moments.safetensors``); ``moments`` overrides it.
    """
    spec = as_spec(spec)
    if not spec.active:
        return None
    m = None
    if not spec.sequential or moments is not None or scores is not None:
        m = load_moments(moments) if moments is not None else load_moments(scores)
        if m is None and not spec.sequential:
            require_moments(moments if moments is not None else scores, spec)
    return Compensator(spec, moments=m, model=model, seqs=seqs, batch_size=batch_size, pad_id=pad_id)


def _check_recorded(moments: Moments, recorded: dict[str, Any] | None) -> None:
    want = (recorded or {}).get("fingerprint")
    if want and moments.fingerprint() != want:
        data = moments.meta.get("data") or {}
        raise ModelMismatchError(
            f"these moments (fingerprint {moments.fingerprint()}, data {data.get('source', '?')}) are not the ones the "
            f"plan was compensated with (fingerprint {want}): they come from another model or data set; pass the "
            "scores directory the plan was selected with, or select again")


def compensation_for_plan(plan: Any, *, scores: Any = None, moments: Any = None, compensation: Any = None,
                          model: Any = None, config: Any = None, seqs: Sequence[Sequence[int]] | None = None,
                          batch_size: int = 8, pad_id: int = 0) -> Compensation | None:
    """The ``Compensation`` a plan asks for, rebuilt and checked; None when the plan zeroes (mode ``none``).

    Args:
        scores / moments: where the statistics are (a ``HeadScores``, a scores directory, a moments file).
        compensation: a ready ``Compensation`` or a file written by ``Compensation.save`` (sequential plans).
        model / config: what the statistics are checked against (a model checks the weights too).
        seqs: calibration sequences, to recompute a sequential compensation on ``model``.
    """
    entry = plan.selection.compensation
    spec = CompensationSpec.from_dict(entry)
    if not spec.active:
        return None
    recorded = (entry or {}).get("moments") or {}
    travelled = compensation is None and moments is None and scores is None
    if travelled:  # the file beside the plan, checked by its own fingerprint
        compensation = _sidecar(plan, entry or {})
    target = model if model is not None else config
    from prune_heads.model.adapters import get_adapter

    mask = plan.mask(get_adapter(target).layout(getattr(target, "config", target))) if target is not None else None
    if compensation is not None:
        comp = compensation if isinstance(compensation, Compensation) else Compensation.load(compensation)
        if comp.spec != spec:
            raise PruneHeadsError(f"the compensation file is {comp.spec.to_dict()} but the plan asks for {spec.to_dict()}")
        if not travelled and recorded.get("fingerprint") and \
                (comp.statistics or {}).get("fingerprint") != recorded["fingerprint"]:
            raise ModelMismatchError("the compensation file was solved from other statistics than the plan records; "
                                     "use the file written with the plan, or select again")
        if mask is not None:
            comp.check_matches(mask)
        return comp
    if spec.sequential:
        from prune_heads.model.sequential_engine import streamed_of

        if model is not None and streamed_of(model) is not None:
            raise PruneHeadsError("this plan's sequential compensation is solved on the whole model, which is run layer "
                                  "by layer here: use the compensation file saved beside the plan (drop --scores), or "
                                  "--engine memory")
        if model is None or not seqs:
            raise PruneHeadsError(
                "this plan uses sequential compensation, which is solved on the model from its calibration data: pass "
                "the model and the calibration sequences, or the compensation file saved with the plan")
        comp = Compensator(spec, model=model, seqs=seqs, batch_size=batch_size, pad_id=pad_id)(mask)
        if recorded.get("sequences_sha256") and comp.statistics.get("sequences_sha256") != recorded["sequences_sha256"]:
            raise ModelMismatchError("these calibration sequences are not the ones the plan was compensated on; use "
                                     "the scores file's data spec (same seed, samples and length)")
        return comp
    m = require_moments(moments if moments is not None else scores, spec)
    if target is None:
        raise PruneHeadsError("compensation_for_plan needs the model or its config to check the moments against")
    m.check(target)
    _check_recorded(m, recorded)
    return Compensator(spec, moments=m)(mask)


def sidecar_path(plan_path: str | os.PathLike) -> Path:
    p = Path(plan_path)
    return p.with_name(p.stem + SIDECAR_SUFFIX)


def save_beside_plan(plan: Any, compensation: Compensation, plan_path: str | os.PathLike) -> Path:
    """Write ``compensation`` beside ``plan_path`` and record its file and fingerprint in the plan.

    Call before the plan itself is written, so a plan file never names a compensation that is not there.
    """
    path = compensation.save(sidecar_path(plan_path))
    entry = dict(plan.selection.compensation or compensation.record())
    entry.update(file=path.name, fingerprint=compensation.fingerprint())
    plan.selection.compensation = entry
    return path


def _sidecar(plan: Any, entry: dict[str, Any]) -> Compensation | None:
    """The compensation file that travels with a loaded plan, checked against the plan's record; None if none."""
    name, where = entry.get("file"), getattr(plan, "path", None)
    if not name or where is None:
        return None
    path = Path(where).with_name(name)
    if not path.is_file():
        raise PruneHeadsError(f"the plan {where} was compensated with {name}, which is not beside it; copy it with "
                              "the plan, or pass the scores directory it was selected with (--scores)")
    comp = Compensation.load(path)
    if entry.get("fingerprint") and comp.fingerprint() != entry["fingerprint"]:
        raise ModelMismatchError(f"{path} is not the compensation this plan was selected with (its fingerprint "
                                 "differs); select again or restore the file")
    return comp


def record_of(compensator: Compensator | None) -> dict[str, Any]:
    """A plan's ``compensation`` entry for ``compensator`` (``{"mode": "none"}`` without one)."""
    if compensator is None:
        return {**CompensationSpec(mode="none").to_dict(), "moments": None}
    return compensator.record()


def evaluator_with(evaluator: Any, compensator: Compensator | None) -> Any:
    """``evaluator`` compensating with ``compensator``; None leaves the evaluator's own compensation (if any)
    alone. Evaluators that cannot compensate are refused when a compensation is asked for."""
    if evaluator is None or compensator is None:
        return evaluator
    if getattr(evaluator, "compensation", None) is compensator:
        return evaluator
    swap = getattr(evaluator, "with_compensation", None)
    if swap is None:
        raise PruneHeadsError("this evaluator cannot apply compensation (it has no with_compensation); build it "
                              "with make_evaluator(..., compensation=...)")
    return swap(compensator)
