"""``Compensator``: removed mask -> ``Compensation`` for one model's statistics and one spec, and
``compute_compensation``, THE definition of a compensated model.

It picks the per-layer closed form (``compensation.solve``) or the layer-by-layer pass
(``compensation.sequential``); it sits above both, so neither imports the other through it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from prune_heads.compensation.moments import Moments
from prune_heads.compensation.record import Compensation, LayerCompensation, sequences_sha
from prune_heads.compensation.solve import precision, solve_layer
from prune_heads.compensation.spec import CompensationSpec, as_spec
from prune_heads.errors import PruneHeadsError

#: bytes of precision matrices a compensator keeps between probes; past it, the rest are solved again when
#: needed (a 70B's 80 precisions are 43 GB, more than the host may have; one is recomputed in seconds)
PRECISION_CACHE_BYTES = 512 << 20
#: bytes of solved layer compensations (float64) kept between probes (a search revisits the masks of most
#: layers); each keeps its copy in the run dtype once applied, up to half as much again (float32)
LAYER_CACHE_BYTES = 256 << 20


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Compensator:
    """``removed mask -> Compensation`` for one model's statistics and one spec, with the precisions cached.

    Selection asks for the compensation of many candidate masks; each layer's precision matrix is
    inverted once, as long as they fit ``PRECISION_CACHE_BYTES`` (the first ones solved are kept, which for
    a search that visits the layers in order is better than evicting the oldest). With ``spec.sequential``
    each mask gets its own layer-by-layer pass over ``seqs`` on ``model`` (``compensation.sequential``),
    cached by mask.
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
        self._cached_bytes = {"precision": 0, "layer": 0}
        self._budget = {"precision": PRECISION_CACHE_BYTES, "layer": LAYER_CACHE_BYTES}
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
        if key in self._prec:
            return self._prec[key]
        if len(self._prec) > 4 * max(1, source.num_layers) and source is not self.moments:
            self._prec = {k: v for k, v in self._prec.items() if k[0] == id(self.moments)}
            self._cached_bytes["precision"] = _nbytes(*self._prec.values())
        from prune_heads.finite import STATS_ADVICE, require_finite

        cov = source.covariance(layer)  # read once (from the file, for moments loaded from one)
        require_finite(cov, f"the o_proj input statistics of layer {layer} (covariance)", STATS_ADVICE)
        prec = precision(cov, self.spec.ridge, layer=layer)
        if self._cached_bytes["precision"] + _nbytes(prec) <= self._budget["precision"]:
            self._prec[key] = prec
            self._cached_bytes["precision"] += _nbytes(prec)
        return prec

    def layer(self, layer: int, removed: Sequence[int], moments: Moments | None = None) -> LayerCompensation:
        """One layer's compensation for ``removed`` heads, from ``moments`` (default: the stored ones)."""
        source = moments if moments is not None else self.moments
        key = (layer, tuple(sorted(removed)))
        if source is self.moments and key in self._layer_cache:
            return self._layer_cache[key]
        _, H, D = self._layout()
        from prune_heads.finite import STATS_ADVICE, require_finite

        t0 = time.perf_counter()
        mean = source.mean(layer)
        require_finite(mean, f"the o_proj input statistics of layer {layer} (mean)", STATS_ADVICE)
        prec = self.precision(layer, source) if self.spec.mode == "lsq" else None  # checks the covariance
        out = solve_layer(mean, prec, removed, H, D, self.spec.mode)

        require_finite(out.offset, f"the {self.spec.mode} compensation of layer {layer} (offset)", STATS_ADVICE)
        require_finite(out.weight, f"the {self.spec.mode} compensation of layer {layer} (weight)", STATS_ADVICE)
        self.solve_seconds += time.perf_counter() - t0
        size = _nbytes(out.offset, out.weight)
        if source is self.moments and self._cached_bytes["layer"] + size <= self._budget["layer"]:
            self._layer_cache[key] = out
            self._cached_bytes["layer"] += size
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
                     "sequences_sha256": sequences_sha(self.seqs)}
        return {**self.spec.to_dict(), "moments": stats if self.spec.active else None}


def compute_compensation(removed: torch.Tensor, spec: CompensationSpec | str | dict | None, *,
                         moments: Moments | None = None, model: Any = None,
                         seqs: Sequence[Sequence[int]] | None = None, batch_size: int = 8,
                         pad_id: int = 0) -> Compensation:
    """THE definition of a compensated model: ``(L, H)`` removed mask + spec (+ statistics) -> ``Compensation``.

    Non-sequential modes need ``moments``; ``sequential`` needs ``model`` and calibration ``seqs``.
    """
    return Compensator(spec, moments=moments, model=model, seqs=seqs, batch_size=batch_size, pad_id=pad_id)(removed)


__all__ = ["Compensator", "compute_compensation"]
