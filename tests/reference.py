"""A naive, independent reference for every score in SCORES.md, one sequence at a time.

It shares no code with ``prune_heads``: the model runs with transformers' own ``eager`` attention and
``output_attentions=True`` (so ``A`` is the full ``N x N`` matrix transformers itself computes, with the
family's scaling, soft-capping and sliding window), values are read from the ``v_proj`` (or fused
``qkv_proj``) output, and head outputs ``O`` from the input of ``o_proj``. Every score is then computed
literally from its definition with Python loops over heads and tokens. ``grad`` comes from autograd on an
explicit gate multiplying ``o_proj``'s input.
"""

from __future__ import annotations

import math

import torch

RAW = ("awft", "aeqd", "ftvvn", "avvn", "lthon", "ahon", "fhon", "confidence")
LN = {"awft_ln": ("awft", "awft"), "aeqd_ln": ("aeqd", "aeqd"), "ftvvn_ln": ("ftvvn", "ftvvn"),
      "avvn_ln": ("avvn", "avvn"), "ahon_ln": ("ahon", "ahon"), "fhon_ln": ("fhon", "fhon"),
      "lthon_ln": ("lthon", "ahon")}


def _geometry(model):
    cfg = getattr(model.config, "text_config", None) or model.config
    heads = cfg.num_attention_heads
    kv = cfg.num_key_value_heads or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, heads, kv, head_dim


def _attn_modules(model):
    inner = model.model
    if not hasattr(inner, "layers"):
        inner = inner.language_model
    return [layer.self_attn for layer in inner.layers]


def _capture(model, ids: list[int], gates: list[torch.Tensor] | None = None):
    """Run one unpadded sequence with eager attention; return (A per layer, V per layer, O per layer, out).

    A: (H, N, N); V: (Hkv, N, D) float64; O: (H, N, D) float64.
    """
    n_layers, heads, kv, head_dim = _geometry(model)
    attns = _attn_modules(model)
    values: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, attn in enumerate(attns):
        if hasattr(attn, "qkv_proj"):  # Phi-3: q rows, then k rows, then v rows
            def v_hook(mod, inp, out, i=i):
                values[i] = out[0, :, (heads + kv) * head_dim:].detach().double().reshape(-1, kv, head_dim).transpose(0, 1)
            handles.append(attn.qkv_proj.register_forward_hook(v_hook))
        else:
            def v_hook(mod, inp, out, i=i):
                values[i] = out[0].detach().double().reshape(-1, kv, head_dim).transpose(0, 1)
            handles.append(attn.v_proj.register_forward_hook(v_hook))

        def o_hook(mod, args, i=i):
            x = args[0]
            outputs[i] = x[0].detach().double().reshape(-1, heads, head_dim).transpose(0, 1)
            if gates is not None:
                g = gates[i].repeat_interleave(head_dim).to(x.dtype)
                return (x * g,)
            return None
        handles.append(attn.o_proj.register_forward_pre_hook(o_hook))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        x = torch.tensor([ids])
        out = model(input_ids=x, labels=x if gates is not None else None, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()
    probs = [a[0].detach().double() for a in out.attentions]
    return probs, [values[i] for i in range(n_layers)], [outputs[i] for i in range(n_layers)], out


def reference_scores(model, ids: list[int], with_grad: bool = False) -> dict[str, torch.Tensor]:
    """Every score of SCORES.md for one sequence: ``{id: (L, H) float64}``, computed literally."""
    n_layers, heads, kv, head_dim = _geometry(model)
    group = heads // kv
    n = len(ids)
    with torch.no_grad():
        probs, values, outs, _ = _capture(model, ids)
    attns = _attn_modules(model)
    raw = {s: torch.zeros(n_layers, heads, dtype=torch.float64) for s in RAW}
    for layer in range(n_layers):
        a_all, v_all, o_all = probs[layer], values[layer], outs[layer]
        w_o = attns[layer].o_proj.weight.detach().double()  # (hidden, H*D)
        for h in range(heads):
            a = a_all[h]
            v = v_all[h // group]
            o = o_all[h]
            w_h = w_o[:, h * head_dim:(h + 1) * head_dim]
            awft = aeqd = conf = ahon = fhon = 0.0
            for i in range(n):
                awft += float(a[i, 0])
                ent = 0.0
                for j in range(i + 1):
                    p = float(a[i, j])
                    if p > 0:
                        ent -= p * math.log(p)
                aeqd += ent
                conf += float(a[i, : i + 1].max())
                ahon += float(o[i].norm())
                fhon += float((w_h @ o[i]).norm())
            raw["awft"][layer, h] = awft / n
            raw["aeqd"][layer, h] = aeqd / n
            raw["confidence"][layer, h] = conf / n
            raw["ahon"][layer, h] = ahon / n
            raw["fhon"][layer, h] = fhon / n
            raw["ftvvn"][layer, h] = float(v[0].norm())
            raw["avvn"][layer, h] = sum(float(v[j].norm()) for j in range(n)) / n
            raw["lthon"][layer, h] = float(o[n - 1].norm())
    scores = dict(raw)
    for sid, (num, den) in LN.items():
        scores[sid] = raw[num] / raw[den].mean(dim=1, keepdim=True)
    scores["lthon_hn"] = raw["lthon"] / raw["ahon"]
    if with_grad:
        scores["grad"] = reference_grad(model, ids)
    return scores


def reference_grad(model, ids: list[int]) -> torch.Tensor:
    """``|dL/d xi_h|`` with an explicit gate ``xi = 1`` on ``o_proj``'s input; ``L`` = mean token NLL."""
    n_layers, heads, _, _ = _geometry(model)
    gates = [torch.ones(heads, requires_grad=True) for _ in range(n_layers)]
    with torch.enable_grad():
        _, _, _, out = _capture(model, ids, gates=gates)
        grads = torch.autograd.grad(out.loss, gates)
    return torch.stack([g.abs().double() for g in grads])
