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


def init_from_environment(device: str | None, device_map: str | None) -> str | None:
    """Join the process group ``torchrun``/``accelerate launch`` describe in the environment.

    Each process then scores every world-th sample and rank 0 writes the gathered result. Returns the
    device this process should use (its own GPU, when there are GPUs). A single process is left alone.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and device_map is None and (device is None or device.startswith("cuda"))
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device
