"""The closed-form compensation of removed heads, and the ``Compensation`` object every stage shares.

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

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prune_heads.compensation.moments import Moments
from prune_heads.compensation.spec import CompensationSpec, as_spec
from prune_heads.errors import PruneHeadsError

#: raw covariances with a condition number above this get a warning (ridge is what keeps them usable)
COND_WARN = 1e10
COMPENSATION_FORMAT = "prune-heads-compensation/1"


def head_dims(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Input dimensions (columns of ``o_proj``) of ``heads``, in head order."""
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


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


@dataclass
class LayerCompensation:
    """One layer's correction: ``x_R := weight @ x_K + offset`` for the removed dims (see the module doc)."""

    removed: tuple[int, ...]   # removed heads
    kept: tuple[int, ...]      # kept heads
    head_dim: int
    offset: torch.Tensor       # (|R| D,) float64
    weight: torch.Tensor | None = None  # (|R| D, |K| D) float64; None = mean mode (no kept-column change)
    _cache: dict[Any, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)

    def dims(self) -> tuple[torch.Tensor, torch.Tensor]:
        return head_dims(self.removed, self.head_dim), head_dims(self.kept, self.head_dim)

    def _on(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (str(device), dtype)
        if key not in self._cache:
            r, k = self.dims()
            w = self.weight.to(device, dtype) if self.weight is not None else None
            self._cache[key] = (r.to(device), k.to(device), self.offset.to(device, dtype), w)
        return self._cache[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``o_proj``'s input with the removed heads' slots replaced by their prediction."""
        r, k, c, w = self._on(x.device, x.dtype)
        out = x.clone()
        pred = c.expand(*x.shape[:-1], c.shape[0])
        if w is not None and k.numel():
            pred = x.index_select(-1, k) @ w.T + c
        out[..., r] = pred
        return out

    def transform(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, t)`` with ``apply(x) == x @ T.T + t`` (float64; removed rows of ``T`` hold ``A``)."""
        r, k = self.dims()
        T = torch.eye(width, dtype=torch.float64)
        T[r] = 0.0
        if self.weight is not None and k.numel():
            T[r[:, None], k[None, :]] = self.weight.double()
        t = torch.zeros(width, dtype=torch.float64)
        t[r] = self.offset.double()
        return T, t

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compensated ``o_proj`` weight and bias in float64: ``W T`` (removed columns 0) and ``b + W t``."""
        w = weight.double()
        T, t = self.transform(w.shape[1])
        new_b = w @ t.to(w.device)
        if bias is not None:
            new_b = new_b + bias.double()
        return w @ T.to(w.device), new_b

    def bias_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """``W_R c``: what the compensation adds to ``o_proj``'s bias (float64)."""
        r, _ = self.dims()
        return weight.double()[:, r.to(weight.device)] @ self.offset.to(weight.device).double()


@dataclass
class Compensation:
    """The correction of every layer that lost heads under one plan: what evaluation applies and export folds."""

    spec: CompensationSpec
    layers: dict[int, LayerCompensation]
    num_layers: int
    num_heads: int
    head_dim: int
    statistics: dict[str, Any] = field(default_factory=dict)  # Moments.summary() of what it was solved from

    def removed_mask(self) -> torch.Tensor:
        m = torch.zeros(self.num_layers, self.num_heads, dtype=torch.bool)
        for i, lc in self.layers.items():
            m[i, list(lc.removed)] = True
        return m

    def check_matches(self, removed: torch.Tensor) -> None:
        """Refuse to apply a compensation computed for another set of heads."""
        removed = removed.bool().cpu()
        if tuple(removed.shape) != (self.num_layers, self.num_heads):
            raise PruneHeadsError(f"the compensation is for {self.num_layers} layers x {self.num_heads} heads, the "
                                  f"mask has shape {tuple(removed.shape)}")
        if self.spec.active and not torch.equal(self.removed_mask(), removed):
            bad = [i for i in range(self.num_layers) if not torch.equal(self.removed_mask()[i], removed[i])]
            raise PruneHeadsError(f"the compensation was computed for other removed heads (layers {bad[:5]} differ); "
                                  "compute it for this plan")

    def record(self) -> dict[str, Any]:
        """What a plan records under ``compensation``: the spec and the statistics' fingerprint."""
        return {**self.spec.to_dict(), "moments": self.statistics or None}

    def __call__(self, removed: torch.Tensor) -> Compensation:
        """A fixed compensation acts as a ``Compensator`` for its own mask (``eval --plan``): any other is refused."""
        self.check_matches(removed)
        return self

    # ---- persistence ----------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, lc in sorted(self.layers.items()):
            out[f"layers.{i}.offset"] = lc.offset.detach().to("cpu", torch.float64).contiguous()
            if lc.weight is not None:
                out[f"layers.{i}.weight"] = lc.weight.detach().to("cpu", torch.float64).contiguous()
        return out

    def _header(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "num_layers": self.num_layers, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "statistics": self.statistics,
                "removed": {str(i): list(lc.removed) for i, lc in sorted(self.layers.items())}}

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self._header(), sort_keys=True).encode())
        for k, v in self.tensors().items():
            h.update(k.encode())
            h.update(v.numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the compensation atomically (sequential plans cannot be recomputed from stored moments),
        through the project's one atomic writer: an owner-tagged, fsynced temporary, the umask's mode, and
        a full disk reported as such. It is a few MB at most, so it is serialised in memory first."""
        from prune_heads.io_utils import write_bytes_atomic

        return write_bytes_atomic(path, self.to_bytes())

    def to_bytes(self) -> bytes:
        """The safetensors file ``save`` writes, in memory (a plan records its sha256)."""
        from safetensors.torch import save

        tensors = self.tensors() or {"empty": torch.zeros(0, dtype=torch.float64)}
        return save(tensors, metadata={"format": COMPENSATION_FORMAT, "header": json.dumps(self._header())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Compensation:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != COMPENSATION_FORMAT:
                    raise PruneHeadsError(f"{path} is not a prune-heads compensation file")
                header = json.loads(meta["header"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except PruneHeadsError:
            raise
        except Exception as e:
            raise PruneHeadsError(f"cannot read the compensation in {path}: {e}") from e
        from prune_heads.finite import require_finite

        for k, t in tensors.items():  # a file from outside the solver (edited, or written by other code)
            require_finite(t, f"the compensation file {path} ({k})", "select again to recompute it")
        H, D = header["num_heads"], header["head_dim"]
        layers = {}
        for key, removed in header["removed"].items():
            i = int(key)
            kept = tuple(h for h in range(H) if h not in set(removed))
            layers[i] = LayerCompensation(tuple(removed), kept, D, tensors[f"layers.{i}.offset"],
                                          tensors.get(f"layers.{i}.weight"))
        return cls(CompensationSpec.from_dict(header["spec"]), layers, header["num_layers"], H, D,
                   header.get("statistics") or {})


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


class Compensator:
    """``removed mask -> Compensation`` for one model's statistics and one spec, with the precisions cached.

    Selection asks for the compensation of many candidate masks; each layer's precision matrix is
    inverted once. With ``spec.sequential`` each mask gets its own layer-by-layer pass over ``seqs`` on
    ``model`` (``compensation.sequential``), cached by mask.
    """

    def __init__(self, spec: CompensationSpec | str | dict | None, *, moments: Moments | None = None,
                 model: Any = None, seqs: Sequence[Sequence[int]] | None = None, batch_size: int = 8,
                 pad_id: int = 0, progress: bool = False) -> None:
        self.spec = as_spec(spec)
        self.moments = moments
        self.model, self.seqs = model, [list(map(int, s)) for s in seqs] if seqs is not None else None
        self.batch_size, self.pad_id, self.progress = batch_size, pad_id, progress
        if self.spec.active and not self.spec.sequential and moments is None:
            raise PruneHeadsError(f"compensation {self.spec.mode!r} needs the calibration moments (moments.safetensors "
                                  "in the scores directory); recompute them with `prune-heads calibrate`")
        if self.spec.sequential and (model is None or not self.seqs):
            raise PruneHeadsError("sequential compensation needs the model and its calibration sequences")
        if moments is not None and model is not None:
            moments.check(model)
        self._prec: dict[tuple[int, int], torch.Tensor] = {}
        self._seq: dict[bytes, tuple[Compensation, Moments]] = {}
        self._replay: dict[str, Any] = {}  # the sequential pass's captured layer inputs
        self._layer_cache: dict[tuple[int, tuple[int, ...]], LayerCompensation] = {}
        self.solve_seconds = 0.0

    def _layout(self) -> tuple[int, int, int]:
        if self.moments is not None:
            meta = self.moments.meta
            if meta.get("num_heads") and meta.get("head_dim"):
                return self.moments.num_layers, int(meta["num_heads"]), int(meta["head_dim"])
        from prune_heads.model.adapters import get_adapter

        lay = get_adapter(self.model).layout(self.model.config)
        return lay.num_layers, lay.num_heads, lay.head_dim

    def precision(self, layer: int, moments: Moments | None = None) -> torch.Tensor:
        """The ridged precision of ``layer`` under ``moments`` (default: the stored ones), cached."""
        source = moments if moments is not None else self.moments
        key = (id(source), layer)
        if key not in self._prec:
            if len(self._prec) > 4 * max(1, source.num_layers) and source is not self.moments:
                self._prec = {k: v for k, v in self._prec.items() if k[0] == id(self.moments)}
            self._prec[key] = precision(source.covariance(layer), self.spec.ridge, layer=layer)
        return self._prec[key]

    def layer(self, layer: int, removed: Sequence[int], moments: Moments | None = None) -> LayerCompensation:
        """One layer's compensation for ``removed`` heads, from ``moments`` (default: the stored ones)."""
        import time

        source = moments if moments is not None else self.moments
        key = (layer, tuple(sorted(removed)))
        if source is self.moments and key in self._layer_cache:
            return self._layer_cache[key]
        _, H, D = self._layout()
        from prune_heads.finite import STATS_ADVICE, require_finite

        t0 = time.perf_counter()
        mean = source.mean(layer)
        require_finite(mean, f"the o_proj input statistics of layer {layer} (mean)", STATS_ADVICE)
        if self.spec.mode == "lsq":
            require_finite(source.covariance(layer), f"the o_proj input statistics of layer {layer} (covariance)",
                           STATS_ADVICE)
        prec = self.precision(layer, source) if self.spec.mode == "lsq" else None
        out = solve_layer(mean, prec, removed, H, D, self.spec.mode)

        require_finite(out.offset, f"the {self.spec.mode} compensation of layer {layer} (offset)", STATS_ADVICE)
        require_finite(out.weight, f"the {self.spec.mode} compensation of layer {layer} (weight)", STATS_ADVICE)
        self.solve_seconds += time.perf_counter() - t0
        if source is self.moments:
            self._layer_cache[key] = out
        return out

    def __call__(self, removed: torch.Tensor) -> Compensation:
        L, H, D = self._layout()
        removed = removed.bool().cpu()
        if tuple(removed.shape) != (L, H):
            raise PruneHeadsError(f"removed mask has shape {tuple(removed.shape)}, the statistics are for ({L}, {H})")
        if not self.spec.active:
            return Compensation(self.spec, {}, L, H, D)
        if self.spec.sequential:
            return self.sequential(removed)[0]
        layers = {i: self.layer(i, removed[i].nonzero().flatten().tolist()) for i in range(L) if removed[i].any()}
        return Compensation(self.spec, layers, L, H, D, self.moments.summary())

    def sequential(self, removed: torch.Tensor) -> tuple[Compensation, Moments]:
        """The sequential compensation of ``removed`` and the per-layer statistics it was solved from."""
        from prune_heads.compensation.sequential import sequential_compensation

        key = removed.bool().cpu().numpy().tobytes()
        if key not in self._seq:
            self._seq[key] = sequential_compensation(self.model, self.seqs, removed, self.spec,
                                                     batch_size=self.batch_size, pad_id=self.pad_id,
                                                     progress=self.progress, cache=self._replay)
        return self._seq[key]

    def record(self) -> dict[str, Any]:
        """The plan's ``compensation`` entry."""
        stats = self.moments.summary() if self.moments is not None else None
        if self.spec.sequential and self.seqs is not None:
            stats = {**(stats or {}), "sequential": True, "num_sequences": len(self.seqs),
                     "sequences_sha256": _sequences_sha(self.seqs)}
        return {**self.spec.to_dict(), "moments": stats if self.spec.active else None}


def _sequences_sha(seqs: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(json.dumps(list(s)).encode())
    return h.hexdigest()[:16]


def compute_compensation(removed: torch.Tensor, spec: CompensationSpec | str | dict | None, *,
                         moments: Moments | None = None, model: Any = None,
                         seqs: Sequence[Sequence[int]] | None = None, batch_size: int = 8,
                         pad_id: int = 0) -> Compensation:
    """THE definition of a compensated model: ``(L, H)`` removed mask + spec (+ statistics) -> ``Compensation``.

    Non-sequential modes need ``moments``; ``sequential`` needs ``model`` and calibration ``seqs``.
    """
    return Compensator(spec, moments=moments, model=model, seqs=seqs, batch_size=batch_size, pad_id=pad_id)(removed)
