"""Selection under compensation: batched ablation with per-copy compensation against one full forward
per unit, the selectors' plans record the compensation, and the plan checks refuse what does not fit."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model
from tiny_tokenizer import tiny_tokenizer, words

from prune_heads.compensation import (
    CompensationSpec,
    Compensator,
    collect_moments,
    compensation_for_plan,
    compensator_for,
    compute_compensation,
)
from prune_heads.errors import ModelMismatchError, PruneHeadsError
from prune_heads.model.masking import static_mask
from prune_heads.plan import Plan
from prune_heads.scoring.ablation import measure_units

SEQS = [[1, 5, 9, 13, 2, 7, 30, 4, 8, 8, 3], [1, 8, 8, 4, 17, 6], [1, 60, 3, 17, 22, 5, 5], [1, 2, 3, 4, 5, 6, 7, 8],
        [1, 9, 9, 31, 44, 2, 6, 70, 71, 72, 3, 4, 4]]


def naive_effects(model, seqs, removed, units, comp_of):
    """One full forward per (sequence, unit), unpadded, under static_mask + that mask's compensation."""
    kl = torch.zeros(len(seqs), len(units))
    with torch.no_grad():
        for n, s in enumerate(seqs):
            ids = torch.tensor([s])
            ref = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
            for j, unit in enumerate(units):
                mask = removed.clone()
                for i, h in unit:
                    mask[i, h] = True
                with static_mask(model, mask, compensation=comp_of(mask)):
                    out = model(input_ids=ids, use_cache=False).logits[0, :-1].double()
                kl[n, j] = float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                            reduction="none").sum(-1).mean())
    return kl


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_under_compensation_equals_one_forward_per_unit(family):
    model = tiny_model(family, layers=3, heads=4, kv_heads=2).double()
    moments = collect_moments(model, SEQS, progress=False)
    spec = CompensationSpec("lsq", ridge=1e-3)
    removed = torch.zeros(3, 4, dtype=torch.bool)
    removed[0, 3] = removed[2, 1] = True
    units = [[(0, 0)], [(1, 2)], [(2, 0)], [(1, 0), (1, 1)], [(0, 1), (2, 2)]]  # a KV group; one across layers
    vals, cost = measure_units(model, SEQS, units, scores=["ablation_kl"], removed=removed, batch_size=2,
                               progress=False, compensation=Compensator(spec, moments=moments), heads_per_pass=2)
    want = naive_effects(model, SEQS, removed, units, lambda m: compute_compensation(m, spec, moments=moments))
    # (Gemma-2's soft-capped logits take the float32 direct formula: ~1e-7 absolute)
    torch.testing.assert_close(vals["ablation_kl"].double(), want.double(), rtol=1e-5, atol=5e-7)
    assert cost.extra["compensation"] == "lsq"
    # and it is not the zeroing measurement
    zeroed, _ = measure_units(model, SEQS, units, scores=["ablation_kl"], removed=removed, progress=False)
    assert float((zeroed["ablation_kl"] - vals["ablation_kl"]).abs().max()) > 1e-4


