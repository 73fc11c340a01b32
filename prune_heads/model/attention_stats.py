"""Attention output plus every forward score's per-sequence statistic, query block by query block.

The full ``(B, H, T, T)`` probability matrix is never held: each block of ``block`` queries costs
``O(B·H·block·S)`` extra memory, and statistics are reduced into ``(B, H)`` float32 accumulators before
the next block. The first-token weight, entropy and max weight all come from the block's logits and
its row log-sum-exp.
"""

from __future__ import annotations

import torch

#: elements of one float32 logits block (8 MiB): the block size adapts to B, H and S. Kept under glibc's
#: mmap threshold (32 MiB at most) so blocks reuse heap memory instead of page-faulting fresh pages each
#: time, which on CPU cost more than the arithmetic (benchmarks/bench_calibration.py).
BLOCK_ELEMENTS = 1 << 21


def pick_block(batch: int, heads: int, q_len: int, kv_len: int, block: int | None = None) -> int:
    if block:
        return max(1, min(block, q_len))
    per_query = max(1, batch * heads * kv_len)
    return max(16, min(q_len, BLOCK_ELEMENTS // per_query))


def validity(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys and queries are real tokens, read from the 4-D boolean mask.

    A padded key is masked for every query, including its own position, so the diagonal of the
    (offset) mask tells which positions are real. Returns ``key_valid (B, S)`` and ``query_valid (B, T)``.
    """
    if attention_mask is None:
        key_valid = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    else:
        m = attention_mask[:, 0]
        offset = kv_len - q_len
        if offset == 0:
            key_valid = torch.diagonal(m, dim1=-2, dim2=-1)
        else:
            # decoding with a cache: the last query sees every real key up to itself
            key_valid = m[:, -1, :].clone()
            key_valid[:, offset:] = torch.diagonal(m[:, :, offset:], dim1=-2, dim2=-1)
        key_valid = key_valid.expand(batch, kv_len)
    query_valid = key_valid[:, kv_len - q_len :]
    return key_valid, query_valid


def _allowed_block(attention_mask: torch.Tensor | None, t0: int, t1: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """``(B|1, 1, tb, S)`` boolean: may query ``t`` attend to key ``s``."""
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask == 0
        return attention_mask[:, :, t0:t1, :]
    offset = kv_len - q_len
    q_pos = torch.arange(t0, t1, device=device)[:, None] + offset
    k_pos = torch.arange(kv_len, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


def attention_with_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    o_gram: torch.Tensor | None = None,
    softcap: float | None = None,
    block: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Exact attention and per-sequence raw statistics for one layer.

    Args:
        query: ``(B, Hq, T, D)``; key/value: ``(B, Hkv, S, D)`` (not repeated for GQA).
        attention_mask: boolean ``(B, 1, T, S)`` (True = attend) or None for plain causal.
        o_gram: ``(Hq, D, D)`` = ``W_O^hᵀ W_O^h`` per head, for the full head-output norm; the norm of
            ``W_O^h O`` is ``sqrt(Oᵀ G O)``, which avoids a ``(B, H, T, hidden)`` tensor.
    Returns:
        ``(attn_output (B, T, Hq, D) in the query dtype, stats)`` where stats maps each raw score id
        (plus ``n_tokens``, the real queries, and ``n_keys``, the real keys) to a ``(B, Hq)`` float32 tensor.
    """
    bsz, hq, q_len, dim = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    groups = hq // hkv
    device = query.device
    key_valid, query_valid = validity(attention_mask, bsz, q_len, kv_len, device)
    n_tokens = query_valid.sum(-1).clamp_min(1).float()  # (B,)
    first = key_valid.float().argmax(-1)  # index of token 0 (first real token)
    last = q_len - 1 - query_valid.flip(-1).float().argmax(-1)  # last real query

    k32 = key.float()
    v32 = value.float()
    # value-vector statistics depend only on the KV head
    v_norm = v32.norm(dim=-1)  # (B, Hkv, S)
    avvn = (v_norm * key_valid[:, None, :]).sum(-1) / key_valid.sum(-1).clamp_min(1)[:, None].float()
    ftvvn = v_norm.gather(-1, first.view(bsz, 1, 1).expand(bsz, hkv, 1)).squeeze(-1)

    acc = {k: torch.zeros(bsz, hkv, groups, device=device) for k in ("awft", "aeqd", "ahon", "fhon", "confidence", "lthon")}
    out = torch.empty(bsz, q_len, hq, dim, dtype=query.dtype, device=device)
    gram = o_gram.float().view(hkv, groups, dim, dim) if o_gram is not None else None
    step = pick_block(bsz, hq, q_len, kv_len, block)
    first_idx = first.view(bsz, 1, 1, 1, 1)

    # Causal attention: queries [t0, t1) see no key past t1 + offset, so each block only computes
    # logits for keys [0, t1 + offset), halving the quadratic work. Masked logits get the most negative
    # finite float instead of -inf: exp gives exactly 0 and 0 * d stays 0 (no NaN) in the entropy.
    # In-place ops keep one logits-sized buffer plus the exponentials; autograd (gemma-2 soft-capping
    # under a backward pass) needs the out-of-place forms.
    inplace = not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
    offset = kv_len - q_len
    fill = torch.finfo(torch.float32).min
    q_scale = scaling / softcap if softcap else scaling
    for t0 in range(0, q_len, step):
        t1 = min(q_len, t0 + step)
        tb = t1 - t0
        kv_end = t1 + offset
        qb = query[:, :, t0:t1].float().view(bsz, hkv, groups, tb, dim) * q_scale
        logits = torch.einsum("bkgtd,bksd->bkgts", qb, k32[:, :, :kv_end])
        if softcap:
            logits = logits.tanh_().mul_(softcap) if inplace else torch.tanh(logits) * softcap
        if attention_mask is None:  # plain causal: only the diagonal tb x tb corner is masked
            corner = torch.ones(tb, tb, dtype=torch.bool, device=device).triu_(1)
            if inplace:
                logits[..., kv_end - tb :].masked_fill_(corner, fill)
            else:
                blocked = torch.cat([torch.zeros(tb, kv_end - tb, dtype=torch.bool, device=device), corner], -1)
                logits = logits.masked_fill(blocked, fill)
        else:
            blocked = ~_allowed_block(attention_mask, t0, t1, q_len, kv_len, device)[..., :kv_end].unsqueeze(1)
            logits = logits.masked_fill_(blocked, fill) if inplace else logits.masked_fill(blocked, fill)
        # shift by the row max: d <= 0 with the max at exactly 0, so the max weight is 1/z and the entropy
        # log(z) - sum p*d is a sum of two non-negative terms (lse - sum p*logit loses |logit|*eps)
        row_max, arg_max = logits.max(-1, keepdim=True)
        shifted = logits.sub_(row_max) if inplace else logits - row_max
        del logits
        expd = torch.exp(shifted)  # unnormalised probabilities; dividing the small results by z is cheaper
        ob = torch.einsum("bkgts,bksd->bkgtd", expd, v32[:, :, :kv_end])
        # (a real query always sees its first token; the clamp only guards left-padded rows)
        first_w = expd.gather(-1, first_idx.clamp(max=kv_end - 1).expand(bsz, hkv, groups, tb, 1)).squeeze(-1)
        # sum_j p_j * d_j as a batched dot product: no second block-sized temporary (the max adds 0)
        p_dot_d = torch.matmul(expd.unsqueeze(-2), shifted.unsqueeze(-1)).view(bsz, hkv, groups, tb)
        # z = 1 + eps with eps the sum of the non-maximum terms, summed on its own: for a peaked head
        # z rounds to 1 and log(z) would keep none of eps's digits; log1p(eps) keeps them all
        expd = expd.scatter_(-1, arg_max, 0.0) if inplace else expd.scatter(-1, arg_max, 0.0)
        eps = expd.sum(-1)  # (B,Hkv,g,tb)
        z = 1.0 + eps
        ob = ob / z.unsqueeze(-1)
        out[:, t0:t1] = ob.reshape(bsz, hq, tb, dim).transpose(1, 2).to(query.dtype)

        qv = query_valid[:, t0:t1].float().view(bsz, 1, 1, tb)
        acc["awft"] += (first_w / z * qv).sum(-1)
        ent = torch.log1p(eps) - p_dot_d / z
        acc["aeqd"] += (ent * qv).sum(-1)
        acc["confidence"] += (qv / z).sum(-1)
        o_norm = ob.norm(dim=-1)
        acc["ahon"] += (o_norm * qv).sum(-1)
        if gram is not None:
            proj = torch.einsum("bkgtd,kgde->bkgte", ob, gram)
            quad = (proj * ob).sum(-1)
            acc["fhon"] += (quad.clamp_min(0).sqrt() * qv).sum(-1)
        in_block = ((last >= t0) & (last < t1)).view(bsz, 1, 1)
        idx = (last - t0).clamp(0, tb - 1).view(bsz, 1, 1, 1).expand(bsz, hkv, groups, 1)
        acc["lthon"] = torch.where(in_block, o_norm.gather(-1, idx).squeeze(-1), acc["lthon"])
        del shifted, expd, ob

    stats = {k: v.reshape(bsz, hq) for k, v in acc.items()}
    for k in ("awft", "aeqd", "ahon", "fhon", "confidence"):
        stats[k] = stats[k] / n_tokens[:, None]
    stats["avvn"] = avvn.repeat_interleave(groups, dim=1)
    stats["ftvvn"] = ftvvn.repeat_interleave(groups, dim=1)
    stats["n_tokens"] = n_tokens[:, None].expand(bsz, hq)
    # more real keys than queries: a decoding step over a KV cache (the dynamic mode tells the two apart)
    stats["n_keys"] = key_valid.sum(-1).float()[:, None].expand(bsz, hq)
    if gram is None:
        stats.pop("fhon")
    return out, stats


def o_proj_gram(o_weight: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """``(H, D, D)`` Gram matrices of each head's ``o_proj`` columns, in float32."""
    w = o_weight.float().view(o_weight.shape[0], num_heads, head_dim).permute(1, 0, 2)  # (H, hidden, D)
    return torch.einsum("hod,hoe->hde", w, w)
