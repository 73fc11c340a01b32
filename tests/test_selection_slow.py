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
                             progress=False)
    m = plan.meta
    assert m["search_evaluations"] <= max_probes(m["num_units"]) + 1
    assert m["baseline"]["value"] - m["result"]["value"] <= 0.125 + 1e-9
    assert m["verification"]["task"]["split"] == "verify"
    plan.validate(model)
    # independent re-evaluation of the chosen plan with a fresh (uncached) evaluator agrees
    fresh = make_evaluator(model, tok, "arc_easy", limit=8, split="search", batch_size=16)
    again = fresh(plan.mask(plan.validate(model)))
    assert again.value == pytest.approx(m["result"]["value"], abs=1e-9)
