"""The scores directory: layout, round trip, provenance, and the errors around it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_config, tiny_model

from prune_heads import HeadScores, calibrate, get_adapter
from prune_heads.__about__ import __version__
from prune_heads.errors import (
    ModelMismatchError,
    OutputExistsError,
    PruneHeadsError,
    UnsupportedArchitectureError,
)
from prune_heads.io_utils import atomic_dir
from prune_heads.scoring.score_defs import FORWARD_SCORES

SEQS = [[1, 5, 9, 13, 2, 7, 30], [1, 8, 8, 4], [1, 60, 3, 17, 22]]


@pytest.fixture(scope="module")
def scored():
    model = tiny_model("qwen2", layers=3)
    return model, calibrate(model, SEQS, batch_size=2, model_name="tiny/qwen2", revision="abc123", progress=False)


def test_file_layout_and_metadata(scored, tmp_path):
    model, hs = scored
    out = hs.save(tmp_path / "scores")
    # moments.safetensors: the statistics compensation is solved from (tests/test_compensation_moments.py)
    assert sorted(p.name for p in out.iterdir()) == ["moments.safetensors", "scores.json", "scores.safetensors"]
    tensors = load_file(str(out / "scores.safetensors"))
    assert set(tensors) == set(FORWARD_SCORES) | {f"per_sample/{s}" for s in FORWARD_SCORES}
    assert tensors["ahon_ln"].shape == (3, 4) and tensors["ahon_ln"].dtype == torch.float32
    assert tensors["per_sample/ahon_ln"].shape == (3, 3, 4)
    torch.testing.assert_close(tensors["ahon_ln"], tensors["per_sample/ahon_ln"].mean(0))
    meta = json.loads((out / "scores.json").read_text())
    assert meta["model"] == "tiny/qwen2" and meta["revision"] == "abc123"
    fp = meta["fingerprint"]
    assert fp["format"] == "prune-heads-fingerprint/2" and fp["config"]
    assert set(fp["tensors"]) == {n for n, _ in model.named_parameters()}  # every tensor, not a sample
    assert (meta["num_layers"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) == (3, 4, 2, 8)
    assert meta["data"]["source"] == "pre-tokenised"
    assert meta["num_samples"] == 3 and meta["num_tokens"] == 16
    assert meta["dtype"] == "float32" and meta["tool_version"] == __version__
    assert meta["date"][:2] == "20" and meta["family"] == "qwen2"
    assert set(meta["scores"]) == set(FORWARD_SCORES)


def test_round_trip(scored, tmp_path):
    _, hs = scored
    hs.save(tmp_path / "s")
    back = HeadScores.load(tmp_path / "s")
    assert back.score_ids == hs.score_ids
    for sid in hs.score_ids:
        assert torch.equal(back.mean(sid), hs.mean(sid))
        assert torch.equal(back.per_sample(sid), hs.per_sample(sid))
    assert back.meta == hs.meta
    assert back.num_layers == 3 and back.num_heads == 4 and back.num_samples == 3


def test_existing_output_refused(scored, tmp_path):
    _, hs = scored
    hs.save(tmp_path / "s")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        hs.save(tmp_path / "s")
    hs.save(tmp_path / "s", overwrite=True)
    assert HeadScores.load(tmp_path / "s").score_ids == hs.score_ids


def test_interrupted_write_leaves_nothing(scored, tmp_path, monkeypatch):
    _, hs = scored
    import prune_heads.scoring.head_scores as mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "write_json_atomic", boom)  # dies after the tensors were written
    with pytest.raises(KeyboardInterrupt):
        hs.save(tmp_path / "s")
    assert list(tmp_path.iterdir()) == []
    # an interrupted overwrite keeps the old, complete result
    monkeypatch.undo()
    hs.save(tmp_path / "s")
    before = (tmp_path / "s" / "scores.safetensors").read_bytes()
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "s", overwrite=True) as tmp:
        (tmp / "scores.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert (tmp_path / "s" / "scores.safetensors").read_bytes() == before


def test_load_errors(tmp_path):
    with pytest.raises(PruneHeadsError, match="not a scores directory"):
        HeadScores.load(tmp_path)
    (tmp_path / "scores.safetensors").write_bytes(b"garbage")
    (tmp_path / "scores.json").write_text("{}")
    with pytest.raises(PruneHeadsError, match="cannot read scores"):
        HeadScores.load(tmp_path)


def test_check_against_other_models(scored):
    model, hs = scored
    hs.check(model)  # the same model passes
    with pytest.raises(ModelMismatchError, match="3 layers x 4 heads.*2 x 4"):
        hs.check(tiny_model("qwen2", layers=2))
    with pytest.raises(ModelMismatchError, match="different architecture"):
        hs.check(tiny_model("qwen2", layers=3, vocab=120))
    with pytest.raises(ModelMismatchError, match="different weights"):
        hs.check(tiny_model("qwen2", layers=3, seed=1))


def test_missing_score_is_clear(scored):
    _, hs = scored
    with pytest.raises(PruneHeadsError, match="'grad' is not in this scores file.*--scores grad"):
        hs.mean("grad")


def test_unknown_score_id():
    model = tiny_model("llama")
    with pytest.raises(PruneHeadsError, match="unknown score id.*'awfx'.*known: awft"):
        calibrate(model, SEQS, scores=["awft", "awfx"], progress=False)


def test_subset_of_scores():
    model = tiny_model("llama")
    hs = calibrate(model, SEQS, scores=["lthon_hn", "awft"], progress=False)
    assert sorted(hs.score_ids) == ["awft", "lthon_hn"]


def test_unsupported_architecture():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*llama.*qwen2"):
        calibrate(model, SEQS, progress=False)
    with pytest.raises(UnsupportedArchitectureError):
        get_adapter(tiny_config("llama").__class__.__base__())  # a bare PretrainedConfig has no family
