"""The card and ``prune_heads.json`` of real exports: what really happened, no local path, a snippet that runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from export_helpers import make_source, run_without_package
from test_model_card import front_matter, section, table_rows
from tiny_tokenizer import tiny_tokenizer

from prune_heads.export import export_checkpoint, verify_export
from prune_heads.export.model_card import (
    MEASURED_ON,
    gguf_quantization,
    refresh_card,
    render_model_card,
    scrub_local_paths,
    source_info,
)
from prune_heads.plan import Plan

pytestmark = pytest.mark.filterwarnings("ignore:plan has no model fingerprint")
ROOT = Path(__file__).resolve().parents[1]


def result(value, metric="acc", stderr=0.01, n=100, task=None):
    return {"metric": metric, "value": value, "stderr": stderr, "higher_is_better": True, "n": n,
            "details": {"task": task} if task else {}}


def static_meta(tmp_path):
    """What select_static writes, with the local paths a real run leaves in it."""
    return {"method": "static", "model": str(tmp_path / "cache" / "gguf" / "model"), "score_id": "ahon_ln",
            "policy": "free", "task": {"task": "arc_easy", "split": "search", "metric": "acc"},
            "baseline": result(0.60), "result": result(0.59),
            "verification": {"task": {"task": "arc_easy", "split": "verify"}, "baseline": result(0.61),
                             "result": result(0.595), "within_budget": True},
            "scores": {"data": {"source": str(tmp_path / "data" / "calib.jsonl")}, "model": str(tmp_path / "m")}}


@pytest.fixture
def export(tmp_path):
    model, src = make_source(tmp_path, "llama", heads=4, kv_heads=2)
    tiny_tokenizer(src)
    plan = Plan([(0, 1), (1, 3)], static_meta(tmp_path))
    export_checkpoint(str(src), plan, tmp_path / "out", verify=False, progress=False)
    return src, plan, tmp_path / "out"


def test_no_local_path_anywhere(export, tmp_path):
    src, _, out = export
    for name in ("prune_heads.json", "README.md", "config.json"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and str(Path.home()) not in text, name
    prov = json.loads((out / "prune_heads.json").read_text())
    assert prov["source"]["model"] == src.name and prov["source"]["local"] is True and "path" not in prov["source"]
    assert prov["plan"]["scores"]["data"]["source"] == "calib.jsonl"  # reduced to the file name


def test_selection_rows_are_labelled_by_what_they_are(export):
    _, _, out = export
    rows = table_rows(section((out / "README.md").read_text(), "Evaluation"))
    assert rows == [
        ["arc_easy", "acc", "0.6000 ± 0.0100", "0.5900 ± 0.0100", "-0.0100", "100", MEASURED_ON["selection"]],
        ["arc_easy", "acc", "0.6100 ± 0.0100", "0.5950 ± 0.0100", "-0.0150", "100", MEASURED_ON["held_out"]],
    ]
    assert not any(r[0] in ("baseline", "result", "verification") for r in rows)


def test_selection_rows_are_the_plans_numbers(export):
    """The record's rows are the plan's typed selection record, field by field (search split, then held out)."""
    from prune_heads.export.record import ExportRecord

    _, plan, out = export
    rows = ExportRecord.load(out).evaluation
    sel = plan.selection
    assert [(r.before, r.after, r.n) for r in rows] == [
        (sel.baseline["value"], sel.result["value"], sel.result["n"]),
        (sel.verification.baseline["value"], sel.verification.result["value"], sel.verification.result["n"])]


def test_refresh_card_after_a_separate_verification_and_evaluation(export):
    src, plan, out = export
    assert "No verification is recorded" in section((out / "README.md").read_text(), "Verification")
    from prune_heads.evaluation.stage import EvaluationResult, TaskOutcome

    def evaluated(*tasks):
        return EvaluationResult("m", 8, {"type": "export"}, 0.25, "exported model",
                                [TaskOutcome({"task": t, "split": "all"}, b, p) for t, b, p in tasks])

    v = verify_export(str(src), str(out), plan)
    evaluation = evaluated(("arc_easy", result(0.62, n=500), result(0.60, n=500)),
                           ("ppl:wikitext2", result(20.0, "perplexity", None, 2040),
                            result(20.5, "perplexity", None, 2040)))
    card = refresh_card(out, verification=v, evaluation=evaluation, repo_id="me/tiny-pruned")
    text = card.read_text()
    assert "**passed**" in section(text, "Verification")
    rows = table_rows(section(text, "Evaluation"))
    assert [(r[0], r[-1]) for r in rows] == [("arc_easy", MEASURED_ON["selection"]), ("arc_easy", MEASURED_ON["held_out"]),
                                            ("arc_easy", "exported model"), ("ppl:wikitext2", "exported model")]
    assert rows[2][2:6] == ["0.6200 ± 0.0100", "0.6000 ± 0.0100", "-0.0200", "500"]
    prov = json.loads((out / "prune_heads.json").read_text())
    assert prov["verification"]["passed"] is True and len(prov["evaluation"]) == 4
    assert 'from_pretrained("me/tiny-pruned", trust_remote_code=True)' in text
    # a second evaluation replaces the first one's rows, the selection rows stay
    refresh_card(out, evaluation=evaluated(("piqa", result(0.7), result(0.69))))
    rows = table_rows(section((out / "README.md").read_text(), "Evaluation"))
    assert [r[0] for r in rows] == ["arc_easy", "arc_easy", "piqa"]
    assert "**passed**" in (out / "README.md").read_text()  # kept


def test_loading_snippets_work_as_written(export, tmp_path):
    _, _, out = export
    card = (out / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", section(card, "How to load"), flags=re.S)
    assert len(blocks) == 2
    check = "\nimport json\nprint(json.dumps({'model': type(model).__name__, 'tok': tokenizer('the film').input_ids}))\n"
    remote = blocks[0].replace("path/to/this/model", str(out))
    # no prune_heads, stdin closed: an interactive trust_remote_code prompt would fail here
    got = run_without_package(remote + check, tmp_path)
    assert got["model"] == "PrunedLlamaForCausalLM" and got["tok"] == tiny_tokenizer()("the film").input_ids
    local = blocks[1].replace("path/to/this/model", str(out))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", local + check], env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.splitlines()[-1])["model"] == "PrunedLlamaForCausalLM"


def test_demo_model_is_named_and_its_quantisation_said():
    info = source_info("smollm2")
    assert info["model"] == info["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and info["spec"] == "smollm2"
    assert info["gguf"]["quantization"] == "Q4_1" and info["gguf"]["file"].endswith(".gguf")
    text = render_model_card({"base_model": info["hub_id"], "gguf": info["gguf"], "format": "sliced",
                              "heads_total": 270, "heads_removed": 27})
    assert front_matter(text)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "dequantised to float32 from the Q4_1 GGUF file" in text
    assert [gguf_quantization(n) for n in ("m.Q4_K_M.gguf", "m-IQ2_XS.gguf", "m.f16.gguf", "model.gguf")] == \
        ["Q4_K_M", "IQ2_XS", "F16", None]


def test_compensation_is_stated():
    comp = {"mode": "lsq", "sequential": True, "ridge": 0.01, "moments": {"num_tokens": 64, "fingerprint": "abc"},
            "layers": [0, 3]}
    body = section(render_model_card({"format": "sliced", "compensation": comp}), "Compensation")
    rows = dict(tuple(r) for r in table_rows(body))
    assert rows["mode"] == "`lsq`" and rows["calibration tokens"] == "64" and rows["sequential"] == "yes"
    assert rows["layers with an o_proj bias from compensation"] == "2" and "least squares" in body
    for zeroed in (None, {"mode": "none"}):
        assert "## Compensation" not in render_model_card({"format": "sliced", "compensation": zeroed})


def test_scrub_local_paths():
    obj = {"a": "/home/me/models/x", "b": ["~/data/y.jsonl", "org/name", "hub:ds?x=1"], "c": r"C:\\m\\z.bin", "d": 3}
    assert scrub_local_paths(obj) == {"a": "x", "b": ["y.jsonl", "org/name", "hub:ds?x=1"], "c": "z.bin", "d": 3}
