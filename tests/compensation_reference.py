"""Naive references for the compensation tests: one unpadded sequence at a time, stacked activations,
``torch.linalg.lstsq``. Nothing here uses ``prune_heads.compensation``."""

from __future__ import annotations

import torch


def attn_modules(model):
    inner = model.model
    if not hasattr(inner, "layers"):
        inner = inner.language_model
    return [layer.self_attn for layer in inner.layers]


@torch.no_grad()
def stacked_inputs(model, seqs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: every token's ``o_proj`` input ``(N, n)`` and residual stream entering the layer ``(N, d)``,
    float64, one unpadded sequence at a time (hidden states from ``output_hidden_states``)."""
    attns = attn_modules(model)
    xs: list[list[torch.Tensor]] = [[] for _ in attns]
    handles = []
    for i, a in enumerate(attns):
        def hook(mod, args, i=i):
            xs[i].append(args[0][0].detach().double())
        handles.append(a.o_proj.register_forward_pre_hook(hook))
    hs: list[list[torch.Tensor]] = [[] for _ in attns]
    try:
        for s in seqs:
            out = model(input_ids=torch.tensor([s]), output_hidden_states=True, use_cache=False)
            for i in range(len(attns)):
                hs[i].append(out.hidden_states[i][0].detach().double())
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(h) for h in hs]


def lstsq_fit(inputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``target ~ inputs @ coef.T + bias`` by ``torch.linalg.lstsq`` with an intercept column; returns
    ``(coef, bias, mean squared residual norm per row)``."""
    n = inputs.shape[0]
    design = torch.cat([inputs, torch.ones(n, 1, dtype=inputs.dtype)], 1)
    sol = torch.linalg.lstsq(design, target).solution
    resid = target - design @ sol
    return sol[:-1].T, sol[-1], float(resid.pow(2).sum() / n)


def dims(heads, head_dim):
    return [h * head_dim + d for h in heads for d in range(head_dim)]
