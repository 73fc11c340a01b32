"""The model card: Hub metadata that parses, numbers that match the export, and a stable text."""

from __future__ import annotations

import re

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_heads.evaluation.stage import EvaluationResult, TaskOutcome
from prune_heads.export.model_card import render_model_card, result_rows, write_model_card
from prune_heads.export.record import EvaluationRow, VerificationRecord


def _result(metric, value, stderr, n=200):
    return {"metric": metric, "value": value, "stderr": stderr, "higher_is_better": True, "n": n, "details": {}}


def make_info(**over):
    info = {
        "base_model": "HuggingFaceTB/SmolLM2-135M",
        "format": "sliced",
        "family": "llama",
        "plan": {"removed_heads": [[0, 1], [0, 4], [2, 8]], "score_id": "ahon_ln", "policy": "kv-groups",
                 "max_drop": 0.01, "relative": False, "k": 3, "fingerprint": {"config": "abc"},
                 "trace": [{"k": 1, "value": 0.5}], "tool_version": "0.1.0"},
        "removed_per_layer": [2, 0, 1],
        "num_heads_per_layer": 9,
        "heads_total": 27,
        "heads_removed": 3,
        "params_before": 134_515_008,
        "params_after": 134_301_504,
        "evaluation": [EvaluationRow.of("arc_easy", _result("acc", 0.6, 0.02), _result("acc", 0.595, 0.021),
                                        "exported model")],
        "verification": VerificationRecord(max_abs_logit_diff=2.5e-6, tolerance=1e-4, passed=True, num_sequences=4),
        "license": "apache-2.0",
        "tool_version": "0.1.0",
        "trust_remote_code": True,
    }
    info.update(over)
    return info


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


def section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, f"no section {title!r}"
    return m.group(1)


def table_rows(block: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
            if line.startswith("|")]
    return [r for r in rows[2:]]  # skip header and separator


# ---- metadata -------------------------------------------------------------------------------------
def test_front_matter_keys():
    meta = front_matter(render_model_card(make_info()))
    assert meta == {
        "base_model": "HuggingFaceTB/SmolLM2-135M",
        "tags": ["pruned", "attention-heads", "prune-heads"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "license": "apache-2.0",
    }


def test_unknown_license_is_omitted():
    assert "license" not in front_matter(render_model_card(make_info(license=None)))


@pytest.mark.parametrize("base, expected", [
    ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"),
    ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # the packaged demo model
    ("/tmp/my model: v1", None),  # local paths are not Hub ids: the Hub would reject them
    ("./org/name", None),
    ("a: [b]", None),
])
def test_base_model_is_a_hub_id_or_omitted(base, expected, tmp_path):
    text = render_model_card(make_info(base_model=base))
    assert front_matter(text).get("base_model") == expected
    body = text.split("---\n", 2)[2]
    if expected or not base.startswith(("/", ".")):
        assert (expected or base) in body  # the body still names the source
    else:
        assert base.rstrip("/").split("/")[-1] in body and base not in body  # by name, never by local path


def test_existing_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert "base_model" not in front_matter(render_model_card(make_info(base_model="org/name")))


# ---- numbers --------------------------------------------------------------------------------------
def test_summary_numbers_match_info():
    info = make_info()
    text = render_model_card(info)
    heads_pct = 100 * 3 / 27
    params_pct = 100 * (134_515_008 - 134_301_504) / 134_515_008
    assert f"3 of 27 ({heads_pct:.2f}%)" in text
    assert f"134,515,008 → 134,301,504 ({params_pct:.2f}% removed)" in text
    assert "11.11%" in text and "0.16%" in text  # the same, written out by hand


def test_heads_per_layer_table():
    rows = table_rows(section(render_model_card(make_info()), "Heads removed per layer"))
    assert rows == [["0", "2", "7", "1, 4"], ["1", "0", "9", "–"], ["2", "1", "8", "8"]]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 16).flatmap(lambda h: st.tuples(st.just(h), st.lists(st.integers(0, h), min_size=1, max_size=40))),
       st.integers(1_000, 10**11), st.floats(0, 1))