def test_ablation_under_sequential_compensation_matches_for_the_first_touched_layer():
    """Sequential: a copy's own layer is solved from the pruned prefix's statistics (exact for units of the
    last pruned layer, whose later layers carry no compensation)."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2).double()
    spec = CompensationSpec("lsq", sequential=True, ridge=1e-3)
    removed = torch.zeros(2, 4, dtype=torch.bool)
    removed[0, 1] = True
    units = [[(1, 0)], [(1, 3)]]
    comp = Compensator(spec, model=model, seqs=SEQS)
    vals, _ = measure_units(model, SEQS, units, scores=["ablation_kl"], removed=removed, progress=False,
                            compensation=comp)
    want = naive_effects(model, SEQS, removed, units, lambda m: Compensator(spec, model=model, seqs=SEQS)(m))
    torch.testing.assert_close(vals["ablation_kl"].double(), want.double(), rtol=1e-5, atol=1e-8)


# ---- selectors record the compensation --------------------------------------------------------------

def _evaluator(model, tok, comp=None):
    from prune_heads.evaluation import make_evaluator

    return make_evaluator(model, tok, "kl:" + _docs_file(), limit=6, compensation=comp)


_DOCS = None


def _docs_file():
    import tempfile
    from pathlib import Path

    global _DOCS
    if _DOCS is None:
        d = Path(tempfile.mkdtemp())
        (d / "docs.txt").write_text("\n\n".join(words(40, seed=i) for i in range(24)))
        _DOCS = str(d / "docs.txt")
    return _DOCS


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, vocab=len(tok)).double()
    from prune_heads import calibrate

    scores = calibrate(model, _docs_file(), tokenizer=tok, num_samples=8, seq_len=32, progress=False,
                       scores=["ahon_ln", "lsq_error", "lsq_error_group"])
    return model, tok, scores


def test_static_selection_under_compensation_records_it_and_evaluates_compensated(tiny):
    from prune_heads.selection import select_static

    model, tok, scores = tiny
    comp = compensator_for("lsq", scores=scores)
    ev = _evaluator(model, tok, comp)
    plan = select_static(model, scores, ev, score_id="lsq_error", max_drop=0.05, progress=False)
    rec = plan.selection.compensation
    assert rec["mode"] == "lsq" and rec["moments"]["fingerprint"] == scores.moments.fingerprint()
    # the recorded result is the compensated model's, and differs from the zeroed one
    if plan.removed_heads:
        mask = plan.mask(type("L", (), {"num_layers": 2, "num_heads": 4})())
        compensated = _evaluator(model, tok, comp)(mask)
        assert plan.selection.result["value"] == pytest.approx(compensated.value)
        assert _evaluator(model, tok)(mask).value != pytest.approx(compensated.value)
    # and the plan rebuilds the same compensation from the scores
    rebuilt = compensation_for_plan(plan, scores=scores, model=model)
    if plan.removed_heads:
        assert rebuilt.fingerprint() == comp(rebuilt.removed_mask()).fingerprint()


@pytest.mark.parametrize("policy", ["free", "kv-groups", "uniform"])
def test_every_gqa_policy_selects_under_compensation(tiny, policy):
    from prune_heads.selection import select_static

    model, tok, scores = tiny
    comp = compensator_for(CompensationSpec("mean"), scores=scores)
    score = "lsq_error_group" if policy == "kv-groups" else "lsq_error"
    plan = select_static(model, scores, _evaluator(model, tok, comp), score_id=score, max_drop=1.0, progress=False,
                         policy=policy)
    assert plan.selection.compensation["mode"] == "mean" and plan.removed_heads
    if policy == "kv-groups":
        for i in range(2):
            gone = {h // 2 for layer, h in plan.removed_heads if layer == i}
            assert all(sum(1 for layer, h in plan.removed_heads if layer == i and h // 2 == g) == 2 for g in gone)


def test_iterative_and_gates_take_compensation(tiny):
    from prune_heads.selection.gates import select_gates
    from prune_heads.selection.iterative import select_iterative

    model, tok, scores = tiny
    comp = compensator_for("lsq", scores=scores)
    seqs = [s for s in SEQS]
    plan = select_iterative(model, seqs, _evaluator(model, tok), max_drop=1.0, round_size=2, max_rounds=1,
                            compensation=comp, progress=False)
    assert plan.selection.compensation["mode"] == "lsq"
    assert plan.selection.result["details"]["compensation"] == "lsq"
    # a compensating evaluator alone is enough: the measurement follows it
    same = select_iterative(model, seqs, _evaluator(model, tok, comp), max_drop=1.0, round_size=2, max_rounds=1,
                            progress=False)
    assert same.selection.compensation["mode"] == "lsq" and same.removed_heads == plan.removed_heads
    g = select_gates(model, seqs, l0_penalty=1.0, init=-1.0, steps=2, evaluator=_evaluator(model, tok), compensation=comp,
                     progress=False)
    assert g.removed_heads and g.selection.compensation["mode"] == "lsq"
    assert g.selection.result["details"]["compensation"] == "lsq"


# ---- refusing what does not fit ---------------------------------------------------------------------

def test_plan_checks(tiny, tmp_path):
    model, tok, scores = tiny
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = True
    comp = compensator_for("lsq", scores=scores)
    plan = Plan([(0, 1)], {"compensation": comp.record()})
    assert compensation_for_plan(plan, scores=scores, model=model).layers[0].removed == (1,)
    # the scores directory without moments: says which command recomputes them
    scores.save(tmp_path / "s")
    (tmp_path / "s" / "moments.safetensors").unlink()
    with pytest.raises(PruneHeadsError, match="no moments.safetensors.*prune-heads calibrate"):
        compensation_for_plan(plan, scores=tmp_path / "s", model=model)
    with pytest.raises(PruneHeadsError, match="prune-heads calibrate"):
        compensator_for("lsq", scores=tmp_path / "s")
    # moments of another data set: fingerprint mismatch
    other = collect_moments(model, SEQS, progress=False)
    with pytest.raises(ModelMismatchError, match="another model or data set"):
        compensation_for_plan(plan, moments=other, model=model)
    # moments of another model: shapes
    with pytest.raises(ModelMismatchError, match="another model"):
        compensation_for_plan(plan, moments=scores.moments, model=tiny_model("llama", layers=3, heads=4, kv_heads=2))
    # a plan without compensation gives None
    assert compensation_for_plan(Plan([(0, 1)]), scores=scores, model=model) is None


def test_an_evaluator_with_a_plans_fixed_compensation(tiny):
    """``eval --plan``: the plan's Compensation evaluates that plan and refuses any other mask."""
    model, tok, scores = tiny
    plan = Plan([(0, 1), (1, 3)], {"compensation": compensator_for("lsq", scores=scores).record()})
    comp = compensation_for_plan(plan, scores=scores, model=model)
    mask = plan.mask(type("L", (), {"num_layers": 2, "num_heads": 4})())
    fixed = _evaluator(model, tok, comp)
    assert fixed(mask).value == pytest.approx(_evaluator(model, tok, compensator_for("lsq", scores=scores))(mask).value)
    assert fixed(None).details["compensation"] == "lsq"
    with pytest.raises(PruneHeadsError, match="other removed heads"):
        fixed(torch.zeros(2, 4, dtype=torch.bool).index_fill_(1, torch.tensor([0]), True))


