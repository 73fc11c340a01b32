"""Fingerprints detect a change to any tensor, from a loaded model or a streamed checkpoint, and tolerate
exactly the rounding of another dtype (class 4)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

from prune_heads.errors import ModelMismatchError
from prune_heads.export.streaming import iter_tensors, open_source
from prune_heads.model.fingerprint import (
    FORMAT,
    FingerprintCheck,
    check_config,
    check_fingerprint,
    fingerprint,
    fingerprint_digest,
    fingerprint_stream,
    model_tensors,
)


def _same(a: torch.nn.Module, b: torch.nn.Module, at: torch.dtype | None = None) -> bool:
    """Reference: every tensor equal, after rounding both to ``at`` when given."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    for k in sa:
        x, y = sa[k], sb[k]
        if at is not None and x.is_floating_point():
            x, y = x.to(at), y.to(at)
        if x.shape != y.shape or not torch.equal(x, y):
            return False
    return True


def _accepts(recorded, model) -> bool:
    try:
        check_fingerprint(recorded, model, "this plan")
        return True
    except ModelMismatchError:
        return False


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_checkpoint_matches_loaded_model(family, tmp_path):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "m")
    src = open_source(tmp_path / "m")
    fp = fingerprint(model)
    assert fp["format"] == FORMAT and len(fp["tensors"]) == len(list(model_tensors(model)))
    streamed = fingerprint_stream(model.config, iter_tensors(src, progress=False))
    assert streamed == fp
    check = FingerprintCheck(fp, "this plan")
    for name, t in iter_tensors(src, progress=False):
        check.add(name, t)
    check.finish()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    check_fingerprint(fp, loaded, "this plan")


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_single_change_anywhere_is_detected(data):
    model = tiny_model("qwen3", layers=2)
    fp = fingerprint(model)
    names = [n for n, _, _ in model_tensors(model)]
    name = data.draw(st.sampled_from(names))
    other = copy.deepcopy(model)
    t = other.state_dict()[name]
    i = data.draw(st.integers(0, t.numel() - 1))
    how = data.draw(st.sampled_from(["ulp", "sign", "big", "same"]))
    with torch.no_grad():
        flat = t.view(-1)
        if how == "ulp":
            flat[i] = torch.nextafter(flat[i], torch.tensor(float("inf")))
        elif how == "sign":
            flat[i] = -flat[i]
        elif how == "big":
            flat[i] += 1.0
    assert _accepts(fp, other) == _same(model, other)


@settings(max_examples=40, deadline=None)
@given(rec=st.sampled_from(["float32", "bfloat16", "float16"]), cur=st.sampled_from(["float32", "bfloat16", "float16"]),
       scale=st.sampled_from([0.0, 1e-6, 1e-3, 1e-1, 1.0]), seed=st.integers(0, 3))
def test_other_dtype_accepted_exactly_when_the_rounding_agrees(rec, cur, scale, seed):
    """Record on the model in ``rec``, check the same (or slightly changed) model loaded in ``cur``: accepted
    iff both agree after rounding to the coarser dtype (the reference); a change that survives it is refused."""
    base = tiny_model("llama", seed=seed)
    recorded_model = copy.deepcopy(base).to(getattr(torch, rec))
    fp = fingerprint(recorded_model)
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.model.layers[1].self_attn.o_proj.weight[2, 3] += scale
    current = changed.to(getattr(torch, cur))
    order = ["float32", "float16", "bfloat16"]
    at = getattr(torch, max(rec, cur, key=order.index))
    if {rec, cur} == {"float16", "bfloat16"}:
        expected = _same(recorded_model.to(torch.bfloat16), current.to(torch.bfloat16))
    else:
        expected = _same(recorded_model, current, at=at)
    assert _accepts(fp, current) == expected
    if scale == 0.0 and {rec, cur} != {"float16", "bfloat16"}:
        assert expected  # the same checkpoint in another dtype is always accepted
    if scale >= 1e-1:
        assert not expected  # a real change is always refused


def test_same_checkpoint_loaded_in_bfloat16_and_float16(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    fp = fingerprint(model)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        check_fingerprint(fp, AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype), "this plan")
    # a bfloat16 checkpoint: recorded in bfloat16, loaded (upcast) in float32
    model.to(torch.bfloat16).save_pretrained(tmp_path / "b")
    bf = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.bfloat16)
    fp_bf = fingerprint(bf)
    check_fingerprint(fp_bf, AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32), "this plan")
    src = open_source(tmp_path / "b")  # and export's stream of the bfloat16 checkpoint against a float32 record
    check = FingerprintCheck(fingerprint(AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32)), "p")
    for name, t in iter_tensors(src, progress=False):
        check.add(name, t)
    check.finish()


def test_another_model_of_the_same_shape_is_refused():
    fp = fingerprint(tiny_model("llama", seed=0))
    assert fingerprint_digest(fp) == fingerprint_digest(fingerprint(tiny_model("llama", seed=0)))
    assert fingerprint_digest(fp) != fingerprint_digest(fingerprint(tiny_model("llama", seed=1)))
    with pytest.raises(ModelMismatchError, match="different weights: tensor"):
        check_fingerprint(fp, tiny_model("llama", seed=1), "this plan")
    with pytest.raises(ModelMismatchError, match="different architecture"):
        check_fingerprint(fp, tiny_model("llama", layers=3), "this plan")
    with pytest.raises(ModelMismatchError, match="different architecture"):
        check_config(fp, tiny_model("llama", layers=3).config, "this plan")


