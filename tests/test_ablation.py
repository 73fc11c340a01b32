"""Batched ablation scores equal the same head ablated alone in a separate full forward pass."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import FAMILIES, tiny_model

from prune_heads.errors import PruneHeadsError
from prune_heads.model.masking import static_mask
from prune_heads.scoring.ablation import ablation_scores, measure_units


def _pad(seqs):
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def reference(model, seqs, sets):
    """Independent reference: one full forward per head set, each sequence alone (no padding)."""
    kl = torch.zeros(len(seqs), len(sets))
    dloss = torch.zeros(len(seqs), len(sets))
    with torch.no_grad():
        for n, s in enumerate(seqs):
            ids = torch.tensor([s])
            ref = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            for j, heads in enumerate(sets):
                with static_mask(model, heads):
                    out = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
                kl[n, j] = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                      reduction="none").sum(-1).mean()
                tgt = ids[0, 1:]
                dloss[n, j] = (torch.nn.functional.cross_entropy(out, tgt) - torch.nn.functional.cross_entropy(ref, tgt))
    return kl, dloss


def _seqs(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_separate_forward(family):
    model = tiny_model(family, layers=3)
    seqs = _seqs(0, (11, 6, 11, 3))
    hs = ablation_scores(model, seqs, batch_size=3, progress=False)
    L, H = 3, model.config.num_attention_heads
    heads = [(i, h) for i in range(L) for h in range(H)]
    kl, dloss = reference(model, seqs, [[x] for x in heads])
    got_kl = torch.stack([hs.per_sample("ablation_kl")[:, i, h] for i, h in heads], 1)
    got_loss = torch.stack([hs.per_sample("ablation_loss")[:, i, h] for i, h in heads], 1)
    torch.testing.assert_close(got_kl, kl, atol=2e-6, rtol=1e-3)
    torch.testing.assert_close(got_loss, dloss, atol=2e-5, rtol=1e-3)
    assert hs.meta["ablation"]["cost"]["prefix_reuse"] is True
    # the prefix reuse really ran fewer layers than one full forward per head
    assert hs.meta["ablation"]["cost"]["forward_equivalents"] < hs.meta["ablation"]["naive_forward_equivalents"]


@settings(max_examples=6, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 9), min_size=1, max_size=4),
    removed_bits=st.lists(st.booleans(), min_size=8, max_size=8),
    per_pass=st.integers(1, 5),
    batch=st.integers(1, 3),
)
def test_removed_and_chunking_match_reference(lengths, removed_bits, per_pass, batch):
    model = tiny_model("qwen2", layers=2, heads=4, kv_heads=2)
    seqs = _seqs(1, lengths)
    removed = torch.tensor(removed_bits).view(2, 4)
    removed[:, 0] = False  # keep layers non-empty so every head stays measurable
    cand = [(0, 0), (0, 2), (1, 0), (1, 1), (1, 3)]
    hs = ablation_scores(model, seqs, candidates=cand, removed=removed, batch_size=batch, heads_per_pass=per_pass,
                         progress=False)
    kl = hs.per_sample("ablation_kl")
    base = [tuple(x) for x in removed.nonzero().tolist()]
    measured = [x for x in cand if not removed[x]]
    ref_kl, _ = reference(model, seqs, [[x, *base] for x in measured])
    for j, (i, h) in enumerate(measured):
        torch.testing.assert_close(kl[:, i, h], ref_kl[:, j], atol=2e-6, rtol=1e-3)
    for i in range(2):
        for h in range(4):
            if (i, h) not in measured:
                assert torch.isnan(kl[:, i, h]).all()
                assert math.isnan(float(hs.mean("ablation_kl")[i, h]))


def test_multi_head_units_across_layers():
    model = tiny_model("llama", layers=3)
    seqs = _seqs(2, (8, 5))
    units = [[(0, 1), (2, 3)], [(1, 0), (1, 2)], [(2, 0)]]
    vals, cost = measure_units(model, seqs, units, scores=["ablation_kl"], progress=False)
    ref_kl, _ = reference(model, seqs, units)
    torch.testing.assert_close(vals["ablation_kl"], ref_kl, atol=2e-6, rtol=1e-3)
    assert cost.passes == 3  # one batch, one pass per start layer (0, 1, 2)


def test_calibrate_computes_ablation_ids():
    from prune_heads.scoring.calibrate import calibrate

    model = tiny_model("llama", layers=2)
    seqs = _seqs(3, (7, 7))
    hs = calibrate(model, seqs, scores=["awft", "ablation_kl"], progress=False)
    assert set(hs.score_ids) >= {"awft", "ablation_kl"}
    assert hs.per_sample("ablation_kl").shape == (2, 2, 4)
    direct = ablation_scores(model, seqs, scores=["ablation_kl"], progress=False)
    torch.testing.assert_close(hs.mean("ablation_kl"), direct.mean("ablation_kl"))


def test_bad_inputs_are_clear():
    model = tiny_model("llama", layers=2)
    with pytest.raises(PruneHeadsError, match="at least 2 tokens"):
        ablation_scores(model, [[1]], progress=False)
    with pytest.raises(PruneHeadsError, match="heads_per_pass"):
        ablation_scores(model, [[1, 2, 3]], heads_per_pass=0, progress=False)
    with pytest.raises(PruneHeadsError, match="outside the model"):
        ablation_scores(model, [[1, 2, 3]], candidates=[(5, 0)], progress=False)


def test_out_of_memory_chunks_automatically_or_says_what_to_set(monkeypatch):
    import prune_heads.scoring.ablation as ab

    model = tiny_model("llama", layers=2)
    seqs = _seqs(4, (6, 6))
    expected = ablation_scores(model, seqs, scores=["ablation_kl"], progress=False).per_sample("ablation_kl")
    real_run = ab._Measurer.run
    sizes = []

    def run(self, units, want, cost):
        sizes.append(len(units))
        if len(units) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self, units, want, cost)

    monkeypatch.setattr(ab._Measurer, "run", run)
    got = ablation_scores(model, seqs, scores=["ablation_kl"], progress=False)
    torch.testing.assert_close(got.per_sample("ablation_kl"), expected)
    assert got.meta["ablation"]["cost"]["heads_per_pass"] == 1 and max(sizes) == 4
    with pytest.raises(PruneHeadsError, match=r"set heads_per_pass \(--heads-per-pass\) to 2"):
        ablation_scores(model, seqs, scores=["ablation_kl"], heads_per_pass=4, progress=False)
