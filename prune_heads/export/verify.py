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
"""

from __future__ import annotations

import os
from typing import Any

import torch

from prune_heads.model.loading import parse_dtype
from prune_heads.plan import Plan


def _load(path: str, dtype: torch.dtype | None, compute: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    from prune_heads.export.registration import register_auto_classes

    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
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
                  also_float32: bool = True, compensation: Any = None) -> dict[str, Any]:
    """Largest |logit difference| between ``exported`` and ``original`` under ``static_mask(plan)``.

    ``original``: the source's ``ModelConfig`` (its revision, GGUF file and trust flag honoured) or a model
    spec / local checkpoint directory. ``dtype`` is the dtype the export was written in: the original's weights are rounded through it
    first, so a bfloat16 export is still compared exactly (in float32 arithmetic). ``compensation``: the
    ``Compensation`` the export folded; the reference is then the compensated masked model.
    """
    from prune_heads.model.masking import static_mask

    torch_dtype = parse_dtype(dtype)
    compute = {"float64": torch.float64, "float32": torch.float32}[compute_dtype]
    from prune_heads.export.source import as_model_config, resolve_source

    original = as_model_config(original)
    source = str(resolve_source(original))
    trust = original.trust_remote_code
    if compensation is not None and compensation.layers:
        ref = _compensated_reference(source, compensation, torch_dtype, compute, trust)
    else:
        ref = _load(source, torch_dtype, compute, trust)
    cand = _load(str(exported), torch_dtype, compute)
    from prune_heads.model.adapters import get_adapter

    ids, mask = verification_batch(get_adapter(ref).text_config(ref.config).vocab_size, num_sequences, seq_len)
    with static_mask(ref, plan):
        diff = max_logit_diff(ref, cand, ids, mask)
        diff32 = None
        if also_float32 and compute != torch.float32:
            ref.float()
            cand.float()
            diff32 = max_logit_diff(ref, cand, ids, mask)
    passed = bool(diff <= tol)
    return {
        "max_abs_logit_diff": diff,
        "max_abs_logit_diff_float32": diff32,
        "tolerance": tol,
        "passed": passed,
        "num_sequences": num_sequences,
        "seq_len": seq_len,
        "compute_dtype": compute_dtype,
        "weights_dtype": dtype or "source",
        "approximate_norms": approximate,
        "reference": "original model with the plan's heads zeroed (prune_heads.model.masking.static_mask)"
        + (f", {compensation.spec.mode} compensation folded into o_proj" if compensation is not None
           and compensation.layers else ""),
    }
