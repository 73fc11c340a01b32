"""``torchrun`` / ``accelerate launch ... run``: the calibration pass is shared by every process.

Rank 0 runs the pipeline and owns the work directory (lock, stage directories, every write). Before the
calibrate stage it tells the other processes whether calibration will run (it may be up to date); if so
they join that one pass (each scores every world-th sample, ``scoring.distributed``) and exit, writing
nothing. Every later stage runs on rank 0 alone. A failure on rank 0 before that point is broadcast too,
so the other processes stop instead of waiting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from prune_heads.errors import PruneHeadsError


def join_process_group(model: Any) -> int:
    """This process's rank (0 without torchrun); joins the group and picks this process's GPU."""
    from prune_heads.scoring.distributed import init_from_environment, rank_and_world

    model.device = init_from_environment(model.resolved_device(), model.device_map)
    return rank_and_world()[0]


def _broadcast(message: Any) -> Any:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def share_calibration_decision() -> Iterator[Callable[[bool], None]]:
    """On rank 0: ``decide(will_calibrate)`` tells the other ranks; an error before that tells them to stop."""
    from prune_heads.scoring.distributed import rank_and_world

    _, world = rank_and_world()
    sent = {"done": world == 1}

    def decide(will_calibrate: bool) -> None:
        if not sent["done"]:
            _broadcast({"calibrate": bool(will_calibrate)})
            sent["done"] = True

    try:
        yield decide
    except BaseException as e:
        if not sent["done"]:
            _broadcast({"error": f"{type(e).__name__}: {e}"})
        raise


def follow_calibration(recipe: Any, *, progress: bool = False) -> Any:
    """A rank > 0: take part in rank 0's calibration pass if there is one, then stop."""
    from prune_heads.scoring.stage import run_calibrate

    decision = _broadcast(None)
    if "error" in decision:
        raise PruneHeadsError(f"rank 0 stopped before calibrating ({decision['error']})")
    if decision["calibrate"]:
        m = recipe.model
        run_calibrate(recipe.calibration, m.load(), m.id, None, revision=m.revision, progress=progress)
    return None
