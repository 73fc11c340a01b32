"""Run a checkpoint one decoder layer at a time, straight from its safetensors shards.

The loops of a forward pass are swapped (llm-compressor's *sequential onloading*, Model-Optimizer's layerwise
calibration): instead of every batch running through every layer of a model held whole, each decoder layer is
read from the shards once, runs the hidden states of every sequence, and is freed before the next is read. The
model itself is a skeleton built from its config with every parameter on the ``meta`` device (buffers such as
rotary tables are real), so memory holds one layer, the hidden states, and the rows of the embedding and LM
head that are needed, read in chunks.

The inputs a decoder layer needs besides its hidden states (attention masks per layer type, rotary tables,
positions) are whatever the family's own decoder ``forward`` builds: the skeleton's decoder runs once per
batch with its layers reduced to pass-throughs that record their inputs (and the last one stops the pass), so
no family's masking or rotary code is re-implemented here. Running layer ``j`` on those recorded inputs then
computes what the whole model computes, kernel for kernel (``tests/test_sequential_engine.py`` checks it
bit for bit in float64 against ``model(...)`` on every family).

Evaluation (``batch_logits``): a ``ppl:``/``kl:`` probe is one pass in which each layer runs every batch's hidden
states, then each batch goes through the final norm and the chunked LM head in turn. The static mask and the
compensation hooks sit on the skeleton's own modules, so they act as on the model loaded whole. Fingerprint
checks read the shards through ``StreamedModel.tensors`` (``fingerprint.model_tensors``), once per record.

Choosing the engine (``engine_for``, called by each stage's ``*_engine``): ``Footprint.peaks`` estimates a stage's
peak both ways from the shards' headers and the config, and ``auto`` keeps the whole model when it fits within
``HEADROOM`` of the free memory.

Tensor names come from the family adapter (``layer_prefix``, ``embed_name``, ``final_norm_prefix``,
``lm_head_name``); the shards are opened per layer and closed again, so file pages do not pile up in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_heads.errors import PruneHeadsError
from prune_heads.model.replay import hidden_of

#: rows of the LM head (or embedding) read and multiplied at a time: 16384 x 4096 float64 is 512 MiB
HEAD_CHUNK_ROWS = 16384

LayerHook = Callable[[int, nn.Module], None]
TensorHook = Callable[[str, torch.Tensor], torch.Tensor]


class _Stop(Exception):
    """Raised at the last decoder layer's input: the skeleton's forward has recorded everything needed."""


def skeleton(path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM`` of the checkpoint at ``path`` with every parameter on ``meta`` (buffers real).

    ``dtype`` is the default dtype while the modules are built, as ``from_pretrained(dtype=...)`` sets it, so
    buffers made at construction (Gemma's embedding scale) round exactly as in a model loaded whole.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from prune_heads.export.registration import register_auto_classes
    from prune_heads.model.remote_code import pretrained

    register_auto_classes()
    config = pretrained("config", str(path), trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval().requires_grad_(False)


class ShardReader:
    """Read named tensors from a checkpoint's shards; every shard is closed again after each read."""

    def __init__(self, path: str | os.PathLike) -> None:
        from prune_heads.export.streaming import open_source

        self.src = open_source(Path(path))

    def has(self, name: str) -> bool:
        return name in self.src.weight_map

    def _shard(self, name: str) -> Path:
        try:
            return self.src.path / self.src.weight_map[name]
        except KeyError:
            raise PruneHeadsError(f"{self.src.path} has no tensor {name!r}; the checkpoint is incomplete, "
                                  "re-download or re-export it") from None

    @contextlib.contextmanager
    def _open(self, shard: Path) -> Iterator[Any]:
        from safetensors import safe_open

        if not shard.is_file():
            raise PruneHeadsError(f"shard {shard} disappeared while the model was being read; restore it and rerun")
        try:
            with safe_open(str(shard), framework="pt") as h:
                yield h
        except PruneHeadsError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            raise PruneHeadsError(f"cannot read shard {shard} ({e}); it may be corrupt, re-download it") from e

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_shard: dict[Path, list[str]] = {}
        for n in names:
            by_shard.setdefault(self._shard(n), []).append(n)
        out: dict[str, torch.Tensor] = {}
        for shard, ns in by_shard.items():
            with self._open(shard) as h:
                for n in ns:
                    out[n] = h.get_tensor(n)
        return out

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a 2-D tensor, without reading the rest."""
        with self._open(self._shard(name)) as h:
            return h.get_slice(name)[start:stop]

    def gather_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows ``rows`` (in that order) of a 2-D tensor, the shard opened once, nothing else read."""
        with self._open(self._shard(name)) as h:
            s = h.get_slice(name)
            return torch.cat([s[r:r + 1] for r in rows])

    def shape(self, name: str) -> list[int]:
        with self._open(self._shard(name)) as h:
            return list(h.get_slice(name).get_shape())

    def sizes(self, prefix: str = "") -> tuple[int, int]:
        """``(elements, stored bytes)`` of every tensor whose name starts with ``prefix`` (headers only)."""
        numel_total = bytes_total = 0
        by_shard: dict[Path, list[str]] = {}
        for n in self.src.weight_map:
            if n.startswith(prefix):
                by_shard.setdefault(self._shard(n), []).append(n)
        for shard, ns in by_shard.items():
            with self._open(shard) as h:
                for n in ns:
                    s = h.get_slice(n)
                    numel = 1
                    for d in s.get_shape():
                        numel *= d
                    numel_total += numel
                    bytes_total += numel * _DTYPE_BYTES.get(s.get_dtype(), 4)
        return numel_total, bytes_total

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the checkpoint, one at a time, shard by shard, nothing held after use.

        Each tensor is read through its own handle: safetensors maps the whole shard and a handle kept open
        for a shard's tensors kept every page they touched resident (a fingerprint check of a 1B shape held
        its whole 2.3 GiB shard in RSS); a tensor's own mapping goes when the tensor does.
        """
        by_shard: dict[Path, list[str]] = {}
        for n in self.src.weight_map:
            by_shard.setdefault(self._shard(n), []).append(n)
        for shard, ns in by_shard.items():
            for n in ns:
                with self._open(shard) as h:
                    t = h.get_tensor(n)
                yield n, t
                del t

    def largest_layer(self, adapter: Any, num_layers: int) -> int:
        """Elements of the largest decoder layer."""
        return max(self.sizes(adapter.layer_prefix(j))[0] for j in range(num_layers))


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    if leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


class StreamedModel:
    """A checkpoint run layer by layer (see the module docstring).

    ``load_dtype``: every weight is rounded through it on the way in (``from_pretrained(dtype=load_dtype)``);
    ``compute``: the dtype the layers run in. ``layer_hook(j, layer)`` may change layer ``j``'s weights after
    they are loaded (verification folds a compensation there); ``tensor_hook(name, t)`` changes an embedding,
    norm or LM-head tensor as it is read.
    """

    def __init__(self, path: str | os.PathLike, *, load_dtype: torch.dtype = torch.float32,
                 compute: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 layer_hook: LayerHook | None = None, tensor_hook: TensorHook | None = None) -> None:
        from prune_heads.model.adapters import get_adapter

        self.path = Path(path)
        self.reader = ShardReader(path)
        self.load_dtype, self.compute, self.device = load_dtype, compute, torch.device(device)
        self.model = skeleton(path, load_dtype)
        if compute != load_dtype:  # as the whole model's .to(compute); otherwise from_pretrained's own dtypes
            self.model.to(compute)  # (a float32 rotary table stays float32 in a bfloat16 model)
        _buffers_to(self.model, self.device)
        self.adapter = get_adapter(self.model)
        self.layout = self.adapter.layout(self.model.config)
        self.layers = self.adapter.layers(self.model)
        self.layer_hook, self.tensor_hook = layer_hook, tensor_hook
        self._meta = [{n: p for n, p in layer.named_parameters()} for layer in self.layers]
        #: digests of recorded fingerprints this checkpoint matched (each check reads every shard once)
        self.checked: set[str] = set()
        # the skeleton knows its streamed self: fingerprints and evaluators of a skeleton read the shards
        self.model.__dict__["_prune_heads_streamed"] = self

    # ---- weights -------------------------------------------------------------------------------
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            t = t.to(self.load_dtype).to(self.compute)
        return t.to(self.device)

    def load_layer(self, j: int) -> nn.Module:
        """Materialise decoder layer ``j`` from the shards in the compute dtype (then ``layer_hook``)."""
        layer = self.layers[j]
        prefix = self.adapter.layer_prefix(j)
        wanted = {prefix + n: n for n in self._meta[j]}
        missing = [k for k in wanted if not self.reader.has(k)]
        if missing:
            raise PruneHeadsError(f"{self.path} lacks {missing[0]} (and {len(missing) - 1} more of layer {j}); "
                                  "the checkpoint does not match its config.json")
        for full, t in self.reader.read(list(wanted)).items():
            _set_tensor(layer, wanted[full], self._cast(t))
        if self.layer_hook is not None:
            self.layer_hook(j, layer)
        return layer

    def release_layer(self, j: int) -> None:
        """Put layer ``j`` back on ``meta`` (parameters a hook added, such as a folded bias, are dropped)."""
        layer = self.layers[j]
        for name, _ in list(layer.named_parameters()):
            module_name, _, leaf = name.rpartition(".")
            module = layer.get_submodule(module_name) if module_name else layer
            if name in self._meta[j]:
                module._parameters[leaf] = self._meta[j][name]
            else:
                module._parameters[leaf] = None

    @contextlib.contextmanager
    def layer(self, j: int) -> Iterator[nn.Module]:
        try:
            yield self.load_layer(j)
        finally:
            self.release_layer(j)

    def _hooked(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.tensor_hook(name, t) if self.tensor_hook is not None else t

    def _final_norm_names(self) -> dict[str, str]:
        prefix = self.adapter.final_norm_prefix()
        norm = self.adapter.final_norm(self.model)
        return {prefix + n: n for n, _ in norm.named_parameters()}

    # ---- the pass ------------------------------------------------------------------------------
    @torch.no_grad()
    def start(self, ids: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """Embed ``ids`` and record every decoder layer's other inputs: ``(hidden, inputs per layer)``.

        Only the embedding rows the batch uses are read; the ids are renumbered into them (the embedding
        module, Gemma's scaled one included, computes the same gather).
        """
        dtype = dtype or self.compute
        embed = self.model.get_submodule(self.adapter.embed_name)
        name = f"{self.adapter.embed_name}.weight"
        used, local = torch.unique(ids, return_inverse=True)
        rows = self.reader.gather_rows(name, used.tolist())
        rows = self._hooked(name, self._cast(rows)).to(dtype)
        keep_pad, meta_weight = embed.padding_idx, embed._parameters["weight"]
        embed.padding_idx = None  # the compact table has fewer rows than the pad id; padding_idx only shapes grads
        embed._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
        recorded: dict[int, tuple[tuple, dict]] = {}
        layers = self.layers

        def record(i: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                recorded[i] = (args, dict(kwargs))
                if i == len(layers) - 1:
                    raise _Stop
            return hook

        handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
        for layer in layers:
            layer.forward = _pass_through
        casted = dtype != self.compute
        try:
            if casted:
                self.model.to(dtype)
            self.adapter.decoder(self.model)(input_ids=local.to(self.device), attention_mask=mask.to(self.device),
                                             use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
            for layer in layers:
                del layer.forward
            embed._parameters["weight"], embed.padding_idx = meta_weight, keep_pad
            if casted:
                self.model.to(self.compute)
        if len(recorded) != len(layers):
            raise PruneHeadsError(f"the decoder of {self.path} did not run all {len(layers)} layers; "
                                  "its family cannot run layer by layer")
        hidden = hidden_of(recorded[0])
        return hidden, [_strip(recorded[i]) for i in range(len(layers))]

    def o_proj_weight(self, j: int) -> torch.Tensor:
        """Layer ``j``'s ``o_proj`` weight as the model loaded whole holds it (read alone from its shard)."""
        name = self.adapter.attn_prefix(j) + self.adapter.o_name + ".weight"
        return self._cast(self.reader.read([name])[name])

    def tensors(self) -> Iterator[tuple[str, torch.Tensor, bool]]:
        """``fingerprint.model_tensors`` of the model this checkpoint loads as (in ``load_dtype``, on the CPU)."""
        for name, t in self.reader.iter_tensors():
            yield name, (t.to(self.load_dtype) if t.is_floating_point() else t), True

    @torch.no_grad()
    def batch_logits(self, plan: list[tuple[Any, torch.Tensor, torch.Tensor]], progress: bool = False
                     ) -> Iterator[tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(idx, ids, mask, logits)`` of every batch of ``plan``, as ``model(ids, mask).logits`` gives them.

        One streamed pass: each decoder layer is read once and runs every batch's hidden states (all held),
        then each batch goes through the final norm and the LM head (chunked) in turn, so only one batch's
        logits are in memory at a time. Whatever hooks the caller attached (a static mask, compensation) act
        as in the whole model, because the layers are the skeleton's own modules.
        """
        from tqdm.auto import tqdm

        started = [self.start(ids.to(self.device), mask.to(self.device)) for _, ids, mask in plan]
        hidden = [h for h, _ in started]
        for j in tqdm(range(self.layout.num_layers), desc="layers", unit="layer", disable=not progress, leave=False):
            with self.layer(j) as layer:
                for b in range(len(plan)):
                    hidden[b] = self.run_layer(layer, hidden[b], started[b][1][j])
        for b, (idx, ids, mask) in enumerate(plan):
            normed = self.final_norm(hidden[b])
            hidden[b] = None  # type: ignore[call-overload]
            logits = torch.cat([chunk for _, chunk in self.logit_chunks(normed)], -1)
            yield idx, ids, mask, logits

    @staticmethod
    def run_layer(layer: nn.Module, hidden: torch.Tensor, inputs: tuple[tuple, dict]) -> torch.Tensor:
        args, kwargs = inputs
        if args:
            out = layer(hidden, *args[1:], **kwargs)
        else:
            out = layer(**{**kwargs, "hidden_states": hidden})
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm of ``hidden`` (its weights read, applied, and dropped)."""
        norm = self.adapter.final_norm(self.model)
        names = self._final_norm_names()
        saved = {local: p for local, p in norm.named_parameters()}
        try:
            for full, t in self.reader.read(list(names)).items():
                _set_tensor(norm, names[full], self._hooked(full, self._cast(t)).to(hidden.dtype))
            return norm(hidden)
        finally:
            for local, p in saved.items():
                _set_tensor(norm, local, p)

    def lm_head_name(self) -> str:
        name = f"{self.adapter.lm_head_name}.weight"
        return name if self.reader.has(name) else f"{self.adapter.embed_name}.weight"  # tied

    def vocab_size(self) -> int:
        return self.reader.shape(self.lm_head_name())[0]

    @torch.no_grad()
    def logit_chunks(self, normed: torch.Tensor, rows: int = HEAD_CHUNK_ROWS) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(vocab slice, logits)`` of final-normed ``normed`` states, ``rows`` LM-head rows at a time.

        The family's logit transform (Gemma's soft-cap) is applied, as the model's ``forward`` does.
        """
        name = self.lm_head_name()
        bias_name = f"{self.adapter.lm_head_name}.bias"
        bias = self.reader.has(bias_name)
        transform = self.adapter.logit_transform(self.model.config)
        vocab = self.vocab_size()
        for r0 in range(0, vocab, rows):
            r1 = min(vocab, r0 + rows)
            w = self._hooked(name, self._cast(self.reader.rows(name, r0, r1))).to(normed.dtype)
            b = (self._hooked(bias_name, self._cast(self.reader.rows(bias_name, r0, r1))).to(normed.dtype)
                 if bias else None)
            logits = torch.nn.functional.linear(normed, w, b)
            yield slice(r0, r1), transform(logits) if transform is not None else logits


def streamed_of(model: Any) -> StreamedModel | None:
    """The ``StreamedModel`` whose skeleton ``model`` is (None for a model loaded whole)."""
    return getattr(model, "__dict__", {}).get("_prune_heads_streamed")


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype:
    """The checkpoint's own dtype (``config.json``), as ``from_pretrained(dtype="auto")`` picks it."""
    import json

    from prune_heads.model.loading import parse_dtype

    cfg = json.loads((Path(path) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") or "float32"
    return parse_dtype(str(name)) or torch.float32


def load_streamed(model: Any) -> Any:
    """A ``LoadedModel`` of ``model`` (a ``ModelConfig``) whose ``.model`` is a streamed skeleton.

    Stages that only run forward passes (``ppl:``/``kl:`` evaluation, static selection, the fingerprint
    checks) take it where they take a model loaded whole; they find the shards through ``streamed_of``.
    """
    from prune_heads.export.source import resolve_source
    from prune_heads.model.loading import LoadedModel, parse_dtype
    from prune_heads.model.remote_code import pretrained

    if model.device_map is not None:
        raise PruneHeadsError("--device-map spreads a whole model over devices; layer by layer needs none: drop it "
                              "or use --engine memory")
    source = resolve_source(model)
    dtype = parse_dtype(model.dtype) or checkpoint_dtype(source)
    sm = StreamedModel(source, load_dtype=dtype, compute=dtype, device=model.resolved_device() or "cpu")
    tokenizer = pretrained("tokenizer", str(source), trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(sm.model, tokenizer, model.id, model.revision, model.gguf_file)


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the skeleton's real buffers (rotary tables, scales) to ``device``; its ``meta`` parameters stay
    (``Module.to(device)`` would try to copy them and fail)."""
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                module._buffers[name] = b.to(device)


def _pass_through(*args: Any, **kwargs: Any) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _strip(captured: tuple[tuple, dict]) -> tuple[tuple, dict]:
    args, kwargs = captured
    if args:
        return (None, *args[1:]), kwargs
    return args, {k: v for k, v in kwargs.items() if k != "hidden_states"}


# ---- choosing the engine ---------------------------------------------------------------------------
ENGINES = ("auto", "memory", "sequential")
#: the share of the available memory a whole-model run may plan to use (the rest is headroom for the
#: allocator, the interpreter, page cache churn and whatever else runs on the machine)
HEADROOM = 0.7


def available_memory(device: str | torch.device = "cpu") -> int:
    """Bytes free for this process now: ``MemAvailable`` (cgroup limit included) or the CUDA device's free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import psutil

        avail = int(psutil.virtual_memory().available)
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            used_file = Path(limit_file).with_name("memory.current" if limit_file.endswith(".max") else "memory.usage_in_bytes")
            try:
                used = int(used_file.read_text().strip())
            except (OSError, ValueError):
                used = 0
            avail = min(avail, int(raw) - used)
    return max(avail, 0)


def choose_engine(engine: str, in_memory_bytes: int, sequential_bytes: int, *, what: str,
                  device: str | torch.device = "cpu", notify: Callable[[str], None] | None = None) -> str:
    """``memory`` or ``sequential`` for ``engine`` (``auto`` judges the fit with ``HEADROOM``).

    ``in_memory_bytes``/``sequential_bytes``: the estimated peaks of the two paths. A forced engine is
    honoured; ``auto`` prints one line when it goes sequential.
    """
    if engine not in ENGINES:
        raise PruneHeadsError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine != "auto":
        return engine
    free = available_memory(device)
    if in_memory_bytes <= HEADROOM * free:
        return "memory"
    line = (f"{what}: the whole model needs about {gib(in_memory_bytes)} and {gib(free)} is available, so it runs "
            f"layer by layer (about {gib(sequential_bytes)}); --engine memory forces the whole-model path")
    (notify or _notice)(line)
    return "sequential"


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _notice(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


# ---- the memory model ------------------------------------------------------------------------------
class Footprint:
    """Sizes of a checkpoint that set the peak memory of each engine, read from its headers and config.

    ``weights``: every tensor in the run dtype; ``layer``: the largest decoder layer in it; ``moments_layer``:
    one layer's float64 ``o_proj``-input statistics (mean, Gram matrix, and their relative twins).
    """

    def __init__(self, source: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        from prune_heads.model.adapters import get_adapter

        reader = ShardReader(source)
        sk = skeleton(source)
        adapter = get_adapter(sk)
        layout = adapter.layout(sk.config)
        self.dtype = dtype or checkpoint_dtype(source)
        self.width = torch.finfo(self.dtype).bits // 8
        self.num_layers, self.hidden = layout.num_layers, layout.hidden_size
        self.vocab = int(getattr(adapter.text_config(sk.config), "vocab_size", 0) or 0)
        self.weights = reader.sizes()[0] * self.width
        self.layer = reader.largest_layer(adapter, layout.num_layers) * self.width
        n = layout.num_heads * layout.head_dim
        self.moments_layer = 2 * 8 * (n * n + n)
        self.head_chunk = min(HEAD_CHUNK_ROWS, self.vocab or HEAD_CHUNK_ROWS) * self.hidden * self.width

    def activations(self, batch_tokens: int, logits: bool) -> int:
        """One batch in flight: a layer's intermediates, and (``logits``) its logits, their float32 copy and
        log-probs."""
        return batch_tokens * (self.hidden * 16 + (self.vocab * (self.width + 8) if logits else 4 * self.vocab))

    def peaks(self, *, batch_tokens: int, all_tokens: int, moments: str = "none", logits: bool = True
              ) -> tuple[int, int]:
        """``(whole model, layer by layer)`` peak bytes of a stage.

        ``moments``: ``stream`` for a calibration (whole, it holds every layer's statistics; layer by layer,
        one layer's at a time); ``solve`` when compensation is solved from a moments file (select with
        ``lsq``/``mean``, either engine): one layer's statistics read at a time, plus what the compensator
        keeps between probes (``compensator.PRECISION_CACHE_BYTES``, and ``LAYER_CACHE_BYTES`` with the solved
        layers' copies in the run dtype), and one probe's compensation of every layer.
        """
        from prune_heads.compensation.compensator import LAYER_CACHE_BYTES, PRECISION_CACHE_BYTES

        act = self.activations(batch_tokens, logits)
        if moments not in ("none", "stream", "solve"):
            raise ValueError(f"moments must be none, stream or solve, not {moments!r}")
        if moments == "solve":
            precisions = min(PRECISION_CACHE_BYTES, self.num_layers * self.moments_layer // 2)
            # a probe's compensation, every layer's (|R| D x |K| D, at most (H D / 2)^2) with its run-dtype copy
            probe = self.num_layers * self.moments_layer // 8 * 3 // 2
            whole_held = held = self.moments_layer + precisions + LAYER_CACHE_BYTES * 3 // 2 + probe
        else:
            whole_held = self.num_layers * self.moments_layer if moments == "stream" else 0
            held = self.moments_layer if moments == "stream" else 0
        whole = self.weights + whole_held + act
        # two layers (the one running and the next being read), every sequence's hidden states, one LM-head chunk
        streamed = 2 * self.layer + held + 2 * all_tokens * self.hidden * self.width + act
        if logits:
            streamed += self.head_chunk
        return whole, streamed


def engine_for(engine: str, model: Any, *, what: str, batch_tokens: int, all_tokens: int, moments: str = "none",
               logits: bool = True, whole_only: str | None = None, instead: str = "",
               notify: Callable[[str], None] | None = None, estimate: Callable[[str], None] | None = None) -> str:
    """``memory`` or ``sequential`` for a stage on ``model`` (a ``ModelConfig``), judged before anything loads.

    ``auto``: the whole model when its estimated peak fits the free memory with ``HEADROOM``, else layer by
    layer with a one-line notice. A run that cannot fit even layer by layer is refused with the number; so is
    one that must hold the whole model (``whole_only`` says why, ``instead`` what runs layer by layer) when
    the model does not fit. ``memory`` is honoured as given (the user knows their machine). ``estimate``
    (a single CLI command's preflight, as ``prune-heads run`` prints one for every stage) gets one line with
    both estimated peaks and the free memory, before any slow work, whichever engine runs.
    """
    if engine not in ENGINES:
        raise PruneHeadsError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "memory" or (engine == "auto" and model.device_map is not None):
        if estimate is not None and model.device_map is None:
            _estimate(estimate, model, what, dict(batch_tokens=batch_tokens, all_tokens=all_tokens, moments=moments,
                                                  logits=logits))
        return "memory"
    if whole_only and engine == "sequential":
        raise PruneHeadsError(f"{what}: {whole_only} needs the whole model; {instead or 'use --engine memory'}")
    if model.device_map is not None:
        raise PruneHeadsError("--device-map spreads a whole model over devices; layer by layer needs none: drop it "
                              "or use --engine memory")
    from prune_heads.export.source import resolve_source
    from prune_heads.model.loading import parse_dtype

    try:
        fp = Footprint(resolve_source(model), parse_dtype(model.dtype))
    except (PruneHeadsError, OSError, ValueError, KeyError):
        if engine == "sequential":
            raise
        return "memory"  # no safetensors shards to size (or stream): the whole-model path, which reports any problem
    whole, streamed = fp.peaks(batch_tokens=batch_tokens, all_tokens=all_tokens, moments=moments, logits=logits)
    device = model.resolved_device() or "cpu"
    free = available_memory(device)
    if estimate is not None:
        estimate(estimate_line(what, whole, streamed, free, device))
    if engine == "auto":
        if whole <= HEADROOM * free:
            return "memory"
        if whole_only:
            raise PruneHeadsError(
                f"{what}: {whole_only} needs the whole model, about {gib(whole)}, and {gib(free)} is free on {device}; "
                f"{instead + ', or ' if instead else ''}--engine memory to try anyway")
    if streamed > free:
        raise PruneHeadsError(
            f"{what}: even layer by layer needs about {gib(streamed)} ({gib(fp.layer)} a layer) and only "
            f"{gib(free)} is free on {device}; lower --batch-size, free memory, or use a device with more")
    if engine == "auto":
        (notify or _notice)(f"{what}: the whole model needs about {gib(whole)} and {gib(free)} is free, so it runs "
                            f"layer by layer (about {gib(streamed)}); --engine memory forces the whole-model path")
    return "sequential"


def estimate_line(what: str, whole: int, streamed: int, free: int, device: Any) -> str:
    """The preflight's line for one stage: both estimated peaks and what is free."""
    return (f"{what}: estimated peak memory {gib(whole)} whole / {gib(streamed)} layer by layer ({gib(free)} free "
            f"on {device})")


def _estimate(estimate: Callable[[str], None], model: Any, what: str, kw: dict[str, Any]) -> None:
    """``estimate_line`` for a forced whole-model run, when the checkpoint can be sized (else nothing)."""
    from prune_heads.export.source import resolve_source
    from prune_heads.model.loading import parse_dtype

    try:
        fp = Footprint(resolve_source(model), parse_dtype(model.dtype))
    except (PruneHeadsError, OSError, ValueError, KeyError):
        return
    device = model.resolved_device() or "cpu"
    estimate(estimate_line(what, *fp.peaks(**kw), available_memory(device), device))


def load_for(engine: str, model: Any) -> Any:
    """``model`` (a ``ModelConfig``) loaded whole (``memory``) or as a streamed skeleton (``sequential``)."""
    return load_streamed(model) if engine == "sequential" else model.load()


def refuse_whole_model_task(streamed: StreamedModel, task: str) -> None:
    """lm-eval, ``mc:`` and ``passkey:`` tasks run the model whole: refuse one on a layer-by-layer model with what
    to do."""
    fp = Footprint(streamed.path, streamed.load_dtype)
    how = "runs on the whole model" if task.startswith("passkey:") else "runs through lm-eval on the whole model"
    raise PruneHeadsError(
        f"{task} {how}, which needs about {gib(fp.weights)} and does not fit here; evaluate a ppl:DATA or kl:DATA "
        f"task instead (they run layer by layer), or use --engine memory on a machine with that much memory")
