"""prune-heads: find attention heads that do no work, and remove them for real.

Every public name is imported on first use, so ``import prune_heads`` (and ``prune-heads --help``)
stays cheap: torch, transformers, lm-eval and matplotlib load only when a name that needs them is
touched. ``import prune_heads`` registers the pruned model types with transformers' Auto classes, so
exported ``sliced`` checkpoints load without ``trust_remote_code``.
"""

from __future__ import annotations

import importlib
from typing import Any

from prune_heads.__about__ import __version__

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
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
    "select_static": "prune_heads.selection.static",
    "select_iterative": "prune_heads.selection.iterative",
    "select_gates": "prune_heads.selection.gates",
    "export_checkpoint": "prune_heads.export",
    "verify_export": "prune_heads.export.verify",
    "push": "prune_heads.publish.hub",
    "write_report": "prune_heads.report",
    "run": "prune_heads.pipeline",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prune_heads' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _register_auto_classes() -> None:
    try:
        from prune_heads.export import register_auto_classes
    except ImportError:  # transformers missing: nothing to register
        return
    register_auto_classes()


_register_auto_classes()
