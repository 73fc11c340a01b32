"""Layer-by-layer calibration against ``calibrate()`` on the whole model (the reference).

Bound: none. Every layer runs the same kernels on the same operands in both paths and the statistics are added
in the same order, so the per-sample scores, the moments, their fingerprints and the model fingerprint are
equal bit for bit (asserted with ``torch.equal``), on every family. A run stopped in the middle of the layers
(the stand-in for a kill) resumes from the last finished layer and gives the same result; a full disk while a
layer is written is one line and leaves no half-written layer behind.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from export_helpers import make_source
from tiny_models import FAMILIES
from tiny_tokenizer import tiny_tokenizer, words

from prune_heads.compensation.moments import Moments
from prune_heads.errors import PruneHeadsError
from prune_heads.scoring.calibrate import calibrate
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.scoring.sequential import _Killed, calibrate_sequential, layer_file

SEQS = [[1, 5, 9, 13, 2, 7, 30, 4, 8, 8, 3, 50, 51], [1, 8, 8, 4, 17, 6, 77, 78, 79], [1, 60, 3, 17, 22, 5, 5, 9],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 9, 9, 31, 44, 2, 6, 70, 71, 72, 3, 4, 4, 90, 91, 92]]


def assert_same(a: HeadScores, b: HeadScores, moments_b: Moments) -> None:
    assert sorted(a.score_ids) == sorted(b.score_ids)
    for sid in a.score_ids:
        assert torch.equal(a.per_sample(sid), b.per_sample(sid)), sid
    assert a.meta["fingerprint"] == b.meta["fingerprint"]
    ma = a.moments
    for x, y in zip(ma._tensors(), moments_b._tensors(), strict=True):
        assert torch.equal(x.cpu(), y.cpu())
    assert ma.fingerprint() == moments_b.fingerprint() == b.moments.fingerprint()


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_equals_the_whole_model(family, tmp_path):
    model, src = make_source(tmp_path, family, layers=3, max_shard_size="20KB")
    want = calibrate(model, SEQS, batch_size=2, progress=False)
    got = calibrate_sequential(src, SEQS, tmp_path / "work", batch_size=2, progress=False)
    path = got.moments.save(tmp_path / "moments.safetensors")
    assert_same(want, got, Moments.load(path))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_embedding_and_lm_head_are_fingerprinted_in_row_blocks(tmp_path, monkeypatch, dtype):
    """Non-layer tensors over ``FINGERPRINT_BLOCK_BYTES`` are read in row blocks (they set the 1B's calibrate
    peak when read whole); the model fingerprint still equals the whole model's, and no block the reader
    returns is larger than the bound."""
    from transformers import AutoModelForCausalLM

    from prune_heads.model.sequential_engine import ShardReader
    from prune_heads.scoring import sequential

    monkeypatch.setattr(sequential, "FINGERPRINT_BLOCK_BYTES", 1000)
    _, src = make_source(tmp_path, "llama", layers=2)  # untied: embedding and LM head both over the bound
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype or torch.float32)
    want = calibrate(model, SEQS, batch_size=2, progress=False)
    blocks = []
    real = ShardReader.rows

    def rows(self, name, start, stop):
        out = real(self, name, start, stop)
        blocks.append((name, out.numel() * 4))
        return out

    monkeypatch.setattr(ShardReader, "rows", rows)
    got = calibrate_sequential(src, SEQS, tmp_path / "work", batch_size=2, dtype=dtype, progress=False)
    assert got.meta["fingerprint"] == want.meta["fingerprint"]
    read = {n for n, _ in blocks}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= read
    assert sum(1 for n, _ in blocks if n == "lm_head.weight") > 2 and max(b for _, b in blocks) <= 1000


def test_resume_after_a_kill_in_the_middle_of_the_layers(tmp_path, monkeypatch):
    model, src = make_source(tmp_path, "qwen3", layers=4)
    want = calibrate(model, SEQS, batch_size=2, progress=False)
    work = tmp_path / "work"
    with pytest.raises(_Killed):
        calibrate_sequential(src, SEQS, work, batch_size=2, progress=False, stop_after=2)
    assert layer_file(work, 1).is_file() and not layer_file(work, 2).is_file()
    # the resumed run must not run layers 0 and 1 again
    import prune_heads.model.sequential_engine as eng

    ran: list[int] = []
    real = eng.StreamedModel.load_layer
    monkeypatch.setattr(eng.StreamedModel, "load_layer", lambda self, j: ran.append(j) or real(self, j))
    got = calibrate_sequential(src, SEQS, work, batch_size=2, progress=False)
    assert ran == [2, 3]
    assert_same(want, got, Moments.load(got.moments.save(tmp_path / "m.safetensors")))
    # another run's layers (other data) are not reused
    ran.clear()
    other = calibrate_sequential(src, SEQS[:3], work, batch_size=2, progress=False)
    assert ran == [0, 1, 2, 3] and other.per_sample("awft").shape[0] == 3


def test_a_full_disk_while_a_layer_is_written_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    model, src = make_source(tmp_path, "llama", layers=3)
    work = tmp_path / "work"
    import prune_heads.io_utils as io

    real = io.os.fsync

    def fsync(fd):  # the disk fills while layer 2's statistics are written
        if ".layer-00002.safetensors.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    with pytest.raises(PruneHeadsError, match="no space left"):
        calibrate_sequential(src, SEQS, work, batch_size=2, progress=False)
    monkeypatch.setattr(io.os, "fsync", real)
    assert not layer_file(work, 2).is_file()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary left
    want = calibrate(model, SEQS, batch_size=2, progress=False)
    got = calibrate_sequential(src, SEQS, work, batch_size=2, progress=False)
    assert_same(want, got, Moments.load(got.moments.save(tmp_path / "m.safetensors")))


def test_scores_that_need_the_whole_model_are_refused(tmp_path):
    model, src = make_source(tmp_path, "llama")
    with pytest.raises(PruneHeadsError, match="need the whole model"):
        calibrate_sequential(src, SEQS, tmp_path / "w", scores=["awft", "grad"], progress=False)


def test_cli_engine_sequential_writes_the_scores_directory_of_engine_memory(tmp_path):
    from prune_heads.cli.main import cli

    model, src = make_source(tmp_path, "llama", layers=2, vocab=120)
    tiny_tokenizer(src)
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(words(30, seed=i) for i in range(6)))
    outs = {}
    for engine in ("memory", "sequential"):
        out = tmp_path / f"scores-{engine}"
        res = CliRunner().invoke(cli, ["calibrate", str(src), "--data", str(data), "--num-samples", "4", "--seq-len",
                                       "16", "--batch-size", "2", "--engine", engine, "--device", "cpu", "-o", str(out)])
        assert res.exit_code == 0, res.output
        outs[engine] = HeadScores.load(out)
        assert not (tmp_path / f".scores-{engine}.layers").exists()  # the finished layers are cleaned up
    a, b = outs["memory"], outs["sequential"]
    for sid in a.score_ids:
        assert torch.equal(a.per_sample(sid), b.per_sample(sid))
    assert a.tokens == b.tokens and a.meta["data"] == b.meta["data"]
    ma, mb = Moments.load(tmp_path / "scores-memory"), Moments.load(tmp_path / "scores-sequential")
    assert ma.fingerprint() == mb.fingerprint()
    meta = json.loads((tmp_path / "scores-sequential" / "scores.json").read_text())
    assert meta["moments"]["fingerprint"] == ma.fingerprint()


def test_calibrate_engine_from_a_faked_memory_size(tmp_path, monkeypatch):
    import prune_heads.model.sequential_engine as eng
    from prune_heads.model.config import ModelConfig
    from prune_heads.scoring.stage import CalibrateConfig, calibrate_engine

    _, src = make_source(tmp_path, "llama")
    mc = ModelConfig(id=str(src), device="cpu")
    gib = 2**30

    def memory(free, whole, streamed):
        monkeypatch.setattr(eng, "available_memory", lambda device="cpu": free * gib)
        monkeypatch.setattr(eng.Footprint, "peaks", lambda self, **kw: (whole * gib, streamed * gib))

    lines: list[str] = []
    memory(24, 16, 2)
    assert calibrate_engine(CalibrateConfig(data="x"), mc, lines.append) == "memory" and not lines
    memory(24, 20, 2)  # the 8B shape on this machine: 16 GB of weights and 4 GB of moments
    assert calibrate_engine(CalibrateConfig(data="x"), mc, lines.append) == "sequential"
    assert len(lines) == 1 and "20.0 GiB" in lines[0] and "--engine memory" in lines[0]
    assert calibrate_engine(CalibrateConfig(data="x", engine="memory"), mc) == "memory"
    with pytest.raises(PruneHeadsError, match="the grad score needs the whole model, about 20.0 GiB"):
        calibrate_engine(CalibrateConfig(data="x", scores=["awft", "grad"]), mc)
    memory(24, 40, 30)
    with pytest.raises(PruneHeadsError, match="even layer by layer needs about 30.0 GiB"):
        calibrate_engine(CalibrateConfig(data="x", engine="sequential"), mc)


def test_bfloat16_weights_layer_by_layer_equal_the_whole_model(tmp_path):
    from transformers import AutoModelForCausalLM

    _, src = make_source(tmp_path, "llama", layers=2)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)  # rotary tables stay float32
    want = calibrate(model, SEQS, batch_size=2, progress=False)
    got = calibrate_sequential(src, SEQS, tmp_path / "work", batch_size=2, dtype=torch.bfloat16, progress=False)
    assert_same(want, got, Moments.load(got.moments.save(tmp_path / "m.safetensors")))


KILLER = """
import os, signal, sys
from prune_heads.scoring import sequential
from prune_heads.cli.main import cli

