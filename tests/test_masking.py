"""Static and dynamic masks against independent references."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import FAMILIES, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prune_heads import calibrate, dynamic_mask, get_adapter, static_mask
from prune_heads.errors import PruneHeadsError
from prune_heads.model.masking import threshold_for_fraction
from prune_heads.scoring.head_scores import HeadScores


def zero_o_proj_columns(model, heads):
    """Reference: a copy whose o_proj input columns of the given heads are zero."""
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    layout = adapter.layout(ref.config)
    with torch.no_grad():
        for layer, h in heads:
            o = adapter.o_proj(adapter.attention(adapter.layers(ref)[layer]))
            o.weight[:, h * layout.head_dim : (h + 1) * layout.head_dim] = 0
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_static_mask_equals_zeroed_o_proj_columns(family):
    model = tiny_model(family, **({"attention_bias": True} if family == "qwen2" else {}))
    heads = [(0, 1), (1, 0), (1, 3)]
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with static_mask(model, heads) as m:
            masked = model(input_ids=ids, attention_mask=mask).logits
        after = model(input_ids=ids, attention_mask=mask).logits
        ref = zero_o_proj_columns(model, heads)(input_ids=ids, attention_mask=mask).logits
    assert m.sum() == 3
    valid = mask.bool()
    torch.testing.assert_close(masked[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert (masked - before).abs().max() > 1e-3  # the mask did something
    torch.testing.assert_close(after, before)  # and leaving the block restores the model


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_static_mask_random_heads(data):
    heads_n = data.draw(st.sampled_from([2, 4, 6]))
    kv = data.draw(st.sampled_from([d for d in (1, 2, heads_n) if heads_n % d == 0]))
    model = tiny_model("llama", layers=2, heads=heads_n, kv_heads=kv, head_dim=8, hidden=8 * heads_n)
    chosen = data.draw(st.sets(st.tuples(st.integers(0, 1), st.integers(0, heads_n - 1)), max_size=2 * heads_n))
    ids = torch.randint(0, 100, (1, data.draw(st.integers(2, 12))))
    with torch.no_grad(), static_mask(model, sorted(chosen)):
        masked = model(ids).logits
    ref = zero_o_proj_columns(model, chosen)(ids).logits
    torch.testing.assert_close(masked, ref, atol=1e-5, rtol=1e-5)


def test_static_mask_under_generate():
    model = tiny_model("qwen3")
    ids = torch.randint(0, 100, (1, 5))
    ref = zero_o_proj_columns(model, [(0, 2), (1, 1)])
    with static_mask(model, [(0, 2), (1, 1)]):
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    expected = ref.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.tolist() == expected.tolist()


# ---- dynamic mode: a naive eager reference ---------------------------------------------------------

def _naive_scores(A, V, out_h, score_id):
    """One sequence, one layer: A (H, N, N), V (H, N, D) per query head, out_h (H, N, D)."""
    H, N, _ = A.shape
    if score_id == "awft":
        return torch.stack([sum(A[h, i, 0] for i in range(N)) / N for h in range(H)])
    ahon = torch.stack([sum(out_h[h, i].norm() for i in range(N)) / N for h in range(H)])
    if score_id == "ahon":
        return ahon
    if score_id == "ahon_ln":
        return ahon / ahon.mean()
    raise KeyError(score_id)


def _register_reference(score_id, threshold, record):
    def attn(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kw):
        B, H, T, D = q.shape
        g = H // k.shape[1]
        k = k.repeat_interleave(g, 1)
        v = v.repeat_interleave(g, 1)
        out = torch.zeros(B, T, H, D)
        for b in range(B):
            real = attention_mask[b, 0].diagonal() if attention_mask is not None else torch.ones(T, dtype=torch.bool)
            idx = real.nonzero().flatten()
            n = len(idx)
            logits = torch.einsum("hid,hjd->hij", q[b][:, idx], k[b][:, idx]) * scaling
            logits = logits.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
            A = logits.softmax(-1)
            out_h = A @ v[b][:, idx]
            s = _naive_scores(A, v[b][:, idx], out_h, score_id)
            inactive = s > threshold if score_id == "awft" else s < threshold
            record.append(inactive.clone())
            out_h = out_h * (~inactive).float()[:, None, None]
            out[b, idx] = out_h.transpose(0, 1)
        return out, None

    AttentionInterface.register("naive_dynamic", attn)
    AttentionMaskInterface.register("naive_dynamic", sdpa_mask)


@pytest.mark.parametrize("family,score_id", [("llama", "awft"), ("qwen2", "ahon_ln"), ("olmo2", "awft"), ("gemma2", "ahon_ln")])
def test_dynamic_mode_equals_naive_reference(family, score_id):
    model = tiny_model(family, layers=3)
    ids = torch.randint(0, 100, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    # a threshold in the middle of the unmasked scores, so some heads are zeroed and some not
    seqs = [ids[b][mask[b].bool()].tolist() for b in range(3)]
    values = calibrate(model, seqs, scores=[score_id], progress=False).per_sample(score_id).flatten().sort().values
    mid = len(values) // 2
    threshold = float(values[mid - 1] + values[mid]) / 2  # between two values: no score sits on it
    record: list[torch.Tensor] = []
    _register_reference(score_id, threshold, record)
    probe = copy.deepcopy(model)
    probe.set_attn_implementation("naive_dynamic")
    with torch.no_grad():
        ref = probe(input_ids=ids, attention_mask=mask).logits
        with dynamic_mask(model, score_id, threshold) as stats:
            got = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=1e-4)
    zeroed = int(sum(r.sum() for r in record))
    assert stats.zeroed == zeroed and stats.total == sum(r.numel() for r in record)
    assert 0 < stats.fraction_zeroed < 1, "threshold should zero some heads and keep others"


def test_threshold_for_fraction_marks_the_fraction():
    torch.manual_seed(0)
    per = torch.rand(50, 4, 5)
    hs = HeadScores({"ahon_ln": per, "awft": per}, {})
    for frac in (0.05, 0.1, 0.3):
        t = threshold_for_fraction(hs, "ahon_ln", frac)
        assert abs(float((per < t).float().mean()) - frac) < 0.01
        t = threshold_for_fraction(hs, "awft", frac)
        assert abs(float((per > t).float().mean()) - frac) < 0.01
    with pytest.raises(PruneHeadsError):
        threshold_for_fraction(hs, "awft", 1.5)


def test_dynamic_mode_rejects_non_forward_score():
    model = tiny_model("llama")
    with pytest.raises(PruneHeadsError, match="forward-pass score"):
        with dynamic_mask(model, "grad", 0.1):
            pass
