"""Read a safetensors checkpoint tensor by tensor and write a new one shard by shard.

Only one input tensor and one output shard are held at a time, so exporting needs about one shard
of memory however large the model is (a 70B model exports on a machine with modest RAM and no GPU).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prune_heads.errors import PruneHeadsError
from prune_heads.io_utils import apply_umask

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: files copied verbatim from the source (tokenizer, generation config, licences)
AUX_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "vocab*.json", "merges.txt",
    "*.tiktoken", "spiece.model", "chat_template*", "generation_config.json", "preprocessor_config.json",
    "LICENSE*", "LICENCE*", "license*", "NOTICE*", "USE_POLICY*", "COPYING*",
)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """``"5GB"``, ``"500MiB"``, ``"2000000"`` or an int -> bytes."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]{1,30}(?:\.[0-9]{0,30})?)\s*([A-Za-z]*)\s*", str(size)[:100])
        if not m or m.group(2).upper() not in _UNITS:
            raise PruneHeadsError(f"cannot read shard size {str(size)[:80]!r}; write it like 5GB, 500MB or 2GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])  # bounded digits: always finite
    if value <= 0:
        raise PruneHeadsError(f"shard size must be positive, got {size!r}")
    return value


@dataclass
class SourceCheckpoint:
    """A local safetensors checkpoint, checked before anything is written."""

    path: Path
    config: dict
    weight_map: dict[str, str]          # tensor name -> shard file
    index_file: str | None = None
    shards: list[str] = field(default_factory=list)

    def fingerprint(self) -> dict[str, str]:
        """sha256 of config and index, and of each shard's header (cheap, yet changes with any re-save)."""
        out = {"config.json": sha256_file(self.path / "config.json")}
        if self.index_file:
            out[self.index_file] = sha256_file(self.path / self.index_file)
        for s in self.shards:
            out[f"{s}:header"] = _header_sha256(self.path / s)
        return out


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _header_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return hashlib.sha256(f.read(min(n, 100_000_000))).hexdigest()


def open_source(path: str | Path) -> SourceCheckpoint:
    """Read config and index, and check that every shard exists and has a valid safetensors header."""
    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise PruneHeadsError(f"{root} has no config.json: it is not a model directory")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise PruneHeadsError(f"{cfg_path} is not valid JSON: {e}") from e
    index_file = None
    if (root / INDEX_FILE).is_file():
        index_file = INDEX_FILE
        try:
            weight_map = dict(json.loads((root / INDEX_FILE).read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PruneHeadsError(f"{root / INDEX_FILE} is not a valid safetensors index ({e}); re-download the model") from e
    elif (root / SINGLE_FILE).is_file():
        weight_map = {}
    else:
        if any(root.glob("*.bin")) or any(root.glob("*.pt")):
            raise PruneHeadsError(f"{root} holds PyTorch .bin weights; export reads safetensors only. Convert it first: "
                                  "load it with transformers and save_pretrained(safe_serialization=True)")
        raise PruneHeadsError(f"{root} has neither {SINGLE_FILE} nor {INDEX_FILE}; the weights are missing")
    shards = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    for s in shards:
        f = root / s
        if not f.is_file():
            raise PruneHeadsError(f"shard {s} listed in {index_file} is missing from {root}; re-download the model")
        try:
            with safe_open(str(f), framework="pt") as h:
                names = list(h.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt/truncated files
            raise PruneHeadsError(f"shard {f} is corrupt or truncated ({e}); re-download it") from e
        if not weight_map or index_file is None:
            weight_map.update({n: s for n in names})
        else:
            listed = {n for n, shard in weight_map.items() if shard == s}
            if not listed <= set(names):
                missing = sorted(listed - set(names))[:3]
                raise PruneHeadsError(f"shard {f} lacks tensors its index lists (e.g. {missing}); re-download it")
    _check_config(root, config, weight_map, shards)
    return SourceCheckpoint(root, config, weight_map, index_file, shards)


def _check_config(root: Path, config: dict, weight_map: dict[str, str], shards: list[str]) -> None:
    """config.json describes these weights (``model.loading.check_config_against_weights``): export and its
    verification build the model from it."""
    from prune_heads.model.loading import check_config_against_weights, check_safetensors_file

    shapes: dict[str, list[int]] = {}
    for s in shards:
        check_safetensors_file(root / s, shapes)
    check_config_against_weights(config, {n: shapes[n] for n in weight_map if n in shapes}, root)


def iter_tensors(src: SourceCheckpoint, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time, shard by shard, in a stable order."""
    from tqdm.auto import tqdm

    by_shard: dict[str, list[str]] = {}
    for name, shard in src.weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    bar = tqdm(total=len(src.weight_map), desc="export", unit="tensor", disable=not progress)
    try:
        for shard in sorted(by_shard):
            try:
                with safe_open(str(src.path / shard), framework="pt") as h:
                    for name in sorted(by_shard[shard]):
                        yield name, h.get_tensor(name)
                        bar.update()
            except PruneHeadsError:
                raise
            except (OSError, RuntimeError, ValueError) as e:
                raise PruneHeadsError(f"cannot read shard {src.path / shard} ({e}); it may be corrupt, re-download it") from e
    finally:
        bar.close()


class ShardWriter:
    """Accumulate tensors up to ``max_bytes`` per shard; name the shards and write the index on close."""

    def __init__(self, out_dir: Path, max_bytes: int, metadata: dict[str, str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.max_bytes = max_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.total_params = 0
        #: the largest number of tensor bytes held in the buffer at once (for the memory check)
        self.peak_buffer_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._buffer_bytes)
        self.total_bytes += nbytes
        self.total_params += tensor.numel()

    def _flush(self) -> None:
        if not self._buffer:
            return
        part = self.out_dir / f".part-{len(self._parts):05d}.safetensors"
        save_file(self._buffer, str(part), metadata=self.metadata)
        apply_umask(part)  # safetensors creates its files 0600
        self._parts.append((part, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give shards their final names, write the index; return file names."""
        self._flush()
        n = len(self._parts)
        if n == 1:
            self._parts[0][0].rename(self.out_dir / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map: dict[str, str] = {}
        files = []
        for i, (part, names) in enumerate(self._parts):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            part.rename(self.out_dir / final)
            files.append(final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total_bytes, "total_parameters": self.total_params},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return [*files, INDEX_FILE]


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation config and licence files (never weights, configs or code)."""
    copied = []
    for pattern in AUX_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copyfile(f, dst / f.name)  # the user's umask, not the source file's mode
                apply_umask(dst / f.name)
                copied.append(f.name)
    return copied
