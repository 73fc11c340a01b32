"""Check an export against the oracle: the original model with the plan's heads zeroed.

Both models run on the same token sequences (one of them right-padded, so the padding mask is
exercised); the result is the largest absolute logit difference over real tokens.

The pass/fail criterion is computed in float64 by default. In float32 a sliced model sums fewer
terms in its projections, so BLAS picks different summation orders, and over 30 layers that rounding
noise alone reaches ~1e-3 on SmolLM2's logits (scale ~40) for random tokens, while the same
comparison in float64 is exactly 0. float64 therefore tests the transformation, not the arithmetic;
the float32 difference is recorded beside it for information.

A compensated plan is compared against the compensated masked model: the original with the
``Compensation`` folded into its ``o_proj`` weights (``compensation.fold_into_model``) in float64, those
weights then rounded through the dtype the export writes them in (so that rounding is not counted as an
error), and the plan's heads zeroed. That the folded weights compute exactly what the live compensation of
selection and evaluation computes is tested separately (``tests/test_compensation_apply.py``).

Two engines compute the same numbers. ``memory`` loads both models whole (in float64: 8 bytes a parameter
each, 64 GB apiece for an 8B model). ``sequential`` (``model.sequential_engine``) builds both as skeletons
and reads them one decoder layer at a time from their shards: layer ``j`` of the original (folded and
rounded as above) and of the export run the same hidden states side by side, then are freed; the LM heads
are read in row chunks and the logits compared chunk by chunk, so the peak is about one float64 layer of each
model plus the activations. Every kernel sees the same operands as in the whole model, so the difference is
the same to the last bit (the LM head's chunking may move a float64 product by one rounding unit).
``auto`` (the default) takes the whole-model path when it fits with headroom, and says so when it does not.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from prune_heads.errors import PruneHeadsError
from prune_heads.model.loading import parse_dtype
from prune_heads.plan import Plan


def _load(path: str, dtype: torch.dtype | None, compute: torch.dtype, trust_remote_code: bool = False):
    from prune_heads.export.registration import register_auto_classes
    from prune_heads.model.remote_code import pretrained

    register_auto_classes()
    model = pretrained("model", path, trust_remote_code=trust_remote_code, dtype=dtype or torch.float32)
    return model.to(compute).eval().requires_grad_(False)


def verification_batch(vocab_size: int, num_sequences: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_sequences, seq_len), generator=g)
    mask = torch.ones_like(ids)
    if num_sequences > 1:
        mask[-1, seq_len // 2:] = 0  # right padding in the last row
    return ids, mask


@torch.no_grad()
def max_logit_diff(reference, candidate, ids: torch.Tensor, mask: torch.Tensor) -> float:
    a = reference(input_ids=ids, attention_mask=mask).logits
    b = candidate(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    return float((a[keep] - b[keep]).abs().max())


def _source_dtype(path: str, name: str) -> torch.dtype:
    """The stored dtype of tensor ``name`` in the checkpoint at ``path``."""
    from safetensors import safe_open

    from prune_heads.export.streaming import open_source

    src = open_source(path)
    with safe_open(str(src.path / src.weight_map[name]), framework="pt") as f:
        return f.get_tensor(name).dtype


@torch.no_grad()
def _compensated_reference(path: str, compensation: Any, torch_dtype: torch.dtype | None, compute: torch.dtype,
                            trust_remote_code: bool = False):
    """The original with ``compensation`` folded in float64, every weight rounded as the export stores it."""
    from prune_heads.compensation.apply import fold_into_model
    from prune_heads.model.adapters import get_adapter

    ref = _load(path, None, torch.float64, trust_remote_code)
    adapter = get_adapter(ref)
    o_name = adapter.attn_prefix(0) + adapter.o_name + ".weight"
    folded_dtype = torch_dtype or _source_dtype(path, o_name)
    fold_into_model(ref, compensation)
    for name, p in ref.named_parameters():
        through = folded_dtype if f".{adapter.o_name}." in name else torch_dtype
        if through is not None and p.is_floating_point():
            p.copy_(p.to(through).to(torch.float64))
    return ref.to(compute)


def verify_export(original: Any, exported: str | os.PathLike, plan: Plan, *, num_sequences: int = 4,
                  seq_len: int = 64, tol: float = 1e-4, dtype: str | None = None,
                  approximate: bool = False, compute_dtype: str = "float64",
                  also_float32: bool = True, compensation: Any = None, engine: str = "auto",
                  progress: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    """Largest |logit difference| between ``exported`` and ``original`` under ``static_mask(plan)``.

    ``original``: the source's ``ModelConfig`` (its revision, GGUF file and trust flag honoured) or a model
    spec / local checkpoint directory. ``dtype`` is the dtype the export was written in: the original's weights are rounded through it
    first, so a bfloat16 export is still compared exactly (in float32 arithmetic). ``compensation``: the
    ``Compensation`` the export folded; the reference is then the compensated masked model. ``engine``:
    ``auto``, ``memory`` or ``sequential`` (see the module docstring).
    """
    torch_dtype = parse_dtype(dtype)
    compute = {"float64": torch.float64, "float32": torch.float32}[compute_dtype]
    from prune_heads.export.source import as_model_config, resolve_source

    original = as_model_config(original)
    source = str(resolve_source(original))
    trust = trust_remote_code or original.trust_remote_code
    compensation = compensation if compensation is not None and compensation.layers else None
    chosen = _choose(engine, source, str(exported), compute, num_sequences * seq_len)
    run = _diffs_sequential if chosen == "sequential" else _diffs_in_memory
    diff, diff32 = run(source, str(exported), plan, torch_dtype, compute, num_sequences, seq_len,
                       also_float32 and compute != torch.float32, compensation, progress, trust)
    passed = bool(diff <= tol)
    return {
        "max_abs_logit_diff": diff,
        "max_abs_logit_diff_float32": diff32,
        "tolerance": tol,
        "passed": passed,
        "num_sequences": num_sequences,
        "seq_len": seq_len,
        "compute_dtype": compute_dtype,
        "engine": chosen,
        "weights_dtype": dtype or "source",
        "approximate_norms": approximate,
        "reference": "original model with the plan's heads zeroed (prune_heads.model.masking.static_mask)"
        + (f", {compensation.spec.mode} compensation folded into o_proj" if compensation is not None
           and compensation.layers else ""),
    }


def _diffs_in_memory(source: str, exported: str, plan: Plan, torch_dtype: torch.dtype | None, compute: torch.dtype,
                     num_sequences: int, seq_len: int, also_float32: bool, compensation: Any,
                     progress: bool, trust_remote_code: bool = False) -> tuple[float, float | None]:
    """Both models loaded whole: the reference implementation of the check."""
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.masking import static_mask

    if compensation is not None:
        ref = _compensated_reference(source, compensation, torch_dtype, compute, trust_remote_code)
    else:
        ref = _load(source, torch_dtype, compute, trust_remote_code)
    cand = _load(exported, torch_dtype, compute)  # our export: its classes are registered
    ids, mask = verification_batch(get_adapter(ref).text_config(ref.config).vocab_size, num_sequences, seq_len)
    with static_mask(ref, plan):
        diff = max_logit_diff(ref, cand, ids, mask)
        diff32 = None
        if also_float32:
            ref.float()
            cand.float()
            diff32 = max_logit_diff(ref, cand, ids, mask)
    return diff, diff32


def _reference_hooks(source: str, compensation: Any, torch_dtype: torch.dtype | None):
    """``(load dtype, layer hook, tensor hook)`` that give the streamed original exactly the weights of
    ``_load`` / ``_compensated_reference``: folded in float64, then rounded as the export stores them."""
    if compensation is None:
        return torch_dtype or torch.float32, None, None
    from prune_heads.compensation.apply import fold_into_layer
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.sequential_engine import skeleton

    adapter = get_adapter(skeleton(source))
    o_name = adapter.attn_prefix(0) + adapter.o_name + ".weight"
    folded_dtype = torch_dtype or _source_dtype(source, o_name)
    o_part = f".{adapter.o_name}."

    def through(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        return t.to(dtype).to(t.dtype) if dtype is not None and t.is_floating_point() else t

    def layer_hook(j: int, layer: torch.nn.Module) -> None:
        lc = compensation.layers.get(j)
        if lc is not None:
            fold_into_layer(adapter.o_proj(adapter.attention(layer)), lc)
        for name, p in layer.named_parameters():
            p.copy_(through(name, p, folded_dtype if o_part in f".{name}" else torch_dtype))

    return torch.float32, layer_hook, lambda name, t: through(name, t, torch_dtype)


@torch.no_grad()
def _diffs_sequential(source: str, exported: str, plan: Plan, torch_dtype: torch.dtype | None, compute: torch.dtype,
                      num_sequences: int, seq_len: int, also_float32: bool, compensation: Any,
                      progress: bool, trust_remote_code: bool = False) -> tuple[float, float | None]:
    """Both models streamed layer by layer side by side (see the module docstring)."""
    from tqdm.auto import tqdm

    from prune_heads.model.masking import static_mask
    from prune_heads.model.remote_code import check_remote_code
    from prune_heads.model.sequential_engine import StreamedModel

    check_remote_code(source, trust_remote_code)  # the layer-by-layer path runs no checkpoint code at all
    load_dtype, layer_hook, tensor_hook = _reference_hooks(source, compensation, torch_dtype)
    ref = StreamedModel(source, load_dtype=load_dtype, compute=compute, layer_hook=layer_hook, tensor_hook=tensor_hook)
    cand = StreamedModel(exported, load_dtype=torch_dtype or torch.float32, compute=compute)
    if ref.layout.num_layers != cand.layout.num_layers:
        raise PruneHeadsError(f"{exported} has {cand.layout.num_layers} layers, the original {ref.layout.num_layers}: "
                              "it is not an export of this model")
    ids, mask = verification_batch(ref.adapter.text_config(ref.model.config).vocab_size, num_sequences, seq_len)
    dtypes = [compute, torch.float32] if also_float32 else [compute]
    keep = mask.bool()
    with static_mask(ref.model, plan):
        states = {d: [list(ref.start(ids, mask, d)), list(cand.start(ids, mask, d))] for d in dtypes}
        for j in tqdm(range(ref.layout.num_layers), desc="verify", unit="layer", disable=not progress):
            with ref.layer(j) as a, cand.layer(j) as b:
                for d in dtypes:  # the compute dtype first, then float32 in place (as the whole model's .float())
                    for model, layer, st in ((ref, a, states[d][0]), (cand, b, states[d][1])):
                        layer.to(d)
                        st[0] = model.run_layer(layer, st[0], st[1][j])
        diffs = []
        for d in dtypes:
            (h_ref, _), (h_cand, _) = states[d]
            n_ref, n_cand = ref.final_norm(h_ref), cand.final_norm(h_cand)
            worst = 0.0
            for (s_ref, a), (s_cand, b) in zip(ref.logit_chunks(n_ref), cand.logit_chunks(n_cand), strict=True):
                if s_ref != s_cand:
                    raise PruneHeadsError(f"{exported}'s LM head differs in size from the original's")
                worst = max(worst, float((a[keep] - b[keep]).abs().max()))
            diffs.append(worst)
    return diffs[0], diffs[1] if also_float32 else None


def _choose(engine: str, source: str, exported: str, compute: torch.dtype, tokens: int) -> str:
    """The engine for ``engine``: ``auto`` weighs both models whole in ``compute`` against free memory."""
    if engine in ("memory", "sequential"):
        return engine
    from prune_heads.model.sequential_engine import ShardReader, choose_engine

    a, b = ShardReader(source), ShardReader(exported)
    width = torch.finfo(compute).bits // 8
    numel_a, numel_b = a.sizes()[0], b.sizes()[0]
    vocab_act = tokens * 2 * 32000 * width  # two models' logits at a modest vocabulary
    whole = width * (numel_a + numel_b) + 4 * max(numel_a, numel_b) + vocab_act
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.sequential_engine import HEAD_CHUNK_ROWS, skeleton

    sk = skeleton(source)
    adapter = get_adapter(sk)
    layer = a.largest_layer(adapter, adapter.layout(sk.config).num_layers)
    hidden = adapter.layout(sk.config).hidden_size
    streamed = 2 * (width + 4) * layer + 2 * HEAD_CHUNK_ROWS * hidden * width + vocab_act
    return choose_engine(engine, whole, streamed, what="verify")