def test_numbers_match_for_random_exports(heads_and_counts, params_before, kept_fraction):
    heads, per_layer = heads_and_counts
    params_after = int(params_before * kept_fraction)
    removed_heads = [[layer, h] for layer, r in enumerate(per_layer) for h in range(r)]
    info = make_info(removed_per_layer=per_layer, num_heads_per_layer=heads, heads_total=heads * len(per_layer),
                     heads_removed=sum(per_layer), params_before=params_before, params_after=params_after,
                     plan={"removed_heads": removed_heads})
    text = render_model_card(info)
    rows = table_rows(section(text, "Heads removed per layer"))
    assert [int(r[1]) for r in rows] == per_layer
    assert [int(r[2]) for r in rows] == [heads - r for r in per_layer]
    assert [len(r[3].split(",")) if r[3] != "–" else 0 for r in rows] == per_layer
    m = re.search(r"(\d+) of (\d+) \(([\d.]+)%\)", text)
    assert (int(m[1]), int(m[2])) == (sum(per_layer), heads * len(per_layer))
    assert float(m[3]) == pytest.approx(100 * sum(per_layer) / (heads * len(per_layer)), abs=0.005 + 1e-9)  # printed with 2 decimals
    m = re.search(r"([\d,]+) → ([\d,]+) \(([\d.]+)% removed\)", text)
    assert (int(m[1].replace(",", "")), int(m[2].replace(",", ""))) == (params_before, params_after)
    assert float(m[3]) == pytest.approx(100 * (params_before - params_after) / params_before, abs=0.005 + 1e-9)  # printed with 2 decimals


# ---- evaluation -----------------------------------------------------------------------------------
def results(*tasks, evaluated_as="exported model") -> EvaluationResult:
    """An ``EvaluationResult`` as ``run_evaluate`` makes it, from ``(task, split, baseline, pruned)``."""
    return EvaluationResult("m", 27, {"type": "export"}, 0.1, evaluated_as,
                            [TaskOutcome({"task": t, "split": split}, b, p) for t, split, b, p in tasks])


def test_eval_table_pairs_per_task():
    """Every number of the evaluate stage's result lands in its cell: values, stderrs, change, n, where measured."""
    res = results(("mmlu", "all", _result("acc", 0.30, 0.004, 14042), _result("acc", 0.2975, 0.0041, 14042)),
                  ("arc_easy", "verify", _result("acc_norm", 0.6, 0.02), _result("acc_norm", 0.61, None)))
    rows = table_rows(section(render_model_card(make_info(evaluation=result_rows(res))), "Evaluation"))
    assert rows == [
        ["arc_easy (verify split)", "acc_norm", "0.6000 ± 0.0200", "0.6100", "+0.0100", "200", "exported model"],
        ["mmlu", "acc", "0.3000 ± 0.0040", "0.2975 ± 0.0041", "-0.0025", "14042", "exported model"],
    ]
    masked = results(("piqa", "all", _result("acc", 0.7, 0.01), None), evaluated_as="masked original (...)")
    rows = table_rows(section(render_model_card(make_info(evaluation=result_rows(masked))), "Evaluation"))
    assert rows == [["piqa", "acc", "0.7000 ± 0.0100", "not measured", "not measured", "200", "masked base model"]]


def test_untyped_evaluation_is_refused():
    """The shapes the card once guessed at (task -> {baseline, pruned} dicts) are refused, with what to pass."""
    from prune_heads.errors import PruneHeadsError

    with pytest.raises(PruneHeadsError, match="EvaluationResult"):
        result_rows({"arc_easy": {"baseline": _result("acc", 0.6, 0.02), "pruned": _result("acc", 0.59, 0.02)}})


@pytest.mark.parametrize("ev", [None, []])
def test_no_eval_results(ev):
    body = section(render_model_card(make_info(evaluation=ev)), "Evaluation")
    assert "No evaluation results" in body and "|" not in body


