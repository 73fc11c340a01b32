"""Bad files a user can hand over: plans, scores directories, model directories (classes 4 and 6).

Each case ends in one ``PruneHeadsError`` line that says what to do; none reaches a traceback.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

from prune_heads.errors import ModelMismatchError, PruneHeadsError
from prune_heads.model.fingerprint import fingerprint
from prune_heads.model.loading import check_safetensors_file, load_model
from prune_heads.plan import Plan
from prune_heads.scoring.head_scores import HeadScores

# ---- plans ------------------------------------------------------------------------------------------
BAD_PLANS = [
    ([[0.9, 1.7]], "removed_heads\\[0\\] is \\[0.9, 1.7\\].*non-negative integers"),
    ([[True, "2"]], "removed_heads\\[0\\] is \\[true, \"2\"\\]"),
    ([[1.0, 2]], "removed_heads\\[0\\] is \\[1.0, 2\\]"),
    ([[0, 1], [2]], "removed_heads\\[1\\] is \\[2\\]"),
    ([[0, 1, 2]], "removed_heads\\[0\\]"),
    ([[-1, 0]], "removed_heads\\[0\\] is \\[-1, 0\\]"),
    ([["0", "1"]], "removed_heads\\[0\\]"),
    ([None], "removed_heads\\[0\\] is null"),
    ([{"layer": 0, "head": 1}], "removed_heads\\[0\\]"),
    ("0,1", "must be a list of \\[layer, head\\] pairs, not str"),
    ({"0": 1}, "must be a list"),
    (None, "must be a list"),
]


@pytest.mark.parametrize("heads,message", BAD_PLANS)
def test_bad_plan_entries_are_refused(tmp_path, heads, message):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"removed_heads": heads}))
    with pytest.raises(PruneHeadsError, match=message):
        Plan.load(p)


@pytest.mark.parametrize("text,message", [
    ("", "not valid JSON"), ("[[0, 1]]", "no 'removed_heads' list"), ("{}", "no 'removed_heads' list"),
    ("\x00\x01binary", "not valid JSON"),
])
def test_bad_plan_files_are_refused(tmp_path, text, message):
    p = tmp_path / "plan.json"
    p.write_text(text)
    with pytest.raises(PruneHeadsError, match=message):
        Plan.load(p)


def test_good_plan_round_trips(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"removed_heads": [[1, 2], [0, 3], [1, 2]]}))
    plan = Plan.load(p)
    assert plan.removed_heads == [(0, 3), (1, 2)] and plan.handwritten
    assert Plan.load(plan.save(tmp_path / "again.json")).removed_heads == plan.removed_heads
    # metadata is typed: a misspelt key is refused by name rather than silently ignored
    p.write_text(json.dumps({"removed_heads": [[0, 1]], "allow_empty_layer": True}))
    with pytest.raises(PruneHeadsError, match="allow_empty_layer: unknown key"):
        Plan.load(p)


def test_plan_from_other_weights_is_refused_even_without_the_model_loaded(tmp_path):
    """``validate(config)`` (what export does before it streams) refuses an old-style fingerprint, and a plan
    with a new one is checked in full by ``check_fingerprint``."""
    model = tiny_model("llama")
    legacy = Plan([(0, 1)], {"fingerprint": {"config": fingerprint(model)["config"], "weights": [0.0] * 64}})
    with pytest.raises(ModelMismatchError, match="old-style fingerprint"):
        legacy.validate(model.config)
    plan = Plan([(0, 1)], {"fingerprint": fingerprint(tiny_model("llama", seed=1))})
    plan.validate(model.config)  # same architecture: the config check alone passes
    with pytest.raises(ModelMismatchError, match="different weights"):
        plan.validate(model, check_weights=model)
    with pytest.raises(PruneHeadsError, match="fingerprint: must be a mapping"):
        Plan([(0, 1)], {"fingerprint": "abc"})


# ---- scores directories -------------------------------------------------------------------------------
@pytest.fixture
def scores_dir(tmp_path):
    model = tiny_model("qwen2", layers=2)
    per = torch.rand(3, 2, 4)
    hs = HeadScores({"ahon_ln": per, "awft": per * 2}, {"fingerprint": fingerprint(model), "num_samples": 3})
    hs.save(tmp_path / "s")
    return model, tmp_path / "s"


def _swap_tensors(d):
    from safetensors.torch import save_file

    save_file({"ahon_ln": torch.zeros(2, 4), "per_sample/ahon_ln": torch.zeros(3, 2, 4)}, str(d / "scores.safetensors"))


def _bad_shapes(d):
    from safetensors.torch import save_file

    save_file({"ahon_ln": torch.zeros(2, 4), "per_sample/ahon_ln": torch.zeros(3, 2, 5)}, str(d / "scores.safetensors"))
    meta = json.loads((d / "scores.json").read_text())
    meta.pop("tensors_sha256")
    (d / "scores.json").write_text(json.dumps(meta))


def _legacy(d):
    meta = json.loads((d / "scores.json").read_text())
    meta["fingerprint"] = {"config": meta["fingerprint"]["config"], "weights": [0.1] * 64}
    (d / "scores.json").write_text(json.dumps(meta))


BAD_SCORES = {
    "tensors_from_another_run": (_swap_tensors, "load", "not the file scores.json describes"),
    "inconsistent_shapes": (_bad_shapes, "load", "inconsistent shapes"),
    "truncated_tensors": (lambda d: os.truncate(d / "scores.safetensors", 100), "load", "cannot read scores"),
    "meta_not_object": (lambda d: (d / "scores.json").write_text("[1]"), "load", "not a JSON object"),
    "meta_not_json": (lambda d: (d / "scores.json").write_text("{"), "load", "cannot read scores"),
    "no_meta": (lambda d: (d / "scores.json").unlink(), "load", "not a scores directory"),
    "legacy_fingerprint": (_legacy, "check", "old-style fingerprint"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCORES))
def test_bad_scores_are_refused(scores_dir, case):
    model, d = scores_dir
    change, when, message = BAD_SCORES[case]
    change(d)
    with pytest.raises(PruneHeadsError, match=message):
        HeadScores.load(d).check(model)


def test_scores_of_other_weights_or_shape_are_refused(scores_dir):
    _, d = scores_dir
    hs = HeadScores.load(d)
    with pytest.raises(ModelMismatchError, match="different weights"):
        hs.check(tiny_model("qwen2", layers=2, seed=3))
    with pytest.raises(ModelMismatchError, match="3 x 4: they were made on another model"):
        hs.check(tiny_model("qwen2", layers=3))


# ---- model directories --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models") / "ok"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer(d)
    return d


def _shard(p):
    return p / "model.safetensors"


BAD_MODELS = {
    "truncated_shard": (lambda p: os.truncate(_shard(p), _shard(p).stat().st_size - 100), "is truncated"),
    "padded_shard": (lambda p: _shard(p).write_bytes(_shard(p).read_bytes() + b"\0" * 10), "longer than its header"),
    "zeroed_shard": (lambda p: _shard(p).write_bytes(b"\0" * 1000), "not a complete safetensors file"),
    "random_shard": (lambda p: _shard(p).write_bytes(os.urandom(4096)), "not a complete safetensors file"),
    "json_as_shard": (lambda p: _shard(p).write_text('{"a": 1}'), "not a complete safetensors file"),
    "bad_config": (lambda p: (p / "config.json").write_text("{nope"), "config.json is not valid JSON"),
    "no_weights": (lambda p: _shard(p).unlink(), "cannot load model"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_broken_model_directories_give_one_line(good_model_dir, tmp_path, case):
    change, message = BAD_MODELS[case]
    p = tmp_path / case
    shutil.copytree(good_model_dir, p)
    change(p)
    with pytest.raises(PruneHeadsError, match=message) as e:
        load_model(str(p))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec,message", [
    ("BINARY", "is a file, not a model"),
    ("GGUF", "GGUF file .* is unreadable or incomplete"),
    ("/definitely/not/here", "does not exist"),
    ("./not-here", "does not exist"),
])
def test_files_that_are_not_models(tmp_path, spec, message):
    if spec == "BINARY":
        spec = str(tmp_path / "weights.bin")
        (tmp_path / "weights.bin").write_bytes(os.urandom(2048))
    elif spec == "GGUF":
        spec = str(tmp_path / "model.gguf")
        (tmp_path / "model.gguf").write_bytes(b"GGUF" + os.urandom(2048))
    with pytest.raises(PruneHeadsError, match=message) as e:
        load_model(spec)
    assert "\n" not in str(e.value)


def test_safetensors_check_agrees_with_safetensors(good_model_dir, tmp_path):
    """The header check accepts what safetensors reads and refuses every truncation safetensors refuses."""
    from safetensors import safe_open

    src = _shard(good_model_dir)
    data = src.read_bytes()
    with safe_open(str(src), framework="pt") as h:
        assert sorted(check_safetensors_file(src)) == sorted(h.keys())
    for cut in (1, 7, 100, len(data) // 2, len(data) - 9):
        f = tmp_path / f"cut{cut}.safetensors"
        f.write_bytes(data[:-cut])
        with pytest.raises(PruneHeadsError):
            check_safetensors_file(f)
        with pytest.raises(Exception):  # noqa: B017 - the reference: safetensors refuses it too
            with safe_open(str(f), framework="pt") as h:
                [h.get_tensor(k) for k in h.keys()]
