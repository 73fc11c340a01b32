"""Modelling code of head-pruned checkpoints written by prune-heads (``sliced`` format).

This file travels inside the checkpoint (``auto_map``) and must not import ``prune_heads``. Its family
table is ``pruned_family.py``, generated beside it at export time (see ``configuration_pruned``).

Each class subclasses the family's stock ``*ForCausalLM`` and, after the stock constructor, swaps every
attention block's projections for smaller ones holding only the kept heads. The stock attention
``forward`` views projections as ``(-1, head_dim)``, so it infers the new head counts by itself. What
it cannot express is GQA when the KV groups of one layer keep different numbers of query heads:
``repeat_kv`` assumes equal groups. So each attention module carries an explicit query->KV map, and the
model runs through its own registered attention function ``pruned_attention`` (the KV cache keeps only
the kept KV heads):

* a layer whose kept KV heads all keep the same number ``r`` of query heads (untouched layers,
  ``kv-groups`` and ``uniform`` plans) runs transformers' own SDPA path with ``r`` as the group size:
  SDPA's GQA support, its causal fast path (``is_causal``, no materialised mask), exactly as stock;
* a layer with uneven groups runs one SDPA call per kept KV head over that head's contiguous run of
  query heads (kept heads are sorted, so each group's query heads are adjacent): no K/V is copied, and
  each call still takes the causal fast path. One token at a time (decoding), the query heads are
  packed into a zero-padded ``(KV heads, widest group)`` grid instead, so a single call serves the
  whole layer.

Full-width q/k norms (OLMo-2) normalise over all heads at once: by default the full q/k projections are
kept so the norm statistic is exact, and the kept heads are selected after the norm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .configuration_pruned import FAMILIES, PRUNED_CONFIGS, make_config_class, stock_class

# no "sdpa" in the name: transformers would then apply its SDPA support checks (Gemma-2 has none)
ATTN_NAME = "pruned_attention"

DEFAULT_LAYOUT = {
    "layers": "model.layers",
    "attn_name": "self_attn",
    "q_name": "q_proj",
    "k_name": "k_proj",
    "v_name": "v_proj",
    "o_name": "o_proj",
    "fused_qkv": None,
    "qk_norm": "none",
    "q_norm_name": "q_norm",
    "k_norm_name": "k_norm",
}


# ---- attention function ---------------------------------------------------------------------------
def _index(module: nn.Module, attr: str, device: torch.device) -> torch.Tensor | None:
    """Index tensors are built lazily per device: buffers would be lost to meta-device initialisation."""
    values = getattr(module, attr, None)
    if values is None:
        return None
    cache = module.__dict__.setdefault("_pruned_index_cache", {})
    key = (attr, str(device))
    if key not in cache:
        cache[key] = torch.tensor(values, dtype=torch.long, device=device)
    return cache[key]


class _KVPlan:
    """How one layer's kept query heads share its kept KV heads, worked out once from ``pruned_kv_map``.

    ``runs`` holds ``(first query head, end, KV head)`` per run of adjacent query heads that share a KV
    head; ``groups`` is the common run length when every KV head has exactly one run of that length
    (even groups), else 0. Index tensors are built lazily per device: buffers would be lost to
    meta-device initialisation.
    """

    def __init__(self, kv_map: list[int]):
        self.kv_map = tuple(int(g) for g in kv_map)
        runs: list[tuple[int, int, int]] = []
        for i, g in enumerate(self.kv_map):
            if runs and runs[-1][2] == g:
                runs[-1] = (runs[-1][0], i + 1, g)
            else:
                runs.append((i, i + 1, g))
        self.runs = tuple(runs)
        self.width = max((e - s for s, e, _ in runs), default=0)
        one_run_per_head = [g for _, _, g in runs] == list(range(len(runs)))
        even = one_run_per_head and all(e - s == self.width for s, e, _ in runs)
        self.groups = self.width if even else 0
        #: decoding: a one-token query fits a (KV heads, width) grid when each KV head has one run
        self.packable = one_run_per_head
        #: decoding grid: where each query head sits, and which query head fills each cell (a group with
        #: fewer heads than ``width`` repeats its last one; those rows are computed and dropped)
        self.slots = tuple(g * self.width + (i - s) for s, e, g in runs for i in range(s, e))
        self.fill = tuple(s + min(j, e - s - 1) for s, e, _ in runs for j in range(self.width))
        self._tensors: dict[tuple[str, torch.device], torch.Tensor] = {}

    def tensor(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        t = self._tensors.get(key)
        if t is None:
            t = self._tensors[key] = torch.tensor(getattr(self, name), dtype=torch.long, device=device)
        return t


def _kv_plan(module: nn.Module) -> _KVPlan | None:
    kv_map = getattr(module, "pruned_kv_map", None)
    if kv_map is None:
        return None
    plan = module.__dict__.get("_pruned_kv_plan")
    if plan is None or len(plan.kv_map) != len(kv_map):
        plan = module.__dict__["_pruned_kv_plan"] = _KVPlan(kv_map)
    return plan


class _GroupView:
    """The attention module as transformers' SDPA function should see it: ``r`` query heads per KV head."""

    def __init__(self, module: nn.Module, groups: int):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "num_key_value_groups", groups)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_module"), name)


