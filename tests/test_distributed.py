"""Data-parallel calibration: two CPU processes (gloo) give exactly the scores of one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_models import tiny_model

from prune_heads import calibrate
from prune_heads.scoring.distributed import rank_and_world as _dist

SEQS = [[1, 5, 9, 13, 2, 7, 30, 4], [1, 8, 8, 4], [1, 60, 3, 17, 22], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 9, 9]]
SCORES = ["awft", "aeqd_ln", "fhon", "lthon_hn", "confidence", "grad"]


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        assert _dist() == (rank, world)
        model = tiny_model("qwen3", layers=2)
        hs = calibrate(model, SEQS, scores=SCORES, batch_size=2, progress=False)
        if rank == 0:
            torch.save({"per_sample": hs.per_sample_values, "meta": hs.meta}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    parallel = torch.load(out)
    single = calibrate(tiny_model("qwen3", layers=2), SEQS, scores=SCORES, batch_size=2, progress=False)
    assert parallel["meta"]["world_size"] == 2 and parallel["meta"]["num_samples"] == len(SEQS)
    assert set(parallel["per_sample"]) == set(SCORES)
    for sid in SCORES:
        got = parallel["per_sample"][sid]
        assert got.shape == (len(SEQS), 2, 4)
        # rank 0 batches samples 0,2,4 and rank 1 samples 1,3: padding differs from the single run
        torch.testing.assert_close(got, single.per_sample(sid), rtol=1e-5, atol=1e-6)
