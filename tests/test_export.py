"""Export formats against the oracle: the original model with the plan's heads zeroed at run time."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import batch, make_source, max_diff_vs_oracle, oracle_logits, run_without_package
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import FAMILIES
from transformers import AutoConfig, AutoModelForCausalLM

from prune_heads.export import export_checkpoint as export
from prune_heads.export import register_auto_classes
from prune_heads.plan import Plan

pytestmark = pytest.mark.filterwarnings("ignore:plan has no model fingerprint")
TOL = 1e-4


def load(path):
    register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@st.composite
def geometry_and_plan(draw, family: str):
    kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    heads = kv * group
    head_dim = draw(st.sampled_from([4, 8]))
    layers = draw(st.integers(2, 3))
    removed = []
    for layer in range(layers):
        kind = draw(st.sampled_from(["random", "whole_group", "one_left", "none"]))
        if kind == "random":
            hs = draw(st.sets(st.integers(0, heads - 1), max_size=heads - 1))
        elif kind == "whole_group" and kv > 1:
            g = draw(st.integers(0, kv - 1))
            hs = set(range(g * group, (g + 1) * group))
            hs |= draw(st.sets(st.integers(0, heads - 1), max_size=1)) if kv > 2 else set()
            hs = hs if len(hs) < heads else set(range(g * group, (g + 1) * group))
        elif kind == "one_left":
            keep = draw(st.integers(0, heads - 1))
            hs = set(range(heads)) - {keep}
        else:
            hs = set()
        removed += [(layer, h) for h in hs]
    return dict(layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim), Plan(removed)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_sliced_matches_masked_original(family, data, tmp_path_factory):
    """Every family, random geometry and plans (whole groups, uneven groups, one head left)."""
    geom, plan = data.draw(geometry_and_plan(family))
    tmp = tmp_path_factory.mktemp(family)
    model, src = make_source(tmp, family, **geom)
    res = export(str(src), plan, tmp / "sliced", verify=False, progress=False)
    out = load(tmp / "sliced")
    assert max_diff_vs_oracle(model, plan, out) <= TOL
    # the structure really shrank: per layer, q heads and KV heads as the plan says
    cfg = json.loads((tmp / "sliced" / "config.json").read_text())
    layout_heads, group = geom["heads"], geom["heads"] // geom["kv_heads"]
    removed = plan.by_layer(geom["layers"])
    for i, kept in enumerate(cfg["kept_heads"]):
        assert kept == [h for h in range(layout_heads) if h not in removed[i]]
    v_rows = [out.model.layers[i].self_attn.v_proj.weight.shape[0] for i in range(geom["layers"])
              if family != "phi3"]
    for i, rows in enumerate(v_rows):
        assert rows == len({h // group for h in cfg["kept_heads"][i]}) * geom["head_dim"]
    assert res.params_after <= res.params_before


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmo2", "phi3"])
def test_masked_format_matches_oracle(family, tmp_path):
    model, src = make_source(tmp_path, family, heads=6, kv_heads=2)
    plan = Plan([(0, 0), (0, 4), (1, 1), (1, 2), (1, 3)])
    export(str(src), plan, tmp_path / "m", format="masked", verify=False, progress=False)
    out = load(tmp_path / "m")
    assert type(out).__name__ == type(model).__name__
    assert max_diff_vs_oracle(model, plan, out) <= TOL
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gemma2"])
def test_generate_with_cache_matches_masked_original(family, tmp_path):
    model, src = make_source(tmp_path, family, layers=3, heads=6, kv_heads=3)
    # uneven groups, a whole group gone, one head left
    plan = Plan([(0, 0), (0, 2), (0, 3), (1, 4), (1, 5), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4)])
    export(str(src), plan, tmp_path / "s", verify=False, progress=False)
    out = load(tmp_path / "s")
    ids = torch.tensor([[5, 17, 3, 99, 42, 7]])
    with torch.no_grad():
        from prune_heads.model.masking import static_mask

        with static_mask(model, plan):
            want = model.generate(ids, max_new_tokens=10, do_sample=False)
        got = out.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(want, got)
    # the KV cache holds only the kept KV heads: groups {0, 2}, {0, 1} and {2} survive
    cache = out(ids, use_cache=True).past_key_values
    assert [cache.layers[i].keys.shape[1] for i in range(3)] == [2, 2, 1]


def test_empty_layer_allowed_by_plan(tmp_path):
    # attention_bias: the emptied layer still adds o_proj's bias
    model, src = make_source(tmp_path, "llama", layers=3, heads=4, kv_heads=2, attention_bias=True)
    plan = Plan([(0, h) for h in range(4)] + [(2, 1)], {"allow_empty_layers": True})
    res = export(str(src), plan, tmp_path / "s", progress=False)
    assert res.verification["passed"], res.verification
    out = load(tmp_path / "s")
    assert max_diff_vs_oracle(model, plan, out) <= TOL
    ids = torch.tensor([[1, 2, 3, 4]])
    from prune_heads.model.masking import static_mask

    with torch.no_grad(), static_mask(model, plan):
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out.generate(ids, max_new_tokens=6, do_sample=False), want)


def test_olmo2_exact_by_default_and_approximate_reports_error(tmp_path):
    model, src = make_source(tmp_path, "olmo2", heads=6, kv_heads=2)
    plan = Plan([(0, 0), (0, 1), (0, 2), (1, 5)])
    exact = export(str(src), plan, tmp_path / "exact", progress=False)
    approx = export(str(src), plan, tmp_path / "approx", progress=False, approximate_norms=True)
    assert exact.verification["passed"] and exact.verification["max_abs_logit_diff"] <= TOL
    assert approx.verification["approximate_norms"] is True
    assert approx.verification["max_abs_logit_diff"] > TOL  # the dropped statistic is measurably missed
    assert approx.params_after < exact.params_after < exact.params_before
    prov = json.loads((tmp_path / "approx" / "prune_heads.json").read_text())
    assert prov["verification"]["max_abs_logit_diff"] == approx.verification["max_abs_logit_diff"]


@pytest.mark.parametrize("family,stock", [("llama", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                          ("qwen3", "Qwen3ForCausalLM"), ("phi3", "Phi3ForCausalLM")])
def test_uniform_reloads_with_stock_classes(family, stock, tmp_path):
    model, src = make_source(tmp_path, family, heads=6, kv_heads=2)
    plan = Plan([(0, 0), (0, 4), (1, 2), (1, 3)])  # one query head per group in every layer
    res = export(str(src), plan, tmp_path / "u", format="uniform", progress=False)
    assert res.verification["passed"]
    assert not list((tmp_path / "u").glob("*.py"))
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "u", dtype=torch.float32)  # no remote code, no registration
    assert type(out).__name__ == stock and type(out).__module__.startswith("transformers.")
    assert max_diff_vs_oracle(model, plan, out) <= TOL


def test_uniform_refuses_uneven_plans_and_uncovered_families(tmp_path):
    from prune_heads.errors import PruneHeadsError, UnsupportedArchitectureError

    _, src = make_source(tmp_path, "llama", heads=6, kv_heads=2)
    with pytest.raises(PruneHeadsError, match="same number"):
        export(str(src), Plan([(0, 0)]), tmp_path / "u", format="uniform", progress=False)
    _, src = make_source(tmp_path, "olmo2", heads=4, kv_heads=2)
    with pytest.raises(UnsupportedArchitectureError, match="uniform format covers"):
        export(str(src), Plan([(0, 0), (1, 0)]), tmp_path / "u", format="uniform", progress=False)
    assert not (tmp_path / "u").exists()


def test_sliced_loads_without_package_with_trust_remote_code(tmp_path):
    model, src = make_source(tmp_path, "qwen3", layers=3, heads=6, kv_heads=3)
    plan = Plan([(0, 1), (0, 2), (1, 0), (2, 1), (2, 2), (2, 3), (2, 4), (2, 5)])
    export(str(src), plan, tmp_path / "s", verify=False, progress=False)
    ids, mask = batch()
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    want = oracle_logits(model, plan, ids, mask)
    code = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 's')!r}, trust_remote_code=True, dtype=torch.float32)\n"
        f"d = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=d['ids'], attention_mask=d['mask']).logits\n"
        "    gen = m.generate(d['ids'][:1], max_new_tokens=5, do_sample=False)\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
        "print(json.dumps({'cls': type(m).__name__, 'module': type(m).__module__, 'gen': gen.tolist()}))\n"
    )
    info = run_without_package(code, tmp_path)
    assert info["cls"] == "PrunedQwen3ForCausalLM" and "transformers_modules" in info["module"]
    got = torch.load(tmp_path / "out.pt")
    keep = mask.bool()
    assert float((got[keep] - want[keep]).abs().max()) <= TOL
    from prune_heads.model.masking import static_mask

    with torch.no_grad(), static_mask(model, plan):
        assert model.generate(ids[:1], max_new_tokens=5, do_sample=False).tolist() == info["gen"]


def test_sliced_loads_without_trust_remote_code_after_registration(tmp_path):
    model, src = make_source(tmp_path, "llama", heads=4, kv_heads=2)
    plan = Plan([(0, 1), (1, 2), (1, 3)])
    export(str(src), plan, tmp_path / "s", verify=False, progress=False)
    register_auto_classes()
    cfg = AutoConfig.from_pretrained(tmp_path / "s")
    assert cfg.model_type == "pruned_llama" and cfg.kept_heads == [[0, 2, 3], [0, 1]]
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32)
    assert type(out).__module__ == "prune_heads.export.remote.modeling_pruned"
    assert max_diff_vs_oracle(model, plan, out) <= TOL
    assert out.model.layers[1].self_attn.k_proj.weight.shape[0] == 1 * 8  # KV group 1 removed


def test_tied_embeddings_stay_tied_and_files_are_copied(tmp_path):
    model, src = make_source(tmp_path, "llama", heads=4, kv_heads=2, tie_word_embeddings=True)
    (src / "tokenizer.json").write_text("{}")
    (src / "LICENSE").write_text("Apache-2.0\n")
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# source\n")
    plan = Plan([(0, 0)])
    res = export(str(src), plan, tmp_path / "s", progress=False)
    assert res.verification["passed"]
    for f in ("tokenizer.json", "LICENSE", "generation_config.json", "configuration_pruned.py", "modeling_pruned.py"):
        assert (tmp_path / "s" / f).is_file(), f
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s" / "model.safetensors"), "pt") as h:
        assert "lm_head.weight" not in h.keys()
    out = load(tmp_path / "s")
    assert out.lm_head.weight.data_ptr() == out.model.embed_tokens.weight.data_ptr()


def test_bfloat16_export_verifies_through_the_same_rounding(tmp_path):
    _, src = make_source(tmp_path, "mistral", heads=4, kv_heads=2)
    res = export(str(src), Plan([(0, 3), (1, 0)]), tmp_path / "s", dtype="bfloat16", progress=False)
    assert res.verification["passed"] and res.verification["weights_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "s" / "model.safetensors"), "pt") as h:
        assert h.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16


def test_provenance_records_plan_source_hash_and_verification(tmp_path):
    _, src = make_source(tmp_path, "qwen2", heads=4, kv_heads=2)
    plan = Plan([(0, 1), (1, 1)], {"score_id": "awft"})
    res = export(str(src), plan, tmp_path / "s", progress=False, scores_summary={"score_id": "awft"})
    prov = json.loads((tmp_path / "s" / "prune_heads.json").read_text())
    assert prov["plan"]["removed_heads"] == [[0, 1], [1, 1]]
    assert prov["scores_summary"] == {"score_id": "awft"}
    from prune_heads.export.record import ExportRecord

    rec = ExportRecord.load(tmp_path / "s")  # the typed record reads back what was written, field by field
    assert rec.to_dict() == prov and rec.verification.to_dict() == res.verification
    assert (rec.heads_removed, rec.params_after) == (2, res.params_after)
    import hashlib

    assert prov["source"]["sha256"]["config.json"] == hashlib.sha256((src / "config.json").read_bytes()).hexdigest()
    assert prov["verification"] == res.verification and prov["tool_version"]
    assert prov["params_before"] == res.params_before and prov["params_after"] == res.params_after
