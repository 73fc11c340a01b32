"""The live compensation (o_proj hooks) against a copy of the model whose o_proj weights were changed by
hand, in every family; the model is restored on exit; sequential mode against a naive layer loop."""

from __future__ import annotations

import copy

import pytest
import torch
from compensation_reference import attn_modules, dims
from tiny_models import FAMILIES, tiny_model

from prune_heads.compensation import (
    CompensationSpec,
    Compensator,
    apply_compensation,
    collect_moments,
    compute_compensation,
    fold_into_model,
)
from prune_heads.errors import PruneHeadsError
from prune_heads.model.masking import static_mask

SEQS = [[1, 5, 9, 13, 2, 7, 30, 4, 8, 8], [1, 8, 8, 4, 17], [1, 60, 3, 17, 22, 5, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 9, 9, 31, 44, 2, 6, 70, 71, 72, 3]]


def hand_folded(model, comp):
    """A copy whose o_proj weights are W_K + W_R A on the kept columns, 0 on the removed ones, plus a bias
    b + W_R c (built here from A and c, not with ``LayerCompensation.fold``)."""
    ref = copy.deepcopy(model)
    for i, lc in comp.layers.items():
        o = attn_modules(ref)[i].o_proj
        w = o.weight.detach().double()
        r, k = dims(lc.removed, lc.head_dim), dims(lc.kept, lc.head_dim)
        new = torch.zeros_like(w)
        a = lc.weight if lc.weight is not None else torch.zeros(len(r), len(k), dtype=torch.float64)
        new[:, k] = w[:, k] + w[:, r] @ a
        bias = (o.bias.detach().double() if o.bias is not None else 0) + w[:, r] @ lc.offset
        with torch.no_grad():
            o.weight.copy_(new.to(o.weight.dtype))
            o.bias = torch.nn.Parameter(bias.to(o.weight.dtype), requires_grad=False)
    return ref


def inputs():
    ids = torch.tensor([[1, 7, 3, 99, 42, 7, 8, 9], [1, 5, 6, 2, 0, 0, 0, 0]])
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["lsq", "mean"])
def test_hooks_equal_hand_folded_weights(family, mode):
    model = tiny_model(family, layers=2, heads=4, kv_heads=2).double()
    moments = collect_moments(model, SEQS, batch_size=2, progress=False)
    heads = [(0, 1), (1, 0), (1, 1)]  # a whole KV group of layer 1
    mask = torch.zeros(2, 4, dtype=torch.bool)
    for i, h in heads:
        mask[i, h] = True
    comp = compute_compensation(mask, CompensationSpec(mode, ridge=1e-3), moments=moments)
    ids, am = inputs()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=am).logits
        with static_mask(model, heads, compensation=comp):
            live = model(input_ids=ids, attention_mask=am).logits
        after = model(input_ids=ids, attention_mask=am).logits
        # the references run under the same (no-op) mask so that they take the same attention path
        ref_model, folded_model = hand_folded(model, comp), fold_into_model(copy.deepcopy(model), comp)
        with static_mask(ref_model, heads):
            ref = ref_model(input_ids=ids, attention_mask=am).logits
        with static_mask(folded_model, heads):
            folded = folded_model(input_ids=ids, attention_mask=am).logits
        with static_mask(model, heads):
            zeroed = model(input_ids=ids, attention_mask=am).logits
    keep = am.bool()
    torch.testing.assert_close(live[keep], ref[keep], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(folded[keep], ref[keep], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(after, before)  # leaving the block restores the model
    assert float((live - zeroed)[keep].abs().max()) > 1e-4  # compensation changed something


def test_compensated_generate_matches_folded_copy():
    model = tiny_model("qwen3", layers=2).double()
    moments = collect_moments(model, SEQS, progress=False)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = True
    comp = compute_compensation(mask, "lsq", moments=moments)
    ids = torch.tensor([[1, 5, 17, 3, 4]])
    with static_mask(model, mask, compensation=comp):
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
    want = hand_folded(model, comp).generate(ids, max_new_tokens=6, do_sample=False)
    assert got.tolist() == want.tolist()


def test_mismatched_compensation_is_refused():
    model = tiny_model("llama", layers=2)
    moments = collect_moments(model, SEQS, progress=False)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 2] = True
    comp = compute_compensation(mask, "lsq", moments=moments)
    with pytest.raises(PruneHeadsError, match="other removed heads"):
        with static_mask(model, [(1, 1)], compensation=comp):
            pass
    with pytest.raises(PruneHeadsError, match="another model"):
        with apply_compensation(tiny_model("llama", layers=3), comp):
            pass


# ---- sequential ------------------------------------------------------------------------------------

def naive_sequential(model, seqs, mask, spec):
    """Layer l solved from the moments of full forwards of the model whose layers < l are compensated
    (one full forward pass per layer: no cached hidden states, no layer replay)."""
    from prune_heads.compensation import Compensation

    plain = CompensationSpec(spec.mode, ridge=spec.ridge)
    L, H = mask.shape
    layers = {}
    for layer in range(L):
        if not mask[layer].any():
            continue
        so_far = Compensation(plain, dict(layers), L, H, attn_modules(model)[0].head_dim)
        with apply_compensation(model, so_far):
            moments = collect_moments(model, seqs, batch_size=1, progress=False)
        only = torch.zeros_like(mask)
        only[layer] = mask[layer]
        layers[layer] = compute_compensation(only, plain, moments=moments).layers[layer]
    return layers


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3", "olmo2"])
@pytest.mark.parametrize("mode", ["lsq", "mean"])
def test_sequential_equals_naive_layer_loop(family, mode):
    model = tiny_model(family, layers=3, heads=4, kv_heads=2).double()
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, [1, 2]] = True
    mask[2, [0]] = True  # layer 1 untouched: its statistics still change under layer 0's compensation
    spec = CompensationSpec(mode, sequential=True, ridge=1e-3)
    comp = Compensator(spec, model=model, seqs=SEQS, batch_size=2)(mask)
    want = naive_sequential(model, SEQS, mask, spec)
    assert set(comp.layers) == set(want) == {0, 2}
    for i, lc in want.items():
        torch.testing.assert_close(comp.layers[i].offset, lc.offset, rtol=1e-7, atol=1e-9)
        if lc.weight is not None:
            torch.testing.assert_close(comp.layers[i].weight, lc.weight, rtol=1e-7, atol=1e-9)
    # and it differs from the non-sequential solve where earlier layers changed the statistics
    plain = compute_compensation(mask, CompensationSpec(mode, ridge=1e-3),
                                 moments=collect_moments(model, SEQS, progress=False))
    torch.testing.assert_close(plain.layers[0].offset, comp.layers[0].offset, rtol=1e-7, atol=1e-9)
    assert float((plain.layers[2].offset - comp.layers[2].offset).abs().max()) > 1e-6
    assert comp.statistics["sequential"] is True


def test_sequential_reuses_its_captured_inputs_across_masks():
    model = tiny_model("qwen2", layers=2).double()
    spec = CompensationSpec("lsq", sequential=True, ridge=1e-3)
    comp = Compensator(spec, model=model, seqs=SEQS)
    a = torch.zeros(2, 4, dtype=torch.bool)
    a[0, 1] = True
    b = a.clone()
    b[1, 2] = True
    comp(a)
    captured = comp._replay["captured"]
    got = comp(b)
    assert comp._replay["captured"] is captured
    fresh = Compensator(spec, model=model, seqs=SEQS)(b)
    for i in (0, 1):
        torch.testing.assert_close(got.layers[i].weight, fresh.layers[i].weight)
