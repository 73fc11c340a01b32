"""Paired drop statistics against independent references: scipy's t, a naive paired bootstrap, hand margins."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_evaluation import REMOVED, char_tokenizer, write_docs, write_mc
from tiny_models import tiny_model

from prune_heads.errors import PruneHeadsError
from prune_heads.evaluation import make_evaluator
from prune_heads.evaluation.paired import (
    DocScores,
    paired_drop,
    resolution,
    surrogate_drop,
    surrogate_values,
    t_quantile,
)


@dataclass
class R:
    """An ``EvalResult`` stand-in built from per-document values."""

    docs: DocScores
    higher_is_better: bool
    metric: str = "acc"
    stderr: float | None = None
    n: int = 0
    details: dict = field(default_factory=dict)

    @property
    def value(self) -> float:
        return self.docs.value()


def test_t_quantile_matches_scipy():
    from scipy.stats import t

    for df in (1, 2, 3, 5, 9, 29, 99, 284, 5000):
        for p in (0.5, 0.6, 0.8, 0.9, 0.95, 0.975, 0.99, 0.999, 0.1, 0.02):
            assert t_quantile(p, df) == pytest.approx(float(t.ppf(p, df)), rel=1e-7, abs=1e-9)


# ---- naive reference: resample documents, recompute the drop from its definition ----------------------------
def naive_drop(kind: str, b: np.ndarray, m: np.ndarray, w: np.ndarray | None, relative: bool) -> float:
    if kind == "acc":
        return (b.mean() - m.mean()) / (b.mean() if relative else 1.0)
    if kind == "ppl":
        pb, pm = math.exp(b.sum() / w.sum()), math.exp(m.sum() / w.sum())
        return (pm - pb) / (pb if relative else 1.0)
    kb, km = b.sum() / w.sum(), m.sum() / w.sum()  # kl
    return km - kb


def bootstrap_se(kind, b, m, w, relative, iters=4000, seed=0) -> float:
    rng = np.random.default_rng(seed)
    n = len(b)
    draws = []
    for _ in range(iters):
        i = rng.integers(0, n, n)
        draws.append(naive_drop(kind, b[i], m[i], None if w is None else w[i], relative))
    return float(np.std(draws, ddof=1))


def make_pair(kind: str, n: int, seed: int):
    """Correlated baseline/pruned per-document values of a metric of this kind."""
    rng = np.random.default_rng(seed)
    if kind == "acc":
        b = (rng.random(n) < 0.6).astype(float)
        flip = rng.random(n) < 0.15
        m = np.where(flip, 1 - b, b)
        m[rng.random(n) < 0.05] = 0.0
        return b, m, None, "mean", True
    w = rng.integers(20, 256, n).astype(float)
    per_tok = rng.gamma(4.0, 0.8, n)  # documents differ a lot: the paired design removes that
    if kind == "ppl":
        b = per_tok * w
        m = (per_tok + rng.normal(0.05, 0.04, n)) * w
        return b, m, w, "exp_ratio", False
    b = np.zeros(n)
    m = rng.gamma(2.0, 0.02, n) * w
    return b, m, w, "ratio", False


@settings(max_examples=12, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["acc", "ppl", "kl"]), n=st.integers(60, 400), seed=st.integers(0, 1000),
       relative=st.booleans())
def test_paired_stderr_matches_naive_bootstrap(kind, n, seed, relative):
    if kind == "kl":
        relative = False  # the unpruned model's KL is 0: no relative KL budget
    b, m, w, agg, hib = make_pair(kind, n, seed)
    ids = tuple(f"d{i}" for i in range(n))
    base, res = R(DocScores(ids, b, agg, w), hib), R(DocScores(ids, m, agg, w), hib)
    d = paired_drop(base, res, relative=relative, confidence=0.9)
    assert d.method == "paired" and d.n == n
    assert d.estimate == pytest.approx(naive_drop(kind, b, m, w, relative), rel=1e-9, abs=1e-12)
    ref = bootstrap_se(kind, b, m, w, relative)
    assert d.stderr == pytest.approx(ref, rel=0.12)  # delta method vs bootstrap: O(1/sqrt(iters)) + O(1/n)
    assert d.upper == pytest.approx(d.estimate + t_quantile(0.9, n - 1) * d.stderr, rel=1e-6) or kind == "ppl"
    assert d.lower < d.estimate < d.upper


def test_paired_is_tighter_than_unpaired_and_order_free():
    b, m, w, agg, hib = make_pair("ppl", 200, 3)
    ids = tuple(f"d{i}" for i in range(200))
    base, res = R(DocScores(ids, b, agg, w), hib), R(DocScores(ids, m, agg, w), hib)
    d = paired_drop(base, res, relative=True, confidence=0.9)
    # the same documents in another order give the same statistics (pairing is by id, not by position)
    perm = np.random.default_rng(0).permutation(200)
    shuffled = R(DocScores(tuple(ids[i] for i in perm), m[perm], agg, w[perm]), hib)
    assert paired_drop(base, shuffled, relative=True, confidence=0.9) == d
    # the two runs' own errors, combined as if independent, are several times the paired one: the
    # documents' spread (long and short, easy and hard) cancels only in the per-document differences
    rng = np.random.default_rng(1)
    idx = [rng.integers(0, 200, 200) for _ in range(2000)]
    se_b = np.std([math.log(math.exp(b[i].sum() / w[i].sum())) for i in idx], ddof=1)
    se_m = np.std([math.log(math.exp(m[i].sum() / w[i].sum())) for i in idx], ddof=1)
    assert d.stderr < 0.3 * math.sqrt(se_b**2 + se_m**2)
    with pytest.raises(PruneHeadsError, match="same documents"):
        paired_drop(base, R(DocScores(ids[:-1], m[:-1], agg, w[:-1]), hib))


@dataclass
class Plain:
    value: float
    stderr: float | None
    higher_is_better: bool = True
    n: int = 100
    docs: None = None


def test_unpaired_fallback_and_point_estimate():
    d = paired_drop(Plain(0.6, 0.03), Plain(0.55, 0.04), confidence=0.9)
    assert d.method == "unpaired" and d.estimate == pytest.approx(0.05)
    assert d.stderr == pytest.approx(0.05) and d.upper == pytest.approx(0.05 + t_quantile(0.9, 99) * 0.05)
    p = paired_drop(Plain(0.6, None), Plain(0.55, None), confidence=0.0)
    assert p.method == "point" and p.lower == p.upper == p.estimate == pytest.approx(0.05)
    with pytest.raises(PruneHeadsError, match="confidence"):
        paired_drop(Plain(0.6, None), Plain(0.55, None), confidence=0.9)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(PruneHeadsError, match=r"\[0, 1\)"):
            paired_drop(Plain(0.6, 0.1), Plain(0.5, 0.1), confidence=bad)


def test_resolution_of_a_coin_flip_accuracy():
    n = 100
    ids = tuple(str(i) for i in range(n))
    base = R(DocScores(ids, np.array([1.0, 0.0] * (n // 2))), True)
    sd = float(np.std([1.0, 0.0] * 50, ddof=1))
    r = resolution(base, allowed=0.02, confidence=0.9)
    assert r.applicable and r.resolvable == pytest.approx(t_quantile(0.9, 99) * sd / 10)
    z = 1.2815515655446004
    assert r.docs_needed == math.ceil((z * sd / 0.02) ** 2)  # ~1030 documents for 2 points at 90%
    assert resolution(base, allowed=0.02, confidence=0.0).resolvable == 0.0
    ppl = R(DocScores(ids, np.ones(n), "exp_ratio", np.ones(n)), False)
    assert not resolution(ppl, allowed=0.01, confidence=0.9).applicable


# ---- real evaluators on a tiny model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8), char_tokenizer()


def _mask():
    m = torch.zeros(2, 4, dtype=torch.bool)
    for layer, h in REMOVED:
        m[layer, h] = True
    return m


@pytest.mark.parametrize("metric", ["acc", "acc_norm"])
def test_mc_per_document_scores_and_margins(tiny, tmp_path, metric):
    model, tok = tiny
    ev = make_evaluator(model, tok, f"mc:{write_mc(tmp_path / 'q.jsonl', n=20)}", batch_size=4, metric=metric)
    b, m = ev(), ev(_mask())
    assert b.docs.ids == m.docs.ids == ev.doc_ids and len(b.docs) == 20
    assert b.docs.value() == pytest.approx(b.value) and m.docs.value() == pytest.approx(m.value)
    # the margin says what the metric says: > 0 exactly when lm-eval counted the document right
    for r in (b, m):
        margins = surrogate_values(r.docs, DocScores(r.docs.ids, r.docs.values, choice_scores=tuple(
            np.zeros_like(s) for s in r.docs.choice_scores), gold=r.docs.gold), "margin")
        # margin(base) - margin(all-zero scores) = margin(base)
        assert ((margins > 0) == (r.docs.values == 1.0)).all()
    s = surrogate_drop(b, m, "margin", confidence=0.9)
    assert s.n == 20 and math.isfinite(s.estimate) and s.stderr is not None and s.stderr > 0
    kl = surrogate_values(b.docs, m.docs, "choice_kl")
    assert (kl >= -1e-12).all() and kl.max() > 0
    assert (surrogate_values(b.docs, b.docs, "choice_kl") == 0).all()


def test_text_per_document_scores(tiny, tmp_path):
    model, tok = tiny
    write_docs(tmp_path / "d.txt", n=8)
    for kind in ("ppl", "kl"):
        ev = make_evaluator(model, tok, f"{kind}:{tmp_path / 'd.txt'}", batch_size=3)
        b, m = ev(), ev(_mask())
        assert b.docs.ids == m.docs.ids == ev.doc_ids
        assert b.docs.value() == pytest.approx(b.value, rel=1e-9, abs=1e-12)
        assert m.docs.value() == pytest.approx(m.value, rel=1e-9)
        d = paired_drop(b, m, relative=kind == "ppl", confidence=0.9)
        want = m.value / b.value - 1 if kind == "ppl" else m.value
        assert d.estimate == pytest.approx(want, rel=1e-9) and d.method == "paired"
    s, v = (make_evaluator(model, tok, f"ppl:{tmp_path / 'd.txt'}", split=sp) for sp in ("search", "verify"))
    assert not set(s.doc_ids) & set(v.doc_ids) and len(s.doc_ids) + len(v.doc_ids) == len(ev.doc_ids)
