"""Exports of compensated plans against the compensated masked model (live o_proj hooks, float64), in every
family, format and GQA policy; and the refusals a user meets."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import batch, hidden_for, make_source, run_without_package
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from tiny_models import FAMILIES
from transformers import AutoModelForCausalLM

from prune_heads.compensation import CompensationSpec, Compensator, collect_moments
from prune_heads.errors import PruneHeadsError, UnsupportedArchitectureError
from prune_heads.export import export_checkpoint as export
from prune_heads.export import register_auto_classes
from prune_heads.model.masking import static_mask
from prune_heads.plan import Plan

pytestmark = pytest.mark.filterwarnings("ignore:plan has no model fingerprint", "ignore:layer \\d+. the covariance")
TOL = 1e-4
SEQS = [[1, 5, 9, 13, 2, 7, 30, 4, 8, 8, 3, 50, 51], [1, 8, 8, 4, 17, 6, 77, 78, 79], [1, 60, 3, 17, 22, 5, 5, 9],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 9, 9, 31, 44, 2, 6, 70, 71, 72, 3, 4, 4, 90, 91, 92]]
O_BIAS_FAMILIES = ("llama", "qwen3", "olmo2", "gemma2", "gemma3_text")


def load(path):
    register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def compensated(model, removed, mode="lsq"):
    """A plan with its compensation record, the moments, and the Compensation (float32 statistics)."""
    moments = collect_moments(model, SEQS, batch_size=2, progress=False)
    comp = Compensator(CompensationSpec(mode, ridge=1e-2), moments=moments)
    plan = Plan(removed, {"compensation": comp.record()})
    from prune_heads.model.adapters import get_adapter

    return plan, moments, comp(plan.mask(get_adapter(model).layout(model.config)))


@torch.no_grad()
def diff_vs_compensated(model, plan, comp, exported) -> float:
    """Max |logit difference| against the original, in float64, with the compensation applied live."""
    ids, mask = batch()
    ref_model = model.double()
    with static_mask(ref_model, plan, compensation=comp):
        ref = ref_model(input_ids=ids, attention_mask=mask).logits
    model.float()
    out = exported.double()(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    return float((ref[keep] - out[keep]).abs().max())


@st.composite
def geometry_and_plan(draw, policy: str):
    kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    if policy == "uniform" and group == 1:
        group = 2
    heads = kv * group
    layers = draw(st.integers(2, 3))
    removed = []
    if policy == "uniform":
        j = draw(st.integers(0, group - 2))  # the same number from every group of every layer
        for layer in range(layers):
            for g in range(kv):
                picks = draw(st.permutations(range(group)))[: j + 1]
                removed += [(layer, g * group + p) for p in picks]
        return dict(layers=layers, heads=heads, kv_heads=kv, head_dim=draw(st.sampled_from([4, 8]))), removed
    for layer in range(layers):
        if policy == "kv-groups" and kv > 1:
            gone = draw(st.sets(st.integers(0, kv - 1), max_size=kv - 1))
            removed += [(layer, g * group + j) for g in gone for j in range(group)]
        else:
            hs = draw(st.sets(st.integers(0, heads - 1), max_size=heads - 1))
            removed += [(layer, h) for h in hs]
    if not removed:
        removed = [(0, 0)] if heads > 1 else []
    return dict(layers=layers, heads=heads, kv_heads=kv, head_dim=draw(st.sampled_from([4, 8]))), removed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["free", "kv-groups"])
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_sliced_equals_compensated_masked_model(family, policy, data, tmp_path_factory):
    geom, removed = data.draw(geometry_and_plan(policy))
    tmp = tmp_path_factory.mktemp(family)
    model, src = make_source(tmp, family, **geom)
    plan, moments, comp = compensated(model, removed)
    export(str(src), plan, tmp / "s", verify=False, progress=False, moments=moments)
    out = load(tmp / "s")
    assert diff_vs_compensated(model, plan, comp, out) <= TOL
    prov = json.loads((tmp / "s" / "prune_heads.json").read_text())
    assert prov["compensation"]["mode"] == "lsq" and prov["compensation"]["fingerprint"] == comp.fingerprint()
    cfg = json.loads((tmp / "s" / "config.json").read_text())
    assert cfg.get("pruned_o_bias") is (True if comp.layers else None)
    if comp.layers:  # every layer's o_proj (or an emptied layer's stand-in) carries a bias now
        assert all(p.endswith("o_proj.bias") for p in [n for n, _ in out.named_parameters() if "o_proj.bias" in n])
        assert sum(1 for n, _ in out.named_parameters() if n.endswith("o_proj.bias")) == geom["layers"]


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_masked_and_uniform_equal_compensated_masked_model(family, data, tmp_path_factory):
    geom, removed = data.draw(geometry_and_plan("uniform"))
    tmp = tmp_path_factory.mktemp(family)
    model, src = make_source(tmp, family, **geom)
    plan, moments, comp = compensated(model, removed, mode=data.draw(st.sampled_from(["lsq", "mean"])))
    if family not in O_BIAS_FAMILIES:
        with pytest.raises(UnsupportedArchitectureError, match="sliced"):
            export(str(src), plan, tmp / "m", format="masked", progress=False, moments=moments)
        with pytest.raises(UnsupportedArchitectureError, match="sliced"):
            export(str(src), plan, tmp / "u", format="uniform", progress=False, moments=moments)
        assert not (tmp / "m").exists() and not (tmp / "u").exists()
        return
    # (stock Gemma-2 in float64 gives NaN logits on verify_export's 64-token padded batch, beyond its sliding
    # window of 16, with or without pruning: a transformers float64 issue, so its exports verify only here)
    verify = family != "gemma2"
    res = export(str(src), plan, tmp / "m", format="masked", progress=False, moments=moments, verify=verify)
    assert not verify or res.verification["passed"], res.verification
    out = load(tmp / "m")
    assert type(out).__name__ == type(model).__name__
    assert diff_vs_compensated(model, plan, comp, out) <= TOL
    if family == "olmo2":  # no stock class with fewer heads at all
        return
    res = export(str(src), plan, tmp / "u", format="uniform", progress=False, moments=moments, verify=verify)
    assert not verify or res.verification["passed"], res.verification
    assert not list((tmp / "u").glob("*.py"))
    out = AutoModelForCausalLM.from_pretrained(tmp / "u", dtype=torch.float32)  # stock class, no registration
    assert type(out).__module__.startswith("transformers.")
    assert diff_vs_compensated(model, plan, comp, out) <= TOL
    cfg = json.loads((tmp / "u" / "config.json").read_text())
    assert cfg["attention_bias"] is True and cfg["num_attention_heads"] == len(out.model.layers[0].self_attn.o_proj.weight[0]) // geom["head_dim"]


def test_new_bias_tensor_and_existing_bias_folded(tmp_path):
    model, src = make_source(tmp_path, "llama", heads=4, kv_heads=2)
    plan, moments, comp = compensated(model, [(0, 1), (1, 2), (1, 3)])
    export(str(src), plan, tmp_path / "s", progress=False, moments=moments)
    with safe_open(str(tmp_path / "s" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.o_proj.bias" in f.keys()
        delta = comp.layers[0].bias_delta(model.model.layers[0].self_attn.o_proj.weight)
        torch.testing.assert_close(f.get_tensor("model.layers.0.self_attn.o_proj.bias").double(), delta,
                                   rtol=1e-6, atol=1e-7)
    # a source that has o_proj biases already: the compensation adds to them
    model, src = make_source(tmp_path / "b", "llama", heads=4, kv_heads=2, attention_bias=True)
    plan, moments, comp = compensated(model, [(0, 0), (0, 3), (1, 1)])
    res = export(str(src), plan, tmp_path / "sb", progress=False, moments=moments)
    assert res.verification["passed"] and res.verification["max_abs_logit_diff"] <= TOL
    assert diff_vs_compensated(model, plan, comp, load(tmp_path / "sb")) <= TOL


def test_verification_bfloat16_and_empty_layer(tmp_path):
    model, src = make_source(tmp_path, "qwen3", layers=3, heads=4, kv_heads=2)
    plan, moments, comp = compensated(model, [(0, 0), (0, 1), (0, 2), (0, 3), (2, 1)])
    plan.selection.allow_empty_layers = True
    res = export(str(src), plan, tmp_path / "s", dtype="bfloat16", progress=False, moments=moments)
    assert res.verification["passed"], res.verification
    assert "compensation folded" in res.verification["reference"]
    # the emptied layer keeps only its compensation bias (the removed heads' mean output)
    out = load(tmp_path / "s")
    assert type(out.model.layers[0].self_attn).__name__ == "EmptyAttention"


def test_sliced_with_bias_loads_without_the_package(tmp_path):
    model, src = make_source(tmp_path, "llama", layers=2, heads=6, kv_heads=3, hidden=hidden_for("llama", 6, 8))
    plan, moments, comp = compensated(model, [(0, 0), (0, 1), (1, 4)])
    export(str(src), plan, tmp_path / "s", verify=False, progress=False, moments=moments)
    ids, mask = batch()
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    code = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 's')!r}, trust_remote_code=True, dtype=torch.float64)\n"
        f"d = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=d['ids'], attention_mask=d['mask']).logits\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
        "print(json.dumps({'bias': m.model.layers[1].self_attn.o_proj.bias is not None}))\n"
    )
    info = run_without_package(code, tmp_path)
    assert info["bias"] is True
    ref_model = model.double()
    with torch.no_grad(), static_mask(ref_model, plan, compensation=comp):
        want = ref_model(input_ids=ids, attention_mask=mask).logits
    got = torch.load(tmp_path / "out.pt")
    keep = mask.bool()
    assert float((got[keep] - want[keep]).abs().max()) <= TOL


def test_refusals(tmp_path):
    model, src = make_source(tmp_path, "llama", heads=4, kv_heads=2)
    plan, moments, comp = compensated(model, [(0, 1)])
    with pytest.raises(PruneHeadsError, match="scores directory it was selected with"):
        export(str(src), plan, tmp_path / "x", progress=False)
    other = collect_moments(model, SEQS[:3], progress=False)
    with pytest.raises(PruneHeadsError, match="another model or data set"):
        export(str(src), plan, tmp_path / "x", progress=False, moments=other)
    with pytest.raises(PruneHeadsError, match="records none"):
        export(str(src), Plan([(0, 1)]), tmp_path / "x", progress=False, compensation=comp)
    assert not (tmp_path / "x").exists()
    # Llama's class can hold the bias only when the kept heads divide hidden_size (32 / 3 does not)
    model, src = make_source(tmp_path / "l", "llama", heads=4, kv_heads=4, hidden=32)
    plan, moments, _ = compensated(model, [(0, 1), (1, 2)])
    with pytest.raises(UnsupportedArchitectureError, match="sliced"):
        export(str(src), plan, tmp_path / "u", format="uniform", progress=False, moments=moments)


def test_model_card_states_the_compensation(tmp_path):
    model, src = make_source(tmp_path, "qwen3", heads=4, kv_heads=2)
    plan, moments, _ = compensated(model, [(1, 3)])
    export(str(src), plan, tmp_path / "s", progress=False, moments=moments)
    card = (tmp_path / "s" / "README.md").read_text()
    assert "## Compensation" in card and "least squares" in card and "| mode | `lsq` |" in card
