"""prune-heads: find attention heads that do no work, and remove them for real.

Every public name is imported on first use, so ``import prune_heads`` (and ``prune-heads --help``)
stays cheap: torch, transformers, lm-eval and matplotlib load only when a name that needs them is
touched. After ``import prune_heads``, exported ``sliced`` checkpoints load with transformers' Auto
classes without ``trust_remote_code``: the pruned model types are registered the moment transformers'
Auto classes are imported (an import hook that then removes itself), or at once when they already are.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

from prune_heads.__about__ import __version__
from prune_heads.lazy import lazy_exports

#: public name -> module that defines it.
#: The stage API is the typed configs and one function per stage over the ``run_*`` functions the CLI and
#: the recipe runner call (``prune_heads.api``), so Python gets the front ends' defaults. The low-level
#: keyword functions those stages are built on (``selection.static.select_static``, ``select_iterative``,
#: ``select_gates``, ``export.checkpoint.export_checkpoint``, ``export.verify.verify_export``) default to none
#: of those policies (no compensation, confidence 0, no held-out check), so they are imported from their
#: modules, not from here, by whoever means to take every choice by hand.
_EXPORTS: dict[str, str] = {
    "ModelConfig": "prune_heads.api",
    "CalibrateConfig": "prune_heads.api",
    "SelectConfig": "prune_heads.api",
    "ExportConfig": "prune_heads.api",
    "VerifyConfig": "prune_heads.api",
    "EvaluateConfig": "prune_heads.api",
    "EvalTask": "prune_heads.api",
    "calibrate_model": "prune_heads.api",
    "select_heads": "prune_heads.api",
    "export_model": "prune_heads.api",
    "verify_model": "prune_heads.api",
    "evaluate_model": "prune_heads.api",
    "HeadControl": "prune_heads.model.attention",
    "attach": "prune_heads.model.attention",
    "get_adapter": "prune_heads.model.adapters",
    "register_adapter": "prune_heads.model.adapters",
    "supported_model_types": "prune_heads.model.adapters",
    "load_model": "prune_heads.model.loading",
    "static_mask": "prune_heads.model.masking",
    "dynamic_mask": "prune_heads.model.masking",
    "threshold_for_fraction": "prune_heads.model.masking",
    "calibrate": "prune_heads.scoring.calibrate",
    "HeadScores": "prune_heads.scoring.head_scores",
    "register_score": "prune_heads.scoring.score_defs",
    "ablation_scores": "prune_heads.scoring.ablation",
    "CompensationSpec": "prune_heads.compensation",
    "Compensator": "prune_heads.compensation",
    "compute_compensation": "prune_heads.compensation",
    "compensation_for_plan": "prune_heads.compensation",
    "Plan": "prune_heads.plan",
    "make_evaluator": "prune_heads.evaluation",
    "compare_speed": "prune_heads.evaluation.speed",
    "refresh_card": "prune_heads.export.model_card",
    "ExportRecord": "prune_heads.export.record",
    "VerificationRecord": "prune_heads.export.record",
    "push": "prune_heads.publish.hub",
    "write_report": "prune_heads.report",
    "plot_selection_search": "prune_heads.report",
    "run": "prune_heads.pipeline",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__ = lazy_exports(__name__, _EXPORTS)


#: the registration needs the Auto classes (this module) and a fully imported transformers
_AUTO_MODULE = "transformers.models.auto"
_WATCHED = ("transformers", "prune_heads")


def _register_auto_classes() -> None:
    try:
        from prune_heads.export.registration import register_auto_classes

        register_auto_classes()
    except Exception as e:  # never break the user's import of transformers
        logging.getLogger(__name__).warning("could not register the pruned model types with transformers: %s", e)


class _RegisterWhenReady(importlib.abc.MetaPathFinder):
    """Registers the pruned model types once transformers' Auto classes exist and no transformers or
    prune_heads module is still being imported (transformers imports ``models.auto`` from inside its
    own ``modeling_utils``, whose names the registration needs). It counts the imports of those two
    packages in flight by wrapping their loaders' ``exec_module``, and leaves ``sys.meta_path`` once done.
    """

    def __init__(self) -> None:
        self._finding = False
        self._running = 0

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if self._finding or fullname.partition(".")[0] not in _WATCHED:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        loader = getattr(spec, "loader", None)
        # only a loader made for this one module (a source or extension file) is wrapped
        if loader is None or getattr(loader, "name", None) != fullname or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def counted(module: Any) -> None:
            self._running += 1
            try:
                exec_module(module)
            finally:
                self._running -= 1
            self._maybe_register()

        loader.exec_module = counted
        return spec

    def _maybe_register(self) -> None:
        if self._running or _AUTO_MODULE not in sys.modules or self not in sys.meta_path:
            return
        sys.meta_path.remove(self)
        _register_auto_classes()


if _AUTO_MODULE in sys.modules:
    _register_auto_classes()
elif not any(isinstance(f, _RegisterWhenReady) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenReady())
