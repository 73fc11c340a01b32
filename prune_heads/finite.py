"""Nothing non-finite passes: the one check every chokepoint calls (weights, scores, moments, compensation, metrics).

A NaN weight makes every later number NaN, and NaN compares false with every budget, so without a check it
would be scored, selected, compensated and reported as if it were a value. Each chokepoint names what it checks
(the tensor, the layer, the score, the task) so the one-line refusal says where the bad value came from.
Options are checked in ``prune_heads.schema`` (every float field must be finite).
"""

from __future__ import annotations

import math
from typing import Any

from prune_heads.errors import NonFiniteError

#: what to do about a statistic that came out NaN or infinite
STATS_ADVICE = ("the model produced NaN/Inf (NaN weights, or an overflow in float16/bfloat16): check the checkpoint, "
                "or run with --dtype float32")


#: elements checked at once: ``isfinite`` of a whole 128k-vocabulary embedding allocated more than the tensor
#: (bfloat16 in, a float32 temporary and a bool mask out) and set the peak of layer-by-layer select and eval
FINITE_CHUNK = 1 << 24


def first_bad(t: Any) -> tuple[int, ...] | None:
    """Index of the first NaN/Inf element of tensor ``t`` (None when all are finite or it is not a float),
    checked ``FINITE_CHUNK`` elements at a time in row-major order."""
    import torch

    if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return None
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHUNK):
        ok = torch.isfinite(flat[start:start + FINITE_CHUNK])
        if not bool(ok.all()):
            i = start + int((~ok).nonzero()[0, 0])
            index = []
            for size in reversed(t.shape):
                index.append(i % size)
                i //= size
            return tuple(reversed(index))
    return None


def require_finite(t: Any, what: str, advice: str, *, axis_names: tuple[str, ...] = ()) -> None:
    """Raise ``NonFiniteError`` ("WHAT holds NaN/Inf (at layer 3, head 1); ADVICE") when ``t`` is not finite.

    ``axis_names`` labels the leading indices of the first bad element in the message (e.g. ``("layer", "head")``).
    """
    idx = first_bad(t)
    if idx is None:
        return
    import torch

    bad = t[tuple(slice(None) if i >= len(idx) else idx[i] for i in range(len(idx)))].reshape(-1)[:1]
    kind = "NaN" if bool(torch.isnan(bad).any()) else "Inf"
    where = ", ".join(f"{n} {i}" for n, i in zip(axis_names, idx))
    raise NonFiniteError(f"{what} holds {kind} values{f' (first at {where})' if where else ''}; {advice}")


def require_finite_number(value: Any, what: str, advice: str) -> None:
    """The scalar version: a metric, a baseline, a bound."""
    try:
        ok = value is None or math.isfinite(float(value))
    except (TypeError, ValueError):
        return
    if not ok:
        raise NonFiniteError(f"{what} is {float(value)}; {advice}")