real = sequential.LayerState.finish_layer

def finish_then_die(self, j, *a, **k):
    real(self, j, *a, **k)
    if j == 1:  # layer 1 is on disk: the process dies now, with no cleanup of any kind
        os.kill(os.getpid(), signal.SIGKILL)

sequential.LayerState.finish_layer = finish_then_die
cli(sys.argv[1:])
"""


@pytest.mark.slow  # a fresh interpreter (about 15 s here); the injected stop above is the default suite's check
def test_calibrate_killed_in_the_middle_of_the_layers_resumes_to_the_same_scores(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys

    from prune_heads.cli.main import cli

    model, src = make_source(tmp_path, "llama", layers=4, vocab=120)
    tiny_tokenizer(src)
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(words(30, seed=i) for i in range(6)))
    args = ["calibrate", str(src), "--data", str(data), "--num-samples", "4", "--seq-len", "16", "--batch-size", "2",
            "--device", "cpu"]
    out = tmp_path / "scores"
    proc = subprocess.run([sys.executable, "-c", KILLER, *args, "--engine", "sequential", "-o", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(p) for p in (Path(__file__).parents[1],)] + [os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    work = tmp_path / ".scores.layers"
    assert layer_file(work, 1).is_file() and not layer_file(work, 2).is_file() and not out.exists()
    import prune_heads.model.sequential_engine as eng

    ran: list[int] = []
    real = eng.StreamedModel.load_layer
    monkeypatch.setattr(eng.StreamedModel, "load_layer", lambda self, j: ran.append(j) or real(self, j))
    res = CliRunner().invoke(cli, [*args, "--engine", "sequential", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert ran == [2, 3]  # the same command resumed after the last finished layer
    res = CliRunner().invoke(cli, [*args, "--engine", "memory", "-o", str(tmp_path / "whole")])
    assert res.exit_code == 0, res.output
    a, b = HeadScores.load(tmp_path / "whole"), HeadScores.load(out)
    for sid in a.score_ids:
        assert torch.equal(a.per_sample(sid), b.per_sample(sid)), sid
    assert Moments.load(tmp_path / "whole").fingerprint() == Moments.load(out).fingerprint()
    assert not work.exists()
