"""compare-selectors on a tiny model, and plans from the measured selectors export exactly."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer, words


def _corpus(tmp_path, n=12):
    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(words(24, seed=i) for i in range(n)) + "\n")
    return path


def invoke(*args):
    from click.testing import CliRunner

    from prune_heads.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tiny_tokenizer import SPECIAL, WORDS

    root = tmp_path_factory.mktemp("cmp")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=len(SPECIAL) + len(WORDS))
    model.save_pretrained(root / "model")
    tiny_tokenizer(save_to=root / "model")
    _corpus(root, 24)
    r = invoke("calibrate", root / "model", "--data", root / "text.txt", "--num-samples", 6, "--seq-len", 24,
               "--scores", "ahon_ln,awft_ln", "--device", "cpu", "-o", root / "scores")
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture(scope="module")
def loaded(world):
    from prune_heads.model.loading import load_model

    return load_model(str(world / "model"), device="cpu")


def _strip(plan: dict) -> dict:
    # "sha256": the compensation file's bytes (safetensors orders its metadata per process; the plan's numbers,
    # and the compensation's fingerprint over its header and tensors, are compared)
    volatile = {"wall_seconds", "seconds", "date", "file", "sha256"}
    if isinstance(plan, dict):
        return {k: _strip(v) for k, v in plan.items() if k not in volatile}
    if isinstance(plan, list):
        return [_strip(v) for v in plan]
    return plan


def test_compare_selectors_rows_are_the_plans_select_writes(world, tmp_path):
    """Every row of compare-selectors is `select` with the same options and that row's method: the same plan file
    (the seed, the held-out split and the calibration documents left out of ppl: included), its held-out value
    is that plan's verification, and its perplexity column is `eval --plan` on the same data."""
    text = world / "text.txt"
    common = ["--task", f"ppl:{text}", "--limit", 8, "--max-drop", 0.05, "--relative", "--seed", 3,
              "--allow-underpowered", "--device", "cpu"]
    r = invoke("compare-selectors", "--model", world / "model", "--scores", world / "scores", *common,
               "--selectors", "static:ahon_ln,random,iterative", "--round-size", 2, "--ppl-data", text,
               "--ppl-limit", 6, "-o", tmp_path / "cmp")
    assert r.exit_code == 0, r.output
    rows = {x["selector"]: x for x in json.loads((tmp_path / "cmp" / "results.json").read_text())["rows"]}
    for name, extra in (("static:ahon_ln", ["--score", "ahon_ln"]), ("random", ["--score", "random"]),
                        ("iterative", ["--method", "iterative", "--round-size", 2])):
        out = tmp_path / f"{name.replace(':', '_')}.json"
        r = invoke("select", world / "scores", "--model", world / "model", *common, *extra, "-o", out)
        assert r.exit_code == 0, r.output
        mine = json.loads(out.read_text())
        theirs = json.loads((tmp_path / "cmp" / "plans" / f"{name.replace(':', '_')}_0.05.json").read_text())
        assert _strip(mine) == _strip(theirs), name
        assert mine["task"]["seed"] == 3 and mine["compensation"]["mode"] == "lsq"
        row = rows[name]
        assert row["heads_removed"] == len(mine["removed_heads"])
        assert row["held_out"] == mine["verification"]["result"]["value"]
        r = invoke("eval", world / "model", "--plan", out, "--task", f"ppl:{text}", "--limit", 6, "--seed", 3,
                   "--device", "cpu", "-o", tmp_path / f"{name.replace(':', '_')}-eval.json")
        assert r.exit_code == 0, r.output
        t = json.loads((tmp_path / f"{name.replace(':', '_')}-eval.json").read_text())["tasks"][0]
        assert row["perplexity"] == pytest.approx(t["pruned"]["value"], rel=1e-6)
        assert rows["unpruned"]["perplexity"] == pytest.approx(t["baseline"]["value"], rel=1e-6)
    assert rows["unpruned"]["held_out"] == mine["verification"]["baseline"]["value"]
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert table.count("\n") == len(rows) + 2


