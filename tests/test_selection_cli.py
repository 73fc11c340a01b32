"""``prune-heads select`` / ``sweep`` end to end on a tiny saved model with the real evaluator (perplexity)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer, words

from prune_heads.cli.main import cli
from prune_heads.plan import Plan
from prune_heads.scoring.calibrate import calibrate


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sel")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8)
    model.save_pretrained(root / "model")
    tok = tiny_tokenizer(save_to=root / "model")
    text = "\n\n".join(words(30, seed=i) for i in range(24))
    (root / "docs.txt").write_text(text)
    seqs = [tok(words(20, seed=100 + i)).input_ids for i in range(8)]
    calibrate(model, seqs, scores=["ahon_ln", "awft"], batch_size=8, progress=False).save(root / "scores")
    return root


def _run(args):
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    return r


def test_select_writes_a_valid_plan(setup):
    root = setup
    out = root / "plan.json"
    r = _run(["select", str(root / "scores"), "--model", str(root / "model"), "--task", f"ppl:{root / 'docs.txt'}",
              "--max-drop", "0.05", "--relative", "--limit", "6", "--gqa", "uniform", "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["policy"] == "uniform" and d["method"] == "static" and d["budget"]["relative"] is True
    assert d["budget"]["metric"] == "perplexity" and d["budget"]["higher_is_better"] is False
    assert d["task"]["split"] == "search" and d["verification"]["task"]["split"] == "verify"
    assert d["cost"]["evaluations"] == len(d["trace"]) <= d["cost"]["max_evaluations"]
    # uniform: every KV group of every layer lost the same number of heads
    plan = Plan.load(out)
    m = plan.mask(plan.validate(_config(root)))
    assert (m.reshape(2, 2, 2).sum(-1) == d["details"]["k"]).all()
    # existing output refused
    r = CliRunner().invoke(cli, ["select", str(root / "scores"), "--model", str(root / "model"), "--task",
                                 f"ppl:{root / 'docs.txt'}", "--max-drop", "0.05", "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output


def _config(root):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(root / "model")


def test_select_bad_inputs(setup, tmp_path):
    root = setup
    base = ["select", str(root / "scores"), "--model", str(root / "model"), "--task", f"ppl:{root / 'docs.txt'}",
            "--limit", "4", "--device", "cpu", "-o", str(tmp_path / "p.json")]
    r = CliRunner().invoke(cli, [*base, "--max-drop", "-0.1"])
    assert r.exit_code == 2 and "max-drop" in r.output
    r = CliRunner().invoke(cli, [*base, "--max-drop", "0.1", "--score", "bogus"])
    assert r.exit_code == 2 and "unknown score" in r.output
    r = CliRunner().invoke(cli, [*base, "--max-drop", "0.1", "--min-heads-per-layer", "0"])
    assert r.exit_code == 2 and "allow-empty-layers" in r.output
    other = tiny_model("llama", layers=3, heads=4, kv_heads=2, head_dim=8)
    other.save_pretrained(tmp_path / "other")
    tiny_tokenizer(save_to=tmp_path / "other")
    r = CliRunner().invoke(cli, ["select", str(root / "scores"), "--model", str(tmp_path / "other"), "--task",
                                 f"ppl:{root / 'docs.txt'}", "--max-drop", "0.1", "-o", str(tmp_path / "q.json")])
    assert r.exit_code == 2 and "another model" in r.output


def test_sweep_cli(setup):
    root = setup
    out = root / "sweep"
    r = _run(["sweep", str(root / "scores"), "--model", str(root / "model"), "--task", f"ppl:{root / 'docs.txt'}",
              "--scores", "ahon_ln", "--fractions", "0,0.25,0.5", "--limit", "4", "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    d = json.loads((out / "sweep.json").read_text())
    assert {(row["score"], row["fraction"]) for row in d["rows"]} == {
        (s, f) for s in ("ahon_ln", "random") for f in (0.0, 0.25, 0.5)}
    assert (out / "sweep.png").exists() and "| ahon_ln |" in (out / "table.md").read_text()


def test_measured_methods_dispatch(setup, tmp_path, monkeypatch):
    import prune_heads.selection.iterative as iterative

    root = setup
    seen = {}

    def fake_iterative(model, seqs, evaluator, **kw):
        seen.update(kw, seqs=seqs, split=evaluator.task_config["split"])
        return Plan([(0, 1)], {"method": "iterative", "heads_total": 8})

    monkeypatch.setattr(iterative, "select_iterative", fake_iterative)
    out = tmp_path / "it.json"
    r = _run(["select", str(root / "scores"), "--model", str(root / "model"), "--task", f"ppl:{root / 'docs.txt'}",
              "--max-drop", "0.1", "--method", "iterative", "--round-size", "2", "--data", str(root / "docs.txt"),
              "--limit", "4", "--no-verify", "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert seen["round_size"] == 2 and seen["score_id"] == "ablation_kl" and seen["split"] == "search"
    assert seen["verify_evaluator"] is None and len(seen["seqs"]) > 0
    assert Plan.load(out).removed_heads == [(0, 1)]
    # scores calibrated on pre-tokenised data carry no data spec: --data is required, said clearly
    r = CliRunner().invoke(cli, ["select", str(root / "scores"), "--model", str(root / "model"), "--task",
                                 f"ppl:{root / 'docs.txt'}", "--max-drop", "0.1", "--method", "iterative",
                                 "--limit", "4", "-o", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "--data" in r.output


def test_a_registered_selector_is_a_cli_method_without_any_branch(setup, tmp_path, monkeypatch):
    """Selection dispatches on the method config's type: a new selector is one registration, and its
    options become CLI flags and recipe keys with their checks."""
    from dataclasses import dataclass

    from prune_heads.schema import Config, option
    from prune_heads.selection import stage

    @dataclass
    class FirstHeads(Config):
        count: int = option(1, ge=1, help="heads of layer 0 to remove")

    def first_heads(cfg, ctx):
        return Plan([(0, h) for h in range(cfg.method.count)], {"method": "manual"})

    monkeypatch.setitem(stage.METHODS, "first", FirstHeads)
    monkeypatch.setitem(stage.SELECTORS, FirstHeads, first_heads)
    # the command is built from the registry when its module is imported: rebuild it with the new method
    import importlib

    import prune_heads.cli.select_cmd as select_cmd

    importlib.reload(select_cmd)
    try:
        out = tmp_path / "first.json"
        base = ["select", str(setup / "scores"), "--model", str(setup / "model"), "--task",
                f"ppl:{setup / 'docs.txt'}", "--max-drop", "0.1", "--no-verify", "--compensate", "none"]
        r = CliRunner().invoke(cli, [*base, "-o", str(out), "--method", "first", "--count", "3"])
        assert r.exit_code == 0, r.output
        assert Plan.load(out).removed_heads == [(0, 0), (0, 1), (0, 2)]
        r = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "x.json"), "--method", "first", "--count", "0"])
        assert r.exit_code == 2 and "--count: must be an integer >= 1" in r.output
        r = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "y.json"), "--count", "2"])
        assert r.exit_code == 2 and "--count: applies to method first, not static" in r.output
    finally:
        monkeypatch.undo()
        importlib.reload(select_cmd)
