"""One family registry: the sliced format's modelling code is generated from the adapters."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import batch, make_source, max_diff_vs_oracle, oracle_logits, run_without_package
from transformers import AutoModelForCausalLM

import prune_heads.model.adapters as adapters
from prune_heads.errors import UnsupportedArchitectureError
from prune_heads.export import export_checkpoint, register_auto_classes, sliced
from prune_heads.model.adapters import FamilyAdapter
from prune_heads.model.adapters.families import ALL_ADAPTERS
from prune_heads.plan import Plan

pytestmark = pytest.mark.filterwarnings("ignore:plan has no model fingerprint")
TOL = 1e-4


class GraniteAdapter(FamilyAdapter):
    """A family prune-heads does not ship: Llama-like, with its own attention scaling."""

    name = "granite"
    model_types = ("granite",)


@pytest.fixture
def granite(monkeypatch):
    monkeypatch.setitem(adapters._BY_TYPE, "granite", GraniteAdapter())
    return GraniteAdapter()


def test_table_covers_every_builtin_family_and_names_real_classes():
    import transformers

    table = sliced.family_table()
    assert sorted(table) == sorted(t for a in ALL_ADAPTERS for t in a.sliced_types())
    assert "gemma3" not in table  # the multimodal wrapper's decoder sits elsewhere
    for model_type, entry in table.items():
        config_cls = getattr(transformers, entry["config_class"])
        model_cls = getattr(transformers, entry["model_class"])
        assert config_cls.model_type == model_type and model_cls.config_class is config_cls
        assert entry["pruned_model_class"] == "Pruned" + entry["model_class"]


def test_remote_files_hold_no_family_table():
    """The travelling code names no family: everything family-specific comes from the generated table."""
    for name in sliced.REMOTE_FILES:
        text = (sliced.REMOTE_DIR / name).read_text()
        for cls in ("LlamaConfig", "Qwen2ForCausalLM", "Phi3", "model.model.layers"):
            assert cls not in text, (name, cls)
        assert not any(line.startswith(("from prune_heads", "import prune_heads")) for line in text.splitlines())


def test_registered_family_exports_sliced(granite, tmp_path):
    model, src = make_source(tmp_path, "granite", layers=3, heads=6, kv_heads=3, attention_multiplier=0.3)
    plan = Plan([(0, 1), (0, 2), (0, 3), (1, 4), (1, 5), (2, 0)])  # uneven groups, a whole group, one head
    res = export_checkpoint(str(src), plan, tmp_path / "s", progress=False)
    assert res.verification["passed"], res.verification
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["model_type"] == "pruned_granite" and cfg["architectures"] == ["PrunedGraniteForCausalLM"]
    assert cfg["pruned_layout"]["layers"] == "model.layers"
    table = (tmp_path / "s" / sliced.FAMILY_FILE).read_text()
    assert "'granite'" in table and "GraniteForCausalLM" in table and "'llama'" not in table
    register_auto_classes()
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    assert type(out).__name__ == "PrunedGraniteForCausalLM"
    assert max_diff_vs_oracle(model, plan, out) <= TOL
    assert out.model.layers[0].self_attn.o_proj.in_features == 3 * 8

    # and without prune_heads, through the checkpoint's own code
    ids, mask = batch()
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    code = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 's')!r}, trust_remote_code=True, dtype=torch.float32)\n"
        f"d = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=d['ids'], attention_mask=d['mask']).logits\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
        "print(json.dumps({'cls': type(m).__name__}))\n"
    )
    assert run_without_package(code, tmp_path)["cls"] == "PrunedGraniteForCausalLM"
    keep = mask.bool()
    want = oracle_logits(model, plan, ids, mask)
    assert float((torch.load(tmp_path / "out.pt")[keep] - want[keep]).abs().max()) <= TOL


def test_unregistered_family_is_refused_with_the_list(tmp_path):
    _, src = make_source(tmp_path, "llama", heads=4, kv_heads=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "granite"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="'granite' is not supported.*register_adapter"):
        export_checkpoint(str(src), Plan([(0, 1)]), tmp_path / "s", progress=False)


def test_adapter_without_transformers_classes_says_what_to_override(granite):
    class Custom(FamilyAdapter):
        name = "custom"
        model_types = ("not_in_transformers",)

    with pytest.raises(UnsupportedArchitectureError, match="override Custom.transformers_classes"):
        sliced.family_entry(Custom(), "not_in_transformers")


def test_pruned_o_bias_is_a_config_field(tmp_path):
    """The compensation export sets ``pruned_o_bias``; the pruned config must keep it through a save/load."""
    from prune_heads.export.remote import configuration_pruned

    register_auto_classes()
    cls = configuration_pruned.PRUNED_CONFIGS["llama"]
    assert cls().pruned_o_bias is False
    cfg = cls(pruned_o_bias=True, kept_heads=[[0]], num_hidden_layers=1)
    cfg.save_pretrained(tmp_path)
    assert cls.from_pretrained(tmp_path).pruned_o_bias is True
