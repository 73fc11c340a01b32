"""The dynamic mode during generation makes the paper's decisions: every step over the whole sequence so far,
as generating without the cache does (the authors' code), under ``generate()`` and lm-eval's ``generate_until``."""

from __future__ import annotations

import copy

import pytest
import torch
from test_masking import _register_reference
from tiny_models import tiny_model

from prune_heads import calibrate
from prune_heads.errors import PruneHeadsError
from prune_heads.model.dynamic import dynamic_mask
from prune_heads.model.masking import dynamic_mask as reexported


def _threshold(model, ids, score_id):
    """A threshold between two calibration values in the middle: some heads zeroed, some kept."""
    values = calibrate(model, [ids[b].tolist() for b in range(ids.shape[0])], scores=[score_id],
                       progress=False).per_sample(score_id).flatten().sort().values
    mid = len(values) // 2
    return float(values[mid - 1] + values[mid]) / 2


def _reference(model, score_id, threshold):
    """A copy running the naive per-forward dynamic attention of test_masking, generating without the cache."""
    record: list[torch.Tensor] = []
    _register_reference(score_id, threshold, record)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("naive_dynamic")
    original = ref.generate

    def generate(*args, **kwargs):
        kwargs["use_cache"] = False  # whatever the caller (lm-eval asks for the cache) says
        return original(*args, **kwargs)

    ref.generate = generate
    return ref, record


@pytest.mark.parametrize("family,score_id", [("qwen3", "awft"), ("llama", "ahon_ln")])
def test_default_generation_equals_the_no_cache_reference(family, score_id):
    assert reexported is dynamic_mask
    model = tiny_model(family, layers=3)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    tau = _threshold(model, ids, score_id)
    ref, record = _reference(model, score_id, tau)
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=8, do_sample=False)
        with dynamic_mask(model, score_id, tau, record=True) as stats:
            got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert got.tolist() == expected.tolist()
    # the same decisions, step by step and layer by layer (the reference records one row per forward and layer)
    ours = [d[0] for _, d in stats.decisions]
    assert len(ours) == len(record) == 8 * 3
    assert all(torch.equal(a, b) for a, b in zip(ours, record))
    assert stats.cached_steps == 0 and stats.forward_passes == 8
    assert 0 < stats.fraction_zeroed < 1
    assert "generate" not in vars(model)  # the wrapper is gone with the context


def test_default_generation_with_left_padding_equals_each_prompt_alone():
    """Per input means per input: a left-padded batch decides for each row what that row alone would."""
    model = tiny_model("qwen3", layers=2)
    model.generation_config.pad_token_id = 0
    a = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(3))
    b = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(4))
    tau = _threshold(model, a, "ahon_ln")
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad(), dynamic_mask(model, "ahon_ln", tau):
        both = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone = [model.generate(x, max_new_tokens=6, do_sample=False) for x in (a, b)]
    assert both[0].tolist() == alone[0][0].tolist()
    assert both[1, 3:].tolist() == alone[1][0].tolist()


def test_a_cached_step_is_refused_in_the_exact_mode():
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad(), dynamic_mask(model, "awft", 0.5):
        out = model(ids, use_cache=True)
        with pytest.raises(PruneHeadsError, match="whole sequence.*use_cache=False.*mode='cached'"):
            model(ids[:, -1:], cache=out.past_key_values, use_cache=True)


def test_lm_eval_generate_until_runs_without_the_cache():
    """lm-eval's HFLM asks generate() for the cache; inside dynamic_mask it gets the paper's no-cache decisions."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from tiny_tokenizer import tiny_tokenizer, words

    model = tiny_model("llama", layers=3)
    tok = tiny_tokenizer()
    prompt = words(9, seed=5)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    tau = _threshold(model, ids, "awft")
    ref, record = _reference(model, "awft", tau)

    def generate(lm_model):
        lm = HFLM(pretrained=lm_model, tokenizer=tok, batch_size=1, max_length=64)
        req = Instance(request_type="generate_until", doc={}, idx=0,
                       arguments=(prompt, {"until": ["never-said"], "max_gen_toks": 6, "do_sample": False}))
        return lm.generate_until([req])

    with torch.no_grad():
        expected = generate(ref)
        with dynamic_mask(model, "awft", tau, record=True) as stats:
            got = generate(model)
    assert got == expected and len(expected[0].split()) > 0
    assert stats.cached_steps == 0 and stats.forward_passes >= 6
    assert all(torch.equal(d[0], r) for (_, d), r in zip(stats.decisions, record))


def test_cached_mode_accumulates_the_whole_sequence():
    """With nothing zeroed the hidden states are those of the unmasked model in both modes, so the cached
    mode's running query means must equal the exact mode's full-sequence statistics at every step."""
    model = tiny_model("qwen3", layers=2)
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(7))
    for score_id in ("awft", "aeqd_ln", "ahon_ln", "confidence", "avvn", "lthon_hn"):
        with torch.no_grad():
            with dynamic_mask(model, score_id, float("-inf") if score_id != "awft" else float("inf"),
                              record=True) as exact:
                a = model.generate(ids, max_new_tokens=5, do_sample=False)
            with dynamic_mask(model, score_id, float("-inf") if score_id != "awft" else float("inf"), mode="cached",
                              record=True) as cached:
                b = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert a.tolist() == b.tolist()
        assert cached.cached_steps == 4 and exact.cached_steps == 0
        for (la, va), (lb, vb) in zip(exact.values, cached.values):
            assert la == lb
            torch.testing.assert_close(vb, va, rtol=2e-5, atol=1e-6, msg=f"{score_id} layer {la}")


def test_cached_mode_without_its_prompt_is_refused():
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        with dynamic_mask(model, "awft", 0.5, mode="cached"):
            with pytest.raises(PruneHeadsError, match="without its prompt"):
                model(ids[:, -1:], cache=out.past_key_values, use_cache=True)


def test_bad_mode():
    with pytest.raises(PruneHeadsError, match="choose exact"):
        with dynamic_mask(tiny_model("llama"), "awft", 0.5, mode="fast"):
            pass
