"""The ``Compensation`` every stage shares, as data: one ``LayerCompensation`` per layer that lost heads,
with its save and load (``compensation.safetensors`` beside a plan).

Solving it (``compensation.solve``), computing it layer by layer (``compensation.sequential``), applying it
live (``compensation.apply``) and folding it into an export (``export.folding``) all read this one type;
it imports none of them, so none of them imports another through it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prune_heads.compensation.spec import CompensationSpec
from prune_heads.errors import PruneHeadsError

COMPENSATION_FORMAT = "prune-heads-compensation/1"


def head_dims(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Input dimensions (columns of ``o_proj``) of ``heads``, in head order."""
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)



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
        data = save(tensors, metadata={"format": COMPENSATION_FORMAT, "header": json.dumps(self._header(), sort_keys=True)})
        return _canonical_header(data)

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


def sequences_sha(seqs: Sequence[Sequence[int]]) -> str:
    """A short hash of calibration token sequences (a sequential compensation's statistics)."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(json.dumps(list(s)).encode())
    return h.hexdigest()[:16]


__all__ = ["COMPENSATION_FORMAT", "Compensation", "LayerCompensation", "head_dims", "sequences_sha"]


def _canonical_header(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header's keys sorted, so that equal compensations give equal
    bytes and a plan's recorded sha256 names the content: safetensors writes its metadata map in a per-process
    hash order. The header keeps its length (padded with spaces, as the format allows); the rare header that
    would grow is left as it was."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps({k: dict(sorted(v.items())) if k == "__metadata__" else v for k, v in sorted(header.items())},
                      separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]

