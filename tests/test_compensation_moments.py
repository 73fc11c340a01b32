"""Moments of o_proj's input against a naive per-sequence computation: padding excluded, two processes,
files, fingerprints and the errors a user meets."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from compensation_reference import stacked_inputs
from tiny_models import FAMILIES, tiny_model

from prune_heads import calibrate
from prune_heads.compensation import MOMENTS_FILE, Moments, collect_moments, moments_cost
from prune_heads.errors import ModelMismatchError, PruneHeadsError
from prune_heads.scoring.head_scores import HeadScores

SEQS = [[1, 5, 9, 13, 2, 7, 30, 4], [1, 8, 8, 4], [1, 60, 3, 17, 22], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 9, 9]]


def assert_moments_equal_naive(m: Moments, model, seqs, rtol=1e-5) -> None:
    xs, hs = stacked_inputs(model, seqs)
    n_tokens = sum(len(s) for s in seqs)
    for i, (x, h) in enumerate(zip(xs, hs)):
        assert float(m.count[i]) == n_tokens == x.shape[0]
        torch.testing.assert_close(m.sums[i], x.sum(0), rtol=rtol, atol=1e-6 * float(x.abs().max()))
        torch.testing.assert_close(m.grams[i], x.T @ x, rtol=rtol, atol=1e-6 * float((x.T @ x).abs().max()))
        sq = h.pow(2).sum(-1)
        assert float(m.resid_sq[i]) == pytest.approx(float(sq.sum()), rel=rtol)
        w = 1 / (sq + 1e-6 * h.shape[-1])
        assert float(m.resid_inv[i]) == pytest.approx(float(w.sum()), rel=rtol)
        if m.has_relative:
            gw = (x * w[:, None]).T @ x
            torch.testing.assert_close(m.grams_rel[i], gw, rtol=rtol, atol=1e-6 * float(gw.abs().max()))
            torch.testing.assert_close(m.sums_rel[i], (x * w[:, None]).sum(0), rtol=rtol,
                                       atol=1e-6 * float(x.abs().max() * w.max()))
        mu = x.mean(0)
        torch.testing.assert_close(m.covariance(i), (x - mu).T @ (x - mu) / x.shape[0], rtol=1e-4,
                                   atol=1e-5 * float(x.var(0).max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_moments_equal_naive_loop_with_padding(family):
    model = tiny_model(family, layers=2)
    # batch size 3: the short sequences are right-padded next to the long ones
    m = collect_moments(model, SEQS, batch_size=3, progress=False)
    assert_moments_equal_naive(m, model, SEQS)


def test_calibrate_collects_the_same_moments_and_saves_them(tmp_path):
    model = tiny_model("llama", layers=2)
    hs = calibrate(model, SEQS, scores=["ahon", "lsq_error"], batch_size=2, progress=False)
    assert hs.moments is not None and hs.moments.meta["num_heads"] == 4
    assert_moments_equal_naive(hs.moments, model, SEQS)
    hs.save(tmp_path / "s")
    assert (tmp_path / "s" / MOMENTS_FILE).is_file()
    back = HeadScores.load(tmp_path / "s")
    assert back.moments.fingerprint() == hs.moments.fingerprint()
    assert back.moments.lazy and not hs.moments.lazy  # read back, the layers stay in the file until used
    for a, b in zip([*back.moments.grams, *back.moments.grams_rel], [*hs.moments.grams, *hs.moments.grams_rel]):
        assert torch.equal(a, b)
    assert back.meta["moments"]["fingerprint"] == hs.moments.fingerprint()
    assert set(back.score_ids) == {"ahon", "lsq_error"}


def test_relative_sums_are_optional():
    model = tiny_model("llama", layers=2)
    plain = collect_moments(model, SEQS, progress=False, relative=False)
    assert not plain.has_relative
    assert_moments_equal_naive(plain, model, SEQS)
    with pytest.raises(PruneHeadsError, match="relative"):
        plain.relative_covariance(0)


def test_moments_off_and_lsq_scores_need_them():
    model = tiny_model("qwen2", layers=2)
    hs = calibrate(model, SEQS, scores=["ahon"], moments=False, progress=False)
    assert hs.moments is None
    with pytest.raises(PruneHeadsError, match="moments"):
        calibrate(model, SEQS, scores=["lsq_error"], moments=False, progress=False)


def test_fingerprint_changes_with_the_data_and_check_refuses_other_models():
    model = tiny_model("llama", layers=2)
    a = collect_moments(model, SEQS, progress=False)
    b = collect_moments(model, SEQS[:3], progress=False)
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == collect_moments(model, SEQS, progress=False).fingerprint()  # deterministic
    a.check(model)
    with pytest.raises(ModelMismatchError, match="another model"):
        a.check(tiny_model("llama", layers=3))
    with pytest.raises(ModelMismatchError, match="different weights"):
        a.check(tiny_model("llama", layers=2, seed=5))


def test_cost_formula():
    c = moments_cost(32, 4096, relative=False)
    assert c["values"] == 32 * (4096 * 4096 + 4096 + 3)
    assert c["bytes"] == 8 * c["values"]  # Llama-3.1-8B: 4.3 GB
    assert moments_cost(32, 4096)["values"] == 32 * (2 * (4096 * 4096 + 4096) + 3)


def test_moments_read_a_layer_at_a_time_equal_the_ones_loaded_whole(tmp_path):
    """``Moments.load`` keeps no layer in memory: every access reads that layer from the file. What it reads,
    what compensation is solved from it and the file it saves again equal the moments loaded whole, bit for bit."""
    from prune_heads.compensation import compute_compensation

    model = tiny_model("qwen2", layers=3)
    made = collect_moments(model, SEQS, batch_size=2, progress=False)
    made.save(tmp_path / "m.safetensors")
    whole = Moments.load(tmp_path / "m.safetensors", lazy=False)
    lazy = Moments.load(tmp_path / "m.safetensors")
    assert lazy.lazy and not whole.lazy and lazy.num_layers == 3
    assert lazy.fingerprint() == whole.fingerprint() == made.fingerprint()
    for kind in ("sums", "grams", "sums_rel", "grams_rel"):
        for a, b, c in zip(getattr(lazy, kind), getattr(whole, kind), getattr(made, kind)):
            assert torch.equal(a, b) and torch.equal(a, c)
    assert lazy.grams[-1].data_ptr() != lazy.grams[-1].data_ptr()  # read again, not kept
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 0] = mask[2, 3] = True
    for mode in ("lsq", "mean"):
        a = compute_compensation(mask, mode, moments=lazy)
        b = compute_compensation(mask, mode, moments=whole)
        assert a.layers.keys() == b.layers.keys() == {0, 2}
        for i in a.layers:
            assert torch.equal(a.layers[i].offset, b.layers[i].offset)
            if mode == "mean":
                assert a.layers[i].weight is None and b.layers[i].weight is None
            else:
                assert torch.equal(a.layers[i].weight, b.layers[i].weight)
    # saved again one tensor at a time: the same statistics, fingerprint recomputed from the tensors
    lazy.save(tmp_path / "again.safetensors")
    again = Moments.load(tmp_path / "again.safetensors", lazy=False)
    again._fingerprint = None
    assert again.fingerprint() == made.fingerprint() and again.meta == made.meta
    with pytest.raises(IndexError):
        lazy.grams[3]


def test_moments_replaced_while_in_use_are_refused(tmp_path):
    """A recalibration that replaces the file mid-run must not be mixed in with the statistics already used."""
    model = tiny_model("llama", layers=2)
    collect_moments(model, SEQS, progress=False).save(tmp_path / "m.safetensors")
    lazy = Moments.load(tmp_path / "m.safetensors")
    lazy.covariance(0)
    collect_moments(model, SEQS[:2], progress=False).save(tmp_path / "new.safetensors")
    (tmp_path / "new.safetensors").replace(tmp_path / "m.safetensors")
    with pytest.raises(PruneHeadsError, match="changed while in use"):
        lazy.covariance(1)
    (tmp_path / "m.safetensors").unlink()
    with pytest.raises(PruneHeadsError, match="is gone"):
        lazy.mean(0)


def test_a_truncated_moments_file_is_refused_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model("llama", layers=2)
    collect_moments(model, SEQS, progress=False).save(tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(tmp_path / "m.safetensors")
    del tensors["layers.1.gram"]
    save_file(tensors, tmp_path / "m.safetensors", metadata=meta)
    with pytest.raises(PruneHeadsError, match="lacks layers.1.gram"):
        Moments.load(tmp_path / "m.safetensors")


def test_corrupt_moments_file_is_a_clear_error(tmp_path):
    (tmp_path / MOMENTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(PruneHeadsError, match="cannot read moments"):
        Moments.load(tmp_path)


# ---- data parallel --------------------------------------------------------------------------------

def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = tiny_model("qwen3", layers=2)
        hs = calibrate(model, SEQS, scores=["ahon", "lsq_error"], batch_size=2, progress=False)
        if rank == 0:
            m = hs.moments
            torch.save({"count": m.count, "sums": m.sums, "grams": m.grams, "resid_sq": m.resid_sq,
                        "resid_inv": m.resid_inv, "sums_rel": m.sums_rel, "grams_rel": m.grams_rel,
                        "lsq": hs.mean("lsq_error")}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_sum_to_one(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    got = torch.load(out)
    model = tiny_model("qwen3", layers=2)
    single = calibrate(model, SEQS, scores=["ahon", "lsq_error"], batch_size=2, progress=False)
    m = Moments(got["count"], got["sums"], got["grams"], got["resid_sq"], got["resid_inv"], {}, got["sums_rel"],
                got["grams_rel"])
    assert m.has_relative
    assert_moments_equal_naive(m, model, SEQS)
    torch.testing.assert_close(got["lsq"], single.mean("lsq_error"), rtol=1e-4, atol=1e-7)