# ---- compensated ablation from the CLI -------------------------------------------------------------

def test_calibrate_cli_measures_ablation_under_compensation(tmp_path):
    """``calibrate --scores ablation_kl --ablation-compensate lsq``: every head's score equals one full forward per
    head with that head removed and lsq-compensated from the same calibration's moments (independent loop); the
    scores directory records the compensation; without the option the scores are the zeroing ones, which differ.
    ``select --score ablation_kl`` warns when the plan's compensation is not the one the ranking was measured
    under, and is silent when they agree."""
    import json

    from click.testing import CliRunner

    from prune_heads.cli.main import cli
    from prune_heads.scoring.head_scores import HeadScores

    tok = tiny_tokenizer()
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, vocab=len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": words(40, seed=i)}) for i in range(12)) + "\n")
    common = ["calibrate", str(tmp_path / "m"), "--data", str(data), "--num-samples", "4", "--seq-len", "12",
              "--scores", "ablation_kl,ahon_ln"]
    r = CliRunner().invoke(cli, [*common, "--ablation-compensate", "lsq", "-o", str(tmp_path / "lsq")])
    assert r.exit_code == 0, r.output + str(r.exception)
    r = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "zero")])
    assert r.exit_code == 0, r.output + str(r.exception)
    lsq, zero = HeadScores.load(tmp_path / "lsq"), HeadScores.load(tmp_path / "zero")
    assert lsq.meta["ablation"]["compensation"]["mode"] == "lsq"
    assert zero.meta["ablation"]["compensation"]["mode"] == "none"

    m = model.double()
    spec = CompensationSpec("lsq")
    moments = lsq.moments
    units = [[(i, h)] for i in range(2) for h in range(4)]
    none = torch.zeros(2, 4, dtype=torch.bool)
    want = naive_effects(m, lsq.tokens, none, units, lambda mask: compute_compensation(mask, spec, moments=moments))
    torch.testing.assert_close(lsq.mean("ablation_kl").double().flatten(), want.mean(0).double(), rtol=2e-3, atol=1e-6)
    assert not torch.allclose(zero.mean("ablation_kl"), lsq.mean("ablation_kl"), rtol=1e-2)

    def select(scores_dir, compensate):
        return CliRunner().invoke(cli, ["select", str(scores_dir), "--model", str(tmp_path / "m"), "--score",
                                        "ablation_kl", "--compensate", compensate, "--task", f"ppl:{data}",
                                        "--max-drop", "5", "--relative", "--limit", "2", "--no-verify",
                                        "--confidence", "0", "-o", str(tmp_path / f"plan-{compensate}-{scores_dir.name}.json")])

    import warnings

    with pytest.warns(UserWarning, match="ablation_kl was measured with compensation 'none' but the selection "
                                         "compensates with 'lsq'; recalibrate with --ablation-compensate lsq"):
        r = select(tmp_path / "zero", "lsq")
    assert r.exit_code == 0, r.output + str(r.exception)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = select(tmp_path / "lsq", "lsq")
    assert r.exit_code == 0, r.output + str(r.exception)
    assert not [w for w in seen if "was measured with compensation" in str(w.message)]