def _group_view(module: nn.Module, groups: int) -> _GroupView:
    view = module.__dict__.get("_pruned_group_view")
    if view is None or view.num_key_value_groups != groups:
        view = module.__dict__["_pruned_group_view"] = _GroupView(module, groups)
    return view


def _eager(query, key, value, attention_mask, scaling, dropout, softcap, training):
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., :k_len], torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask[..., :k_len]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _head_slice(mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    return mask if mask is None or mask.shape[1] == 1 else mask[:, start:end]


def _per_kv_head(plan: _KVPlan, query, key, value, attention_mask, dropout: float, scaling: float,
                 is_causal: bool) -> torch.Tensor:
    """Uneven groups: one SDPA call per run of query heads against its single KV head, no K/V copy."""
    q_len = query.shape[2]
    causal = bool(is_causal and q_len > 1 and attention_mask is None)
    if causal and key.shape[2] > q_len:  # prefill into an empty static cache (as transformers does)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    # SDPA's GQA broadcast takes masks on CPU; elsewhere a masked GQA call would fall back to the math kernel
    gqa = attention_mask is None or query.device.type == "cpu"
    outs = []
    for start, end, g in plan.runs:
        k, v = key[:, g:g + 1], value[:, g:g + 1]
        kw = {}
        if end - start > 1:
            if gqa:
                kw["enable_gqa"] = True
            else:
                k, v = repeat_kv(k, end - start), repeat_kv(v, end - start)
        out = nn.functional.scaled_dot_product_attention(
            query[:, start:end], k, v, attn_mask=_head_slice(attention_mask, start, end), dropout_p=dropout,
            scale=scaling, is_causal=causal, **kw)
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=2)  # (batch, q_len, heads, head_dim), contiguous


