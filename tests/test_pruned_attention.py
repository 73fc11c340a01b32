"""The sliced checkpoints' attention function against a naive reference, and the fast paths it must take."""

from __future__ import annotations

import math

import pytest
import torch
from export_helpers import make_source
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM

from prune_heads.evaluation.speed import _cache_of
from prune_heads.export import export_checkpoint, register_auto_classes
from prune_heads.export.remote.modeling_pruned import _KVPlan, pruned_attention
from prune_heads.plan import Plan

pytestmark = pytest.mark.filterwarnings("ignore:plan has no model fingerprint")


class Attn(nn.Module):
    is_causal = True

    def __init__(self, kv_map):
        super().__init__()
        self.pruned_kv_map = kv_map
        self.num_key_value_groups = 1


def naive(query, key, value, kv_map, allowed, scaling):
    """Every query head against its own KV head, by explicit loops over heads (float64)."""
    b, nq, tq, d = query.shape
    out = torch.zeros(b, tq, nq, d, dtype=query.dtype)
    for h in range(nq):
        g = kv_map[h]
        scores = query[:, h] @ key[:, g].transpose(-1, -2) * scaling  # (b, tq, tk)
        scores = scores.masked_fill(~allowed, -math.inf)
        out[:, :, h] = torch.softmax(scores, dim=-1) @ value[:, g]
    return out


@st.composite
def case(draw):
    counts = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    kv_map = [g for g, n in enumerate(counts) for _ in range(n)]
    b, d = draw(st.integers(1, 2)), draw(st.sampled_from([4, 8]))
    kind = draw(st.sampled_from(["causal", "decode", "static", "bool", "float"]))
    tq = 1 if kind == "decode" else draw(st.integers(2, 6))
    past = 0 if kind == "causal" else draw(st.integers(1, 4))
    return kv_map, b, d, tq, past, kind, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(case())
def test_attention_matches_naive_reference(c):
    kv_map, b, d, tq, past, kind, seed = c
    g = torch.Generator().manual_seed(seed)
    nq, nkv, tk = len(kv_map), max(kv_map) + 1, tq + past
    q = torch.randn(b, nq, tq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, nkv, tk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, nkv, tk, d, generator=g, dtype=torch.float64)
    pos_q = torch.arange(tq)[:, None] + (0 if kind == "static" else past)
    allowed = (torch.arange(tk)[None, :] <= pos_q).expand(b, tq, tk).clone()
    mask = None
    if kind in ("bool", "float"):
        allowed[-1, :, 0] = False  # left padding in the last row
        mask = allowed[:, None]
        if kind == "float":
            mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
    if kind == "decode":
        allowed[:] = True
    out, _ = pruned_attention(Attn(kv_map), q, k, v, mask, scaling=d ** -0.5)
    want = naive(q, k, v, kv_map, allowed, d ** -0.5)
    assert out.shape == (b, tq, nq, d) and out.is_contiguous()
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_kv_plan_runs_groups_and_slots():
    even = _KVPlan([0, 0, 1, 1, 2, 2])
    assert even.groups == 2 and even.runs == ((0, 2, 0), (2, 4, 1), (4, 6, 2))
    uneven = _KVPlan([0, 0, 0, 1, 1, 2, 2, 2])
    assert uneven.groups == 0 and uneven.width == 3 and uneven.packable
    assert uneven.slots == (0, 1, 2, 3, 4, 6, 7, 8)  # KV head 1's third slot is padding
    assert uneven.fill == (0, 1, 2, 3, 4, 4, 5, 6, 7)  # ... filled with that group's last head
    assert _KVPlan([0, 1, 0]).packable is False  # a KV head split into two runs


# ---- the fast paths, seen from the calls the exported model makes ------------------------------------
class Calls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.sdpa: list[dict] = []
        self.gathers: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.scaled_dot_product_attention:
            self.sdpa.append({"q": tuple(args[0].shape), "k": tuple(args[1].shape),
                              "mask": kwargs.get("attn_mask"), "causal": kwargs.get("is_causal", False)})
        elif getattr(func, "__name__", "") in ("index_select", "repeat_interleave") and args[0].dim() == 4:
            self.gathers.append(tuple(args[0].shape))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def sliced_uneven(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast")
    _, src = make_source(tmp, "llama", layers=3, heads=6, kv_heads=3)
    # layer 0 uneven (1, 1, 2 heads per group), layer 1 even (whole group 2 gone), layer 2 untouched
    plan = Plan([(0, 1), (0, 3), (1, 4), (1, 5)])
    export_checkpoint(str(src), plan, tmp / "s", verify=False, progress=False)
    register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(tmp / "s", dtype=torch.float32).eval()


def test_prefill_takes_the_causal_fast_path_without_copying_kv(sliced_uneven):
    ids = torch.tensor([[3, 7, 11, 2, 9, 4, 8, 1]])
    with torch.no_grad(), Calls() as calls:
        sliced_uneven(input_ids=ids, use_cache=False)
    assert calls.gathers == []
    assert all(c["mask"] is None and c["causal"] for c in calls.sdpa)
    # layer 0: one call per kept KV head (1 + 1 + 2 query heads, 1 KV head each); layers 1, 2: one GQA call
    assert [(c["q"][1], c["k"][1]) for c in calls.sdpa] == [(1, 1), (1, 1), (2, 1), (4, 2), (6, 3)]


def test_decode_step_is_one_call_per_layer_without_copying_the_cache(sliced_uneven):
    ids = torch.tensor([[3, 7, 11, 2, 9, 4, 8, 1]])
    with torch.no_grad():
        name, cache = _cache_of(sliced_uneven(input_ids=ids, use_cache=True))
        with Calls() as calls:
            sliced_uneven(input_ids=torch.tensor([[5]]), use_cache=True, **{name: cache})
    assert calls.gathers == []
    assert len(calls.sdpa) == 3 and all(c["mask"] is None for c in calls.sdpa)
    assert calls.sdpa[0]["q"] == (1, 3, 2, 8) and calls.sdpa[0]["k"] == (1, 3, 9, 8)  # packed: 3 KV heads x width 2
