"""The select stage wires compensation and the budget rule into every command: the plan records its
compensation and carries the solved compensation in a file beside it, ``eval --plan`` and ``export`` apply
exactly that (so the masked model judged during selection is the model exported), and a plan that fails
its held-out verification stops ``select`` without losing the search's result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer, words

from prune_heads.cli.main import cli
from prune_heads.selection.stage import GatesMethod, SelectConfig, StaticMethod

pytestmark = pytest.mark.filterwarnings("ignore:layer \\d+. the covariance", "ignore:verification inconclusive")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sel")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=len(SPECIAL) + len(WORDS))
    model.save_pretrained(root / "model")
    tiny_tokenizer(save_to=root / "model")
    (root / "docs.txt").write_text("\n\n".join(words(24, seed=i) for i in range(24)) + "\n")
    r = invoke("calibrate", root / "model", "--data", root / "docs.txt", "--num-samples", 8, "--seq-len", 24,
               "--batch-size", 4, "--scores", "ahon_ln", "--device", "cpu", "-o", root / "scores")
    assert r.exit_code == 0, r.output
    return root


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def select(world: Path, out: Path, *extra) -> object:
    return invoke("select", world / "scores", "--model", world / "model", "--task", f"ppl:{world / 'docs.txt'}",
                  "--limit", 8, "--max-drop", 5.0, "--relative", "--device", "cpu", *extra, "-o", out)


def ppl(results: Path) -> tuple[float, float]:
    t = json.loads(results.read_text())["tasks"][0]
    return t["baseline"]["value"], t["pruned"]["value"]


def test_default_ranking_follows_compensation_and_policy():
    def ranking(**kw):
        return SelectConfig(task="ppl:x", max_drop=0.1, **kw).ranking

    assert ranking() == "lsq_error"
    assert ranking(policy="kv-groups") == "lsq_error_group"
    assert ranking(compensate="none") == ranking(compensate="mean") == "ahon_ln"
    assert ranking(method=StaticMethod(score="awft")) == "awft"
    assert ranking(method=GatesMethod(target_fraction=0.2)) == "lsq_error"  # unused by gates, but defined


def test_compensated_plan_is_the_same_model_in_eval_and_export(world, tmp_path):
    r = select(world, tmp_path / "plan.json")
    assert r.exit_code == 0, r.output
    assert "compensated: lsq" in r.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    comp = plan["compensation"]
    assert comp["mode"] == "lsq" and plan["score_id"] == "lsq_error" and plan["removed_heads"]
    assert (tmp_path / comp["file"]).is_file() and comp["fingerprint"]

    docs = world / "docs.txt"
    common = ("--task", f"ppl:{docs}", "--limit", 8, "--device", "cpu")
    assert invoke("eval", world / "model", "--plan", tmp_path / "plan.json", *common, "-o", tmp_path / "masked.json").exit_code == 0
    r = invoke("export", world / "model", "--plan", tmp_path / "plan.json", "--verify-sequences", 2,
               "--verify-seq-len", 12, "-o", tmp_path / "export")
    assert r.exit_code == 0, r.output
    assert "against the compensated masked original" in r.output
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert any(k.endswith("o_proj.bias") for k in weights)
    # --scores: the same calibration documents left out as eval --plan leaves out (the plan records them)
    r = invoke("eval", tmp_path / "export", *common, "--scores", world / "scores", "-o", tmp_path / "exported.json")
    assert r.exit_code == 0, r.output
    # the masked evaluation (hooks) and the export (folded weights) are two independent paths to one model
    base, masked = ppl(tmp_path / "masked.json")
    exported = json.loads((tmp_path / "exported.json").read_text())["tasks"][0]["baseline"]["value"]
    assert masked == pytest.approx(exported, rel=1e-4) and base > 0

    # the same heads zeroed are a different model: compensation was really applied
    zeroed = dict(plan, compensation={"mode": "none", "sequential": False, "ridge": 0.01, "moments": None})
    (tmp_path / "zeroed.json").write_text(json.dumps(zeroed))
    assert invoke("eval", world / "model", "--plan", tmp_path / "zeroed.json", *common, "-o", tmp_path / "z.json").exit_code == 0
    assert abs(ppl(tmp_path / "z.json")[1] - masked) > 1e-5 * masked  # float noise is ~1e-7


def test_plan_without_its_compensation_file_needs_scores(world, tmp_path):
    assert select(world, tmp_path / "plan.json").exit_code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    with_file = load_file(str(tmp_path / plan["compensation"]["file"]))
    (tmp_path / plan["compensation"]["file"]).unlink()
    r = invoke("export", world / "model", "--plan", tmp_path / "plan.json", "--no-verify", "-o", tmp_path / "a")
    assert r.exit_code == 2 and "--scores" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "a").exists()
    r = invoke("export", world / "model", "--plan", tmp_path / "plan.json", "--scores", world / "scores",
               "--verify-sequences", 2, "--verify-seq-len", 12, "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    # rebuilt from the moments: the same compensation the file held, so the same weights
    rebuilt = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert any(k.endswith("o_proj.bias") for k in rebuilt)
    assert with_file  # the file had the solved layers


def test_sequential_compensation_travels_with_the_plan(world, tmp_path):
    r = select(world, tmp_path / "plan.json", "--sequential")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["compensation"]["sequential"] is True and plan["removed_heads"]
    r = invoke("export", world / "model", "--plan", tmp_path / "plan.json", "--verify-sequences", 2,
               "--verify-seq-len", 12, "-o", tmp_path / "export")
    assert r.exit_code == 0, r.output
    prov = json.loads((tmp_path / "export" / "prune_heads.json").read_text())
    assert prov["compensation"]["sequential"] is True and prov["verification"]["passed"]


def test_zeroing_plan_has_no_compensation_file(world, tmp_path):
    r = select(world, tmp_path / "plan.json", "--compensate", "none")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["compensation"]["mode"] == "none" and plan["score_id"] == "ahon_ln"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_sequential_without_compensation_is_refused(world, tmp_path):
    r = select(world, tmp_path / "plan.json", "--compensate", "none", "--sequential")
    assert r.exit_code == 2 and "sequential" in r.output and not (tmp_path / "plan.json").exists()


def _failing_verify(monkeypatch):
    """Make every held-out verification say 'over budget' (its statistics are otherwise the real ones)."""
    import prune_heads.selection.static as static

    real = static.verify

    def over(*a, **kw):
        v = real(*a, **kw)
        v.verdict, v.within_budget = "over", False
        return v

    monkeypatch.setattr(static, "verify", over)


def test_failed_verification_stops_select_and_keeps_the_plan(world, tmp_path, monkeypatch):
    _failing_verify(monkeypatch)
    r = select(world, tmp_path / "plan.json")
    assert r.exit_code == 2 and "verification failed" in r.output and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("error: verification failed")  # one line, after the bars
    assert not (tmp_path / "plan.json").exists()
    kept = json.loads((tmp_path / "plan.unverified.json").read_text())
    assert kept["removed_heads"] and (tmp_path / kept["compensation"]["file"]).is_file()
    assert "plan.unverified.json" in r.output

    r = select(world, tmp_path / "accepted.json", "--accept-unverified")
    assert r.exit_code == 0, r.output
    assert "ACCEPTED UNVERIFIED" in r.output
    plan = json.loads((tmp_path / "accepted.json").read_text())
    assert plan["accepted_unverified"] is True and plan["removed_heads"] == kept["removed_heads"]
    r = invoke("export", world / "model", "--plan", tmp_path / "accepted.json", "--no-verify", "-o", tmp_path / "x")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "x" / "README.md").read_text()
    assert "failed its held-out verification and was written anyway" in card
    assert "## Selection budget" in card and "verdict **over**" in card


def test_card_states_the_verified_drop_interval(world, tmp_path):
    r = select(world, tmp_path / "plan.json", "--confidence", "0.9", "--allow-underpowered")
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    drop = plan["verification"]["drop"]
    assert plan["budget"]["confidence"] == 0.9 and drop["confidence"] == 0.9
    r = invoke("export", world / "model", "--plan", tmp_path / "plan.json", "--no-verify", "-o", tmp_path / "x")
    assert r.exit_code == 0, r.output
    card = (tmp_path / "x" / "README.md").read_text()
    assert "one-sided 90% upper bound of the paired drop" in card
    assert f"90% one-sided bounds {100 * drop['lower']:.2f}% .. {100 * drop['bound']:.2f}%" in card
    assert torch.tensor(drop["bound"]) >= torch.tensor(drop["estimate"])


def test_failed_verification_stops_the_run_at_select(world, tmp_path, monkeypatch):
    from prune_heads.pipeline import stages as P
    from prune_heads.selection.budget import VerificationFailed

    _failing_verify(monkeypatch)
    docs = world / "docs.txt"
    recipe = {"name": "vf", "model": {"id": str(world / "model"), "device": "cpu"},
              "calibration": {"data": str(docs), "num_samples": 8, "seq_len": 24, "batch_size": 4, "scores": ["ahon_ln"]},
              "select": {"task": f"ppl:{docs}", "limit": 8, "max_drop": 5.0, "relative": True},
              "export": {"format": "sliced"}, "verify": {"num_sequences": 2, "seq_len": 12},
              "evaluate": {"tasks": [{"task": f"ppl:{docs}", "limit": 8}], "speed_seq_len": 0},
              "report": {"enabled": False}}
    with pytest.raises(VerificationFailed, match="plan.unverified.json"):
        P.run(recipe, tmp_path / "wd", progress=False, echo=None)
    kept = json.loads((tmp_path / "wd" / "plan.unverified.json").read_text())
    assert kept["removed_heads"] and (tmp_path / "wd" / kept["compensation"]["file"]).is_file()
    assert not (tmp_path / "wd" / "select" / "plan.json").exists() and not (tmp_path / "wd" / "export").exists()
