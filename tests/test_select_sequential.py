"""select and eval with ``ppl:``/``kl:`` tasks layer by layer, against the model loaded whole (the reference).

- the streamed evaluator (``StreamedTextBackend``: one pass over the documents per probe, each decoder layer read
  once from the shards) gives the whole model's perplexity, KL and per-document scores bit for bit, unmasked,
  masked and compensated, on several families;
- ``select --engine sequential`` writes the plan ``--engine memory`` writes (same heads, same probes, same
  numbers) and ``eval --engine sequential`` the same results, for a plan and for an export;
- the engine is chosen from a (faked) memory size: a model that fits stays whole, one that does not runs layer
  by layer with one line, and what cannot run at all is refused with one line that says what to do.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from export_helpers import make_source
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer, words

from prune_heads.cli.main import cli
from prune_heads.compensation import CompensationSpec, Compensator, collect_moments
from prune_heads.errors import PruneHeadsError
from prune_heads.evaluation import make_evaluator
from prune_heads.model.config import ModelConfig
from prune_heads.model.sequential_engine import load_streamed

pytestmark = pytest.mark.filterwarnings("ignore:layer \\d+. the covariance", "ignore:verification inconclusive",
                                        "ignore:plan has no model fingerprint")
VOCAB = len(SPECIAL) + len(WORDS)


def _world(tmp_path, family: str = "llama", layers: int = 3):
    model, src = make_source(tmp_path, family, layers=layers, vocab=VOCAB, max_shard_size="20KB")
    tiny_tokenizer(save_to=src)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(words(20 + i % 7, seed=i) for i in range(24)) + "\n")
    return model, src, docs


def _same(a, b) -> None:
    assert a.value == b.value and a.stderr == b.stderr and a.n == b.n
    assert a.docs.ids == b.docs.ids
    assert (a.docs.values == b.docs.values).all() and (a.docs.weights == b.docs.weights).all()


@pytest.mark.parametrize("family", ["llama", *(pytest.param(f, marks=pytest.mark.slow) for f in ("gemma2", "qwen3"))])
def test_streamed_ppl_and_kl_equal_the_whole_model(family, tmp_path):
    model, src, docs = _world(tmp_path, family)
    tok = tiny_tokenizer()
    streamed = load_streamed(ModelConfig(id=str(src), device="cpu")).model
    seqs = [tok(words(16, seed=50 + i)).input_ids for i in range(6)]
    comp = Compensator(CompensationSpec("lsq", ridge=1e-2), moments=collect_moments(model, seqs, progress=False))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = mask[2, 0] = True
    for kind in ("ppl", "kl"):
        kw = dict(limit=7, batch_size=3, split="search")
        whole = make_evaluator(model, tok, f"{kind}:{docs}", **kw)
        layered = make_evaluator(streamed, tok, f"{kind}:{docs}", **kw)
        assert layered.backend.task_config["engine"] == "sequential"
        for removed in (None, mask):
            _same(whole(removed), layered(removed))
        _same(whole.with_compensation(comp)(mask), layered.with_compensation(comp)(mask))
        assert whole(mask).value != whole(None).value  # the mask does something
    assert all(p.is_meta for p in streamed.parameters())


def _untimed(x):
    if isinstance(x, dict):
        # "sha256": the compensation file's bytes (safetensors orders its metadata per process); its tensors are
        # compared on their own
        return {k: _untimed(v) for k, v in x.items()
                if k not in ("seconds", "wall_seconds", "engine", "file", "sha256")}
    return [_untimed(v) for v in x] if isinstance(x, list) else x


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("seqsel")
    _, src, docs = _world(root)
    r = _invoke("calibrate", src, "--data", docs, "--num-samples", 8, "--seq-len", 24, "--batch-size", 4,
                "--scores", "ahon_ln", "--device", "cpu", "-o", root / "scores")
    assert r.exit_code == 0, r.output
    return root, src, docs


def test_select_and_eval_layer_by_layer_write_what_the_whole_model_writes(calibrated, tmp_path):
    root, src, docs = calibrated
    plans, results = {}, {}
    for engine in ("memory", "sequential"):
        out = tmp_path / f"plan-{engine}.json"
        r = _invoke("select", root / "scores", "--model", src, "--task", f"kl:{docs}", "--limit", 8, "--max-drop",
                    0.05, "--device", "cpu", "--engine", engine, "-o", out)
        assert r.exit_code == 0, r.output
        plans[engine] = json.loads(out.read_text())
        res = tmp_path / f"eval-{engine}.json"
        r = _invoke("eval", src, "--plan", out, "--task", f"ppl:{docs}", "--limit", 8, "--device", "cpu",
                    "--engine", engine, "-o", res)
        assert r.exit_code == 0, r.output
        results[engine] = json.loads(res.read_text())["tasks"][0]
    a, b = plans["memory"], plans["sequential"]
    assert a["removed_heads"] and a["trace"] and a["verification"]
    # everything equal (every probe's value and paired drop, the verification, the compensation), but for
    # timings, the file name and the sequential side's engine tag
    assert _untimed(a) == _untimed(b)
    from safetensors.torch import load_file

    ca, cb = (load_file(str(tmp_path / p["compensation"]["file"])) for p in (a, b))
    assert ca and ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    ra, rb = results["memory"], results["sequential"]
    assert ra["baseline"]["value"] == rb["baseline"]["value"] and ra["pruned"]["value"] == rb["pruned"]["value"]
    assert ra["pruned"]["value"] != ra["baseline"]["value"]


def test_eval_of_an_export_layer_by_layer_equals_the_whole_models(calibrated, tmp_path):
    from prune_heads.evaluation.stage import EvalTask, EvaluateConfig, PrunedSide, run_evaluate
    from prune_heads.export import export_checkpoint
    from prune_heads.plan import Plan

    root, src, docs = calibrated
    plan = Plan([(0, 1), (1, 2), (2, 0)])
    export_checkpoint(str(src), plan, tmp_path / "out", verify=False, progress=False)
    cfg = EvaluateConfig(tasks=[EvalTask(task=f"ppl:{docs}", limit=6)], speed_seq_len=0)
    mc = ModelConfig(id=str(src), device="cpu")
    side = PrunedSide(plan=plan, export_dir=tmp_path / "out")
    whole = run_evaluate(cfg, mc.load(), str(src), side).tasks[0]
    layered = run_evaluate(cfg, load_streamed(mc), str(src), side).tasks[0]
    assert whole.baseline["value"] == layered.baseline["value"]
    assert whole.pruned["value"] == layered.pruned["value"] != whole.baseline["value"]


def test_kl_of_an_export_is_measured_against_the_original(calibrated, tmp_path):
    """``kl:`` on an export compares it with the original (it compared the export with itself: always 0); an
    exact export's KL is the masked original's, whole model or layer by layer."""
    from prune_heads.evaluation.stage import EvalTask, EvaluateConfig, PrunedSide, run_evaluate
    from prune_heads.export import export_checkpoint
    from prune_heads.plan import Plan

    root, src, docs = calibrated
    plan = Plan([(0, 1), (1, 2), (2, 0)])
    export_checkpoint(str(src), plan, tmp_path / "out", verify=False, progress=False, dtype="float32")
    cfg = EvaluateConfig(tasks=[EvalTask(task=f"kl:{docs}", limit=4)], speed_seq_len=0)
    mc = ModelConfig(id=str(src), device="cpu", dtype="float32")
    masked = run_evaluate(cfg, mc.load(), str(src), PrunedSide(plan=plan)).tasks[0].pruned["value"]
    for loaded in (mc.load(), load_streamed(mc)):
        got = run_evaluate(cfg, loaded, str(src), PrunedSide(plan=plan, export_dir=tmp_path / "out")).tasks[0]
        assert got.baseline["value"] == 0
        assert got.pruned["value"] > 0 and got.pruned["value"] == pytest.approx(masked, rel=1e-4, abs=1e-7)


# ---- choosing the engine with a faked memory size ------------------------------------------------------
GiB = 2**30


@pytest.fixture
def fake_memory(monkeypatch):
    """``set(free, whole, streamed)``: the free memory and the estimated peaks every choice sees."""
    import prune_heads.model.sequential_engine as eng

    def set_(free: float, whole: float, streamed: float) -> None:
        monkeypatch.setattr(eng, "available_memory", lambda device="cpu": int(free * GiB))
        monkeypatch.setattr(eng.Footprint, "peaks", lambda self, **kw: (int(whole * GiB), int(streamed * GiB)))
    return set_


def test_auto_keeps_a_model_that_fits_and_streams_one_that_does_not(calibrated, tmp_path, fake_memory):
    from prune_heads.evaluation.stage import EvalTask, EvaluateConfig, evaluate_engine
    from prune_heads.selection.stage import SelectConfig, select_engine

    root, src, docs = calibrated
    mc = ModelConfig(id=str(src), device="cpu")
    sel = SelectConfig(task=f"ppl:{docs}", max_drop=0.1)
    ev = EvaluateConfig(tasks=[EvalTask(task=f"kl:{docs}")])
    lines: list[str] = []
    fake_memory(free=24, whole=16, streamed=2)
    assert select_engine(sel, mc, lines.append) == evaluate_engine(ev, mc, lines.append) == "memory" and not lines
    fake_memory(free=24, whole=20, streamed=2)  # fits, but not with headroom
    assert select_engine(sel, mc, lines.append) == evaluate_engine(ev, mc, lines.append) == "sequential"
    assert len(lines) == 2 and "20.0 GiB" in lines[0] and "--engine memory" in lines[0]
    # --engine forces either, whatever the memory
    assert select_engine(SelectConfig(task=f"ppl:{docs}", max_drop=0.1, engine="memory"), mc) == "memory"
    fake_memory(free=24, whole=1, streamed=1)
    assert select_engine(SelectConfig(task=f"ppl:{docs}", max_drop=0.1, engine="sequential"), mc) == "sequential"
    # the CLI runs layer by layer by itself, with the one line
    fake_memory(free=24, whole=20, streamed=0.001)
    r = _invoke("eval", src, "--task", f"ppl:{docs}", "--limit", 4, "--device", "cpu", "-o", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "runs layer by layer" in r.output
    assert json.loads((tmp_path / "r.json").read_text())["tasks"][0]["task"]["engine"] == "sequential"


def test_what_cannot_run_is_refused_with_one_line(calibrated, tmp_path, fake_memory):
    root, src, docs = calibrated
    base = ("--device", "cpu", "-o", tmp_path / "x.json")
    fake_memory(free=24, whole=20, streamed=30)  # not even layer by layer
    r = _invoke("eval", src, "--task", f"ppl:{docs}", *base)
    assert r.exit_code == 2 and "even layer by layer needs about 30.0 GiB" in r.output and "--batch-size" in r.output
    assert "Traceback" not in r.output
    fake_memory(free=24, whole=20, streamed=2)  # an lm-eval task on a model that does not fit
    r = _invoke("eval", src, "--task", "arc_easy", *base)
    assert r.exit_code == 2 and "about 20.0 GiB" in r.output and "ppl:DATA" in r.output
    r = _invoke("select", root / "scores", "--model", src, "--task", f"ppl:{docs}", "--max-drop", 0.1, "--method",
                "iterative", *base)
    assert r.exit_code == 2 and "iterative method needs the whole model" in r.output
    r = _invoke("select", root / "scores", "--model", src, "--task", "arc_easy", "--max-drop", 0.1,
                "--engine", "sequential", *base)
    assert r.exit_code == 2 and "the task arc_easy needs the whole model" in r.output
    assert not (tmp_path / "x.json").exists()
    # a pass-key guard runs the whole model: refused by the engine choice (before loading), not by the evaluator
    from prune_heads.selection.stage import SelectConfig, select_engine

    guarded = SelectConfig(task=f"ppl:{docs}", max_drop=0.1, guard_task="passkey:48", guard_max_drop=0.1)
    with pytest.raises(PruneHeadsError, match="the guard task passkey:48 needs the whole model, about 20.0 GiB"):
        select_engine(guarded, ModelConfig(id=str(src), device="cpu"))


def test_the_memory_estimate_counts_the_longest_window():
    """A pass-key guard or a long ppl: window sets the activations the engine choice must hold, not 256 tokens."""
    from prune_heads.evaluation.stage import EvalTask, EvaluateConfig, evaluate_memory
    from prune_heads.selection.stage import SelectConfig, select_memory

    short = select_memory(SelectConfig(task="ppl:wikitext2", max_drop=0.1, batch_size=4))
    guarded = select_memory(SelectConfig(task="ppl:wikitext2", max_drop=0.1, batch_size=4, guard_task="passkey:2048",
                                         guard_max_drop=0.1))
    assert short["batch_tokens"] == 4 * 256 and guarded["batch_tokens"] == 4 * 2048
    assert guarded["whole_only"] == "the guard task passkey:2048" and short["whole_only"] is None
    ev = evaluate_memory(EvaluateConfig(tasks=[EvalTask(task="ppl:wikitext2", seq_len=4096, limit=3)], batch_size=2))
    assert ev["batch_tokens"] == 2 * 4096 and ev["all_tokens"] == 3 * 4096 and ev["whole_only"] is None
    assert evaluate_memory(EvaluateConfig(batch_size=2))["batch_tokens"] == 2 * 256  # no task yet (a recipe's preflight)


def test_an_lm_eval_task_on_a_streamed_model_is_refused(calibrated):
    _, src, _ = calibrated
    loaded = load_streamed(ModelConfig(id=str(src), device="cpu"))
    with pytest.raises(PruneHeadsError, match="ppl:DATA or kl:DATA"):
        make_evaluator(loaded.model, loaded.tokenizer, "arc_easy")


def _recipe(src, docs, engine: str) -> dict:
    return {"name": "seq", "model": {"id": str(src), "device": "cpu"},
            "calibration": {"data": str(docs), "num_samples": 8, "seq_len": 24, "batch_size": 4,
                            "scores": ["ahon_ln"], "engine": engine},
            "select": {"task": f"ppl:{docs}", "limit": 8, "max_drop": 5.0, "relative": True, "engine": engine,
                       "accept_unverified": True},
            "export": {"format": "sliced"}, "verify": {"num_sequences": 2, "seq_len": 12, "engine": engine},
            "evaluate": {"tasks": [{"task": f"ppl:{docs}", "limit": 6}], "speed_seq_len": 0, "engine": engine},
            "report": {"enabled": False}}


@pytest.mark.slow  # two whole recipe runs (about 30 s here)
def test_a_recipe_layer_by_layer_gives_the_whole_models_results(calibrated, tmp_path):
    from prune_heads.pipeline import stages as P

    _, src, docs = calibrated
    out = {}
    lines: list[str] = []
    for engine in ("memory", "sequential"):
        P.run(_recipe(src, docs, engine), tmp_path / engine, progress=False, echo=lines.append)
        wd = tmp_path / engine
        out[engine] = (json.loads((wd / "select" / "plan.json").read_text()),
                       json.loads((wd / "evaluate" / "results.json").read_text())["tasks"][0],
                       json.loads((wd / "verify" / "verification.json").read_text()))
    (pa, ra, va), (pb, rb, vb) = out["memory"], out["sequential"]
    assert _untimed(pa) == _untimed(pb) and pa["removed_heads"]
    assert _untimed(ra) == _untimed(rb) and ra["pruned"]["value"] != ra["baseline"]["value"]
    assert va["max_abs_logit_diff"] == vb["max_abs_logit_diff"] and vb["engine"] == "sequential"
    assert any(line.startswith("memory (estimated peaks") and "layer by layer" in line for line in lines)
    # the engine is not part of a stage's inputs: switching it (auto picks memory here) reruns nothing
    again = P.run(_recipe(src, docs, "auto"), tmp_path / "memory", progress=False, echo=None)
    assert again.complete and set(again.stages.values()) <= {"cached", "skipped"}, again.stages


def test_a_recipe_that_cannot_fit_is_refused_before_any_stage(calibrated, tmp_path, fake_memory):
    from prune_heads.pipeline import stages as P

    _, src, docs = calibrated
    fake_memory(free=1, whole=20, streamed=3)
    with pytest.raises(PruneHeadsError, match=r"calibrate: even layer by layer needs about 3.0 GiB .* "
                                              r"lower calibration.batch_size"):
        P.run(_recipe(src, docs, "auto"), tmp_path / "wd", progress=False, echo=None)
    assert not (tmp_path / "wd" / "calibrate").exists()


@pytest.mark.parametrize("kind", ["ppl", pytest.param("kl", marks=pytest.mark.slow)])
def test_bfloat16_weights_layer_by_layer_equal_the_whole_model(kind, tmp_path):
    _, src, docs = _world(tmp_path, "qwen3", layers=2)
    mc = ModelConfig(id=str(src), device="cpu", dtype="bfloat16")
    whole, layered = mc.load(), load_streamed(mc)
    assert next(whole.model.parameters()).dtype == torch.bfloat16
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = True
    a = make_evaluator(whole.model, whole.tokenizer, f"{kind}:{docs}", limit=5, batch_size=2)
    b = make_evaluator(layered.model, layered.tokenizer, f"{kind}:{docs}", limit=5, batch_size=2)
    for removed in (None, mask):
        _same(a(removed), b(removed))


def test_python_api_chooses_the_engine_as_the_cli_does(calibrated, tmp_path, fake_memory, capsys):
    """``calibrate_model``/``select_heads``/``evaluate_model`` given a ``ModelConfig`` go through the stage's engine
    choice: a model that fits runs whole, one that does not runs layer by layer (with the CLI's one line) and
    gives the same scores, plan and results; a ``LoadedModel`` is used as given."""
    import prune_heads as ph
    from prune_heads.model.sequential_engine import StreamedModel

    root, src, docs = calibrated
    mc = ModelConfig(id=str(src), device="cpu")
    cal = ph.CalibrateConfig(data=str(docs), num_samples=8, seq_len=24, batch_size=4, scores=["ahon_ln"])
    ev = ph.EvaluateConfig(tasks=[ph.EvalTask(task=f"ppl:{docs}", limit=8)], speed_seq_len=0)

    def run(tag):
        scores = ph.calibrate_model(mc, cal, progress=False)
        saved = ph.calibrate_model(mc, cal, tmp_path / f"scores-{tag}", progress=False)
        plan = ph.select_heads(mc, scores, ph.SelectConfig(task=f"kl:{docs}", limit=8, max_drop=0.05),
                               tmp_path / f"plan-{tag}.json", progress=False)
        res = ph.evaluate_model(mc, ev, plan=plan).tasks[0]
        return scores, saved, plan, res

    fake_memory(free=24, whole=1, streamed=1)
    s_mem, saved_mem, p_mem, r_mem = run("memory")
    assert "layer by layer" not in capsys.readouterr().err
    fake_memory(free=24, whole=20, streamed=0.001)
    s_seq, saved_seq, p_seq, r_seq = run("sequential")
    assert capsys.readouterr().err.count("runs layer by layer") == 4  # two calibrations, select, eval
    assert s_mem.meta.get("engine") != "sequential" and s_seq.meta["engine"] == saved_seq.meta["engine"] == "sequential"
    assert HeadScoresOnDisk(tmp_path / "scores-sequential").meta["engine"] == "sequential"
    assert torch.equal(s_mem.per_sample("ahon_ln"), s_seq.per_sample("ahon_ln"))
    assert s_seq.moments.fingerprint() == s_mem.moments.fingerprint() == saved_mem.moments.fingerprint()
    assert p_seq.selection.task["engine"] == "sequential" and r_seq.task["engine"] == "sequential"
    assert p_mem.removed_heads == p_seq.removed_heads and p_mem.removed_heads
    assert r_mem.pruned["value"] == r_seq.pruned["value"] != r_mem.baseline["value"]
    # a LoadedModel is whole already: used as given, whatever the memory
    loaded = mc.load()
    assert not isinstance(loaded.model, StreamedModel)
    assert ph.evaluate_model(loaded, ev, plan=p_mem).tasks[0].task.get("engine") != "sequential"
    assert "layer by layer" not in capsys.readouterr().err


def HeadScoresOnDisk(path):  # noqa: N802 - reads back what calibrate_model wrote
    from prune_heads.scoring.head_scores import HeadScores

    return HeadScores.load(path)


@pytest.mark.parametrize("engine", ["auto", "memory", "sequential"])
def test_single_commands_print_the_estimated_peak(calibrated, tmp_path, fake_memory, engine):
    """calibrate, select and eval each print, on stderr, the estimated peak of both engines and the free memory
    (``prune-heads run`` prints the same for every stage), whichever engine then runs."""
    root, src, docs = calibrated
    fake_memory(free=24, whole=3, streamed=1.5)
    common = ("--device", "cpu", "--engine", engine)
    runs = [("calibrate", src, "--data", docs, "--num-samples", 4, "--seq-len", 24, "--scores", "ahon_ln", *common,
             "-o", tmp_path / "s"),
            ("select", root / "scores", "--model", src, "--task", f"ppl:{docs}", "--limit", 4, "--max-drop", 0.5,
             "--compensate", "none", *common, "-o", tmp_path / "p.json"),
            ("eval", src, "--task", f"ppl:{docs}", "--limit", 4, *common, "-o", tmp_path / "r.json")]
    for args in runs:
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        line = f"{args[0]}: estimated peak memory 3.0 GiB whole / 1.5 GiB layer by layer (24.0 GiB free on cpu)"
        assert r.stderr.count(line) == 1 and line not in r.stdout, r.stderr
