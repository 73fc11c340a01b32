"""The closed-form compensation of removed heads (the ``Compensation`` object it fills is in ``compensation.record``).

For one layer let ``x`` be ``o_proj``'s input (the head outputs, ``n = H*D`` wide), ``R`` the dimensions
of the removed heads and ``K`` those of the kept ones; ``mu`` and ``S`` are ``x``'s mean and centred
covariance over the calibration tokens, ``S`` regularised to ``S + lambda * mean(diag S) * I`` and
``P = S^{-1}`` its precision (the optimal-brain-surgeon trick, as SlimGPT uses it).

- ``lsq``: the regression ``x_R ~ A x_K + c`` with ``A = -(P_RR)^{-1} P_RK`` and ``c = mu_R - A mu_K``.
  Folding it into ``o_proj`` gives kept columns ``W_K' = W_K + W_R A`` and a bias ``b' = b + W_R c``; no
  other ``W_K'``, ``b'`` reproduces the layer's attention output better in least squares (the regression
  of ``W_R x_R`` on ``x_K`` is ``W_R`` times that of ``x_R``). What is left,
  ``E|W_R (x_R - A x_K - c)|^2``, is ``tr(W_R (P_RR)^{-1} W_R^T)``: ``(P_RR)^{-1}`` is the residual
  covariance of ``x_R`` given ``x_K`` (a Schur complement).
- ``mean``: ``A = 0``, ``c = mu_R``: the removed heads' mean output becomes a bias (FLAP).
- ``none``: nothing (the heads are zeroed).

A ``LayerCompensation`` holds ``A`` and ``c`` in the input space, independent of ``W``: applied live it
rewrites the removed heads' slots of ``o_proj``'s input (``x_R := A x_K + c``); folded, it changes the
weights as above. Both give the same function, so selection, evaluation and export agree by construction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from prune_heads.compensation.record import (  # (re-exported: they were defined here)
    COMPENSATION_FORMAT,
    Compensation,
    LayerCompensation,
    head_dims,
)
from prune_heads.errors import PruneHeadsError

#: raw covariances with a condition number above this get a warning (ridge is what keeps them usable)
COND_WARN = 1e10


def regularised(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """``S + ridge * mean(diag S) * I`` (the relative ridge of ``CompensationSpec``)."""
    if ridge == 0:
        return cov
    scale = cov.diagonal().mean().clamp_min(torch.finfo(cov.dtype).tiny)
    return cov + ridge * scale * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)


def condition_estimate(cov: torch.Tensor) -> float:
    """A cheap condition-number estimate from a Cholesky factor, ``(max L_ii / min L_ii)^2``; inf if not PD."""
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        return math.inf
    d = chol.diagonal()
    return float((d.max() / d.min().clamp_min(torch.finfo(d.dtype).tiny)) ** 2)


def precision(cov: torch.Tensor, ridge: float, *, layer: int | None = None) -> torch.Tensor:
    """``(S + ridge)^{-1}`` in float64; warns when ``S`` itself is ill-conditioned, refuses when singular."""
    where = f"layer {layer}: " if layer is not None else ""
    cov = cov.double()
    raw = condition_estimate(cov)
    reg = regularised(cov, ridge)
    chol, info = torch.linalg.cholesky_ex(reg)
    if int(info) != 0:
        raise PruneHeadsError(
            f"{where}the covariance of o_proj's input is singular (condition number {raw:.1e}) and ridge {ridge:g} "
            "does not fix it; raise the compensation ridge (e.g. 1e-2) or calibrate on more tokens")
    if raw > COND_WARN:
        what = "singular (not positive definite)" if math.isinf(raw) else f"ill-conditioned (condition number {raw:.1e})"
        warnings.warn(
            f"{where}the covariance of o_proj's input is {what}; ridge {ridge:g} brings its condition number to "
            f"about {condition_estimate(reg):.1e}", stacklevel=3)
    return torch.cholesky_inverse(chol)


def residual_error(prec: torch.Tensor, weight: torch.Tensor, removed: torch.Tensor) -> float:
    """``tr(W_R (P_RR)^{-1} W_R^T)``: the attention-output error left by compensating ``removed`` dims."""
    if removed.numel() == 0:
        return 0.0
    w_r = weight.double()[:, removed]
    p_rr = prec[removed][:, removed]
    return float((w_r.T * torch.linalg.solve(p_rr, w_r.T)).sum())


# ---- solving ---------------------------------------------------------------------------------------

def solve_layer(mean: torch.Tensor, prec: torch.Tensor | None, removed: Sequence[int], num_heads: int, head_dim: int,
                mode: str) -> LayerCompensation:
    """One layer's compensation for ``removed`` heads from the mean and (for ``lsq``) the ridged precision."""
    removed = tuple(sorted(int(h) for h in removed))
    kept = tuple(h for h in range(num_heads) if h not in set(removed))
    r, k = head_dims(removed, head_dim), head_dims(kept, head_dim)
    mean = mean.double()
    if mode == "mean" or not kept:
        return LayerCompensation(removed, kept, head_dim, mean[r].clone(), None)
    if mode != "lsq" or prec is None:
        raise PruneHeadsError(f"cannot solve compensation mode {mode!r} here")
    a = -torch.linalg.solve(prec[r][:, r], prec[r][:, k])
    c = mean[r] - a @ mean[k]
    return LayerCompensation(removed, kept, head_dim, c, a)


__all__ = ["COMPENSATION_FORMAT", "COND_WARN", "Compensation", "LayerCompensation", "condition_estimate", "head_dims",
           "precision", "regularised", "residual_error", "solve_layer"]
