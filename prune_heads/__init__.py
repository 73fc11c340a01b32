"""prune-heads: find attention heads that do no work, and remove them for real."""

from .__about__ import __version__
from .adapters import get_adapter, register_adapter, supported_model_types
from .calibrate import calibrate
from .control import HeadControl, attach
from .head_scores import HeadScores
from .loading import load_model
from .masking import dynamic_mask, static_mask, threshold_for_fraction
from .plan import Plan
from .score_defs import register_score

__all__ = [
    "HeadControl",
    "HeadScores",
    "Plan",
    "__version__",
    "attach",
    "calibrate",
    "dynamic_mask",
    "get_adapter",
    "load_model",
    "register_adapter",
    "register_score",
    "static_mask",
    "supported_model_types",
    "threshold_for_fraction",
]
