"""The static selector on the real SmolLM2-135M with an offline lm-eval task (small limits)."""

from __future__ import annotations

import warnings

import pytest

pytestmark = pytest.mark.slow


def test_select_static_on_smollm2_arc_easy(smollm2):
    from prune_heads.evaluation import make_evaluator
    from prune_heads.scoring.calibrate import calibrate
    from prune_heads.selection import max_probes, select_static

    model, tok = smollm2.model, smollm2.tokenizer
    scores = calibrate(model, "wikitext2", tokenizer=tok, scores=["ahon_ln"], num_samples=4, seq_len=64,
                       batch_size=4, progress=False)
    ev = make_evaluator(model, tok, "arc_easy", limit=8, split="search", batch_size=16)
    ver = make_evaluator(model, tok, "arc_easy", limit=8, split="verify", batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = select_static(model, scores, ev, score_id="ahon_ln", max_drop=0.125, verify_evaluator=ver,
                             accept_unverified=True, progress=False)  # 8 held-out documents decide nothing
    sel = plan.selection
    assert sel.cost.evaluations == len(sel.trace) <= max_probes(sel.details.num_units) + 1
    assert sel.baseline["value"] - sel.result["value"] <= 0.125 + 1e-9
    v = sel.verification
    assert v.task["split"] == "verify" and v.verdict in ("within", "inconclusive", "over")
    assert v.drop.estimate == pytest.approx(v.baseline["value"] - v.result["value"], abs=1e-12)
    plan.validate(model)
    # independent re-evaluation of the chosen plan with a fresh (uncached) evaluator agrees
    fresh = make_evaluator(model, tok, "arc_easy", limit=8, split="search", batch_size=16)
    again = fresh(plan.mask(plan.validate(model)))
    assert again.value == pytest.approx(sel.result["value"], abs=1e-9)


def test_paired_statistics_and_surrogates_on_smollm2(smollm2):
    """On the real task: per-document scores pair up, and the margins say what lm-eval's verdicts say."""
    import numpy as np
    import torch

    from prune_heads.evaluation import make_evaluator
    from prune_heads.evaluation.paired import DocScores, paired_drop, surrogate_drop, surrogate_values

    model, tok = smollm2.model, smollm2.tokenizer
    removed = torch.zeros(30 * 9, dtype=torch.bool)
    removed[torch.randperm(30 * 9, generator=torch.Generator().manual_seed(0))[:60]] = True
    removed = removed.view(30, 9)
    for metric in ("acc", "acc_norm"):
        ev = make_evaluator(model, tok, "arc_easy", limit=10, batch_size=16, metric=metric)
        b, m = ev(), ev(removed)
        assert b.docs.ids == m.docs.ids and len(b.docs) == 10
        d = paired_drop(b, m, confidence=0.9)
        assert d.estimate == pytest.approx(b.value - m.value, abs=1e-12) and d.upper >= d.estimate
        for r in (b, m):  # margin > 0 exactly where lm-eval scored the document right
            zero = DocScores(r.docs.ids, r.docs.values, choice_scores=tuple(np.zeros_like(s) for s in r.docs.choice_scores),
                             gold=r.docs.gold)
            assert ((surrogate_values(r.docs, zero, "margin") > 0) == (r.docs.values == 1.0)).all()
        s = surrogate_drop(b, m, "margin")
        assert s.estimate > 0  # removing 60 heads costs the gold answers margin on average
