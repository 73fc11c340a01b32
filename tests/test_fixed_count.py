"""Fixed-count selection (``select --heads N`` / ``--fraction F``, ``select.heads`` / ``select.fraction``):
the first units of the ranking the budgeted search walks, compensated the same way, with no budget claimed.

References: the budgeted search's own probes (a fixed count equal to a probe's count evaluates the same model
on the search split), a naive ranking for the heads chosen, and the exported checkpoint for the measured
held-out cost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer, words

from prune_heads.cli.main import cli
from prune_heads.plan import Plan
from prune_heads.schema import ConfigError
from prune_heads.selection.stage import SelectConfig, StaticMethod, run_select

pytestmark = pytest.mark.filterwarnings("ignore:layer \\d+. the covariance", "ignore:verification inconclusive")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixed")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=len(SPECIAL) + len(WORDS))
    model.save_pretrained(root / "model")
    tiny_tokenizer(save_to=root / "model")
    (root / "docs.txt").write_text("\n\n".join(words(24, seed=i) for i in range(24)) + "\n")
    r = invoke("calibrate", root / "model", "--data", root / "docs.txt", "--num-samples", 8, "--seq-len", 24,
               "--batch-size", 4, "--scores", "ahon_ln", "--device", "cpu", "-o", root / "scores")
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture(scope="module")
def loaded(world):
    from prune_heads.model.loading import load_model

    return load_model(str(world / "model"), device="cpu")


@pytest.fixture(scope="module")
def scores(world):
    from prune_heads.scoring.head_scores import HeadScores

    return HeadScores.load(world / "scores")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def task(world: Path) -> str:
    return f"ppl:{world / 'docs.txt'}"


# ---- the ranking and the compensation are the search's ------------------------------------------
@pytest.mark.parametrize("policy", ["free", "kv-groups", "uniform"])
@pytest.mark.parametrize("compensate", ["none", "mean", "lsq"])
def test_fixed_count_evaluates_the_model_the_search_probed(world, loaded, scores, policy, compensate):
    """Every probe of the budgeted search at k units removed the first k units of its ranking, compensated: a
    fixed count of that many heads must be the same model (same value on the same search documents)."""
    common = {"task": task(world), "limit": 8, "policy": policy, "compensate": compensate, "verify": False}
    searched = run_select(SelectConfig(max_drop=5.0, relative=True, search="ascend", confidence=0.0, **common),
                          loaded, scores, None, progress=False)
    probes = [p for p in searched.selection.trace if p.k > 0]
    assert probes
    for p in probes[:2]:
        fixed = run_select(SelectConfig(heads=p.heads_removed, **common), loaded, scores, None, progress=False)
        sel = fixed.selection
        assert sel.budget is None and sel.details.search == "fixed" and sel.details.heads == p.heads_removed
        assert len(fixed.removed_heads) == p.heads_removed and sel.score_id == searched.selection.score_id
        assert sel.compensation["mode"] == compensate
        assert sel.result["value"] == pytest.approx(p.value, rel=1e-6)
        assert sel.baseline["value"] == pytest.approx(searched.selection.baseline["value"], rel=1e-9)
    if searched.selection.heads_removed:  # and at the searched count, the very same heads
        same = run_select(SelectConfig(heads=searched.selection.heads_removed, **common), loaded, scores, None,
                          progress=False)
        assert sorted(same.removed_heads) == sorted(searched.removed_heads)


def naive_free(values: torch.Tensor, n: int, floor: int) -> list[tuple[int, int]]:
    """The n most inactive heads, most inactive first, skipping a head whose layer would keep fewer than floor."""
    L, H = values.shape
    order = sorted(((layer, head) for layer in range(L) for head in range(H)),
                   key=lambda lh: (-float(values[lh]), lh[0] * H + lh[1]))
    left, out = [H] * L, []
    for layer, head in order:
        if len(out) == n:
            break
        if left[layer] > floor:
            left[layer] -= 1
            out.append((layer, head))
    return out


@pytest.mark.parametrize("n", [1, 3, 6])
def test_free_fixed_count_takes_the_most_inactive_heads(world, loaded, scores, n):
    from prune_heads.scoring.score_defs import inactivity

    plan = run_select(SelectConfig(heads=n, method=StaticMethod(score="ahon_ln"), compensate="none"), loaded, scores,
                      None, progress=False)
    ref = naive_free(inactivity(scores.mean("ahon_ln"), "ahon_ln"), n, floor=1)
    assert sorted(map(tuple, plan.removed_heads)) == sorted(ref)
    assert plan.selection.baseline is None and plan.selection.verification is None  # no task: nothing measured


def test_fraction_rounds_to_whole_units(world, loaded, scores):
    # 8 heads; kv-groups units are 2 heads: 0.3 * 8 = 2.4 heads -> 1.2 units -> 1 unit; 0.4 -> 1.6 -> 2 units
    for fraction, heads in ((0.3, 2), (0.4, 4)):
        plan = run_select(SelectConfig(fraction=fraction, policy="kv-groups", compensate="none"), loaded, scores,
                          None, progress=False)
        assert len(plan.removed_heads) == heads and plan.selection.details.fraction == fraction
        groups = {(layer, head // 2) for layer, head in plan.removed_heads}
        assert len(groups) * 2 == heads  # whole KV groups
    plan = run_select(SelectConfig(fraction=0.5, policy="uniform", compensate="none"), loaded, scores, None,
                      progress=False)
    assert plan.selection.per_layer_counts == [2, 2]
    assert sorted(h // 2 for _, h in plan.removed_heads) == [0, 0, 1, 1]  # one head from every group of every layer


# ---- the measured cost is the export's ----------------------------------------------------------
def test_held_out_cost_is_the_exported_models(world, tmp_path):
    """The plan's held-out verification (no budget, verdict measured) equals the exported checkpoint evaluated
    on the same held-out documents; the card reports it and claims no budget."""
    docs = world / "docs.txt"
    r = invoke("select", world / "scores", "--model", world / "model", "--task", task(world), "--limit", 8,
               "--heads", 3, "--seed", 2, "--device", "cpu", "-o", tmp_path / "plan.json")
    assert r.exit_code == 0, r.output
    assert "fixed count, no budget" in r.output and "(measured)" in r.output
    plan = Plan.load(tmp_path / "plan.json")
    v = plan.selection.verification
    assert v.verdict == "measured" and v.within_budget is None and v.drop.allowed is None
    assert plan.selection.budget is None and plan.selection.compensation["mode"] == "lsq"
    r = invoke("export", world / "model", "--plan", tmp_path / "plan.json", "--verify-sequences", 2,
               "--verify-seq-len", 12, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    r = invoke("eval", world / "model", "--task", f"ppl:{docs}", "--split", "verify", "--limit", 8, "--seed", 2,
               "--scores", world / "scores", "--device", "cpu", "--plan", tmp_path / "plan.json",
               "-o", tmp_path / "masked.json")
    assert r.exit_code == 0, r.output
    from prune_heads.evaluation.stage import EvalTask, EvaluateConfig, PrunedSide, run_evaluate
    from prune_heads.model.loading import load_model

    res = run_evaluate(EvaluateConfig(tasks=[EvalTask(task=f"ppl:{docs}", split="verify", limit=8)], seed=2,
                                      speed_seq_len=0),
                       load_model(str(world / "model"), device="cpu"), "m",
                       PrunedSide(plan=plan, export_dir=tmp_path / "out"))
    t = res.tasks[0]
    assert t.baseline["value"] == pytest.approx(v.baseline["value"], rel=1e-9)
    assert t.pruned["value"] == pytest.approx(v.result["value"], rel=1e-4)  # the export against the masked original
    assert v.drop.estimate == pytest.approx(t.pruned["value"] - t.baseline["value"], rel=1e-3)  # ppl: a rise is a drop
    card = (tmp_path / "out" / "README.md").read_text()
    assert "No budget was searched or claimed" in card and "## Selection budget" not in card
    assert "3 heads" in card and f"{v.drop.estimate:.4g}" in card


# ---- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (("--heads", 2, "--fraction", 0.25), "--heads: give at most one of heads (--heads) and fraction (--fraction)"),
    (("--heads", 2, "--max-drop", 0.1), "--max-drop: applies to a search within a budget"),
    (("--fraction", 0.25, "--relative"), "--relative: applies to a search within a budget"),
    (("--heads", 2, "--surrogate", "margin"), "--surrogate: applies to a search within a budget"),
    (("--heads", 2, "--method", "iterative"), "--heads: a fixed count (--heads/--fraction) ranks like the static"),
    (("--heads", 3, "--gqa", "kv-groups"), "--heads 3 is not a whole number of removal units under --gqa kv-groups"),
    (("--heads", 6, "--gqa", "uniform"), "use 4 or 8, or --fraction"),
    (("--heads", 7), "--heads 7 asks for 7 heads, but --gqa free with the layers' floor"),
    (("--fraction", 0.05), "--fraction 0.05 (0.4 of 8 heads) is less than half a removal unit"),
    (("--fraction", 1.0), "--fraction: must be a number in (0, 1)"),
])
def test_contradictions_and_ranges_are_one_line_errors(world, tmp_path, extra, message):
    r = invoke("select", world / "scores", "--model", world / "model", "--compensate", "none", "--device", "cpu",
               *extra, "-o", tmp_path / "plan.json")
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]  # (progress bars aside)
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.output, r.output
    assert not (tmp_path / "plan.json").exists()


def test_budgeted_selection_still_needs_its_budget():
    with pytest.raises(ConfigError, match="max_drop"):
        SelectConfig(task="ppl:x")
    assert SelectConfig(heads=2).fixed and not SelectConfig(task="ppl:x", max_drop=0.1).fixed


def test_recipe_fixed_count_is_the_cli_plan(world, tmp_path):
    from prune_heads.pipeline import stages as P

    docs = world / "docs.txt"
    recipe = {"name": "fixed", "model": {"id": str(world / "model"), "device": "cpu"},
              "calibration": {"data": str(docs), "num_samples": 8, "seq_len": 24, "batch_size": 4,
                              "scores": ["ahon_ln"]},
              "select": {"task": f"ppl:{docs}", "limit": 8, "fraction": 0.25, "policy": "kv-groups", "seed": 1}}
    summary = P.run(recipe, tmp_path / "run", progress=False, echo=None, stop_after="select")
    assert summary.selection["budget"] == "none (fixed count)"
    r = invoke("select", tmp_path / "run" / "calibrate" / "scores", "--model", world / "model", "--task",
               f"ppl:{docs}", "--limit", 8, "--fraction", 0.25, "--gqa", "kv-groups", "--seed", 1, "--device", "cpu",
               "-o", tmp_path / "plan.json")
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "plan.json").read_text())
    b = json.loads((tmp_path / "run" / "select" / "plan.json").read_text())
    assert a["removed_heads"] == b["removed_heads"] and len(a["removed_heads"]) == 2
    assert a["details"] == b["details"] and a["details"]["search"] == "fixed"
    assert a["verification"]["drop"] == b["verification"]["drop"]
