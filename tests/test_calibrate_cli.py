"""``prune-heads calibrate`` end to end on a tiny saved model (and, slow, on the real SmolLM2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer, words

from prune_heads import HeadScores, calibrate, load_model
from prune_heads.cli.main import cli
from prune_heads.data import DataSpec, iter_documents, tokenize_documents


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS))
    model.config.name_or_path = "tiny-llama"
    model.save_pretrained(d)
    tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": words(15 + 3 * i, seed=i)}) for i in range(8)) + "\n")
    return f


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def test_cli_writes_scores_equal_to_api(model_dir, data_file, tmp_path):
    out = tmp_path / "scores"
    r = _run("calibrate", model_dir, "--data", data_file, "-o", out, "--num-samples", 5, "--seq-len", 20,
             "--batch-size", 2, "--seed", 3)
    assert r.exit_code == 0, r.output + str(r.exception)
    assert "scored 8 heads (2 layers x 4) with 16 scores on 5 samples / 95 tokens" in r.output
    assert "most inactive by awft: L" in r.output
    assert "calibrating" in r.stderr and "5/5" in r.stderr  # the progress bar
    hs = HeadScores.load(out)
    assert hs.meta["model"] == str(model_dir) and hs.meta["data"]["seed"] == 3
    assert hs.meta["wall_seconds"] >= 0 and hs.per_sample("awft").shape == (5, 2, 4)
    # the same samples through the Python API give the same numbers
    loaded = load_model(str(model_dir))
    hs.check(loaded.model)
    seqs = tokenize_documents(iter_documents(str(data_file)), loaded.tokenizer,
                              DataSpec(source=str(data_file), num_samples=5, seq_len=20, seed=3))
    api = calibrate(loaded.model, seqs, batch_size=5, progress=False)
    for sid in hs.score_ids:
        torch.testing.assert_close(hs.per_sample(sid), api.per_sample(sid), rtol=1e-5, atol=1e-6)


def test_cli_errors(model_dir, data_file, tmp_path):
    out = tmp_path / "scores"
    out.mkdir()
    r = _run("calibrate", model_dir, "--data", data_file, "-o", out)
    assert r.exit_code == 2 and "already exists; pass --overwrite" in r.stderr
    r = _run("calibrate", model_dir, "--data", data_file, "-o", tmp_path / "b", "--scores", "ahon,nope")
    assert r.exit_code == 2 and "--scores: unknown score(s) nope" in r.stderr
    r = _run("calibrate", model_dir, "--data", data_file, "-o", tmp_path / "c", "--seq-len", 1000)
    assert r.exit_code == 2 and "beyond the model's context of 256" in r.stderr
    r = _run("calibrate", model_dir, "--data", data_file, "-o", tmp_path / "d", "--num-samples", 50)
    assert r.exit_code == 2 and "only 8 documents" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    r = _run("calibrate", model_dir, "--data", empty, "-o", tmp_path / "e")
    assert r.exit_code == 2 and "has no documents" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "scores"]  # nothing half-written


def test_cli_unsupported_architecture(tmp_path, data_file):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=80, n_positions=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer(tmp_path / "gpt2")
    r = _run("calibrate", tmp_path / "gpt2", "--data", data_file, "-o", tmp_path / "s")
    assert r.exit_code == 2 and "'gpt2' is not supported. Supported families:" in r.stderr


def test_device_map_auto_loads_and_calibrates(model_dir, data_file, tmp_path):
    r = _run("calibrate", model_dir, "--data", data_file, "-o", tmp_path / "s", "--num-samples", 2,
             "--seq-len", 16, "--device-map", "auto", "--scores", "ahon,grad")
    assert r.exit_code == 0, r.output + str(r.exception)
    assert sorted(HeadScores.load(tmp_path / "s").score_ids) == ["ahon", "grad"]


@pytest.mark.slow
def test_cli_under_torchrun(model_dir, data_file, tmp_path):
    """Two processes launched like ``accelerate launch``/``torchrun`` write what one process writes."""
    exe = shutil.which("prune-heads") or str(Path(sys.executable).parent / "prune-heads")
    common = ["calibrate", str(model_dir), "--data", str(data_file), "--num-samples", "5", "--seq-len", "20",
              "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                    exe, *common, "-o", str(tmp_path / "two")], check=True, env=env, capture_output=True)
    assert _run(*common, "-o", tmp_path / "one").exit_code == 0
    two, one = HeadScores.load(tmp_path / "two"), HeadScores.load(tmp_path / "one")
    assert two.meta["world_size"] == 2 and one.meta["world_size"] == 1
    for sid in one.score_ids:
        torch.testing.assert_close(two.per_sample(sid), one.per_sample(sid), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_real_smollm2_wikitext(tmp_path):
    r = _run("calibrate", "smollm2", "--data", "wikitext2", "-o", tmp_path / "s", "--num-samples", 3,
             "--seq-len", 64, "--batch-size", 3)
    assert r.exit_code == 0, r.output + str(r.exception)
    assert "scored 270 heads (30 layers x 9) with 16 scores on 3 samples / 192 tokens" in r.output
    hs = HeadScores.load(tmp_path / "s")
    assert hs.meta["num_kv_heads"] == 3 and hs.meta["data"]["source"] == "wikitext2"
    awft = hs.mean("awft")
    assert ((awft >= 0) & (awft <= 1)).all()
    # the attention sink the paper builds on: the first token gets far more than uniform attention would give
    uniform = sum(1 / (i + 1) for i in range(64)) / 64
    assert awft.median() > 3 * uniform
