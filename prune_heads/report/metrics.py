"""The numbers behind a report: quantile thresholds, inactive sets, their overlaps, and W1.

Plain numpy on small ``(L, H)`` / ``(N, L, H)`` arrays, so every figure and table can be checked by
hand and the report never needs a model, a GPU or scipy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prune_heads.errors import PruneHeadsError
from prune_heads.scoring.score_defs import inactive_when_high

#: the paper's grid: τ is picked to mark 0, 5, ..., 30% of the calibration distribution
PAPER_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)


def check_fraction(fraction: float) -> float:
    if not 0.0 <= float(fraction) <= 1.0:
        raise PruneHeadsError(f"fraction must be in [0, 1], got {fraction}; e.g. --fraction 0.1 for 10% of heads")
    return float(fraction)


def inactivity(values: np.ndarray, score_id: str) -> np.ndarray:
    """Larger = more inactive for every score (numpy twin of ``score_defs.inactivity``).

    NaN ranks as the *least* inactive value, so a broken head is never reported as prunable.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v if inactive_when_high(score_id) else -v
    return np.where(np.isnan(v), -np.inf, v)


def quantile_threshold(values: np.ndarray, score_id: str, fraction: float, method: str = "quantile") -> float:
    """``τ`` that marks ``fraction`` of ``values`` inactive (same rule as ``masking.threshold_for_fraction``:
    ``method="quantile"``, the linear-interpolated quantile of the pooled values, or ``"paper"``, the
    authors' empirical CDF; ±inf at fraction 0 so nothing is marked). ``scoring.thresholds.threshold``
    returns the same value with the method and the fraction it marks."""
    from prune_heads.scoring.thresholds import threshold

    fraction = check_fraction(fraction)
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if fraction > 0 and not np.isfinite(flat).any():
        raise PruneHeadsError(f"score {score_id!r} has no finite values to take a quantile of")
    return threshold(flat, score_id, fraction, method).value


def marked_by_threshold(values: np.ndarray, score_id: str, tau: float) -> np.ndarray:
    """Bool mask of values a threshold marks inactive: ``> τ`` for awft-like scores, ``< τ`` otherwise."""
    v = np.asarray(values, dtype=np.float64)
    return v > tau if inactive_when_high(score_id) else v < tau


def num_for_fraction(fraction: float, total: int) -> int:
    """Heads in a "top fraction" set: rounded, and at least one so tiny models still get a set."""
    check_fraction(fraction)
    return min(total, max(1, int(round(fraction * total)))) if fraction > 0 else 0


def inactive_set(mean: np.ndarray, score_id: str, fraction: float) -> set[tuple[int, int]]:
    """The top ``fraction`` of heads by inactivity of their mean score, as ``{(layer, head)}``.

    Ties break towards the lower (layer, head) index (stable sort), so the set is deterministic.
    """
    m = np.asarray(mean)
    if m.ndim != 2:
        raise PruneHeadsError(f"expected an (L, H) array of head means, got shape {m.shape}")
    k = num_for_fraction(fraction, m.size)
    order = np.argsort(-inactivity(m, score_id).reshape(-1), kind="stable")[:k]
    return {(int(i // m.shape[1]), int(i % m.shape[1])) for i in order}


def iou(a: set, b: set) -> float:
    """``|A∩B| / |A∪B|``; two empty sets agree perfectly (1.0)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def precision(a: set, b: set) -> float:
    """Precision of ``A`` w.r.t. ``B``: ``|A∩B| / |A|`` (NaN when ``A`` is empty)."""
    return len(a & b) / len(a) if a else float("nan")


@dataclass
class Overlap:
    """Pairwise agreement of inactive sets; ``precision[i, j]`` = precision of ``ids[i]`` w.r.t. ``ids[j]``."""

    ids: list[str]
    iou: np.ndarray
    precision: np.ndarray
    sizes: list[int]


def overlap_matrices(sets: dict[str, set]) -> Overlap:
    ids = list(sets)
    n = len(ids)
    iou_m = np.empty((n, n))
    prec_m = np.empty((n, n))
    for i, a in enumerate(ids):
        for j, b in enumerate(ids):
            iou_m[i, j] = iou(sets[a], sets[b])
            prec_m[i, j] = precision(sets[a], sets[b])
    return Overlap(ids, iou_m, prec_m, [len(sets[s]) for s in ids])


def wasserstein1(u: np.ndarray, v: np.ndarray) -> float:
    """Exact 1-Wasserstein distance between two empirical distributions: ``∫ |F_u(x) − F_v(x)| dx``.

    Both CDFs are step functions that only change at sample points, so the integral is a finite sum
    over the gaps between consecutive pooled sample values. Non-finite values are dropped.
    """
    u = np.asarray(u, dtype=np.float64).reshape(-1)
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    u, v = np.sort(u[np.isfinite(u)]), np.sort(v[np.isfinite(v)])
    if u.size == 0 or v.size == 0:
        raise PruneHeadsError("cannot compare an empty distribution (no finite values)")
    allv = np.sort(np.concatenate([u, v]))
    gaps = np.diff(allv)
    cdf_u = np.searchsorted(u, allv[:-1], side="right") / u.size
    cdf_v = np.searchsorted(v, allv[:-1], side="right") / v.size
    return float(np.sum(np.abs(cdf_u - cdf_v) * gaps))


def ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted finite values and their CDF heights ``(i+1)/n`` (for step plots)."""
    x = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    x = x[np.isfinite(x)]
    return x, np.arange(1, x.size + 1) / max(x.size, 1)


def per_layer_counts(mask: np.ndarray) -> list[int]:
    """Heads marked per layer in an ``(L, H)`` bool mask."""
    return [int(c) for c in np.asarray(mask).sum(axis=1)]


def set_to_mask(heads: set[tuple[int, int]], shape: Sequence[int]) -> np.ndarray:
    m = np.zeros(tuple(shape), dtype=bool)
    for layer, head in heads:
        m[layer, head] = True
    return m


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
