"""Family facts live in the adapters: a family added with ``register_adapter()`` that states a fact
differently (its logit transform, LM head name, uniform defaults, q/k norm kind) is obeyed on every path
that uses the fact. Each test also shows the built-in answer differs, so a path that bypassed the
adapter (a hard-coded name or config key) would fail it."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import make_source
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

import prune_heads.model.adapters as adapters
from prune_heads.export import export_checkpoint
from prune_heads.model.adapters import FamilyAdapter, get_adapter, register_adapter
from prune_heads.model.adapters.families import LlamaAdapter, Olmo2Adapter
from prune_heads.model.masking import static_mask
from prune_heads.plan import Plan
from prune_heads.scoring.ablation import ablation_scores

pytestmark = pytest.mark.filterwarnings("ignore:plan has no model fingerprint")


@pytest.fixture
def registry(monkeypatch):
    """``register_adapter`` for this test only."""
    monkeypatch.setattr(adapters, "_BY_TYPE", dict(adapters._BY_TYPE))
    return register_adapter


def _naive_kl(model, seqs, heads):
    """One full forward per head, each sequence alone: KL(reference || head zeroed), mean over positions."""
    out = torch.zeros(len(seqs), len(heads))
    with torch.no_grad():
        for n, s in enumerate(seqs):
            ids = torch.tensor([s])
            ref = model(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
            for j, head in enumerate(heads):
                with static_mask(model, [head]):
                    lp = model(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
                out[n, j] = (ref.exp() * (ref - lp)).sum(-1).mean().float()
    return out


class ScaledGranite(FamilyAdapter):
    """Granite divides its logits by ``logits_scaling`` after the LM head: a fact ablation must apply too."""

    name = "granite"
    model_types = ("granite",)

    def logit_transform(self, config):
        scale = float(config.logits_scaling)
        return lambda logits: logits / scale


def test_registered_logit_transform_is_applied_by_ablation(registry):
    model = tiny_model("granite", layers=2, heads=4, kv_heads=2, logits_scaling=4.0)
    seqs = [[5, 9, 2, 7, 31, 8, 4], [3, 14, 15, 9, 2]]
    heads = [(i, h) for i in range(2) for h in range(4)]
    registry(ScaledGranite())
    want = _naive_kl(model, seqs, heads)  # (masking itself needs no logit fact)

    def measured():
        hs = ablation_scores(model, seqs, scores=["ablation_kl"], batch_size=2, progress=False)
        kl = torch.stack([hs.per_sample("ablation_kl")[:, i, h] for i, h in heads], 1)
        return kl, hs.meta["ablation"]["cost"]["prefix_reuse"]

    registry(ScaledGranite())
    kl, prefix_reuse = measured()
    torch.testing.assert_close(kl, want, atol=2e-6, rtol=1e-3)
    assert prefix_reuse is True  # the tail passes recompute the logits the way the model does
    registry(type("PlainGranite", (FamilyAdapter,), {"name": "granite", "model_types": ("granite",)})())
    with pytest.warns(UserWarning, match="does not reproduce"):
        kl, _ = measured()
    assert not torch.allclose(kl, want, atol=1e-5, rtol=1e-2)  # the fact matters on this model


def test_builtin_softcap_is_the_adapters_logit_transform():
    model = tiny_model("gemma2", final_logit_softcapping=2.0)
    transform = get_adapter(model).logit_transform(model.config)
    x = torch.tensor([-30.0, 0.5, 30.0])
    torch.testing.assert_close(transform(x), torch.tanh(x / 2.0) * 2.0)
    assert get_adapter(tiny_model("llama")).logit_transform(tiny_model("llama").config) is None


def _store_tied_head(src, name):
    """Rewrite the checkpoint so it also stores the tied LM head under ``name`` (as some converters do)."""
    tensors = load_file(src / "model.safetensors")
    tensors[name] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return tensors


def _written(out):
    with safe_open(str(out / "model.safetensors"), "pt") as h:
        return set(h.keys())


@pytest.mark.parametrize("custom", [False, True], ids=["builtin lm_head", "registered head name"])
def test_tied_lm_head_stored_anyway_is_dropped_by_the_adapters_name(tmp_path, registry, custom):
    model, src = make_source(tmp_path, "llama", heads=4, kv_heads=2, tie_word_embeddings=True)
    head = "output.weight" if custom else "lm_head.weight"
    if custom:
        registry(type("OutputHeadLlama", (LlamaAdapter,), {"lm_head_name": "output"})())
    tensors = _store_tied_head(src, head)
    unique = sum(t.numel() for n, t in tensors.items() if n != head)
    res = export_checkpoint(str(src), Plan([(0, 1)]), tmp_path / "m", format="masked", verify=False, progress=False)
    assert head not in _written(tmp_path / "m")
    assert res.params_before == unique
    # the other name is an ordinary tensor to whichever adapter does not call it its LM head
    other = "lm_head.weight" if custom else "output.weight"
    tensors = _store_tied_head(src, other)
    res = export_checkpoint(str(src), Plan([(0, 1)]), tmp_path / "m2", format="masked", verify=False, progress=False)
    assert other in _written(tmp_path / "m2") and head not in _written(tmp_path / "m2")


def test_builtin_tied_duplicate_exports_sliced_and_verifies(tmp_path):
    _, src = make_source(tmp_path, "llama", heads=4, kv_heads=2, tie_word_embeddings=True)
    _store_tied_head(src, "lm_head.weight")
    res = export_checkpoint(str(src), Plan([(0, 1), (1, 2)]), tmp_path / "s", progress=False)
    assert res.verification["passed"] and "lm_head.weight" not in _written(tmp_path / "s")


@pytest.mark.parametrize("custom", [False, True], ids=["builtin", "registered defaults"])
def test_uniform_defaults_come_from_the_adapter(tmp_path, registry, custom):
    """Llama is written uniform as Mistral, whose class defaults to a 4096-token window: the adapter says to
    write ``sliding_window: null``; an adapter that states no such default gets Mistral's."""
    _, src = make_source(tmp_path, "llama", heads=4, kv_heads=2)
    if custom:
        registry(type("NoDefaultsLlama", (LlamaAdapter,), {"uniform_defaults": {}})())
    plan = Plan([(0, 0), (0, 2), (1, 1), (1, 3)])  # one head per KV group in every layer
    res = export_checkpoint(str(src), plan, tmp_path / "u", format="uniform", progress=False)
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and res.verification["passed"]
    if custom:
        assert "sliding_window" not in cfg  # the stock class's own default applies
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(tmp_path / "u").sliding_window == 4096
    else:
        assert cfg["sliding_window"] is None


