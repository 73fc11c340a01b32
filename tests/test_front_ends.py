"""The CLI and the recipe runner are two front ends over the same stage functions: given the same values
they must write the same plans, the same checkpoints and report the same numbers, for every selection
method. Each drift once found between them has a test here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer, words

from prune_heads.cli.main import cli
from prune_heads.pipeline import stages as P
from prune_heads.plan import Plan

#: what differs between two runs of the same computation: timings, and the recipe's name
VOLATILE = {"seconds", "wall_seconds", "recipe", "date", "finished"}

METHODS = {
    "static": {"method": "static", "score": "ahon_ln", "max_drop": 5.0, "relative": True},
    "random": {"method": "static", "score": "random", "seed": 3, "max_drop": 5.0, "relative": True},
    "iterative": {"method": "iterative", "round_size": 2, "max_drop": 5.0, "relative": True},
    "gates": {"method": "gates", "target_fraction": 0.25, "steps": 30, "lr": 0.1, "gate_batch_size": 2},
    # compensated (the recipes' default): ranked by lsq_error, the compensation file travels with the plan
    "static_lsq": {"method": "static", "max_drop": 5.0, "relative": True, "compensate": "lsq"},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fe")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=len(SPECIAL) + len(WORDS))
    model.save_pretrained(root / "model")
    tiny_tokenizer(save_to=root / "model")
    (root / "docs.txt").write_text("\n\n".join(words(24, seed=i) for i in range(24)) + "\n")
    return root


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def cli_ok(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def recipe_for(world: Path, method: dict) -> dict:
    docs = world / "docs.txt"
    return {
        "name": "fe",
        "model": {"id": str(world / "model"), "device": "cpu"},
        "calibration": {"data": str(docs), "num_samples": 6, "seq_len": 24, "batch_size": 3,
                        "scores": ["ahon_ln", "awft"]},
        "select": {"task": f"ppl:{docs}", "limit": 6, "verify": False, "compensate": "none", **method},
        "export": {"format": "sliced"},
        "verify": {"num_sequences": 2, "seq_len": 12},
        "evaluate": {"tasks": [{"task": f"ppl:{docs}", "limit": 6}], "speed_seq_len": 0},
        "report": {"enabled": False},
    }


def cli_flags(method: dict) -> list[str]:
    out = []
    for k, v in method.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                out.append(flag)
        else:
            out += [flag, str(v)]
    return out


def run_both(world: Path, tmp: Path, name: str) -> tuple[Path, Path, object]:
    method = METHODS[name]
    docs = world / "docs.txt"
    cli_dir = tmp / "cli"
    cli_ok("calibrate", world / "model", "--data", docs, "--num-samples", 6, "--seq-len", 24, "--batch-size", 3,
           "--scores", "ahon_ln,awft", "--device", "cpu", "-o", cli_dir / "scores")
    cli_ok("select", cli_dir / "scores", "--model", world / "model", "--task", f"ppl:{docs}", "--limit", 6,
           "--no-verify", "--compensate", "none", "--device", "cpu", *cli_flags(method), "-o", cli_dir / "plan.json")
    cli_ok("export", world / "model", "--plan", cli_dir / "plan.json", "--verify-sequences", 2, "--verify-seq-len", 12,
           "-o", cli_dir / "model")
    cli_ok("eval", world / "model", "--plan", cli_dir / "plan.json", "--task", f"ppl:{docs}", "--limit", 6,
           "--device", "cpu", "-o", cli_dir / "results.json")
    wd = tmp / "run"
    summary = P.run(recipe_for(world, method), wd, progress=False, echo=None)
    return cli_dir, wd, summary


@pytest.mark.parametrize("name", list(METHODS))
def test_cli_and_recipe_runner_agree(world, tmp_path, name):
    cli_dir, wd, summary = run_both(world, tmp_path, name)
    # the calibration tokens and scores
    a, b = load_file(str(cli_dir / "scores" / "scores.safetensors")), load_file(str(wd / "calibrate" / "scores" / "scores.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(str(cli_dir / "scores" / "tokens.safetensors"))["ids"].equal(
        load_file(str(wd / "calibrate" / "scores" / "tokens.safetensors"))["ids"])
    # the plans, field by field
    pc, pr = json.loads((cli_dir / "plan.json").read_text()), json.loads((wd / "select" / "plan.json").read_text())
    assert strip(pc) == strip(pr)
    assert pc["method"] == ("static" if name in ("random", "static_lsq") else name) and pc["removed_heads"]
    if name == "static_lsq":
        assert pc["compensation"]["mode"] == "lsq" and pc["score_id"] == "lsq_error"
        ca = load_file(str(cli_dir / pc["compensation"]["file"]))
        cb = load_file(str(wd / "select" / pr["compensation"]["file"]))
        assert ca and ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    # the checkpoints, tensor by tensor, and their configs
    ta, tb = load_file(str(cli_dir / "model" / "model.safetensors")), load_file(str(wd / "export" / "model" / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads((cli_dir / "model" / "config.json").read_text()) == json.loads((wd / "export" / "model" / "config.json").read_text())
    prov_c = json.loads((cli_dir / "model" / "prune_heads.json").read_text())
    prov_r = json.loads((wd / "export" / "model" / "prune_heads.json").read_text())
    assert strip(prov_c["plan"]) == strip(prov_r["plan"]) and prov_c["params_after"] == prov_r["params_after"]
    # the numbers the summary reports are the CLI's numbers
    res = json.loads((cli_dir / "results.json").read_text())["tasks"][0]
    row = summary.metrics[0]
    assert row["baseline"]["value"] == pytest.approx(res["baseline"]["value"], rel=1e-6)
    assert row["pruned"]["value"] == pytest.approx(res["pruned"]["value"], rel=1e-4)  # export vs masked original
    assert (summary.heads_removed, summary.params_after) == (len(pc["removed_heads"]), prov_c["params_after"])
    assert summary.selection["method"] == pc["method"]
    assert summary.verification["passed"] and summary.verification["max_abs_logit_diff"] <= 1e-4


# ---- the drifts found in a read of the code, one test each ------------------------------------
def test_random_ranking_seed_reaches_the_selector_from_a_recipe(world, tmp_path):
    plans = []
    for seed in (3, 4):
        method = {**METHODS["random"], "seed": seed}
        P.run(recipe_for(world, method), tmp_path / f"r{seed}", progress=False, echo=None, stop_after="select")
        plans.append(Plan.load(tmp_path / f"r{seed}" / "select" / "plan.json"))
    assert plans[0].selection.details.seed == 3 and plans[1].selection.details.seed == 4
    assert plans[0].removed_heads != plans[1].removed_heads


def test_gates_batch_size_is_the_same_option_in_both_front_ends(world, tmp_path, monkeypatch):
    import prune_heads.selection.gates as gates

    seen = []
    real = gates.select_gates

    def spy(*a, **k):
        seen.append(k["batch_size"])
        return real(*a, **k)

    monkeypatch.setattr(gates, "select_gates", spy)
    run_both(world, tmp_path, "gates")
    assert seen == [2, 2]


def test_iterative_refuses_a_proxy_score_instead_of_replacing_it(world, tmp_path):
    from prune_heads.pipeline.recipe import RecipeError

    with pytest.raises(RecipeError, match="select.score: must be one of ablation_kl, ablation_loss"):
        P.run(recipe_for(world, {**METHODS["iterative"], "score": "ahon_ln"}), tmp_path / "w", progress=False, echo=None)
    r = CliRunner().invoke(cli, ["select", str(tmp_path), "--model", "x", "--task", "ppl:x", "--max-drop", "0.1",
                                 "--method", "iterative", "--score", "ahon_ln", "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 2 and "--score: must be one of ablation_kl, ablation_loss" in r.output


def test_model_card_of_a_cli_export_shows_the_selection_evaluation(world, tmp_path):
    docs = world / "docs.txt"
    cli_ok("calibrate", world / "model", "--data", docs, "--num-samples", 6, "--seq-len", 24, "--scores", "ahon_ln",
           "--device", "cpu", "-o", tmp_path / "scores")
    cli_ok("select", tmp_path / "scores", "--model", world / "model", "--task", f"ppl:{docs}", "--limit", 6,
           "--max-drop", "5", "--relative", "--compensate", "none", "--device", "cpu", "-o", tmp_path / "plan.json")
    plan = Plan.load(tmp_path / "plan.json")
    cli_ok("export", world / "model", "--plan", tmp_path / "plan.json", "-o", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    v = plan.selection.verification
    assert "held-out" in card and f"{v.baseline['value']:.4f}" in card and f"{v.result['value']:.4f}" in card


def test_summary_reports_the_selection_of_every_method(world, tmp_path):
    for name in ("iterative", "gates"):
        s = P.run(recipe_for(world, METHODS[name]), tmp_path / name, progress=False, echo=None)
        plan = Plan.load(tmp_path / name / "select" / "plan.json")
        assert s.selection["method"] == name and s.heads_removed == len(plan.removed_heads) > 0
        md = (tmp_path / name / "summary.md").read_text()
        assert f"method `{name}`" in md and f"-{s.heads_removed} (" in md
        # the verification the summary shows is the verify stage's record, not a fallback
        rec = json.loads((tmp_path / name / "verify" / "verification.json").read_text())
        assert s.verification["max_abs_logit_diff"] == rec["max_abs_logit_diff"]


def test_calibration_sequences_are_built_one_way(world, tmp_path):
    """The scores directory keeps its token sequences; measured selectors read exactly those."""
    from prune_heads.data import DataSpec, calibration_sequences
    from prune_heads.model.loading import load_model
    from prune_heads.scoring.head_scores import HeadScores

    docs = world / "docs.txt"
    cli_ok("calibrate", world / "model", "--data", docs, "--num-samples", 6, "--seq-len", 24, "--seed", 2,
           "--scores", "ahon_ln", "--device", "cpu", "-o", tmp_path / "scores")
    hs = HeadScores.load(tmp_path / "scores")
    lm = load_model(str(world / "model"))
    assert hs.tokens == calibration_sequences(DataSpec(source=str(docs), num_samples=6, seq_len=24, seed=2),
                                              lm.tokenizer, lm.model)
    assert hs.meta["data"]["seed"] == 2 and len(hs.tokens) == 6


def test_evaluation_results_have_one_format(world, tmp_path):
    """`prune-heads eval` and the runner's evaluate stage write the same results.json shape."""
    cli_dir, wd, _ = run_both(world, tmp_path, "static")
    a = json.loads((cli_dir / "results.json").read_text())
    b = json.loads((wd / "evaluate" / "results.json").read_text())
    assert a.keys() == b.keys() and a["tasks"][0].keys() == b["tasks"][0].keys()
    assert a["mask"]["type"] == "plan" and b["mask"]["type"] == "export"


