"""The export's typed records: ``prune_heads.json`` (``ExportRecord``), the verification (``VerificationRecord``)
and ``results.json`` (``EvaluationResult.load``) read back exactly what was written, and refuse a field of the
wrong type by name instead of rendering a card or a summary from a guess."""

from __future__ import annotations

import json

import pytest
from export_helpers import make_source

from prune_heads.evaluation.stage import EvaluationResult, TaskOutcome
from prune_heads.export import export_checkpoint
from prune_heads.export.record import ExportRecord, RecordError, VerificationRecord
from prune_heads.plan import Plan

pytestmark = pytest.mark.filterwarnings("ignore:plan has no model fingerprint")


@pytest.fixture
def exported(tmp_path):
    _, src = make_source(tmp_path, "llama", heads=4, kv_heads=2)
    res = export_checkpoint(str(src), Plan([(0, 1), (1, 3)]), tmp_path / "out", progress=False, verify_num_sequences=2,
                            verify_seq_len=8)
    return res, tmp_path / "out"


def test_export_record_reads_back_what_export_wrote(exported):
    res, out = exported
    raw = json.loads((out / "prune_heads.json").read_text())
    rec = ExportRecord.load(out)
    assert rec.to_dict() == raw
    assert (rec.params_before, rec.params_after, rec.heads_removed) == (res.params_before, res.params_after, 2)
    assert isinstance(rec.verification, VerificationRecord) and rec.verification.to_dict() == res.verification
    assert rec.selection().method == "manual"
    rec.save(out)
    assert json.loads((out / "prune_heads.json").read_text()) == raw  # save(load(x)) == x


@pytest.mark.parametrize("key,value,message", [
    ("heads_removed", "two", "heads_removed: must be an integer"),
    ("verification", {"passed": True}, "verification.max_abs_logit_diff: required key is missing"),
    ("base_model", "org/x", "base_model: unknown key"),
    ("evaluation", [{"task": "arc_easy", "before": "high"}], "evaluation.0.before: must be a number"),
])
def test_a_bad_field_is_refused_by_name(exported, key, value, message):
    _, out = exported
    raw = json.loads((out / "prune_heads.json").read_text())
    raw[key] = value
    (out / "prune_heads.json").write_text(json.dumps(raw))
    with pytest.raises(RecordError, match=message.replace(".", r"\.")):
        ExportRecord.load(out)


def test_verification_record_refuses_what_the_card_once_guessed_at():
    with pytest.raises(RecordError, match="unknown key"):
        VerificationRecord.from_dict({"passed": True, "max_abs_diff": 0.1, "tol": 1e-4})


def test_evaluation_result_load_round_trips(tmp_path):
    from prune_heads.io_utils import write_json_atomic

    res = EvaluationResult("m", 8, {"type": "plan"}, 0.25, "masked original",
                           [TaskOutcome({"task": "ppl:x", "split": "verify"}, {"metric": "perplexity", "value": 20.0},
                                        {"metric": "perplexity", "value": 21.0})],
                           speed=None, evaluations=2, wall_seconds=1.5, fingerprint={"config": "abc"})
    write_json_atomic(tmp_path / "results.json", res.to_dict())
    back = EvaluationResult.load(tmp_path / "results.json")
    assert back == res and back.tasks[0].difference == 1.0
    raw = res.to_dict()
    del raw["tasks"][0]["baseline"]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(RecordError, match="bad.json: a field is missing"):
        EvaluationResult.load(tmp_path / "bad.json")


def test_dead_helpers_are_gone():
    from prune_heads.export import model_card
    from prune_heads.pipeline import recipe, stages

    for module, name in ((stages, "outcome_statuses"), (stages, "read_json"), (model_card, "eval_rows"),
                         (model_card, "evaluation_rows"), (recipe, "hub_offline")):
        assert not hasattr(module, name), name