def test_compare_has_no_options_of_its_own_for_what_select_has():
    """The options compare-selectors shares with select are select's own (same names, defaults and help)."""
    import click

    from prune_heads.cli.main import cli

    ctx = click.Context(cli)
    sel = {p.name: p for p in cli.get_command(ctx, "select").params}
    cmp = {p.name: p for p in cli.get_command(ctx, "compare-selectors").params}
    own = set(cmp) - set(sel)
    assert own <= {"model_spec", "scores_dir", "selectors", "budgets", "ppl_data", "ppl_limit"}, own
    for name in set(cmp) & set(sel) - {"model_spec", "scores_dir", "output"}:  # (inputs and output differ)
        assert (cmp[name].opts, cmp[name].default, getattr(cmp[name], "help", None)) == \
            (sel[name].opts, sel[name].default, getattr(sel[name], "help", None)), name


def test_shared_measurement_is_done_once_across_budgets(world, loaded, tmp_path, monkeypatch):
    """Two calls on one model: the ablation is measured once (with the selection's compensation) and both
    tables charge its cost; gates train once per call whatever the number of budgets."""
    import prune_heads.scoring.ablation as ablation_mod
    import prune_heads.selection.gates as gates_mod
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection.compare import CompareConfig, run_comparison
    from prune_heads.selection.stage import GatesMethod, SelectConfig

    calls = {"ablation": 0, "gates": 0}
    real_abl, real_gates = ablation_mod.ablation_scores, gates_mod.select_gates
    modes = []

    def count_abl(*a, **k):
        calls["ablation"] += 1
        modes.append(k["compensation"].spec.mode)
        return real_abl(*a, **k)

    def count_gates(*a, **k):
        calls["gates"] += 1
        return real_gates(*a, **k)

    monkeypatch.setattr(ablation_mod, "ablation_scores", count_abl)
    monkeypatch.setattr(gates_mod, "select_gates", count_gates)
    scores = HeadScores.load(world / "scores")
    text = world / "text.txt"
    shared: dict = {}
    tables = []
    for name, task in (("a", f"ppl:{text}"), ("b", f"kl:{text}")):
        select = SelectConfig(task=task, max_drop=0.2, relative=(name == "a"), limit=6, allow_underpowered=True)
        cfg = CompareConfig(selectors=["static:ablation_kl", "gates"], budgets=[0.2, 0.3])
        rows = run_comparison(select, cfg, loaded, scores, tmp_path / name, gates=GatesMethod(target_fraction=0.25,
                              steps=60), progress=False, shared=shared)
        tables.append({(r["selector"], r["max_drop"]): r for r in rows})
    assert calls == {"ablation": 1, "gates": 2} and modes == ["lsq"]
    for sel in ("static:ablation_kl", "gates"):
        assert tables[0][(sel, 0.2)]["forward_equivalents"] == tables[1][(sel, 0.2)]["forward_equivalents"] > 0
    assert tables[0][("gates", 0.2)]["heads_removed"] == tables[0][("gates", 0.3)]["heads_removed"] == 2


