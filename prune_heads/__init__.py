"""prune-heads: find attention heads that do no work, and remove them for real.

Optional parts of the API (evaluation, selection, report, hub, pipeline) are imported on first use, so
lm-eval and matplotlib load only when needed. ``import prune_heads`` registers
the pruned model types with transformers' Auto classes (when transformers is importable), so exported
``sliced`` checkpoints load without ``trust_remote_code``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .__about__ import __version__

# Names that equal a submodule's name are imported eagerly: importing the submodule later would
# otherwise rebind the package attribute to the module.
from .calibrate import calibrate  # noqa: E402
from .export import export  # noqa: E402

_EXPORTS: dict[str, str] = {
    "HeadControl": "control",
    "attach": "control",
    "HeadScores": "head_scores",
    "Plan": "plan",
    "get_adapter": "adapters",
    "register_adapter": "adapters",
    "supported_model_types": "adapters",
    "load_model": "loading",
    "static_mask": "masking",
    "dynamic_mask": "masking",
    "threshold_for_fraction": "masking",
    "register_score": "score_defs",
    "make_evaluator": "evaluation",
    "select_static": "selection",
    "select_iterative": "selection.iterative",
    "select_gates": "selection.gates",
    "ablation_scores": "ablation",
    "verify_export": "export",
    "push": "hub",
    "write_report": "report",
    "run": "pipeline",
}

__all__ = ["__version__", "calibrate", "export", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prune_heads' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def _register_auto_classes() -> None:
    try:
        from .export import register_auto_classes
    except ImportError:  # transformers missing or export unavailable: nothing to register
        return
    register_auto_classes()


_register_auto_classes()
