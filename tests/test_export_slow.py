"""Real SmolLM2-135M: a sliced export reloads in a fresh process without prune_heads and matches."""

from __future__ import annotations

import copy

import pytest
import torch
from export_helpers import batch, oracle_logits, run_without_package

from prune_heads.plan import Plan

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:plan has no model fingerprint")]


def smollm2_plan() -> Plan:
    # 9 heads in 3 KV groups: a whole group in some layers, uneven groups, a layer left with one head
    removed = [(0, h) for h in range(8)]                              # layer 0: one head left
    removed += [(i, h) for i in range(1, 30, 3) for h in (0, 1, 2)]   # whole KV group 0
    removed += [(i, h) for i in range(2, 30, 3) for h in (4, 8)]      # uneven groups
    return Plan(removed)


def test_smollm2_sliced_reloads_without_package(smollm2, tmp_path):
    from prune_heads.export import export_checkpoint as export
    from prune_heads.model.loading import gguf_to_plain, resolve_model_spec

    src = gguf_to_plain(*resolve_model_spec("smollm2"))
    plan = smollm2_plan()
    res = export("smollm2", plan, tmp_path / "s", shard_size="200MB", progress=False)
    assert res.verification["passed"], res.verification
    assert res.params_after == res.predicted_params_after < res.params_before
    assert (tmp_path / "s" / "tokenizer.json").exists() and src.exists()
    ids, mask = batch(vocab=49152, n=2, t=32)
    # float64: float32 summation-order noise alone reaches ~1e-3 over 30 layers (see export/verify.py)
    model64 = copy.deepcopy(smollm2.model).double()
    want = oracle_logits(model64, plan, ids, mask)
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    code = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"p = {str(tmp_path / 's')!r}\n"
        "m = AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True, dtype=torch.float32).double()\n"
        "tok = AutoTokenizer.from_pretrained(p, trust_remote_code=True)\n"
        f"d = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=d['ids'], attention_mask=d['mask']).logits\n"
        "    gen = m.generate(**tok('The capital of France is', return_tensors='pt'), max_new_tokens=8, do_sample=False)\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
        "print(json.dumps({'cls': type(m).__name__, 'gen': gen[0].tolist()}))\n"
    )
    info = run_without_package(code, tmp_path)
    assert info["cls"] == "PrunedLlamaForCausalLM"
    assert res.verification["max_abs_logit_diff_float32"] < 1e-2
    got = torch.load(tmp_path / "out.pt")
    keep = mask.bool()
    assert float((got[keep] - want[keep]).abs().max()) <= 1e-4
    from prune_heads.model.masking import static_mask

    enc = smollm2.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad(), static_mask(smollm2.model, plan):
        want_gen = smollm2.model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert want_gen[0].tolist() == info["gen"]