def test_gates_that_do_not_converge_give_a_row_not_a_lost_comparison(world, loaded, tmp_path, monkeypatch):
    import prune_heads.selection.gates as gates_mod
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection.compare import CompareConfig, run_comparison
    from prune_heads.selection.stage import GatesMethod, SelectConfig

    def fail(*a, **k):
        raise gates_mod.GatesDidNotConverge("expected open fraction 0.95 after 3 steps, target 0.75")

    monkeypatch.setattr(gates_mod, "select_gates", fail)
    text = world / "text.txt"
    select = SelectConfig(task=f"ppl:{text}", max_drop=0.2, relative=True, limit=6, allow_underpowered=True)
    rows = run_comparison(select, CompareConfig(selectors=["static:ahon_ln", "gates"]), loaded,
                          HeadScores.load(world / "scores"), tmp_path / "cmp", gates=GatesMethod(target_fraction=0.25),
                          progress=False)
    by = {r["selector"]: r for r in rows}
    assert by["gates"]["heads_removed"] is None and "target 0.75" in by["gates"]["error"]
    assert by["static:ahon_ln"]["heads_removed"] is not None
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "| gates | 0.2 | no plan: expected open fraction" in table
    assert (tmp_path / "cmp" / "accuracy_vs_removed.png").exists()
    assert not list((tmp_path / "cmp" / "plans").glob("gates*"))


def test_gates_selector_needs_its_target(world, tmp_path):
    r = invoke("compare-selectors", "--model", world / "model", "--scores", world / "scores", "--task",
               f"ppl:{world / 'text.txt'}", "--max-drop", 0.1, "--relative", "--selectors", "gates", "--device", "cpu",
               "-o", tmp_path / "cmp")
    assert r.exit_code == 2 and "needs its target: --target-fraction F or --l0-penalty P" in r.output, r.output


def test_measured_plans_export_exactly(tmp_path):
    from test_iterative import CountingEvaluator
    from transformers import AutoModelForCausalLM

    from prune_heads.export import export_checkpoint as export
    from prune_heads.model.masking import static_mask
    from prune_heads.plan import Plan
    from prune_heads.selection.gates import select_gates
    from prune_heads.selection.iterative import select_iterative

    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    src = tmp_path / "src"
    model.save_pretrained(src)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 100, (10,), generator=g).tolist() for _ in range(2)]
    plans = {
        "iterative": select_iterative(model, seqs, CountingEvaluator(), max_drop=3, round_size=2, progress=False),
        "gates": select_gates(model, seqs, target_fraction=0.25, steps=60, lr=0.1, progress=False),
    }
    ids = torch.tensor([seqs[0]])
    for name, plan in plans.items():
        plan = Plan.load(plan.save(tmp_path / f"{name}.json"))
        assert plan.removed_heads
        res = export(str(src), plan, tmp_path / f"out_{name}", format="sliced", progress=False)
        assert res.verification is None or res.verification.get("passed", True)
        pruned = AutoModelForCausalLM.from_pretrained(tmp_path / f"out_{name}", trust_remote_code=True).eval()
        with torch.no_grad(), static_mask(model, plan):
            expected = model(input_ids=ids).logits
        with torch.no_grad():
            got = pruned(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_options_only_some_methods_read_apply_to_those_rows():
    """``select --allow-underpowered --surrogate margin`` in a comparison: the static rows take them, the
    iterative and gates rows (which ``select`` would refuse them for) get the defaults instead of failing."""
    from prune_heads.selection.compare import _config_of, _Setup, method_configs
    from prune_heads.selection.stage import GatesMethod, SelectConfig

    select = SelectConfig(task="ppl:x", max_drop=0.1, allow_underpowered=True, surrogate="margin")
    setup = _Setup(select, None, None, method_configs(gates=GatesMethod(target_fraction=0.25)), None, None, False)
    static, iterative, gates = (_config_of(setup, name, 0.05) for name in ("static:ahon_ln", "iterative", "gates"))
    assert (static.allow_underpowered, static.surrogate, static.max_drop) == (True, "margin", 0.05)
    assert (iterative.allow_underpowered, iterative.surrogate) == (True, None)
    assert (gates.allow_underpowered, gates.surrogate, gates.method) == (False, None, GatesMethod(target_fraction=0.25))
    # and each is what `select` accepts with that method
    with pytest.raises(Exception, match="allow_underpowered"):
        SelectConfig(task="ppl:x", max_drop=0.1, allow_underpowered=True, method=GatesMethod(target_fraction=0.25))
