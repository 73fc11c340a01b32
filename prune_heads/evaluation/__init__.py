"""Evaluate a model with heads masked: lm-eval tasks (offline too), local multiple choice, perplexity, KL.

The evaluator itself is ``evaluation.evaluator``; names here load on first use (``prune_heads.lazy``),
so importing a sibling module (a stage's config, the task parser) does not import torch or lm-eval.
"""

from prune_heads.lazy import lazy_exports

_EXPORTS = {
    "DocScores": "prune_heads.evaluation.paired",
    "EvalResult": "prune_heads.evaluation.evaluator",
    "Evaluator": "prune_heads.evaluation.evaluator",
    "make_evaluator": "prune_heads.evaluation.evaluator",
    "parse_task": "prune_heads.evaluation.evaluator",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
