"""``prune-heads eval`` end to end on a tiny saved model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_evaluation import REMOVED, char_tokenizer, hand_mc, write_mc, zeroed_copy
from tiny_models import tiny_model

from prune_heads.cli.main import cli
from prune_heads.model.fingerprint import fingerprint
from prune_heads.plan import Plan


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8)
    tok = char_tokenizer()
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    Plan(REMOVED, {"fingerprint": fingerprint(model)}).save(d / "plan.json")
    write_mc(d / "q.jsonl", n=10)
    return d, model, tok


def run(*args):
    return CliRunner().invoke(cli, ["eval", *map(str, args)], catch_exceptions=False)


def test_eval_plan_writes_baseline_masked_and_fraction(saved, tmp_path):
    d, model, tok = saved
    out = tmp_path / "results.json"
    r = run(d / "model", "--task", f"mc:{d / 'q.jsonl'}", "--plan", d / "plan.json", "--batch-size", 4, "-o", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    (t,) = res["tasks"]
    assert t["baseline"]["value"] == pytest.approx(hand_mc(model, tok, d / "q.jsonl")[0])
    assert t["pruned"]["value"] == pytest.approx(hand_mc(zeroed_copy(model, REMOVED), tok, d / "q.jsonl")[0])
    assert t["difference"] == pytest.approx(t["pruned"]["value"] - t["baseline"]["value"])
    assert res["fraction_heads_zeroed"] == pytest.approx(len(REMOVED) / 8) and res["heads_total"] == 8
    assert res["mask"]["removed_heads"] == [list(x) for x in sorted(REMOVED)]
    assert t["task"]["task"] == f"mc:{d / 'q.jsonl'}" and t["task"]["num_docs"] == 10
    assert t["baseline"]["stderr"] > 0 and res["tool_version"] and res["evaluations"] == 2
    # refuses to overwrite, then does with --overwrite
    r = CliRunner().invoke(cli, ["eval", str(d / "model"), "--task", f"mc:{d / 'q.jsonl'}", "-o", str(out)])
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = run(d / "model", "--task", f"mc:{d / 'q.jsonl'}", "--limit", 3, "-o", out, "--overwrite")
    res = json.loads(out.read_text())
    assert r.exit_code == 0 and res["tasks"][0]["pruned"] is None and res["tasks"][0]["baseline"]["n"] == 3


def test_eval_dynamic_records_fraction_zeroed(saved, tmp_path):
    d, model, tok = saved
    out = tmp_path / "dyn.json"
    # awft marks a head inactive when above the threshold: -1e9 zeroes every head of every input
    r = run(d / "model", "--task", f"mc:{d / 'q.jsonl'}", "--dynamic", "awft:-1e9", "--limit", 4, "-o", out)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["fraction_heads_zeroed"] == 1.0 and res["mask"]["type"] == "dynamic"
    assert res["mask"]["threshold_method"] is None and res["mask"]["dynamic_mode"] == "exact"  # a given threshold
    assert res["tasks"][0]["pruned"]["details"]["batch_size_used"] == 1  # no padding enters per-input scores
    all_heads = [(i, h) for i in range(2) for h in range(4)]
    sub = tmp_path / "sub.jsonl"
    sub.write_text("".join(open(d / "q.jsonl").readlines()[:4]))
    assert res["tasks"][0]["pruned"]["value"] == pytest.approx(hand_mc(zeroed_copy(model, all_heads), tok, sub)[0])


def test_eval_bad_inputs_give_clear_errors(saved, tmp_path):
    d, model, _ = saved
    other = tmp_path / "other.json"
    Plan([(5, 0)]).save(other)
    cases = [
        (["--task", f"mc:{d / 'q.jsonl'}", "--plan", other], "another model"),
        (["--task", f"mc:{tmp_path / 'none.jsonl'}"], "not found"),
        (["--task", f"mc:{d / 'q.jsonl'}", "--dynamic-fraction", "awft:0.2"], "--scores"),
        (["--task", f"mc:{d / 'q.jsonl'}", "--dynamic", "awft"], "SCORE:NUMBER"),
        (["--task", f"mc:{d / 'q.jsonl'}", "--limit", "0"], "--limit: must be an integer >= 1"),
        (["--task", f"mc:{d / 'q.jsonl'}", "--split", "train"], "'train' is not one of"),
        (["--task", f"mc:{d / 'q.jsonl'}", "--plan", d / "plan.json", "--dynamic", "awft:1"], "at most one"),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(cli, ["eval", str(d / "model"), *map(str, args), "-o", str(tmp_path / "x.json")])
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
        assert not (tmp_path / "x.json").exists()


def test_eval_dynamic_fraction_records_the_threshold_method(saved, tmp_path):
    """--threshold-method paper reads τ off the authors' empirical CDF; results.json says which was used."""
    from prune_heads.scoring.calibrate import calibrate
    from prune_heads.scoring.thresholds import threshold

    d, model, tok = saved
    seqs = [tok("the city and the river " * 3).input_ids for _ in range(3)]
    hs = calibrate(model, seqs, scores=["ahon_ln"], progress=False)
    hs.save(tmp_path / "scores")
    outs = {}
    for method in ("quantile", "paper"):
        out = tmp_path / f"{method}.json"
        r = run(d / "model", "--task", f"mc:{d / 'q.jsonl'}", "--dynamic-fraction", "ahon_ln:0.3", "--scores",
                tmp_path / "scores", "--threshold-method", method, "--limit", 3, "-o", out)
        assert r.exit_code == 0, r.output
        outs[method] = json.loads(out.read_text())["mask"]
        expected = threshold(hs.per_sample("ahon_ln").double().numpy(), "ahon_ln", 0.3, method)
        assert outs[method]["threshold"] == pytest.approx(expected.value)
        assert outs[method]["threshold_record"]["method"] == method
