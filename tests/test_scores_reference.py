"""Every calibrated score equals the naive eager reference of tests/reference.py (SCORES.md, literally)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_scores
from tiny_models import FAMILIES, tiny_model

from prune_heads import calibrate
from prune_heads.scoring.score_defs import FORWARD_SCORES

RTOL = 1e-4


def _random_seqs(lengths, seed=1, vocab=100):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def _assert_matches(hs, seqs, model, ids=FORWARD_SCORES, with_grad=False):
    for k, seq in enumerate(seqs):
        ref = reference_scores(model, seq, with_grad=with_grad)
        for sid in ids:
            got = hs.per_sample(sid)[k].double()
            torch.testing.assert_close(got, ref[sid], rtol=RTOL, atol=1e-6,
                                       msg=lambda m, sid=sid, k=k: f"{sid} of sequence {k}: {m}")
    # the stored mean is the mean over sequences of the per-sequence (already normalised) value
    for sid in ids:
        torch.testing.assert_close(hs.mean(sid), hs.per_sample(sid).mean(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_score_matches_reference_with_padding(family):
    """GQA (4 query / 2 KV heads), a padded batch mixing lengths; gemma's window (16) is exceeded."""
    model = tiny_model(family)
    seqs = _random_seqs([7, 21, 2, 13])
    hs = calibrate(model, seqs, batch_size=3, progress=False)
    assert set(FORWARD_SCORES) <= set(hs.score_ids)
    assert hs.per_sample("awft").shape == (4, 2, 4)
    _assert_matches(hs, seqs, model)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_batch_equals_each_sequence_alone(family):
    model = tiny_model(family)
    seqs = _random_seqs([5, 19, 11, 2], seed=3)
    together = calibrate(model, seqs, batch_size=4, progress=False)
    for k, seq in enumerate(seqs):
        alone = calibrate(model, [seq], batch_size=1, progress=False)
        for sid in FORWARD_SCORES:
            torch.testing.assert_close(together.per_sample(sid)[k], alone.per_sample(sid)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [1, 3])
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_small_query_blocks_equal_one_block(family, block):
    model = tiny_model(family)
    seqs = _random_seqs([9, 18, 4], seed=5)
    one = calibrate(model, seqs, batch_size=3, block_size=10_000, progress=False)
    small = calibrate(model, seqs, batch_size=3, block_size=block, progress=False)
    for sid in FORWARD_SCORES:
        torch.testing.assert_close(small.per_sample(sid), one.per_sample(sid), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo2", "gemma2", "phi3"])
def test_grad_matches_reference(family):
    model = tiny_model(family)
    seqs = _random_seqs([6, 12, 9], seed=7)
    hs = calibrate(model, seqs, scores=["grad"], batch_size=2, progress=False)
    assert hs.score_ids == ["grad"]
    for k, seq in enumerate(seqs):
        ref = reference_scores(model, seq, with_grad=True)["grad"]
        torch.testing.assert_close(hs.per_sample("grad")[k].double(), ref, rtol=1e-3, atol=1e-7)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(["llama", "qwen3", "gemma3_text"]),
    layers=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    head_dim=st.sampled_from([4, 8, 16]),
    lengths=st.lists(st.integers(2, 24), min_size=1, max_size=4),
    batch_size=st.integers(1, 4),
    block=st.one_of(st.none(), st.integers(1, 7)),
)
def test_shapes_vary(family, layers, kv_heads, group, head_dim, lengths, batch_size, block):
    heads = kv_heads * group
    # llama and gemma3 configs insist that the heads divide the hidden size
    model = tiny_model(family, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, hidden=heads * head_dim)
    seqs = _random_seqs(lengths, seed=len(lengths))
    hs = calibrate(model, seqs, batch_size=batch_size, block_size=block, progress=False)
    assert hs.per_sample("ahon").shape == (len(seqs), layers, heads)
    _assert_matches(hs, seqs, model)


def test_bfloat16_model_accumulates_in_float32():
    model = tiny_model("llama")
    seqs = _random_seqs([12, 8])
    ref = calibrate(model, seqs, progress=False)
    hs = calibrate(model.to(torch.bfloat16), seqs, progress=False)
    assert hs.per_sample("aeqd").dtype == torch.float32
    for sid in FORWARD_SCORES:
        torch.testing.assert_close(hs.per_sample(sid), ref.per_sample(sid), rtol=5e-2, atol=5e-2)


@pytest.mark.slow
def test_real_smollm2_matches_reference(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    texts = ["The capital of France is Paris, a city on the Seine.",
             "In 1905 Einstein published four papers.",
             "def add(a, b):\n    return a + b"]
    seqs = [tok(t).input_ids[:24] for t in texts]
    hs = calibrate(model, seqs, batch_size=3, progress=False)
    assert hs.per_sample("awft").shape == (3, 30, 9)
    _assert_matches(hs, seqs, model)


def test_left_padding_matches_unpadded():
    """The block-wise kernel also handles left padding (a padded query/key never counts)."""
    from prune_heads.model.attention_stats import attention_with_stats

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False
    mask = (torch.tril(torch.ones(9, 9, dtype=torch.bool))[None] & valid[:, None, :])[:, None]
    _, padded = attention_with_stats(q, k, v, mask, 8**-0.5, block=2)
    _, alone = attention_with_stats(q[1:, :, 3:], k[1:, :, 3:], v[1:, :, 3:], None, 8**-0.5)
    for sid in ("awft", "aeqd", "confidence", "ahon", "lthon", "avvn", "ftvvn"):
        torch.testing.assert_close(padded[sid][1], alone[sid][0], rtol=1e-5, atol=1e-6)