def test_streamed_check_stops_at_the_first_changed_tensor(tmp_path):
    model = tiny_model("llama")
    fp = fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    model.save_pretrained(tmp_path / "m")
    check = FingerprintCheck(fp, "this plan")
    seen = []
    with pytest.raises(ModelMismatchError, match="model.layers.1.mlp.up_proj.weight"):
        for name, t in iter_tensors(open_source(tmp_path / "m"), progress=False):
            seen.append(name)
            check.add(name, t)
    assert seen[-1] == "model.layers.1.mlp.up_proj.weight"


def test_tied_embeddings(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    fp = fingerprint(model)
    assert "lm_head.weight" not in fp["tensors"] and "model.embed_tokens.weight" in fp["tensors"]
    model.save_pretrained(tmp_path / "m")
    check = FingerprintCheck(fp, "p")
    for name, t in iter_tensors(open_source(tmp_path / "m"), progress=False):
        check.add(name, t)
    check.add("lm_head.weight", model.lm_head.weight)  # a checkpoint that stores the tie twice
    check.finish()
    check = FingerprintCheck(fp, "p")
    for name, t in iter_tensors(open_source(tmp_path / "m"), progress=False):
        check.add(name, t)
    check.add("lm_head.weight", torch.zeros_like(model.lm_head.weight))  # an untied, different head
    with pytest.raises(ModelMismatchError, match="without tensors this one has.*lm_head"):
        check.finish()


def test_missing_tensor_is_refused():
    model = tiny_model("llama")
    fp = fingerprint(model)
    check = FingerprintCheck(fp, "p")
    for name, t, _ in model_tensors(model):
        if name != "model.norm.weight":
            check.add(name, t)
    with pytest.raises(ModelMismatchError, match="tensors this one lacks.*model.norm.weight"):
        check.finish()


def test_old_format_and_hand_written():
    model = tiny_model("llama")
    check_fingerprint(None, model, "this plan")  # hand-written: nothing to check
    check_fingerprint({}, model, "this plan")
    legacy = {"config": fingerprint(model)["config"], "weights": [0.1] * 64}
    for call in (lambda: check_fingerprint(legacy, model, "this plan"), lambda: check_config(legacy, model, "this plan")):
        with pytest.raises(ModelMismatchError, match="old-style fingerprint.*make it again.*delete its \"fingerprint\" key"):
            call()
    with pytest.raises(ModelMismatchError, match="unknown format"):
        check_fingerprint({"format": "x/9", "config": fingerprint(model)["config"], "tensors": {}}, model, "p")


@settings(max_examples=60, deadline=None)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64), src=st.sampled_from(["float32", "float16"]))
def test_numpy_rounding_is_torch_rounding_bit_for_bit(bits, src):
    """The one-thread numpy path of rounded_hash gives the bytes torch's .to() gives, specials included
    (NaN payloads aside: any NaN weight is refused as a change anyway)."""
    import numpy as np

    from prune_heads.model.fingerprint import rounded_hash, tensor_hash

    t = torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32).copy())
    specials = torch.tensor([0.0, -0.0, 1e-45, 3.4e38, float("inf"), -float("inf"), 65504.0, 65520.0, 2**-24, 2**-25,
                             1.00390625, 1.01171875, -1.0009765625])
    t = torch.cat([t[~t.isnan()], specials]).to(getattr(torch, src))
    for to in ("bfloat16", "float16"):
        if to != src:
            assert rounded_hash(t, to) == tensor_hash(t.to(getattr(torch, to)))


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       rows=st.integers(1, 40), cols=st.integers(1, 9), cuts=st.lists(st.integers(0, 40), max_size=5),
       seed=st.integers(0, 2**16), scale=st.sampled_from([1.0, 1e-3, 7e4]))
def test_a_record_from_row_blocks_equals_the_whole_tensors(dtype, rows, cols, cuts, seed, scale):
    """``tensor_record_chunks`` (the layer-by-layer engine's embedding and LM head, read in row blocks) gives
    ``tensor_record``'s hashes of the whole tensor, exact and at every coarser rounding (float32 -> float16
    overflows to inf above 65504 on both paths), wherever the blocks are cut."""
    from prune_heads.model.fingerprint import tensor_record, tensor_record_chunks

    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g, dtype=torch.float64) * scale
    t = (t.clamp(-6e4, 6e4) if dtype == torch.float16 else t).to(dtype)  # a finite source
    edges = sorted({0, rows, *(c for c in cuts if c <= rows)})
    blocks = [t[a:b] for a, b in zip(edges, edges[1:])]
    assert tensor_record_chunks(dtype, [rows, cols], iter(blocks)) == tensor_record(t)


def test_a_non_finite_row_block_is_refused_as_the_whole_tensor_is():
    from prune_heads.errors import NonFiniteError
    from prune_heads.model.fingerprint import FingerprintBuilder, tensor_record_chunks

    t = torch.zeros(6, 3)
    t[4, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="tensor lm_head.weight") as whole:
        FingerprintBuilder(tiny_model("llama").config).add("lm_head.weight", t)
    with pytest.raises(NonFiniteError, match="tensor lm_head.weight") as blocks:
        tensor_record_chunks(t.dtype, [6, 3], iter([t[:3], t[3:]]), "lm_head.weight")
    assert "NaN" in str(whole.value) and "NaN" in str(blocks.value)
