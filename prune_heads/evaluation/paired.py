"""Paired statistics of a drop: the unpruned and the pruned model scored on the same documents.

Why paired: the two runs see the same documents, so most of the document-to-document spread (easy and
hard questions, short and long texts) cancels in the per-document differences. The drop's standard
error is that of the mean of the differences, typically several times smaller than the one of either
accuracy on its own, and it is the right one: the unpaired ``sqrt(se_b**2 + se_m**2)`` treats two
evaluations of the same documents as independent samples.

Every estimator here is a smooth function of per-document means, linearised per document
(delta method): the drop is ``estimate`` and each document contributes an influence value ``psi_i``
whose mean is 0; ``stderr = sd(psi) / sqrt(n)``. For plain means (accuracy, ``acc_norm``) ``psi`` is the
centred difference itself, so this is the textbook paired standard error. For ratio metrics the
documents are weighted by their tokens, as the metric is:

- ``kl``: ``sum KL / sum tokens``; the drop is the increase of that ratio (the unpruned model's is 0);
- ``perplexity``: ``exp(sum NLL / sum tokens)``; the change of the log-perplexity is a ratio of sums,
  linearised as above. A relative budget is judged on ``exp(delta log ppl) - 1`` (the bound is carried
  through the monotone ``expm1`` exactly); an absolute one on ``ppl_m - ppl_b`` by the delta method.

The one-sided bound is ``estimate + t_{C, n-1} * stderr``: Student's t with ``n - 1`` degrees of
freedom, because the mean of ``n`` independent per-document differences is close to normal (central
limit theorem) while its variance is estimated from the same ``n`` documents, which matters at the
few dozen documents a CPU search uses; for large ``n`` it is the normal quantile. One-sided because
only a drop larger than the budget is a failure. ``tests/test_paired.py`` checks the standard errors
against a naive paired bootstrap.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from prune_heads.errors import PruneHeadsError

__all__ = ["DocScores", "PairedDrop", "SURROGATES", "paired_drop", "resolution", "surrogate_drop", "t_quantile"]

#: how the metric is built from per-document values: the mean of them, the ratio of their sums to the
#: documents' token counts (KL per token), or exp of that ratio (perplexity)
AGGREGATES = ("mean", "ratio", "exp_ratio")

#: per-document surrogates of a multiple-choice task (see ``surrogate_drop``)
SURROGATES = ("margin", "choice_kl")


# ---- Student's t quantile without scipy (scipy is a test-only dependency) -------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t (``p`` in (0, 1), ``df`` > 0), by bisection on the exact CDF."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    if df > 1e7:
        return NormalDist().inv_cdf(p)
    lo, hi = 0.0, max(1.0, NormalDist().inv_cdf(p))
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def one_sided_quantile(confidence: float, n: int) -> float:
    """The multiplier of the standard error for a one-sided ``confidence`` bound from ``n`` documents."""
    if confidence <= 0.0:
        return 0.0
    if n < 2:
        return math.inf
    return t_quantile(confidence, n - 1)


# ---- per-document scores -----------------------------------------------------------------------------
@dataclass
class DocScores:
    """What one evaluation measured on each document, aligned by ``ids`` (stable across evaluations).

    ``values`` are per-document metric values (accuracy: the 0/1 score; ``ppl``: the summed NLL;
    ``kl``: the summed KL) and ``weights`` the tokens per document for ratio metrics. ``choice_scores``
    (multiple choice only) are the per-choice scores the metric takes the argmax of (log-likelihoods, or
    per-character ones for ``acc_norm``), and ``gold`` the index (or indices) of the right choice(s):
    the surrogates are computed from them.
    """

    ids: tuple[str, ...]
    values: np.ndarray
    aggregate: str = "mean"
    weights: np.ndarray | None = None
    choice_scores: tuple[np.ndarray, ...] | None = None
    gold: tuple[Any, ...] | None = None
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ids = tuple(str(i) for i in self.ids)
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, not {self.aggregate!r}")
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float64)
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("document ids must be unique")
        if self.values.shape != (len(self.ids),):
            raise ValueError(f"{len(self.ids)} ids but values of shape {self.values.shape}")
        self._index = {d: i for i, d in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def value(self) -> float:
        """The metric these documents give (the evaluator's ``value``, recomputed)."""
        if self.aggregate == "mean":
            return float(self.values.mean())
        assert self.weights is not None
        r = float(self.values.sum() / self.weights.sum())
        return math.exp(r) if self.aggregate == "exp_ratio" else r

    def order(self, ids: tuple[str, ...]) -> np.ndarray:
        """Positions of ``ids`` in this record (every id must be present)."""
        missing = [d for d in ids if d not in self._index]
        if missing:
            raise PruneHeadsError(f"{len(missing)} document(s) of one evaluation are missing from the other "
                                  f"(e.g. {missing[0]!r}): paired statistics need the same documents")
        return np.fromiter((self._index[d] for d in ids), dtype=np.int64, count=len(ids))

    def subset(self, ids: tuple[str, ...] | list[str]) -> DocScores:
        """The same evaluation restricted to (and ordered as) ``ids``."""
        pos = self.order(tuple(ids))
        return DocScores(
            tuple(ids), self.values[pos], self.aggregate,
            None if self.weights is None else self.weights[pos],
            None if self.choice_scores is None else tuple(self.choice_scores[i] for i in pos),
            None if self.gold is None else tuple(self.gold[i] for i in pos),
        )


def docs_of(result: Any) -> DocScores | None:
    docs = getattr(result, "docs", None)
    return docs if isinstance(docs, DocScores) and len(docs) else None


# ---- the paired drop -------------------------------------------------------------------------------------
@dataclass
class PairedDrop:
    """A drop (in metric units, or a fraction of the baseline with ``relative``) and its uncertainty.

    ``lower``/``upper`` are the one-sided ``confidence`` bounds (both equal ``estimate`` at confidence 0).
    ``method``: ``paired`` (per-document differences), ``unpaired`` (no per-document scores, both
    standard errors combined as if independent: conservative), ``point`` (no uncertainty available).
    """

    estimate: float
    stderr: float | None
    lower: float
    upper: float
    confidence: float
    n: int
    method: str
    relative: bool = False


def _mean_psi(d: np.ndarray) -> tuple[float, np.ndarray]:
    est = float(d.mean())
    return est, d - est


def _ratio_psi(num: np.ndarray, den: np.ndarray) -> tuple[float, np.ndarray]:
    """``sum num / sum den`` and its per-document influence (delta method for a ratio of means)."""
    est = float(num.sum() / den.sum())
    return est, (num - est * den) / float(den.mean())


def _linearised(base: DocScores, res: DocScores, higher_is_better: bool, relative: bool
                ) -> tuple[float, np.ndarray, Any]:
    """``(estimate, psi, transform)``: the drop on a scale where it is a smooth mean, and the map back."""
    b, m = base.values, res.values
    if base.aggregate == "mean":
        d = b - m if higher_is_better else m - b
        if not relative:
            return (*_mean_psi(d), None)
        if float(b.sum()) == 0.0:
            raise PruneHeadsError("the baseline value is 0, so a relative drop is undefined; use an absolute budget")
        return (*_ratio_psi(d, b), None)
    w = base.weights
    assert w is not None and res.weights is not None
    if not np.allclose(w, res.weights):
        raise PruneHeadsError("the two evaluations counted different tokens per document: not the same documents")
    sign = -1.0 if higher_is_better else 1.0
    if base.aggregate == "ratio":  # KL per token
        if relative:
            if float(b.sum()) == 0.0:
                raise PruneHeadsError("the baseline KL is 0 by definition, so a relative KL budget allows nothing; "
                                      "give an absolute --max-drop (nats per token)")
            return (*_ratio_psi(sign * (m - b), b), None)
        return (*_ratio_psi(sign * (m - b), w), None)
    # perplexity = exp(sum nll / sum tokens)
    if relative:
        est, psi = _ratio_psi(sign * (m - b), w)
        return est, psi, math.expm1
    lb, psi_b = _ratio_psi(b, w)
    lm, psi_m = _ratio_psi(m, w)
    est = sign * (math.exp(lm) - math.exp(lb))
    return est, sign * (math.exp(lm) * psi_m - math.exp(lb) * psi_b), None


def paired_drop(baseline: Any, result: Any, *, relative: bool = False, confidence: float = 0.0) -> PairedDrop:
    """The drop from ``baseline`` to ``result`` (``EvalResult``-like) with its one-sided bounds.

    The drop is the loss in the metric's direction (a decrease of accuracy, an increase of perplexity),
    as a fraction of the baseline's value with ``relative``. With per-document scores on both sides the
    statistics are paired; otherwise the two standard errors are combined as if independent (an upper
    bound on the paired one when the two runs are positively correlated, as same-document runs are).
    """
    if not 0.0 <= confidence < 1.0:
        raise PruneHeadsError(f"confidence must be in [0, 1), got {confidence}")
    hib = bool(baseline.higher_is_better)
    bd, rd = docs_of(baseline), docs_of(result)
    if bd is not None and rd is not None:
        if set(bd.ids) != set(rd.ids):
            raise PruneHeadsError(f"paired statistics need the same documents: the baseline has {len(bd)}, the "
                                  f"result {len(rd)}, {len(set(bd.ids) & set(rd.ids))} in common")
        rd = rd if rd.ids == bd.ids else rd.subset(bd.ids)
        est, psi, transform = _linearised(bd, rd, hib, relative)
        n = len(bd)
        se = float(psi.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
        q = one_sided_quantile(confidence, n)
        half = 0.0 if q == 0.0 else (math.inf if se is None else q * se)
        lo, hi = est - half, est + half
        if transform is not None:  # the bounds of a monotone map are the map of the bounds
            se = None if se is None else se * math.exp(est)  # delta method: d expm1(x) / dx = exp(x)
            est, lo, hi = transform(est), transform(lo), transform(hi)
        return PairedDrop(est, se, lo, hi, confidence, n, "paired", relative)
    return _unpaired(baseline, result, hib, relative, confidence)


def _unpaired(baseline: Any, result: Any, hib: bool, relative: bool, confidence: float) -> PairedDrop:
    base, value = float(baseline.value), float(result.value)
    est = base - value if hib else value - base
    scale = abs(base) if relative else 1.0
    if relative and scale == 0.0:
        raise PruneHeadsError("the baseline value is 0, so a relative drop is undefined; use an absolute budget")
    est /= scale
    n = int(min(getattr(baseline, "n", 0) or 0, getattr(result, "n", 0) or 0))
    ses = [getattr(baseline, "stderr", None), getattr(result, "stderr", None)]
    if any(s is None for s in ses):
        if confidence > 0:
            raise PruneHeadsError(
                "a confidence bound needs per-document scores or standard errors, and this evaluator gives "
                "neither; use confidence 0 (the point estimate)")
        return PairedDrop(est, None, est, est, confidence, n, "point", relative)
    se = math.sqrt(float(ses[0]) ** 2 + float(ses[1]) ** 2) / scale
    q = one_sided_quantile(confidence, max(n, 2))
    return PairedDrop(est, se, est - q * se, est + q * se, confidence, n, "unpaired", relative)


# ---- surrogates ------------------------------------------------------------------------------------------
def _gold_list(g: Any) -> list[int]:
    return [int(x) for x in g] if isinstance(g, (list, tuple)) else [int(g)]


def _margin(scores: np.ndarray, gold: Any) -> float:
    """Best gold score minus best other score (> 0: the metric counts the document right)."""
    golds = [i for i in _gold_list(gold) if 0 <= i < len(scores)]
    if not golds:
        return float("nan")
    others = np.delete(scores, golds)
    best_gold = float(scores[golds].max())
    return best_gold - float(others.max()) if others.size else best_gold


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - math.log(float(np.exp(x).sum()))


def surrogate_values(base: DocScores, res: DocScores, kind: str) -> np.ndarray:
    """Per-document surrogate harm of ``res`` against ``base`` (larger = worse), on ``base``'s documents.

    - ``margin``: the loss of the gold answer's margin (best gold score minus best other), so a document
      whose right answer became less separated counts, even before its 0/1 score flips;
    - ``choice_kl``: ``KL(p_base || p_res)`` of the softmax over the choices' scores: any change of the
      choice distribution, harmful or not.
    """
    if kind not in SURROGATES:
        raise PruneHeadsError(f"surrogate must be one of {', '.join(SURROGATES)}, not {kind!r}")
    if base.choice_scores is None or res.choice_scores is None or base.gold is None:
        raise PruneHeadsError(f"the {kind} surrogate needs a multiple-choice task (per-choice log-likelihoods)")
    res = res if res.ids == base.ids else res.subset(base.ids)
    assert res.choice_scores is not None
    out = np.empty(len(base))
    for i, (sb, sr, g) in enumerate(zip(base.choice_scores, res.choice_scores, base.gold)):
        if kind == "margin":
            out[i] = _margin(sb, g) - _margin(sr, g)
        else:
            pb, pr = _log_softmax(sb), _log_softmax(sr)
            out[i] = float((np.exp(pb) * (pb - pr)).sum())
    return out


def surrogate_drop(baseline: Any, result: Any, kind: str, *, confidence: float = 0.0) -> PairedDrop:
    """Mean per-document surrogate harm (nats) with its standard error and one-sided bounds."""
    bd, rd = docs_of(baseline), docs_of(result)
    if bd is None or rd is None:
        raise PruneHeadsError(f"the {kind} surrogate needs per-document scores from the evaluator")
    v = surrogate_values(bd, rd, kind)
    v = v[np.isfinite(v)]
    n = len(v)
    est = float(v.mean()) if n else float("nan")
    se = float(v.std(ddof=1) / math.sqrt(n)) if n >= 2 else None
    q = one_sided_quantile(confidence, n)
    half = 0.0 if q == 0.0 else (math.inf if se is None else q * se)
    return PairedDrop(est, se, est - half, est + half, confidence, n, "paired")


# ---- what the data can resolve ------------------------------------------------------------------------
@dataclass
class Resolution:
    """The smallest drop the baseline's documents can resolve, and the documents a budget would need.

    Assumes the pruned model's per-document differences vary as much as the baseline's own scores
    (for a 0/1 metric ``p(1 - p)``); ``tests``/the benchmark report the measured ratio.
    """

    n: int
    per_doc_sd: float
    resolvable: float
    docs_needed: int | None
    applicable: bool = True
    reason: str = ""


def resolution(baseline: Any, *, allowed: float, confidence: float, relative: bool = False) -> Resolution:
    """From the baseline's per-document variance: the smallest resolvable drop at ``confidence``.

    A probe passes only when ``estimate + t * stderr <= allowed``; even a drop of 0 needs
    ``t * sd / sqrt(n) <= allowed``, so ``t_{C, n-1} * sd / sqrt(n)`` is the smallest budget this many
    documents can certify and ``ceil((z_C * sd / allowed)**2)`` the documents a budget needs. ``sd`` is the
    baseline's per-document standard deviation, which for a 0/1 metric is the spread of a difference
    whose flips are as frequent as the baseline's own uncertainty. It applies to metrics that are a mean
    of bounded per-document scores (accuracy-like). For perplexity and KL the paired differences are
    exactly 0 at ``k = 0`` and the baseline's spread says nothing about them, so no check is made.
    """
    bd = docs_of(baseline)
    if confidence <= 0:
        return Resolution(int(getattr(baseline, "n", 0) or 0), 0.0, 0.0, None, False, "confidence 0")
    if bd is None or bd.aggregate != "mean":
        return Resolution(int(getattr(baseline, "n", 0) or 0), float("nan"), 0.0, None, False,
                          "not a mean of per-document scores (perplexity/KL, or no per-document scores)")
    n = len(bd)
    sd = float(bd.values.std(ddof=1)) if n >= 2 else float("inf")
    scale = abs(float(bd.values.mean())) if relative else 1.0
    if scale == 0.0:
        return Resolution(n, sd, math.inf, None, True, "baseline value 0")
    sd /= scale
    resolvable = one_sided_quantile(confidence, n) * sd / math.sqrt(n) if n >= 2 else math.inf
    z = NormalDist().inv_cdf(confidence)
    needed = None if allowed <= 0 or not math.isfinite(sd) else max(2, math.ceil((z * sd / allowed) ** 2))
    return Resolution(n, sd, resolvable, needed)
