"""``τ`` for a fraction of heads: ``torch.quantile``'s interpolation, or the paper authors' empirical CDF.

Both read ``τ`` off the pooled calibration values (every sequence x head) so that ``fraction`` of them are
marked inactive (``score > τ`` for ``awft``-like scores, ``score < τ`` otherwise):

- ``"quantile"`` (default): the linear-interpolated quantile of ``torch.quantile`` / ``numpy.quantile``
  (Hyndman-Fan type 7, position ``(n - 1) q``);
- ``"paper"``: the authors' ``x_intercept_for_cdf`` on the CDF ``(sorted x_i, (i + 1) / n)``, linearly
  interpolated and clamped to ``[1/n, 1]`` (type 4, position ``n q - 1``), at ``q = fraction`` or ``1 - fraction``.

The two differ by about one order statistic, which matters where many values sit close together (at 5%
the issue measured 4.91% of SmolLM2's heads marked by the paper's ``τ``, 5.00% by ``torch.quantile``).
``fraction = 0`` gives ``±inf`` for both (nothing is zeroed; the authors' code returns the extreme
calibration value there, which marks nothing of the calibration set either). Computed in float64; the
authors' code works in float32, which can move ``τ`` by a float32 rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from prune_heads.errors import PruneHeadsError
from prune_heads.scoring.score_defs import inactive_when_high

METHODS = ("quantile", "paper")


@dataclass(frozen=True)
class Threshold:
    """A threshold and how it was chosen (what ``results.json`` records)."""

    value: float
    method: str
    score_id: str
    fraction: float
    #: the fraction of the calibration values this ``τ`` marks (strict inequality)
    marked_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise PruneHeadsError(f"threshold method {method!r}: choose quantile (torch.quantile) or paper (the authors' "
                              "empirical CDF)")
    return method


def paper_quantile(values: np.ndarray, q: float) -> float:
    """The authors' ``x_intercept_for_cdf``: linear interpolation of the inverse of the CDF
    ``((i + 1) / n, sorted x_i)``, with ``q`` clamped to ``[1/n, 1]``."""
    x = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    n = x.size
    if n == 0:
        raise PruneHeadsError("no finite values to read a threshold from")
    if n == 1:
        return float(x[0])
    y = np.arange(1, n + 1, dtype=np.float64) / n
    q = min(max(float(q), y[0]), y[-1])
    i = int(np.clip(np.searchsorted(y, q, side="left"), 1, n - 1))
    dy = y[i] - y[i - 1]
    return float(x[i - 1] + (q - y[i - 1]) / (dy if dy != 0 else 1.0) * (x[i] - x[i - 1]))


def _finite(values: Any) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return v[np.isfinite(v)]


def threshold(values: Any, score_id: str, fraction: float, method: str = "quantile") -> Threshold:
    """``τ`` marking ``fraction`` of ``values`` (any shape; non-finite values are left out) by ``method``."""
    check_method(method)
    if not 0.0 <= float(fraction) <= 1.0:
        raise PruneHeadsError(f"fraction must be in [0, 1], got {fraction}; e.g. 0.1 for 10% of heads")
    high = inactive_when_high(score_id)
    flat = _finite(values)
    if fraction == 0:
        tau = float("inf") if high else float("-inf")
    else:
        if flat.size == 0:
            raise PruneHeadsError(f"score {score_id!r} has no finite values to take a threshold from")
        q = 1.0 - float(fraction) if high else float(fraction)
        tau = paper_quantile(flat, q) if method == "paper" else float(np.quantile(flat, q))
    marked = float(((flat > tau) if high else (flat < tau)).mean()) if flat.size else 0.0
    return Threshold(tau, method, score_id, float(fraction), marked)
