"""Every stage that reads the source checkpoint gets the whole ``ModelConfig``: an export made with
``--revision`` streams that revision's weights (not the default branch's), a GGUF source is verified
against its own conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from model_sources import add_gguf, add_revision, use_cache
from safetensors.torch import load_file
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer

from prune_heads.cli.main import cli
from prune_heads.plan import Plan

REPO = "org/tiny"
VOCAB = len(SPECIAL) + len(WORDS)


def _tiny(seed: int):
    return tiny_model("llama", seed=seed, layers=2, heads=4, kv_heads=2, head_dim=8, vocab=VOCAB)


def _save(seed: int) -> object:
    def write(folder: Path) -> None:
        _tiny(seed).save_pretrained(folder)
        tiny_tokenizer(save_to=folder)
    return write


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """``org/tiny`` in an offline Hub cache: ``main`` and ``v2`` hold different weights."""
    cache = tmp_path / "hub"
    add_revision(cache, REPO, "main", "1" * 40, _save(0))
    add_revision(cache, REPO, "v2", "2" * 40, _save(1))
    use_cache(monkeypatch, cache)
    return cache


def cli_ok(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.filterwarnings("ignore:plan has no model fingerprint")
def test_export_streams_the_revision_it_is_given(hub, tmp_path):
    """A hand-written plan carries no fingerprint, so nothing else would notice the wrong weights."""
    Plan([(0, 1), (1, 2)]).save(tmp_path / "plan.json")
    cli_ok("export", REPO, "--revision", "v2", "--plan", tmp_path / "plan.json", "--verify-sequences", 2,
           "--verify-seq-len", 12, "-o", tmp_path / "out")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    v2, main = _tiny(1).state_dict(), _tiny(0).state_dict()
    name = "model.embed_tokens.weight"  # untouched by slicing: exactly the source's tensor
    assert torch.equal(got[name], v2[name]) and not torch.equal(got[name], main[name])
    # the kept heads' q rows of layer 0 are v2's (head 1 removed, head_dim 8)
    q = v2["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], torch.cat([q[:8], q[16:]]))
    prov = json.loads((tmp_path / "out" / "prune_heads.json").read_text())
    assert prov["source"]["revision"] == "v2" and prov["verification"]["passed"]


@pytest.mark.filterwarnings("ignore:plan has no model fingerprint")
def test_verify_stage_uses_the_gguf_file_it_is_given(tmp_path, monkeypatch):
    """A folder with two GGUF files: the verify stage compares with the one ``gguf_file`` names."""
    from prune_heads.export.stage import VerifyConfig, run_verify
    from prune_heads.model.config import ModelConfig

    monkeypatch.setenv("PRUNE_HEADS_CACHE", str(tmp_path / "cache"))
    add_gguf(tmp_path / "src", "a.Q8_0.gguf", b"a", _save(0))
    add_gguf(tmp_path / "src", "b.Q8_0.gguf", b"b", _save(1))
    Plan([(0, 1), (1, 2)]).save(tmp_path / "plan.json")
    cli_ok("export", tmp_path / "src", "--gguf-file", "b.Q8_0.gguf", "--plan", tmp_path / "plan.json", "--no-verify",
           "-o", tmp_path / "out")
    plan = Plan.load(tmp_path / "plan.json")
    cfg = VerifyConfig(num_sequences=2, seq_len=12)
    res = run_verify(cfg, ModelConfig(id=str(tmp_path / "src"), gguf_file="b.Q8_0.gguf"), tmp_path / "out", plan)
    assert res.passed and res.max_abs_logit_diff <= 1e-4
    # the check tells the two sources apart: against a.gguf the same export fails
    other = run_verify(cfg, ModelConfig(id=str(tmp_path / "src"), gguf_file="a.Q8_0.gguf"), tmp_path / "out", plan)
    assert not other.passed