def _packed_decode(plan: _KVPlan, query, key, value, attention_mask, dropout: float, scaling: float) -> torch.Tensor:
    """One query token, uneven groups: the query heads of KV head ``g`` become ``width`` query *positions*
    of ``g`` (padded by repeating one of them), so one non-causal SDPA call covers the layer; the padding
    rows are dropped."""
    b, nq, _, d = query.shape
    nkv = len(plan.runs)
    grid = query[:, :, 0].index_select(1, plan.tensor("fill", query.device))
    out = nn.functional.scaled_dot_product_attention(
        grid.view(b, nkv, plan.width, d), key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(b, nkv * plan.width, d).index_select(1, plan.tensor("slots", query.device)).view(b, 1, nq, d)


def pruned_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA (eager when soft-capping or attention weights are needed) with an explicit query->KV map."""
    plan = _kv_plan(module)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    if softcap is not None or kwargs.get("output_attentions"):
        if plan is not None:
            kv_map = plan.tensor("kv_map", key.device)
            key, value = key.index_select(1, kv_map), value.index_select(1, kv_map)
        return _eager(query, key, value, attention_mask, scaling, dropout, softcap, module.training)
    kwargs.pop("softcap", None)
    if plan is None or plan.groups:
        groups = plan.groups if plan is not None else getattr(module, "num_key_value_groups", 1)
        return sdpa_attention_forward(_group_view(module, groups), query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    mask_per_head = attention_mask is not None and attention_mask.shape[1] > 1
    if query.shape[2] == 1 and plan.packable and not mask_per_head:
        return _packed_decode(plan, query, key, value, attention_mask, dropout, scaling), None
    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return _per_kv_head(plan, query, key, value, attention_mask, dropout, scaling, is_causal), None


def _mask(*args, **kwargs):
    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Register the function and its mask builder; without the mask entry padding would be ignored."""
    AttentionInterface.register(ATTN_NAME, pruned_attention)
    AttentionMaskInterface.register(ATTN_NAME, _mask)


register_attention()


# ---- module surgery ---------------------------------------------------------------------------------
class _LayerConfig:
    """A view of the model config with this layer's head counts (fused-qkv families read them in forward).

    Everything else reads through to the live config, so later changes (attention implementation...)
    are seen.
    """

    def __init__(self, config, **overrides):
        object.__setattr__(self, "_base", config)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name):
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_base"), name, value)


class _BiasOnly(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size))


