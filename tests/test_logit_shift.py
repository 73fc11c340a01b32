"""The KL / loss change from the hidden-state difference equals the direct float64 formula.

``logit_shift`` avoids a per-copy log-softmax by rewriting ``KL(p || q)`` in terms of the logit
shift ``d = W (h_q - h_p)``. The reference here is the textbook formula on float64 logits, over every
regime the rewrite treats differently: quiet heads (tiny ``d``), ordinary ones, copies that move
nearly all of ``p``'s mass (the cancelling ``1 + A + B`` branch), and logit rises large enough to
overflow float32 ``e^d`` or to matter where float32 ``p`` underflowed.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_heads.scoring.logit_shift import LinearHeadReference


def _direct(weight, bias, h_p, h_q, target):
    z_p = (h_p.double() @ weight.double().T) + bias.double()
    z_q = (h_q.double() @ weight.double().T) + bias.double()
    lp, lq = z_p.log_softmax(-1), z_q.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    dloss = lp.gather(-1, target[:, None]).squeeze(-1) - lq.gather(-1, target[:, None]).squeeze(-1)
    return kl, dloss


def _case(seed, vocab, dim, n, shift, weight_scale):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=g) * weight_scale
    bias = torch.randn(vocab, generator=g)
    h_p = torch.randn(n, dim, generator=g) * 3
    h_q = h_p + torch.randn(n, dim, generator=g) * shift
    target = torch.randint(0, vocab, (n,), generator=g)
    return weight, bias, h_p, h_q, target


def _ours(weight, bias, h_p, h_q, target):
    log_p = torch.log_softmax(h_p @ weight.T + bias, -1)  # float32, as the model gives it
    return LinearHeadReference.build(weight, h_p, log_p).effects(h_q, target)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 700), dim=st.integers(1, 24), n=st.integers(1, 40),
       shift=st.sampled_from([0.0, 1e-4, 1e-2, 0.3, 3.0, 30.0]), weight_scale=st.sampled_from([0.1, 1.0]))
def test_matches_direct_formula(seed, vocab, dim, n, shift, weight_scale):
    weight, bias, h_p, h_q, target = _case(seed, vocab, dim, n, shift, weight_scale)
    kl, dloss = _ours(weight, bias, h_p, h_q, target)
    ref_kl, ref_dloss = _direct(weight, bias, h_p, h_q, target)
    # float32 logits (reference and shifted) carry ~6e-8 * |logit| of rounding, as the direct float32
    # formula's do
    logits = torch.cat([h_p, h_q]).double() @ weight.double().T + bias.double()
    scale = 4e-7 * (1 + logits.abs().max())
    assert ((kl - ref_kl).abs() <= scale * (1 + ref_kl)).all(), (kl - ref_kl).abs().max()
    assert ((dloss - ref_dloss).abs() <= scale * (1 + ref_dloss.abs() + ref_kl)).all()
    assert (kl >= -scale).all()


def test_cancelling_branch_when_every_logit_drops():
    """All logits fall by 20: 1 + A + B = e^-20 is the difference of ~20-sized float32 sums."""
    weight, bias, h_p, h_q, target = _case(0, 500, 16, 8, shift=0.0, weight_scale=0.1)
    weight[:, 0] = 1.0  # a direction that moves every logit alike
    h_q = h_p.clone()
    h_q[:, 0] -= 20.0
    h_q[:, 1:] += 0.05 * torch.randn(8, 15, generator=torch.Generator().manual_seed(1))
    kl, dloss = _ours(weight, bias, h_p, h_q, target)
    ref_kl, ref_dloss = _direct(weight, bias, h_p, h_q, target)
    torch.testing.assert_close(kl, ref_kl, rtol=1e-4, atol=1e-5)  # logits ~20: float32 rounding ~1e-6
    torch.testing.assert_close(dloss, ref_dloss, rtol=1e-4, atol=1e-5)


def test_logit_rise_where_p_underflows_float32():
    """Token 1 has p = e^-104 (0 in float32); its logit rises by 88.5 (e^d still finite in float32)."""
    dim, vocab = 4, 6
    weight = torch.zeros(vocab, dim)
    weight[0, 0] = 1.0
    weight[1, 1] = 1.0
    bias = torch.zeros(vocab)
    h_p = torch.tensor([[104.0, 0.0, 0.0, 0.0]])
    h_q = torch.tensor([[104.0, 88.5, 0.0, 0.0]])  # q(1) = e^-15.5
    target = torch.tensor([1])
    kl, dloss = _ours(weight, bias, h_p, h_q, target)
    ref_kl, ref_dloss = _direct(weight, bias, h_p, h_q, target)
    assert ref_kl.item() > 1e-7  # the underflowed token's term is all of it
    torch.testing.assert_close(kl, ref_kl, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(dloss, ref_dloss, rtol=1e-5, atol=1e-6)


def test_vocabulary_and_row_chunks_give_the_same_result(monkeypatch):
    """Small chunk sizes (as a 128k vocabulary or a long batch would get) change nothing."""
    import prune_heads.scoring.logit_shift as ls

    weight, bias, h_p, h_q, target = _case(3, 300, 12, 50, shift=0.3, weight_scale=0.5)
    whole = _ours(weight, bias, h_p, h_q, target)
    monkeypatch.setattr(ls, "VOCAB_CHUNK", 7)
    monkeypatch.setattr(ls, "CHUNK_BYTES", 4 * 300 * 3)  # 3 rows per block -> 32-row floor
    chunked = _ours(weight, bias, h_p, h_q, target)
    ref = _direct(weight, bias, h_p, h_q, target)
    for a, b, r in zip(whole, chunked, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)  # float64 sums: order barely matters
        torch.testing.assert_close(b, r, rtol=1e-4, atol=1e-6)
