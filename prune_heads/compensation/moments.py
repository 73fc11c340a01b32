"""First and second moments of every layer's ``o_proj`` input, the statistics compensation is solved from.

``o_proj``'s input is the concatenation of the layer's head outputs, ``n = H * D`` wide. Per layer we keep,
over the real (non-padding) tokens of the calibration data:

- ``count``: tokens;
- ``sum``: ``sum_t x_t`` (``n``);
- ``gram``: ``sum_t x_t x_t^T`` (``n x n``);
- ``resid_sq`` / ``resid_inv``: ``sum_t |h_t|^2`` and ``sum_t 1 / (|h_t|^2 + d * RESID_EPS)`` of the
  residual stream ``h`` (width ``d``) entering the decoder layer: scalars that put the errors of different
  layers on one scale. ``RESID_EPS`` plays the part of an RMSNorm epsilon: a token whose residual is
  almost zero cannot dominate the sum (an RMSNorm does not amplify below its epsilon either).

With ``relative=True`` (the default) the same sums are also kept weighted by ``w_t = 1 / (|h_t|^2 +
d * RESID_EPS)`` (``gram_rel = sum_t w_t x_t x_t^T``, ``sum_rel = sum_t w_t x_t``; ``sum_t w_t`` is
``resid_inv``): errors measured under these weights are *relative* to the residual stream each token
adds them to, which is what ranks heads across layers best (``greedy``). It doubles the memory.

Each batch's ``X^T X`` is computed in the activations' dtype (float32 for float32 models) and added into
float64 accumulators that live on the layer's own device, so with ``device_map="auto"`` the statistics
spread over the GPUs with the layers (or on the CPU with ``offload=True``). Raw sums, not means, are kept:
they add across batches and across data-parallel processes (``all_reduce``) exactly.

Cost: ``n^2`` float64 values per layer and Gram, ``8 L n^2`` bytes per Gram (``moments_cost``), twice that
with ``relative``: SmolLM2-135M ``30 x 576^2`` = 80 MB (160 MB); Llama-3.1-8B ``32 x 4096^2`` = 4.3 GB
(8.6 GB); Llama-3.1-70B ``80 x 8192^2`` = 43 GB (86 GB), spread over the layers' devices.

Read back from a file (``Moments.load``), the per-layer tensors are *not* held: each access reads that
layer's tensor from the file (``LayerTensors``), so a 70B's 86 GB of statistics cost one layer's worth of
memory while compensation is solved layer after layer. The file is checked on every read to be the one
loaded (size, inode and modification time): a recalibration that replaced it mid-run is refused, not mixed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_heads.errors import ModelMismatchError, PruneHeadsError

MOMENTS_FILE = "moments.safetensors"
FORMAT = "prune-heads-moments/1"
#: per-dimension floor of ``|h|^2 / d`` in ``resid_inv`` (see the module docstring)
RESID_EPS = 1e-6


class LayerTensors(Sequence[torch.Tensor]):
    """``layers.{i}.{kind}`` of a moments file, read on each access and not kept (see the module docstring).

    Each read opens the file, copies the one tensor out and closes it again, so neither the copy of the
    other layers nor the file's mapped pages stay resident (a handle kept open would keep every page it
    touched counted in the process's memory).
    """

    def __init__(self, path: Path, kind: str, num_layers: int, device: str) -> None:
        self.path, self.kind, self.num_layers, self.device = path, kind, num_layers, device
        self._stamp = _stamp(path)

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("LayerTensors reads one layer at a time; iterate over it instead of slicing")
        if not -self.num_layers <= i < self.num_layers:
            raise IndexError(i)
        from safetensors import safe_open

        if _stamp(self.path) != self._stamp:
            raise PruneHeadsError(f"{self.path} changed while in use (recalibrated?); run again on the new file")
        try:
            with safe_open(str(self.path), framework="pt", device=self.device) as f:
                return f.get_tensor(f"layers.{i % self.num_layers}.{self.kind}")
        except Exception as e:  # truncated or removed under us: say which
            raise PruneHeadsError(f"cannot read layer {i % self.num_layers} of the moments in {self.path}: {e}") from e


def _stamp(path: Path) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise PruneHeadsError(f"the moments file {path} is gone ({e.strerror}); it was in use") from e
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class Moments:
    """Per-layer sums of ``o_proj``'s input (see the module docstring)."""

    count: torch.Tensor                  # (L,) float64
    sums: Sequence[torch.Tensor]         # L x (n,) float64 (a list, or ``LayerTensors`` read from a file)
    grams: Sequence[torch.Tensor]        # L x (n, n) float64
    resid_sq: torch.Tensor               # (L,) float64
    resid_inv: torch.Tensor              # (L,) float64
    meta: dict[str, Any] = field(default_factory=dict)
    sums_rel: Sequence[torch.Tensor] | None = None    # L x (n,) float64, weighted by 1 / |h|^2
    grams_rel: Sequence[torch.Tensor] | None = None   # L x (n, n) float64, weighted by 1 / |h|^2
    _fingerprint: str | None = field(default=None, repr=False)

    def _tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor in the fingerprint's order, one at a time (file-backed layers are read as they come)."""
        yield from (self.count, self.resid_sq, self.resid_inv)
        yield from self.sums
        yield from self.grams
        if self.grams_rel is not None:
            yield from self.sums_rel
            yield from self.grams_rel

    @property
    def lazy(self) -> bool:
        """Whether the per-layer tensors are read from a file on each access (``Moments.load``)."""
        return isinstance(self.grams, LayerTensors)

    # ---- geometry -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.sums)

    @property
    def width(self) -> int:
        """``n = H * D``."""
        return int(self.sums[0].shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.count.max()) if self.count.numel() else 0

    # ---- statistics -----------------------------------------------------------------------
    def mean(self, layer: int) -> torch.Tensor:
        """``(n,)`` float64 mean of ``o_proj``'s input."""
        return self.sums[layer] / self._count(layer)

    def covariance(self, layer: int) -> torch.Tensor:
        """``(n, n)`` float64 centred covariance (divided by the token count)."""
        c = self._count(layer)
        mu = self.sums[layer] / c
        cov = self.grams[layer] / c - torch.outer(mu, mu)
        return (cov + cov.T) / 2

    @property
    def has_relative(self) -> bool:
        return self.grams_rel is not None

    def relative_covariance(self, layer: int) -> torch.Tensor:
        """``(n, n)`` centred covariance under the weights ``1 / |h|^2`` (divided by their sum)."""
        if self.grams_rel is None:
            raise PruneHeadsError("these moments were collected without the relative statistics (relative=False)")
        w = float(self.resid_inv[layer])
        if w <= 0:
            raise PruneHeadsError(f"the moments of layer {layer} saw no token; recalibrate with more data")
        mu = self.sums_rel[layer] / w
        cov = self.grams_rel[layer] / w - torch.outer(mu, mu)
        return (cov + cov.T) / 2

    def residual_mean_square(self, layer: int) -> float:
        """Mean ``|h|^2`` of the residual stream entering the layer."""
        return float(self.resid_sq[layer]) / self._count(layer)

    def residual_inverse_mean(self, layer: int) -> float:
        """Mean ``1 / (|h|^2 + d * RESID_EPS)``: turns an absolute squared error into a mean relative one."""
        return float(self.resid_inv[layer]) / self._count(layer)

    def _count(self, layer: int) -> float:
        c = float(self.count[layer])
        if c <= 0:
            raise PruneHeadsError(f"the moments of layer {layer} saw no token; recalibrate with more data")
        return c

    # ---- identity -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the statistics themselves: plans record it, export checks it."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of(self._tensors())
        return self._fingerprint

    def summary(self) -> dict[str, Any]:
        """What a plan records about the statistics it was compensated with."""
        return {"fingerprint": self.fingerprint(), "num_tokens": self.num_tokens, "data": self.meta.get("data"),
                "sequential": bool(self.meta.get("sequential", False))}

    def check(self, model_or_config: Any) -> None:
        """Refuse statistics of another geometry or model (config fingerprint and, given a model, its weights)."""
        from prune_heads.model.adapters import get_adapter
        from prune_heads.model.fingerprint import check_fingerprint, config_fingerprint

        config = getattr(model_or_config, "config", model_or_config)
        layout = get_adapter(config).layout(config)
        n = layout.num_heads * layout.head_dim
        if self.num_layers != layout.num_layers or self.width != n:
            raise ModelMismatchError(
                f"the moments cover {self.num_layers} layers x {self.width} o_proj inputs but the model has "
                f"{layout.num_layers} x {n}: they were made on another model; recalibrate on this one")
        recorded = self.meta.get("fingerprint") or {}
        if isinstance(model_or_config, nn.Module):
            check_fingerprint(recorded, model_or_config, "the moments file")
        elif recorded.get("config") and recorded["config"] != config_fingerprint(config):
            raise ModelMismatchError("the moments file was made on a model with a different architecture; "
                                     "recalibrate on this model")

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``moments.safetensors`` at ``path`` (a file name or a directory), one tensor at a time (file-backed
        layers are read as they are written). Not atomic by itself: ``HeadScores.save`` calls it inside its
        temporary directory."""
        p = Path(path)
        if p.is_dir():
            p = p / MOMENTS_FILE
        entries: list[tuple[str, Any]] = [("count", lambda: self.count), ("resid_sq", lambda: self.resid_sq),
                                          ("resid_inv", lambda: self.resid_inv)]
        kinds = [("sum", self.sums), ("gram", self.grams)]
        if self.grams_rel is not None:
            kinds += [("sum_rel", self.sums_rel), ("gram_rel", self.grams_rel)]
        for kind, seq in kinds:
            entries += [(f"layers.{i}.{kind}", lambda seq=seq, i=i: seq[i]) for i in range(self.num_layers)]
        return write_moments_file(p, entries, self.num_layers, self.width,
                                  {**self.meta, "fingerprint_moments": self.fingerprint()})

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu", lazy: bool = True) -> Moments:
        """The moments in ``path``; with ``lazy`` (the default) each layer's tensors are read when used."""
        from safetensors import safe_open

        p = Path(path)
        if p.is_dir():
            p = p / MOMENTS_FILE
        if not p.is_file():
            raise PruneHeadsError(f"no moments file at {p}")
        try:
            with safe_open(str(p), framework="pt", device=str(device)) as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise PruneHeadsError(f"{p} is not a prune-heads moments file (format {header.get('format')!r})")
                names = set(f.keys())
                num_layers = 1 + max((int(k.split(".")[1]) for k in names if k.startswith("layers.")), default=-1)
                rel = all(f"layers.{i}.gram_rel" in names for i in range(num_layers))
                missing = [f"layers.{i}.{k}" for i in range(num_layers) for k in ("sum", "gram")
                           if f"layers.{i}.{k}" not in names]
                if missing:
                    raise PruneHeadsError(f"{p} lacks {missing[0]}: it is incomplete; recalibrate")

                def per_layer(kind: str) -> Sequence[torch.Tensor]:
                    if lazy:
                        return LayerTensors(p, kind, num_layers, str(device))
                    return [f.get_tensor(f"layers.{i}.{kind}") for i in range(num_layers)]

                out = cls(
                    count=f.get_tensor("count"),
                    sums=per_layer("sum"),
                    grams=per_layer("gram"),
                    resid_sq=f.get_tensor("resid_sq"),
                    resid_inv=f.get_tensor("resid_inv"),
                    meta=json.loads(header.get("meta") or "{}"),
                    sums_rel=per_layer("sum_rel") if rel else None,
                    grams_rel=per_layer("gram_rel") if rel else None,
                )
        except PruneHeadsError:
            raise
        except Exception as e:  # corrupt or truncated file: say which
            raise PruneHeadsError(f"cannot read moments in {p}: {e}") from e
        out._fingerprint = out.meta.pop("fingerprint_moments", None) or None
        return out

    # ---- combination ----------------------------------------------------------------------
    def all_reduce(self) -> Moments:
        """Sum the statistics over data-parallel processes (in place); a no-op in a single process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if self.lazy:
            raise PruneHeadsError("moments read from a file are already summed; load them with lazy=False to reduce")
        for t in self._tensors():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        self._fingerprint = None
        return self


def fingerprint_of(tensors: Iterable[torch.Tensor]) -> str:
    """The moments fingerprint of ``tensors`` given in ``Moments._tensors()``'s order (a file's, or a
    layer-by-layer calibration's per-layer files), hashed one at a time as float64."""
    h = hashlib.sha256(FORMAT.encode())
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def write_moments_file(path: Path, entries: Sequence[tuple[str, Any]], num_layers: int, width: int,
                       meta: dict[str, Any]) -> Path:
    """A moments file written one tensor at a time (the safetensors layout by hand, so no more than one
    layer's statistics is in memory). ``entries``: ``(name, () -> tensor)``; shapes follow from the names."""
    import struct

    header: dict[str, Any] = {}
    offset = 0
    for name, _ in entries:
        shape = [num_layers] if "." not in name else [width, width] if "gram" in name else [width]
        size = 8
        for d in shape:
            size *= d
        header[name] = {"dtype": "F64", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": FORMAT, "meta": json.dumps(meta)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, get in entries:
            t = get().detach().to("cpu", torch.float64).contiguous()
            if list(t.shape) != header[name]["shape"]:
                raise RuntimeError(f"moments tensor {name} has shape {list(t.shape)}, not {header[name]['shape']}")
            f.write(t.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path


def moments_cost(num_layers: int, width: int, bytes_per_value: int = 8, relative: bool = True) -> dict[str, Any]:
    """Size of the statistics: ``L * n^2`` values per Gram matrix (two with ``relative``)."""
    grams = 2 if relative else 1
    per_layer = grams * (width * width + width) + 3
    values = num_layers * per_layer
    return {"formula": f"{grams} x L x (H*D)^2 float64 values", "values": values, "bytes": values * bytes_per_value,
            "bytes_per_layer": per_layer * bytes_per_value}


# ---- collection -----------------------------------------------------------------------------------

class MomentsCollector:
    """Hooks that add one batch after another into per-layer accumulators.

    Call ``set_mask(attention_mask)`` before each forward: padding positions are left out. A forward
    pre-hook on each decoder layer records the residual stream's norms, one on each ``o_proj`` its input.
    """

    def __init__(self, model: nn.Module, *, offload: bool = False, relative: bool = True) -> None:
        from prune_heads.model.adapters import get_adapter

        adapter = get_adapter(model)
        self.layout = adapter.layout(model.config)
        self.offload = offload
        #: hooks do nothing while False (sequential compensation replays layers it must not count twice)
        self.enabled = True
        L = self.layout.num_layers
        self.count: list[torch.Tensor | None] = [None] * L
        self.sums: list[torch.Tensor | None] = [None] * L
        self.grams: list[torch.Tensor | None] = [None] * L
        self.resid_sq: list[torch.Tensor | None] = [None] * L
        self.resid_inv: list[torch.Tensor | None] = [None] * L
        self.relative = relative
        self.sums_rel: list[torch.Tensor | None] = [None] * L
        self.grams_rel: list[torch.Tensor | None] = [None] * L
        self._weights: dict[int, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._handles = []
        for i, layer in enumerate(adapter.layers(model)):
            self._handles.append(layer.register_forward_pre_hook(self._residual_hook(i), with_kwargs=True))
            self._handles.append(adapter.o_proj(adapter.attention(layer)).register_forward_pre_hook(self._input_hook(i)))

    def set_mask(self, mask: torch.Tensor) -> None:
        self._mask = mask.bool()

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Real-token rows of a ``(B, T, width)`` activation, as float32 (or float64 for float64 models)."""
        if self._mask is None:
            raise RuntimeError("MomentsCollector.set_mask must be called before each forward")
        rows = x[self._mask.to(x.device)]
        return rows if rows.dtype == torch.float64 else rows.float()

    def _target(self, x: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.offload else x.device

    def _residual_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.enabled:
                return
            h = args[0] if args else kwargs["hidden_states"]
            sq = self._rows(h).pow(2).sum(-1).double()
            dev = self._target(h)
            if self.resid_sq[i] is None:
                self.resid_sq[i] = torch.zeros((), dtype=torch.float64, device=dev)
                self.resid_inv[i] = torch.zeros((), dtype=torch.float64, device=dev)
            w = 1.0 / (sq + RESID_EPS * h.shape[-1])
            self.resid_sq[i] += sq.sum().to(dev)
            self.resid_inv[i] += w.sum().to(dev)
            self._weights[i] = w

        return hook

    def _input_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.enabled:
                return
            x = self._rows(args[0])
            dev = self._target(args[0])
            if self.grams[i] is None:
                n = x.shape[-1]
                self.count[i] = torch.zeros((), dtype=torch.float64, device=dev)
                self.sums[i] = torch.zeros(n, dtype=torch.float64, device=dev)
                self.grams[i] = torch.zeros(n, n, dtype=torch.float64, device=dev)
            self.count[i] += x.shape[0]
            self.sums[i] += x.sum(0).double().to(dev)
            self.grams[i] += (x.T @ x).double().to(dev)
            if self.relative:
                w = self._weights.pop(i).to(x.device)
                if self.grams_rel[i] is None:
                    self.sums_rel[i] = torch.zeros_like(self.sums[i])
                    self.grams_rel[i] = torch.zeros_like(self.grams[i])
                xw = x * w.to(x.dtype)[:, None]
                self.sums_rel[i] += xw.sum(0).double().to(dev)
                self.grams_rel[i] += (xw.T @ x).double().to(dev)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self, meta: dict[str, Any] | None = None, *, reduce: bool = True) -> Moments:
        """The accumulated statistics (summed over data-parallel processes when ``reduce``)."""
        n = self.layout.num_heads * self.layout.head_dim
        missing = [i for i, g in enumerate(self.grams) if g is None]
        if missing and len(missing) < len(self.grams):
            raise RuntimeError(f"o_proj inputs came from {len(self.grams) - len(missing)} of {len(self.grams)} layers")

        def zero(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64)

        grams = [g if g is not None else zero((n, n)) for g in self.grams]
        sums = [s if s is not None else zero((n,)) for s in self.sums]
        stack = [c.cpu() if c is not None else zero(()) for c in self.count]
        rsq = [r.cpu() if r is not None else zero(()) for r in self.resid_sq]
        rinv = [r.cpu() if r is not None else zero(()) for r in self.resid_inv]
        from prune_heads.finite import STATS_ADVICE, require_finite

        for i, (s, g) in enumerate(zip(sums, grams)):
            require_finite(s, f"the o_proj input statistics of layer {i} (mean)", STATS_ADVICE)
            require_finite(g, f"the o_proj input statistics of layer {i} (covariance)", STATS_ADVICE)
        out = Moments(torch.stack(stack), sums, grams, torch.stack(rsq), torch.stack(rinv), dict(meta or {}))
        if self.relative:
            out.sums_rel = [s if s is not None else zero((n,)) for s in self.sums_rel]
            out.grams_rel = [g if g is not None else zero((n, n)) for g in self.grams_rel]
        return out.all_reduce() if reduce else out


@contextlib.contextmanager
def collecting(model: nn.Module, *, offload: bool = False, relative: bool = True) -> Iterator[MomentsCollector]:
    """``MomentsCollector`` for the duration of a ``with`` block (hooks removed on exit)."""
    collector = MomentsCollector(model, offload=offload, relative=relative)
    try:
        yield collector
    finally:
        collector.remove()


def model_meta(model: nn.Module) -> dict[str, Any]:
    """Provenance every moments file carries: the model's fingerprint and head geometry."""
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.fingerprint import fingerprint

    layout = get_adapter(model).layout(model.config)
    return {"format": FORMAT, "fingerprint": fingerprint(model), "num_layers": layout.num_layers,
            "num_heads": layout.num_heads, "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
            "statistic": "o_proj input (concatenated head outputs), real tokens only"}


@torch.no_grad()
def collect_moments(model: nn.Module, seqs: Sequence[Sequence[int]], *, batch_size: int = 8, pad_id: int = 0,
                    offload: bool = False, progress: bool = True, data: dict[str, Any] | None = None,
                    relative: bool = True) -> Moments:
    """The moments of ``model`` on token sequences ``seqs`` in one forward pass each batch (no scores).

    ``calibrate()`` collects the same statistics during its own pass; this is for callers without one.
    """
    from tqdm.auto import tqdm

    from prune_heads.data import batches

    device = next(model.parameters()).device
    bar = tqdm(total=len(seqs), desc="moments", unit="seq", disable=not progress)
    with collecting(model, offload=offload, relative=relative) as col:
        for idx, ids, mask in batches([list(s) for s in seqs], batch_size, pad_id):
            col.set_mask(mask)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
            bar.update(len(idx))
    bar.close()
    return col.result({**model_meta(model), "data": data or {"source": "pre-tokenised", "num_samples": len(seqs)}})