# ---- verification, loading, provenance, citation --------------------------------------------------
def test_verification_states():
    ok = section(render_model_card(make_info()), "Verification")
    assert "**passed**" in ok and "2.50e-06" in ok and "1.00e-04" in ok and "num_sequences | 4" in ok
    bad = section(render_model_card(make_info(verification=VerificationRecord(max_abs_logit_diff=0.3, tolerance=1e-4,
                                                                               passed=False))), "Verification")
    assert "**FAILED**" in bad and "3.00e-01" in bad
    assert "No verification is recorded" in section(render_model_card(make_info(verification=None)), "Verification")


def test_loading_instructions_per_format():
    sliced = section(render_model_card(make_info(repo_id="me/smol-pruned")), "How to load")
    assert 'AutoModelForCausalLM.from_pretrained("me/smol-pruned", trust_remote_code=True)' in sliced
    assert 'AutoTokenizer.from_pretrained("me/smol-pruned", trust_remote_code=True)' in sliced
    assert "import prune_heads" in sliced
    for fmt in ("uniform", "masked"):
        text = section(render_model_card(make_info(format=fmt, trust_remote_code=False)), "How to load")
        assert "trust_remote_code" not in text and "import prune_heads" not in text
        assert "AutoModelForCausalLM.from_pretrained(" in text
    assert "vLLM" in section(render_model_card(make_info(format="uniform", trust_remote_code=False)), "How to load")


def test_how_it_was_made_lists_plan_settings():
    rows = dict(tuple(r) for r in table_rows(section(render_model_card(make_info()), "How it was made")))
    assert rows["score"] == "ahon_ln" and rows["GQA policy"] == "kv-groups"
    assert rows["budget (max drop)"] == "0.01" and rows["heads chosen (k)"] == "3"
    assert rows["exported with"] == "prune-heads 0.1.0"
    assert "fingerprint" not in rows and "trace" not in rows  # bulky fields stay in prune_heads.json
    hand_written = section(render_model_card(make_info(plan={"removed_heads": [[0, 1]]})), "How it was made")
    assert "without selection metadata" in hand_written


def test_citation():
    cite = section(render_model_card(make_info()), "Citation")
    bib = cite[cite.index("```bibtex") + len("```bibtex"):cite.rindex("```")]
    assert bib.count("{") == bib.count("}")
    assert "Sandoval-Segura, Pedro" in bib and "2504.03889" in bib and "ICLR" in bib and "2026" in bib
    assert "Identifying and Evaluating Inactive Heads in Pretrained {LLM}s" in bib


# ---- determinism and writing ----------------------------------------------------------------------
def test_deterministic_and_order_independent():
    a, b = ("a", "all", _result("acc", 0.4, 0.01), None), ("b", "all", _result("acc", 0.5, 0.01), None)
    info = make_info(evaluation=result_rows(results(b, a)))
    reordered = make_info(evaluation=result_rows(results(a, b)))
    text = render_model_card(info)
    assert text == render_model_card(info) == render_model_card(reordered)
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b|\d\d:\d\d:\d\d", text)  # no dates or times


def test_minimal_info():
    """A hand-written plan exported without evaluation still gets a valid card."""
    text = render_model_card({"base_model": "/models/local", "format": "masked", "heads_total": 8,
                              "heads_removed": 1, "removed_per_layer": [1, 0], "num_heads_per_layer": 4})
    assert "base_model" not in front_matter(text) and "`local`" in text and "/models" not in text
    assert "1 of 8 (12.50%)" in text


def test_write_model_card(tmp_path):
    path = write_model_card(tmp_path, make_info())
    assert path == tmp_path / "README.md"
    assert path.read_text(encoding="utf-8") == render_model_card(make_info())
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left behind
    write_model_card(tmp_path, make_info(heads_removed=4))  # replaces an existing card
    assert "4 attention heads removed" in path.read_text(encoding="utf-8")