class EmptyAttention(nn.Module):
    """A layer whose every head was removed: it contributes ``o_proj``'s bias (or nothing).

    It still appends zero-head K/V to the cache, so the cache's sequence length stays right for the
    layers after it.
    """

    def __init__(self, config, layer_idx: int, head_dim: int, o_name: str, o_bias: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.config = config
        if o_bias:
            setattr(self, o_name, _BiasOnly(config.hidden_size))
        self._o_name = o_name if o_bias else None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        past = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else past
        b, t = hidden_states.shape[:2]
        if cache is not None:
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        if self._o_name is not None:
            out = out + getattr(self, self._o_name).bias.to(out.dtype)
        return out, None


def _linear_like(old: nn.Linear, out_features: int | None = None, in_features: int | None = None,
                 bias: bool | None = None) -> nn.Linear:
    """A linear layer like ``old`` with other sizes; ``bias=True`` adds a bias the stock one lacks."""
    dev = old.weight.device
    return nn.Linear(
        in_features if in_features is not None else old.in_features,
        out_features if out_features is not None else old.out_features,
        bias=(old.bias is not None) if bias is None else bias,
        device=dev,
        dtype=old.weight.dtype,
    )


def _select_hook(attr: str):
    def hook(module, inputs, output):
        idx = _index(module, attr, output.device)
        return output.index_select(-1, idx)

    return hook


def _shrink_norm(norm: nn.Module, width: int) -> None:
    norm.weight = nn.Parameter(torch.ones(width, device=norm.weight.device, dtype=norm.weight.dtype))


def _layers(model: nn.Module, path: str) -> nn.ModuleList:
    """The decoder layers at ``path`` (the family adapter's ``layers_path``, recorded in the config)."""
    module = model
    for part in path.split("."):
        module = getattr(module, part)
    return module


def prune_attention_modules(model: nn.Module, config) -> None:
    """Replace every attention block's projections by ones holding only the kept heads."""
    layout = dict(DEFAULT_LAYOUT, **(config.pruned_layout or {}))
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    layers = _layers(model, layout["layers"])
    kept_all = config.kept_heads
    if kept_all is None or len(kept_all) != len(layers):
        raise ValueError("config.kept_heads must list the kept query heads of every layer")
    full_norm = layout["qk_norm"] == "full_width"
    exact_norm = full_norm and not config.approximate_norms
    # compensation folded into the weights gives every o_proj a bias (zeros where nothing was compensated)
    o_bias = True if getattr(config, "pruned_o_bias", False) else None
    for i, layer in enumerate(layers):
        kept = [int(h) for h in kept_all[i]]
        attn = getattr(layer, layout["attn_name"])
        o_proj = getattr(attn, layout["o_name"])
        if kept == list(range(heads)):
            # untouched layer: only the GQA expansion moves into the attention function
            attn.num_key_value_groups = 1
            attn.pruned_kv_map = [h // group for h in kept]
            if o_bias and o_proj.bias is None:
                setattr(attn, layout["o_name"], _linear_like(o_proj, bias=True))
            continue
        if not kept:
            setattr(layer, layout["attn_name"], EmptyAttention(config, attn.layer_idx, head_dim, layout["o_name"],
                                                               o_proj.bias is not None or bool(o_bias)))
            continue
        kv_kept = sorted({h // group for h in kept})
        kv_map = [kv_kept.index(h // group) for h in kept]
        nq, nkv = len(kept), len(kv_kept)
        setattr(attn, layout["o_name"], _linear_like(o_proj, in_features=nq * head_dim, bias=o_bias))
        if layout["fused_qkv"]:
            fused = getattr(attn, layout["fused_qkv"])
            setattr(attn, layout["fused_qkv"], _linear_like(fused, out_features=(nq + 2 * nkv) * head_dim))
        else:
            q, k, v = (getattr(attn, layout[n]) for n in ("q_name", "k_name", "v_name"))
            if not exact_norm:
                setattr(attn, layout["q_name"], _linear_like(q, out_features=nq * head_dim))
                setattr(attn, layout["k_name"], _linear_like(k, out_features=nkv * head_dim))
            setattr(attn, layout["v_name"], _linear_like(v, out_features=nkv * head_dim))
        if full_norm:
            q_norm, k_norm = getattr(attn, layout["q_norm_name"]), getattr(attn, layout["k_norm_name"])
            if exact_norm:
                q_norm.pruned_select = [h * head_dim + d for h in kept for d in range(head_dim)]
                k_norm.pruned_select = [g * head_dim + d for g in kv_kept for d in range(head_dim)]
                q_norm.register_forward_hook(_select_hook("pruned_select"))
                k_norm.register_forward_hook(_select_hook("pruned_select"))
            else:
                _shrink_norm(q_norm, nq * head_dim)
                _shrink_norm(k_norm, nkv * head_dim)
        attn.config = _LayerConfig(config, num_attention_heads=nq, num_key_value_heads=nkv)
        attn.num_key_value_heads = nkv
        attn.num_key_value_groups = 1
        attn.pruned_kv_map = kv_map


class _PrunedMixin:
    """Shared by all pruned model classes: shrink attention after the stock constructor."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        prune_attention_modules(self, config)
        self.post_init()

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, allow_all_kernels=False):
        # the stock kernels would apply repeat_kv with the original group size: always use ours
        register_attention()
        return ATTN_NAME


#: family model_type -> pruned model class (filled by ``make_model_class``)
PRUNED_MODELS: dict[str, type] = {}


def make_model_class(base_type: str, spec: dict[str, Any]) -> type:
    """Define ``spec["pruned_model_class"]`` in this module (``auto_map`` names it) and return it."""
    config_class = PRUNED_CONFIGS.get(base_type) or make_config_class(base_type, spec)
    name = spec["pruned_model_class"]
    cls = type(name, (_PrunedMixin, stock_class(spec, "model_class")),
               {"__module__": __name__, "__qualname__": name, "config_class": config_class})
    globals()[name] = cls
    PRUNED_MODELS[base_type] = cls
    return cls


for _base_type, _spec in FAMILIES.items():
    make_model_class(_base_type, _spec)