def test_recipe_yaml_and_overrides_use_the_cli_option_checks(world, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_for(world, METHODS["static"])))
    for key, value, cli_message in [("calibration.num_samples", "-3", "--num-samples: must be an integer >= 1"),
                                    ("select.confidence", "1.5", "--confidence: must be a number in [0, 1)")]:
        r = CliRunner().invoke(cli, ["run", str(path), "--set", f"{key}={value}", "-o", str(tmp_path / "w")])
        assert r.exit_code == 2 and f"{key}: {cli_message.split(': ', 1)[1]}" in r.output


@pytest.mark.slow
def test_run_under_torchrun_equals_one_process(world, tmp_path):
    """`torchrun --nproc-per-node 2 prune-heads run`: both processes calibrate, rank 0 does the rest; the
    result equals a single-process run."""
    import os
    import shutil
    import subprocess
    import sys

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_for(world, METHODS["static"])))
    exe = shutil.which("prune-heads") or str(Path(sys.executable).parent / "prune-heads")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           "29541", exe, "run", str(path), "-o", str(tmp_path / "two"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    P.run(recipe_for(world, METHODS["static"]), tmp_path / "one", progress=False, echo=None)
    two = json.loads((tmp_path / "two" / "calibrate" / "scores" / "scores.json").read_text())
    assert two["world_size"] == 2
    a = load_file(str(tmp_path / "two" / "calibrate" / "scores" / "scores.safetensors"))
    b = load_file(str(tmp_path / "one" / "calibrate" / "scores" / "scores.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    pa = json.loads((tmp_path / "two" / "select" / "plan.json").read_text())
    pb = json.loads((tmp_path / "one" / "select" / "plan.json").read_text())
    assert pa["removed_heads"] == pb["removed_heads"]
    assert (tmp_path / "two" / "summary.md").is_file()


# ---- the Python API: the same stages, the same defaults ----------------------------------------
def test_python_config_defaults_are_the_front_ends():
    """One default each, read from the CLI's generated options and the recipe's built section."""
    import prune_heads as ph
    from prune_heads.pipeline.recipe import validate

    recipe = validate({"name": "d", "model": {"id": "m"}, "calibration": {"data": "wikitext2"},
                       "select": {"task": "arc_easy", "max_drop": 0.01}})
    for cls, section in ((ph.SelectConfig, recipe.select), (ph.CalibrateConfig, recipe.calibration),
                         (ph.ExportConfig, recipe.export), (ph.VerifyConfig, recipe.verify),
                         (ph.EvaluateConfig, recipe.evaluate)):
        required = {"task": "arc_easy", "max_drop": 0.01} if cls is ph.SelectConfig else \
            {"data": "wikitext2"} if cls is ph.CalibrateConfig else {}
        assert cls(**required) == section, cls.__name__
    s = ph.SelectConfig(task="arc_easy", max_drop=0.01)
    assert (s.compensate, s.confidence, s.verify) == ("lsq", 0.9, True) and ph.VerifyConfig().enabled
    import click

    options = {p.name: p.default for p in cli.get_command(click.Context(cli), "select").params}
    assert options["compensate"] == s.compensate and float(options["confidence"]) == s.confidence
    assert options["verify"] in (True, None)  # --no-verify: a flag that turns the default off


def test_low_level_functions_are_not_the_top_level_api():
    """The kwargs functions that default to none of the front ends' policies live in their modules only."""
    import prune_heads as ph

    for name in ("select_static", "select_iterative", "select_gates", "export_checkpoint", "verify_export"):
        assert not hasattr(ph, name), name
    from prune_heads.export.checkpoint import export_checkpoint  # noqa: F401  (still reachable)
    from prune_heads.selection.static import select_static  # noqa: F401


# ---- issue 20: one behaviour whatever the front end -------------------------------------------
def test_recipe_held_out_evaluation_uses_the_selection_seed(world, tmp_path):
    """With select.seed != 0 the evaluate stage scores exactly the documents selection verified on (the
    seeded verify half), not evaluate.seed's half, which overlaps the search half."""
    from prune_heads.data.splits import select_indices

    recipe = recipe_for(world, {**METHODS["static"], "seed": 3})
    recipe["select"]["verify"] = True
    del recipe["evaluate"]["tasks"]  # the default: the selection task on its held-out documents
    P.run(recipe, tmp_path / "w", progress=False, echo=None)
    plan = Plan.load(tmp_path / "w" / "select" / "plan.json")
    task = json.loads((tmp_path / "w" / "evaluate" / "results.json").read_text())["tasks"][0]
    assert (task["task"]["split"], task["task"]["seed"]) == ("verify", 3)
    # the baseline the evaluate stage reports is the one selection's held-out check measured
    assert task["baseline"]["value"] == pytest.approx(plan.selection.verification.baseline["value"], rel=1e-9)
    assert not set(select_indices(24, "verify", 3)) & set(select_indices(24, "search", 3))
    assert set(select_indices(24, "verify", 0)) & set(select_indices(24, "search", 3))  # what seed 0 got wrong


def _no_model_load(monkeypatch):
    """Make loading the model fail the test: a preflight check must come first."""
    from prune_heads.model.config import ModelConfig

    def refuse(self):
        raise AssertionError("the model was loaded before the preflight check")

    monkeypatch.setattr(ModelConfig, "load", refuse)


def test_preflight_is_the_same_in_both_front_ends(world, tmp_path, monkeypatch):
    """The runner checks select.data, the CLI checks sequence lengths against the model, before any load."""
    from prune_heads.errors import PruneHeadsError

    _no_model_load(monkeypatch)
    missing = tmp_path / "missing.txt"
    recipe = recipe_for(world, {**METHODS["iterative"], "data": str(missing)})
    with pytest.raises(PruneHeadsError, match="select.data"):
        P.run(recipe, tmp_path / "w", progress=False, echo=None)
    (tmp_path / "scores").mkdir()
    r = CliRunner().invoke(cli, ["select", str(tmp_path / "scores"), "--model", str(world / "model"), "--task",
                                 f"ppl:{world / 'docs.txt'}", "--max-drop", "0.1", "--data", str(missing),
                                 "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 2 and "--data" in r.output
    # lengths beyond the tiny model's context (256): found from its config, before loading it
    r = CliRunner().invoke(cli, ["calibrate", str(world / "model"), "--data", str(world / "docs.txt"), "--seq-len",
                                 "300", "-o", str(tmp_path / "s")])
    assert r.exit_code == 2 and "--seq-len: 300 tokens is beyond the model's context of 256" in r.output, r.output
    Plan([(0, 0)]).save(tmp_path / "plan.json")
    r = CliRunner().invoke(cli, ["export", str(world / "model"), "--plan", str(tmp_path / "plan.json"),
                                 "--verify-seq-len", "300", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--verify-seq-len: 300 tokens is beyond the model's context of 256" in r.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(PruneHeadsError, match="calibration.seq_len: 300 tokens is beyond"):
        P.run({**recipe_for(world, METHODS["static"]), "calibration": {"data": str(world / "docs.txt"), "seq_len": 300}},
              tmp_path / "w2", progress=False, echo=None)


@pytest.mark.parametrize("section, values, key", [
    ("evaluate", {"dynamic": "ahon_ln:0.5"}, "evaluate.dynamic"),
    ("evaluate", {"dynamic_fraction": "ahon_ln:0.2"}, "evaluate.dynamic_fraction"),
    ("evaluate", {"dynamic_mode": "cached"}, "evaluate.dynamic_mode"),
    ("evaluate", {"threshold_method": "paper"}, "evaluate.threshold_method"),
    ("select", {**METHODS["gates"], "surrogate": "margin"}, "select.surrogate"),
    ("select", {**METHODS["gates"], "policy": "kv-groups"}, "select.policy"),
    ("select", {**METHODS["gates"], "allow_underpowered": True}, "select.allow_underpowered"),
    ("select", {**METHODS["iterative"], "search": "ascend"}, "select.search"),
    ("select", {**METHODS["static"], "data": "wikitext2"}, "select.data"),
])
def test_recipe_refuses_keys_its_runner_would_ignore(world, tmp_path, section, values, key):
    from prune_heads.pipeline.recipe import RecipeError, load_recipe

    recipe = recipe_for(world, values if section == "select" else METHODS["static"])
    if section == "evaluate":
        recipe[section].update(values)
    with pytest.raises(RecipeError, match=f"{key}: "):
        load_recipe(recipe)


def test_cli_refuses_the_same_ignored_options(world, tmp_path):
    docs = world / "docs.txt"
    for args, option in [(["eval", world / "model", "--task", f"ppl:{docs}", "--dynamic-mode", "cached"], "--dynamic-mode"),
                         (["eval", world / "model", "--task", f"ppl:{docs}", "--dynamic", "awft:0.1",
                           "--threshold-method", "paper"], "--threshold-method"),
                         (["select", world / "model", "--model", world / "model", "--method", "gates",
                           "--target-fraction", "0.2", "--gqa", "kv-groups"], "--gqa")]:
        r = CliRunner().invoke(cli, [str(a) for a in [*args, "-o", tmp_path / "x.json"]])
        assert r.exit_code == 2 and f"{option}: " in r.output, r.output


# ---- the whole pipeline, both front ends, a source that needs its options ---------------------
#: a budget that binds on the tiny model (some probe fails it), a non-default seed for the split
BINDING = {"max_drop": 0.002, "relative": True, "seed": 3}


def _source(kind: str, root: Path, monkeypatch) -> tuple[str, dict[str, str], dict]:
    """(model id, its ModelConfig options, the weights it must resolve to): ``org/tiny`` at revision v2 of an
    offline Hub cache whose main branch holds other weights, or a folder of two GGUF files of which
    ``gguf_file`` picks the second."""
    from model_sources import add_gguf, add_revision, use_cache

    def writer(seed):
        def write(folder):
            tiny_model("llama", seed=seed, layers=2, heads=4, kv_heads=2, head_dim=8,
                       vocab=len(SPECIAL) + len(WORDS)).save_pretrained(folder)
            tiny_tokenizer(save_to=folder)
        return write

    want = tiny_model("llama", seed=1, layers=2, heads=4, kv_heads=2, head_dim=8, vocab=len(SPECIAL) + len(WORDS))
    if kind == "revision":
        add_revision(root / "hub", "org/tiny", "main", "1" * 40, writer(0))
        add_revision(root / "hub", "org/tiny", "v2", "2" * 40, writer(1))
        use_cache(monkeypatch, root / "hub")
        return "org/tiny", {"revision": "v2"}, want.state_dict()
    monkeypatch.setenv("PRUNE_HEADS_CACHE", str(root / "cache"))
    add_gguf(root / "gguf", "a.Q8_0.gguf", b"a", writer(0))
    add_gguf(root / "gguf", "b.Q8_0.gguf", b"b", writer(1))
    return str(root / "gguf"), {"gguf_file": "b.Q8_0.gguf"}, want.state_dict()


def rc_value(cli_dir: Path) -> float:
    """The pruned model's held-out value in the CLI's results.json."""
    return json.loads((cli_dir / "results.json").read_text())["tasks"][0]["pruned"]["value"]


def _sidecar_bytes_apart(plan: dict) -> dict:
    """A plan without its compensation file's sha256: safetensors writes its metadata in a per-process hash order,
    so equal compensations give different bytes (their tensors are compared one by one instead)."""
    comp = {k: v for k, v in (plan.get("compensation") or {}).items() if k != "sha256"}
    return {**plan, "compensation": comp}


def _volatile_free(prov):
    """An export record without what differs between two runs of the same computation."""
    out = strip(prov)
    if out.get("plan"):
        out["plan"] = _sidecar_bytes_apart(out["plan"])
    for rec in (out.get("verification") or {},):
        rec.pop("max_abs_logit_diff_float32", None)
    return out


# ~20 s each: the revision source runs in the default suite, the GGUF source with the slow tests
@pytest.mark.parametrize("kind", ["revision", pytest.param("gguf", marks=pytest.mark.slow)])
def test_front_ends_agree_on_a_binding_budget(world, tmp_path, monkeypatch, kind):
    """A budget that binds, seed 3, and a source that needs its options (a Hub revision, a GGUF file):
    the CLI, the recipe runner and the Python API write the same plan, compensation, export, card and
    held-out results, and the runner's summary reports the CLI's numbers."""
    model_id, opts, want = _source(kind, tmp_path, monkeypatch)
    docs = world / "docs.txt"
    mflags = [x for k, v in opts.items() for x in ("--" + k.replace("_", "-"), v)]
    cli_dir = tmp_path / "cli"
    cli_ok("calibrate", model_id, *mflags, "--data", docs, "--num-samples", 6, "--seq-len", 24, "--batch-size", 3,
           "--scores", "ahon_ln,awft", "--device", "cpu", "-o", cli_dir / "scores")
    cli_ok("select", cli_dir / "scores", "--model", model_id, *mflags, "--task", f"ppl:{docs}", "--limit", 6,
           "--max-drop", BINDING["max_drop"], "--relative", "--seed", 3, "--device", "cpu", "-o", cli_dir / "plan.json")
    cli_ok("export", model_id, *mflags, "--plan", cli_dir / "plan.json", "--verify-sequences", 2, "--verify-seq-len", 12,
           "-o", cli_dir / "model")
    r = cli_ok("eval", model_id, *mflags, "--export", cli_dir / "model", "--plan", cli_dir / "plan.json", "--task",
               f"ppl:{docs}", "--limit", 6, "--split", "verify", "--seed", 3, "--speed-seq-len", 16,
               "--speed-repeats", 1, "--device", "cpu", "-o", cli_dir / "results.json")
    assert "prefill:" in r.output
    wd = tmp_path / "run"
    recipe = {
        "name": "fe", "model": {"id": model_id, "device": "cpu", **opts},
        "calibration": {"data": str(docs), "num_samples": 6, "seq_len": 24, "batch_size": 3, "scores": ["ahon_ln", "awft"]},
        "select": {"task": f"ppl:{docs}", "limit": 6, **BINDING},  # compensate lsq, verify: the defaults
        "verify": {"num_sequences": 2, "seq_len": 12},
        "evaluate": {"speed_seq_len": 16, "speed_repeats": 1},  # the held-out half of the selection task
        "report": {"enabled": False},
    }
    summary = P.run(recipe, wd, progress=False, echo=None)
    # the Python API: the README's lines, the model loaded once with the same source options, defaults untouched
    import prune_heads as ph

    py = tmp_path / "py"
    lm = ph.load_model(model_id, device="cpu", **opts)
    scores = ph.calibrate_model(lm, ph.CalibrateConfig(data=str(docs), num_samples=6, seq_len=24, batch_size=3,
                                                       scores=["ahon_ln", "awft"]), py / "scores", progress=False)
    py_plan = ph.select_heads(lm, scores, ph.SelectConfig(task=f"ppl:{docs}", limit=6, **BINDING), py / "plan.json",
                              progress=False)
    ph.export_model(lm, py_plan, py / "model", verify=ph.VerifyConfig(num_sequences=2, seq_len=12), progress=False)
    ph.evaluate_model(lm, ph.EvaluateConfig(tasks=[ph.EvalTask(task=f"ppl:{docs}", limit=6, split="verify", seed=3)],
                                            speed_seq_len=16, speed_repeats=1),
                      plan=py_plan, export_dir=py / "model", out=py / "results.json")
    outputs = {"cli": (cli_dir / "plan.json", cli_dir / "model", cli_dir / "results.json"),
               "runner": (wd / "select" / "plan.json", wd / "export" / "model", wd / "evaluate" / "results.json"),
               "python": (py / "plan.json", py / "model", py / "results.json")}
    _same_outputs(outputs, want)
    plan = Plan.load(cli_dir / "plan.json")
    assert 0 < len(plan.removed_heads) < 6 and any(p.within_budget is False for p in plan.selection.trace)
    assert plan.selection.compensation["mode"] == "lsq" and plan.selection.verification.verdict == "within"
    rc = json.loads((cli_dir / "results.json").read_text())
    assert rc["tasks"][0]["task"]["seed"] == 3
    assert rc["tasks"][0]["baseline"]["value"] == pytest.approx(plan.selection.verification.baseline["value"], rel=1e-9)
    card = (cli_dir / "model" / "README.md").read_text()
    assert "held-out" in card and f"{rc_value(cli_dir):.4f}" in card
    # the summary reports these numbers
    row = summary.metrics[0]
    assert row["baseline"]["value"] == rc["tasks"][0]["baseline"]["value"]
    assert row["pruned"]["value"] == rc["tasks"][0]["pruned"]["value"]
    prov_c = json.loads((cli_dir / "model" / "prune_heads.json").read_text())
    assert (summary.heads_removed, summary.params_after) == (len(plan.removed_heads), prov_c["params_after"])


def _same_outputs(outputs: dict[str, tuple[Path, Path, Path]], want: dict) -> None:
    """Each front end's (plan, export, results) equal the first's: plan and compensation, the export's tensors
    (the source's, from the weights its options name), its record and card, and the held-out results."""
    (first, (plan0, model0, res0)), *others = outputs.items()
    pc = json.loads(plan0.read_text())
    ca = load_file(str(plan0.parent / pc["compensation"]["file"]))
    ta = load_file(str(model0 / "model.safetensors"))
    assert torch.equal(ta["model.embed_tokens.weight"], want["model.embed_tokens.weight"])
    prov0 = _volatile_free(json.loads((model0 / "prune_heads.json").read_text()))
    card0 = [x for x in (model0 / "README.md").read_text().splitlines() if "| recipe |" not in x]
    rc = json.loads(res0.read_text())
    assert rc["speed"]
    for name, (plan_path, model_dir, res_path) in others:
        pr = json.loads(plan_path.read_text())
        assert strip(_sidecar_bytes_apart(pc)) == strip(_sidecar_bytes_apart(pr)), name
        cb = load_file(str(plan_path.parent / pr["compensation"]["file"]))
        assert ca and ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca), name
        tb = load_file(str(model_dir / "model.safetensors"))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
        assert prov0 == _volatile_free(json.loads((model_dir / "prune_heads.json").read_text())), name
        assert card0 == [x for x in (model_dir / "README.md").read_text().splitlines() if "| recipe |" not in x], name
        rr = json.loads(res_path.read_text())
        assert strip({**rc, "speed": None}) == strip({**rr, "speed": None}), name
        assert {k for k, v in rc["speed"].items() if "ratio" in v} == {k for k, v in rr["speed"].items() if "ratio" in v} \
            == {"prefill", "decode"}, name


def test_eval_of_an_export_refuses_another_plan_and_a_non_export(world, tmp_path):
    from prune_heads.errors import PruneHeadsError
    from prune_heads.evaluation.stage import export_side

    Plan([(0, 1)]).save(tmp_path / "plan.json")
    with pytest.warns(UserWarning, match="fingerprint"):
        cli_ok("export", world / "model", "--plan", tmp_path / "plan.json", "--no-verify", "-o", tmp_path / "out")
    assert export_side(tmp_path / "out").plan.removed_heads == [(0, 1)]  # the plan it records
    with pytest.raises(PruneHeadsError, match="removes other heads than the export"):
        export_side(tmp_path / "out", Plan([(1, 1)]))
    with pytest.raises(PruneHeadsError, match="is not an export"):
        export_side(world / "model")