class SpanningNorms(Olmo2Adapter):
    """Says its q/k norms span the heads through the property alone, its label left at the default."""

    qk_norm = "none"
    qk_norm_spans_heads = True


@pytest.mark.parametrize("fmt", ["masked", "sliced"])
def test_every_export_path_asks_whether_norms_span_heads(tmp_path, registry, fmt):
    """OLMo-2's exact exports must keep (sliced) or not zero (masked) the removed heads' q/k rows; a path that
    read the label instead of ``qk_norm_spans_heads`` would drop them and fail verification."""
    _, src = make_source(tmp_path, "olmo2", heads=4, kv_heads=4)
    plan = Plan([(0, 1), (1, 0), (1, 3)])
    want = export_checkpoint(str(src), plan, tmp_path / "builtin", format=fmt, progress=False)
    registry(SpanningNorms())
    got = export_checkpoint(str(src), plan, tmp_path / "custom", format=fmt, progress=False)
    assert got.verification["passed"], got.verification
    assert got.params_after == want.params_after == got.predicted_params_after
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        with safe_open(str(tmp_path / "custom" / "model.safetensors"), "pt") as a, \
                safe_open(str(tmp_path / "builtin" / "model.safetensors"), "pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name))
    if fmt == "sliced":  # only a spanning norm has an approximate form, which drops the q/k rows
        approx = export_checkpoint(str(src), plan, tmp_path / "approx", format="sliced", approximate_norms=True,
                                   progress=False)
        assert approx.verification["approximate_norms"] and approx.params_after < got.params_after
