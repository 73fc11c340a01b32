"""The Python front end: one function per stage, each taking the stage's typed config.

The configs are the API (as peft's ``get_peft_model(model, config)`` and torchao's ``quantize_(model,
config)`` are): a ``SelectConfig()`` in Python has the same defaults as ``prune-heads select`` and a
recipe's ``select:`` section (``lsq`` compensation, confidence 0.9, held-out verification), and
``export_model`` verifies the export as ``prune-heads export`` does. Every function is a thin wrapper
over the stage's ``run_*`` function, the one the CLI command and the recipe runner call, so the three
front ends cannot drift apart (``tests/test_front_ends.py``)::

    import prune_heads as ph
    lm = ph.load_model("smollm2")
    scores = ph.calibrate_model(lm, ph.CalibrateConfig(data="wikitext2"))
    plan = ph.select_heads(lm, scores, ph.SelectConfig(task="arc_easy", max_drop=0.01), "plan.json")
    ph.export_model(lm, plan, "smollm2-pruned")

``model`` is a ``ModelConfig``, a model spec (Hub id, folder, GGUF, ``smollm2``) or a ``LoadedModel``
from ``load_model``; pass a ``LoadedModel`` to load the weights once for several stages (a spec or a
``ModelConfig`` is loaded by each call). A spec or ``ModelConfig`` goes through the same engine choice as the
CLI and the recipe runner (the config's ``engine``, ``auto`` by default): a model that does not fit in memory
runs layer by layer, streamed from its shards, with the same results; a ``LoadedModel`` is already whole.
Export streams the source's files, so it reads the source the ``LoadedModel`` was loaded from.

The keyword-argument functions these stages are built on (``scoring.calibrate.calibrate``,
``selection.static.select_static``, ``export.checkpoint.export_checkpoint`` ...) stay in their modules as the
low-level layer: they take every choice as an argument and default to none of the front ends' policies
(``select_static`` does not compensate and judges at confidence 0 unless told), so they are not exported
from ``prune_heads``.

This module imports no torch: the stages load it when called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prune_heads.evaluation.stage import EvalTask, EvaluateConfig
from prune_heads.export.stage import ExportConfig, VerifyConfig
from prune_heads.model.config import ModelConfig
from prune_heads.scoring.stage import CalibrateConfig
from prune_heads.selection.stage import SelectConfig

PathLike = str | os.PathLike


def _model(model: Any) -> tuple[ModelConfig, Any]:
    """``(ModelConfig, LoadedModel or None)`` of whatever the caller passed as the model."""
    if isinstance(model, ModelConfig):
        return model, None
    if isinstance(model, (str, os.PathLike)):
        return ModelConfig(id=str(model)), None
    if hasattr(model, "model") and hasattr(model, "tokenizer") and hasattr(model, "source"):  # a LoadedModel
        return ModelConfig(id=str(model.source), revision=getattr(model, "revision", None),
                           gguf_file=getattr(model, "gguf_file", None),
                           trust_remote_code=bool(getattr(model, "trust_remote_code", False))), model
    from prune_heads.errors import PruneHeadsError

    raise PruneHeadsError(f"model must be a ModelConfig, a model spec or a LoadedModel (load_model), not "
                          f"{type(model).__name__}")


def _loaded(model: Any, engine_of: Any) -> tuple[ModelConfig, Any]:
    """``(ModelConfig, the model to run)``: a ``LoadedModel`` as given (it is already whole); a spec or a
    ``ModelConfig`` loaded as the CLI and the recipe runner load it for this stage: ``engine_of(mc)`` (the stage's
    ``*_engine``, which honours the config's ``engine`` and judges the fit before anything loads) says whole, or
    a layer-by-layer skeleton streamed from the shards when the model does not fit."""
    mc, loaded = _model(model)
    if loaded is not None:
        return mc, loaded
    from prune_heads.model.sequential_engine import load_for

    return mc, load_for(engine_of(mc), mc)


def _scores(scores: Any) -> Any:
    if isinstance(scores, (str, os.PathLike)):
        from prune_heads.scoring.head_scores import HeadScores

        return HeadScores.load(scores)
    return scores


def _plan(plan: Any) -> Any:
    if isinstance(plan, (str, os.PathLike)):
        from prune_heads.plan import Plan

        return Plan.load(plan)
    return plan


def calibrate_model(model: Any, config: CalibrateConfig, out: PathLike | None = None, *, overwrite: bool = False,
                    progress: bool = True) -> Any:
    """Score every head (``prune-heads calibrate``); returns the ``HeadScores`` (also written to ``out`` when given)."""
    from prune_heads.scoring.stage import calibrate_engine, run_calibrate, run_calibrate_sequential

    mc, loaded = _model(model)
    if loaded is None and calibrate_engine(config, mc) == "sequential":
        from prune_heads.scoring.head_scores import HeadScores

        # layer by layer, the moments go to disk layer by layer and are never held whole by the stage: read the
        # scores back (moments included, as the whole-model path returns them) from where they were written
        if out is not None:
            run_calibrate_sequential(config, mc, mc.id, Path(out), overwrite=overwrite, progress=progress)
            return HeadScores.load(out)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="prune-heads-calibrate-") as tmp:  # its per-layer files, then gone
            run_calibrate_sequential(config, mc, mc.id, Path(tmp) / "scores", progress=progress)
            return HeadScores.load(Path(tmp) / "scores", lazy_moments=False)  # the file goes with the directory
    res = run_calibrate(config, loaded if loaded is not None else mc.load(), mc.id,
                        Path(out) if out is not None else None, revision=mc.revision, overwrite=overwrite,
                        progress=progress)
    return res.scores


def select_heads(model: Any, scores: Any, config: SelectConfig, out: PathLike | None = None, *,
                 overwrite: bool = False, progress: bool = True) -> Any:
    """Choose the heads to remove (``prune-heads select``); returns the ``Plan`` (written to ``out`` when given,
    with its compensation file beside it, which ``export_model`` then applies)."""
    from prune_heads.selection.stage import run_select, select_engine

    mc, loaded = _loaded(model, lambda mc: select_engine(config, mc))
    return run_select(config, loaded, _scores(scores), Path(out) if out is not None else None, model_id=mc.id,
                      overwrite=overwrite, progress=progress)


def export_model(model: Any, plan: Any, out: PathLike, config: ExportConfig | None = None, *,
                 verify: VerifyConfig | None = None, scores: Any = None, overwrite: bool = False,
                 progress: bool = True) -> Any:
    """Write the plan applied to the model as a checkpoint (``prune-heads export``), verified against the
    (compensated) masked original unless ``verify=VerifyConfig(enabled=False)``. Returns ``ExportResult``.

    ``scores`` (a scores directory or ``HeadScores``) rebuilds a compensated plan's compensation when the plan
    was not saved with its compensation file (``select_heads`` without ``out``).
    """
    from prune_heads.export.stage import run_export

    mc, _ = _model(model)
    return run_export(config or ExportConfig(), mc, _plan(plan), Path(out), verify=verify or VerifyConfig(),
                      overwrite=overwrite, progress=progress, scores=scores)


def verify_model(model: Any, export_dir: PathLike, plan: Any, config: VerifyConfig | None = None, *,
                 scores: Any = None) -> Any:
    """Largest |logit difference| between an export and the (compensated) masked original; ``VerificationResult``."""
    from prune_heads.export.stage import run_verify

    mc, _ = _model(model)
    return run_verify(config or VerifyConfig(), mc, Path(export_dir), _plan(plan), scores=scores)


def evaluate_model(model: Any, config: EvaluateConfig, *, plan: Any = None, export_dir: PathLike | None = None,
                   scores: Any = None, out: PathLike | None = None, overwrite: bool = False) -> Any:
    """Every task of ``config`` on the original and on the pruned side (``prune-heads eval``): the export in
    ``export_dir`` (``eval --export``: checked against the plan it records, and the results recorded in its
    ``prune_heads.json`` and card), else the original with ``plan``'s heads removed (compensated as the plan
    says), else the dynamic mode of ``config``. Returns ``EvaluationResult`` (``results.json`` in ``out``)."""
    from prune_heads.errors import PruneHeadsError
    from prune_heads.evaluation.stage import PrunedSide, evaluate_engine, evaluate_export, run_evaluate

    if not config.tasks:
        raise PruneHeadsError("EvaluateConfig.tasks is empty: name the tasks, e.g. "
                              "EvaluateConfig(tasks=[EvalTask(task='arc_easy')])")
    mc, loaded = _loaded(model, lambda mc: evaluate_engine(config, mc))
    if export_dir is not None:
        return evaluate_export(config, loaded, mc.id, export_dir, Path(out) if out is not None else None,
                               plan=_plan(plan), scores=_scores(scores), overwrite=overwrite)
    side = PrunedSide(plan=_plan(plan), export_dir=Path(export_dir) if export_dir is not None else None,
                      scores=_scores(scores))
    return run_evaluate(config, loaded, mc.id, side, Path(out) if out is not None else None, overwrite=overwrite)


__all__ = ["CalibrateConfig", "EvalTask", "EvaluateConfig", "ExportConfig", "ModelConfig", "SelectConfig",
           "VerifyConfig", "calibrate_model", "evaluate_model", "export_model", "select_heads", "verify_model"]
