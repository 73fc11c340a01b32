"""Data-parallel calibration: which samples this process scores, and gathering every process's rows.

Under ``torchrun`` / ``accelerate launch`` each process scores every ``world``-th sample; the per-sample
rows are gathered (with their sample index) so the result equals a single-process run.
"""

from __future__ import annotations

from typing import Any

import torch


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(per_sample: dict[str, list[tuple[int, torch.Tensor]]]) -> dict[str, list[tuple[int, torch.Tensor]]]:
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return per_sample
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, per_sample)
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for part in gathered:
        for k, rows in part.items():
            out.setdefault(k, []).extend(rows)
    return out
