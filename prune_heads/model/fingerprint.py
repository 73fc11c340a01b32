"""Model fingerprints: refuse a scores file or plan applied to a model it was not made on.

A fingerprint has two parts:

- ``config``: a hash of the head geometry and sizes (exact);
- ``tensors``: per tensor, a 64-bit hash (xxh3) of its bytes with its dtype and shape, plus hashes of the
  tensor rounded (round-to-nearest-even, as ``tensor.to(dtype)`` and ``from_pretrained(dtype=...)`` do)
  to each lower-precision float dtype (float32 -> bfloat16 and float16; float16 -> bfloat16).

Every byte of every tensor enters, so a change to any one weight anywhere is detected. The dtype
tolerance is exact too, and one-sided: a model in dtype ``D`` matches a record in dtype ``R`` when

- ``D == R``: the bytes are equal;
- ``D`` is coarser than ``R`` (float32 record, bfloat16 model): the model's tensors equal the recorded ones
  rounded to ``D``, i.e. it *is* the recorded checkpoint loaded in ``D``. A change smaller than half a ``D``
  ulp made to the float32 weights is invisible in ``D`` (the ``D`` models are bit-identical), and accepted;
- ``D`` is finer (bfloat16 record, float32 model): the model's tensors rounded to ``R`` equal the record, which
  holds for a bfloat16 checkpoint upcast to float32; any change that does not round away is detected.

Order of coarseness: float64 > float32 > float16 > bfloat16 (bfloat16 vs float16 compares at bfloat16; a
float16 tensor whose values overflow or underflow float16's range could then differ and be refused).

It is computed tensor by tensor (``FingerprintBuilder`` / ``FingerprintCheck``), so export can fingerprint or
check a checkpoint while it streams it (``fingerprint_stream``) and a loaded model is read once. Cost: one
xxh3 pass over the bytes (about 6-8 GB/s per core here) plus, for float32 records, two rounding casts
(about 1-1.5 GB/s of float32 on 2 cores); a bfloat16 checkpoint (how 70B models ship) needs the hash
only: about 20 s per 140 GB on one core, well under the time to read it (benchmarks in the report).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from prune_heads.errors import ModelMismatchError
from prune_heads.finite import require_finite
from prune_heads.model.adapters import get_adapter

#: what to do about a weight that is NaN or infinite (every command reads the weights through a fingerprint)
WEIGHTS_ADVICE = "the checkpoint is damaged: re-download or re-export it (a float16 overflow: load it in float32)"


def require_finite_weight(name: str, t: torch.Tensor) -> None:
    """A parameter must be finite: NaN weights make every score, statistic and metric NaN downstream."""
    require_finite(t, f"the model's weights are not finite: tensor {name}", WEIGHTS_ADVICE)


FORMAT = "prune-heads-fingerprint/2"
HASH = "xxh3_64"
#: finest first; a tensor's record holds its own hash and its roundings to every coarser float dtype
FLOAT_ORDER = ("float64", "float32", "float16", "bfloat16")
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: non-persistent buffers some old checkpoints carry; their presence or absence is not a different model
_IGNORED_EXTRA = ("inv_freq", "rotary_emb.")


def _ignorable(name: str) -> bool:
    return any(part in name for part in _IGNORED_EXTRA)


def config_fingerprint(model_or_config: Any) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    adapter = get_adapter(config)
    layout = adapter.layout(config)
    text = adapter.text_config(config)
    key = {
        "family": adapter.name,
        "layers": layout.num_layers,
        "heads": layout.num_heads,
        "kv_heads": layout.num_kv_heads,
        "head_dim": layout.head_dim,
        "hidden": layout.hidden_size,
        "vocab": getattr(text, "vocab_size", None),
        "intermediate": getattr(text, "intermediate_size", None),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---- one tensor ------------------------------------------------------------------------------------
def _hasher() -> Any:
    import xxhash

    return xxhash.xxh3_64()


def _digest(dtype: str, shape: list[int], data: Any) -> str:
    h = _hasher()
    h.update(f"{dtype}{list(shape)}".encode())
    if data is not None:
        h.update(data)
    return h.hexdigest()


def tensor_hash(t: torch.Tensor) -> str:
    """xxh3 of dtype, shape and the raw bytes of ``t`` (moved to CPU, made contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    data = memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else None
    return _digest(str(t.dtype).removeprefix("torch."), list(t.shape), data)


#: below this many elements, roundings run in numpy on one thread: torch's parallel cast of a small tensor
#: can cost 10x more than the cast on a busy machine (measured: 11 ms vs 0.5 ms for a 1536 x 576 float32)
NUMPY_CAST_MAX = 1 << 24


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round-to-nearest-even, NaN -> 0x7FC0: exactly c10::BFloat16's rule."""
    b = a.view(np.uint32)
    r = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        r[nan] = 0x7FC0
    return r


def rounded_hash(t: torch.Tensor, to: str) -> str:
    """``tensor_hash(t.to(to))``, computed without torch's thread pool for small float32/float16 tensors."""
    src = dtype_name(t)
    if src == to:
        return tensor_hash(t)
    if src not in ("float32", "float16") or to not in ("float16", "bfloat16") or t.numel() > NUMPY_CAST_MAX:
        return tensor_hash(t.detach().to(_DTYPES[to]))
    a = t.detach().cpu().contiguous().reshape(-1).numpy()
    if to == "bfloat16":
        out = _bf16_bits(a.astype(np.float32, copy=False))
    else:
        with np.errstate(over="ignore"):  # overflow to inf is the rounding torch does too
            out = a.astype(np.float16)
    return _digest(to, list(t.shape), memoryview(out.view(np.uint8)) if out.size else None)


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def coarser(dtype: str) -> tuple[str, ...]:
    """The float dtypes coarser than ``dtype`` (none for non-float dtypes)."""
    return FLOAT_ORDER[FLOAT_ORDER.index(dtype) + 1:] if dtype in FLOAT_ORDER else ()


def tensor_record(t: torch.Tensor) -> dict[str, Any]:
    """``{"dtype", "shape", "exact", <coarser dtype>: hash of t rounded to it, ...}``."""
    name = dtype_name(t)
    rec: dict[str, Any] = {"dtype": name, "shape": list(t.shape), "exact": tensor_hash(t)}
    for c in coarser(name):
        rec[c] = rounded_hash(t, c)
    return rec


def tensor_record_chunks(dtype: torch.dtype, shape: list[int], chunks: Iterable[torch.Tensor],
                         name: str = "tensor") -> dict[str, Any]:
    """``tensor_record`` of the tensor whose row blocks, in order, are ``chunks``, never holding it whole.

    Why: the layer-by-layer engine fingerprints the embedding and LM head as the whole-model path does, and
    reading them whole set calibrate's peak (a Llama-3.2-1B's tied 128256 x 2048 embedding: 0.5 GiB read,
    plus 0.25 GiB for its finiteness mask). xxh3 is a stream over the same bytes, so the hashes equal
    ``tensor_record``'s; every block is checked finite as ``FingerprintBuilder.add`` checks the whole.
    """
    dname = str(dtype).removeprefix("torch.")
    hashers = {k: _hasher() for k in ("exact", *coarser(dname))}
    for k, h in hashers.items():
        h.update(f"{dname if k == 'exact' else k}{list(shape)}".encode())
    for block in chunks:
        require_finite_weight(name, block)
        for k, h in hashers.items():
            b = block if k == "exact" else block.to(_DTYPES[k])
            if b.numel():
                h.update(memoryview(b.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return {"dtype": dname, "shape": list(shape), **{k: h.hexdigest() for k, h in hashers.items()}}


def compare_dtype(recorded: str, current: str) -> str | None:
    """The dtype two records are compared at (the coarser one); None when they cannot be compared."""
    if recorded == current:
        return recorded
    if recorded in FLOAT_ORDER and current in FLOAT_ORDER:
        return max(recorded, current, key=FLOAT_ORDER.index)
    return None


def tensor_matches(recorded: dict[str, Any], t: torch.Tensor, exact: str | None = None) -> bool:
    """Does ``t`` equal the recorded tensor, up to the rounding its own dtype implies (module docstring)?
    ``exact``: ``tensor_hash(t)`` when the caller has it already."""
    current = dtype_name(t)
    if list(t.shape) != list(recorded.get("shape", t.shape)):
        return False
    at = compare_dtype(recorded["dtype"], current)
    if at is None:
        return False
    want = recorded["exact"] if at == recorded["dtype"] else recorded.get(at)
    if want is None:
        return False
    if at == current:
        return want == (exact or tensor_hash(t))
    return want == rounded_hash(t, at)


# ---- whole models ----------------------------------------------------------------------------------
def model_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor, is_parameter)`` of every parameter and persistent buffer, each storage once
    (a tied ``lm_head`` shares the embedding's and is skipped, as checkpoints skip it).

    A layer-sequential skeleton (``model.sequential_engine``) has its weights on ``meta``: its tensors are read
    from the shards one at a time instead, as the model loaded whole would hold them."""
    streamed = model.__dict__.get("_prune_heads_streamed")
    if streamed is not None:
        yield from streamed.tensors()
        return
    seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    params = {id(p) for p in model.parameters()}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.device.type == "meta":
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        yield name, t, id(t) in params


class FingerprintBuilder:
    """Fingerprint tensor by tensor: ``add(name, tensor)`` for each, then ``result()``."""

    def __init__(self, config: Any) -> None:
        self.config = config_fingerprint(config)
        self.tensors: dict[str, dict[str, Any]] = {}
        self.bytes = 0

    def add(self, name: str, t: torch.Tensor, *, parameter: bool = True) -> None:
        if parameter:
            require_finite_weight(name, t)
        rec = tensor_record(t)
        if not parameter:
            rec["buffer"] = True
        self.tensors[name] = rec
        self.bytes += t.numel() * t.element_size()

    def add_chunks(self, name: str, dtype: torch.dtype, shape: list[int], chunks: Iterable[torch.Tensor]) -> None:
        """``add`` for a parameter given as row blocks (``tensor_record_chunks``): the same record."""
        self.tensors[name] = tensor_record_chunks(dtype, shape, chunks, name)
        self.bytes += math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    def result(self) -> dict[str, Any]:
        return {"format": FORMAT, "hash": HASH, "config": self.config, "tensors": dict(sorted(self.tensors.items()))}


@torch.no_grad()
def fingerprint(model: nn.Module) -> dict[str, Any]:
    """The fingerprint of a loaded model (every parameter and persistent buffer)."""
    b = FingerprintBuilder(model)
    for name, t, is_param in model_tensors(model):
        b.add(name, t, parameter=is_param)
    return b.result()


def fingerprint_stream(config: Any, tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """The fingerprint of a checkpoint read tensor by tensor (e.g. ``export.streaming.iter_tensors``)."""
    b = FingerprintBuilder(config)
    for name, t in tensors:
        b.add(name, t)
    return b.result()


def fingerprint_digest(fp: dict[str, Any]) -> str:
    """One short hash of a whole fingerprint (config and every tensor's exact hash), for places that only
    need to name the model (results files, logs); checking needs the full fingerprint."""
    h = hashlib.sha256(str(fp.get("config")).encode())
    for name, rec in sorted((fp.get("tensors") or {}).items()):
        h.update(f"{name}:{rec.get('dtype')}:{rec.get('exact')};".encode())
    return h.hexdigest()[:16]


def is_legacy(recorded: Any) -> bool:
    """The pre-0.2 form ``{"config", "weights"}`` (64 sampled values of one tensor)."""
    return isinstance(recorded, dict) and "tensors" not in recorded and ("weights" in recorded or "config" in recorded)


def _legacy_error(what: str) -> ModelMismatchError:
    return ModelMismatchError(
        f"{what} has an old-style fingerprint (64 sampled weights of one tensor, written by an earlier prune-heads), "
        "which cannot tell whether it was made on this model: make it again with this version (calibrate / select), "
        "or delete its \"fingerprint\" key to use it unchecked, as a hand-written file"
    )


def check_config(recorded: dict[str, Any] | None, model_or_config: Any, what: str) -> None:
    """The architecture part only (cheap: no weights needed)."""
    if not recorded:
        return
    if not isinstance(recorded, dict):
        raise ModelMismatchError(f"{what} has a malformed fingerprint ({type(recorded).__name__}, not an object): make "
                                 "it again, or delete its \"fingerprint\" key to use it unchecked")
    if is_legacy(recorded):
        raise _legacy_error(what)
    current = config_fingerprint(model_or_config)
    if recorded.get("config") and recorded["config"] != current:
        raise ModelMismatchError(
            f"{what} was made on a model with a different architecture (fingerprint {recorded['config']}, "
            f"this model {current}); recompute it on this model"
        )


class FingerprintCheck:
    """Check tensors against a recorded fingerprint as they stream by; ``finish()`` checks the name sets.

    The first tensor that differs raises ``ModelMismatchError`` naming it, so an export stops at once.
    """

    def __init__(self, recorded: dict[str, Any], what: str) -> None:
        if is_legacy(recorded):
            raise _legacy_error(what)
        if recorded.get("format") != FORMAT or not isinstance(recorded.get("tensors"), dict):
            raise ModelMismatchError(f"{what} has a fingerprint of an unknown format ({recorded.get('format')!r}); "
                                     "make it again with this version of prune-heads")
        self.recorded: dict[str, dict[str, Any]] = recorded["tensors"]
        self.what = what
        self.matched: set[str] = set()
        self.extra: dict[str, str] = {}  # current-only name -> exact hash (a tied duplicate stored twice?)
        self.current_exact: dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        rec = self.recorded.get(name)
        if rec is not None and not rec.get("buffer"):
            require_finite_weight(name, t)
        exact = tensor_hash(t)
        if rec is None:
            if not _ignorable(name):
                self.extra[name] = exact
            return
        if not tensor_matches(rec, t, exact):
            raise ModelMismatchError(
                f"{self.what} was made on different weights: tensor {name} ({rec['dtype']} {rec.get('shape')}) differs "
                f"in this model ({dtype_name(t)} {list(t.shape)}); recompute it on this model"
            )
        self.matched.add(name)
        self.current_exact[name] = exact

    def finish(self) -> None:
        recorded_hashes = {self.recorded[n]["exact"] for n in self.matched}
        missing = [n for n, r in self.recorded.items() if n not in self.matched and not r.get("buffer")
                   and r["exact"] not in recorded_hashes]  # a tie recorded under two names is not missing
        if missing:
            raise ModelMismatchError(f"{self.what} was made on a model with tensors this one lacks "
                                     f"({', '.join(sorted(missing)[:3])}); recompute it on this model")
        current_hashes = set(self.current_exact.values())
        extra = [n for n, h in self.extra.items() if h not in current_hashes]
        if extra:
            raise ModelMismatchError(f"{self.what} was made on a model without tensors this one has "
                                     f"({', '.join(sorted(extra)[:3])}); recompute it on this model")


@torch.no_grad()
def check_fingerprint(recorded: dict[str, Any] | None, model: nn.Module, what: str) -> None:
    """Raise ``ModelMismatchError`` when ``recorded`` was made on a different model (no-op when None)."""
    if not recorded:
        return
    check_config(recorded, model, what)
    streamed = model.__dict__.get("_prune_heads_streamed")
    digest = fingerprint_digest(recorded) if streamed is not None else None
    if streamed is not None and digest in streamed.checked:
        return  # this checkpoint was read against this record already: reading every shard again finds the same
    check = FingerprintCheck(recorded, what)
    for name, t, _ in model_tensors(model):
        check.add(name, t)
    check.finish()
    if streamed is not None:
        streamed.checked.add(digest)
