"""Recipe schema: every shipped recipe validates; bad recipes fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_heads.pipeline.recipe import (
    Recipe,
    RecipeError,
    apply_overrides,
    dump_recipe,
    load_recipe,
    parse_override,
)

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
DEMO = Path(__file__).parent.parent / "recipes" / "smollm2-135m.yaml"


def minimal() -> dict:
    return {"name": "m", "model": {"id": "x"}, "calibration": {"data": "wikitext2"},
            "select": {"task": "arc_easy", "max_drop": 0.01}}


def test_recipes_exist_for_every_family():
    names = {p.stem for p in RECIPES}
    assert {"llama-3.1-8b", "llama-3.2", "qwen2.5", "qwen3", "olmo2-7b", "mistral-7b", "smollm2-135m"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_round_trips(path):
    r = load_recipe(path)
    assert r.name == path.stem
    assert r.notes.strip(), "each recipe says what is known about its family"
    again = load_recipe(yaml.safe_load(dump_recipe(r)))
    assert again == r


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem != "smollm2-135m"], ids=lambda p: p.stem)
def test_paper_recipes_use_fineweb_mmlu_5shot_one_point(path):
    r = load_recipe(path)
    assert r.calibration.data == "hub:HuggingFaceFW/fineweb-edu?name=sample-10BT"
    assert r.calibration.offline_data  # an offline alternative
    assert (r.select.task, r.select.num_fewshot, r.select.max_drop, r.select.relative) == ("mmlu", 5, 0.01, False)


def test_paper_best_scores_per_family():
    best = {"llama-3.1-8b": "ahon_ln", "qwen2.5": "lthon_ln", "olmo2-7b": "ahon_ln"}
    for stem, score in best.items():
        assert load_recipe(DEMO.parent / f"{stem}.yaml").select.method.score == score


def test_demo_recipe_is_offline():
    r = load_recipe(DEMO)
    assert (r.model.id, r.calibration.data, r.select.task) == ("smollm2", "wikitext2", "ppl:wikitext2")
    assert (r.select.compensate, r.select.ranking, r.select.relative) == ("lsq", "lsq_error", True)
    assert "arc_easy" in [t.task for t in r.eval_tasks()]  # accuracy only for the final check


def test_offline_data_is_used_when_hub_is_off(monkeypatch):
    raw = minimal()
    raw["calibration"] = {"data": "hub:HuggingFaceFW/fineweb-edu?name=sample-10BT", "offline_data": "wikitext2"}
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert load_recipe(raw).calibration.data_now().startswith("hub:")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_recipe(raw).calibration.data_now() == "wikitext2"


def test_defaults_fill_in():
    r = load_recipe(minimal())
    assert isinstance(r, Recipe)
    assert (r.select.method_name, r.select.method.score, r.select.policy) == ("static", None, "free")
    assert (r.select.ranking, r.select.compensate, r.select.confidence, r.verify.enabled) == ("lsq_error", "lsq", 0.9, True)
    assert (r.export.format, r.calibration.num_samples, r.hub.repo_id) == ("sliced", 128, None)


# ---- errors --------------------------------------------------------------------------------
def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmodel:\n  id: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_recipe(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(p)
    p.write_text("")
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("path", "value", "message"), [
    ("select.max_drop", 1.5, "select.max_drop: must be below 1 for an accuracy task"),
    ("select.max_drop", None, "select.max_drop: this method needs a budget"),
    ("select.round_size", 2, "select.round_size: applies to method iterative, not static"),
    ("select.confidence", 1.0, "select.confidence: must be a number in [0, 1)"),
    ("name", "../x", "name: '../x' must be a plain name"),
    ("select.max_drop", -0.1, "select.max_drop: must be a number >= 0"),
    ("select.policy", "groups", "select.policy: must be one of free, kv-groups, uniform"),
    ("select.method", "magic", "select.method: must be one of static, iterative, gates"),
    ("select.score", "ahon_lnn", "select.score: unknown score(s) ahon_lnn"),
    ("calibration.num_samples", 0, "calibration.num_samples: must be an integer >= 1"),
    ("calibration.num_samples", "many", "calibration.num_samples: must be an integer"),
    ("calibration.seq_len", 3.5, "calibration.seq_len: must be an integer"),
    ("calibration.scores", "ahon", "calibration.scores: must be a list"),
    ("calibration.scores", ["random"], "calibration.scores: 'random' is a ranking"),
    ("export.format", "gguf", "export.format: must be one of sliced, uniform, masked"),
    ("verify.enabled", "yes", "verify.enabled: must be true or false"),
    ("verify.tol", 0, "verify.tol: must be a number > 0"),
    ("hub.private", 1, "hub.private: must be true or false"),
    ("model", "smollm2", "model: must be a mapping"),
    ("model.id", "", "model.id: must not be empty"),
    ("evaluate.tasks", [{"task": "arc_easy", "split": "train"}], "evaluate.tasks.0.split: must be one of all, search, verify"),
    ("evaluate.tasks", [{"limit": 3}], "evaluate.tasks.0.task: required key is missing"),
])
def test_bad_values_name_the_key(path, value, message):
    raw = apply_overrides(minimal(), {path: value})
    with pytest.raises(RecipeError) as e:
        load_recipe(raw)
    assert message in str(e.value)


def test_unknown_and_missing_keys():
    raw = minimal()
    raw["select"]["max_dorp"] = 0.01
    with pytest.raises(RecipeError, match=r"select.max_dorp: unknown key; select accepts .*max_drop"):
        load_recipe(raw)
    raw = minimal()
    raw["extra"] = 1
    with pytest.raises(RecipeError, match="extra: unknown key"):
        load_recipe(raw)
    raw = minimal()
    del raw["calibration"]
    with pytest.raises(RecipeError, match="calibration: required key is missing"):
        load_recipe(raw)


def test_cross_field_checks():
    with pytest.raises(RecipeError, match="export.format: 'uniform' needs select.policy: uniform"):
        load_recipe(minimal(), {"export.format": "uniform"})
    assert load_recipe(minimal(), {"export.format": "uniform", "select.policy": "uniform"}).export.format == "uniform"
    with pytest.raises(RecipeError, match="select.target_fraction"):
        load_recipe(minimal(), {"select.method": "gates"})
    with pytest.raises(RecipeError, match="hub.repo_id"):
        load_recipe(minimal(), {"hub.push": True})
    # label-free budgets are in perplexity/KL units, so they may exceed 1
    assert load_recipe(minimal(), {"select.task": "ppl:wikitext2", "select.max_drop": 2.5}).select.max_drop == 2.5


# ---- overrides -----------------------------------------------------------------------------
def test_overrides_parse_yaml_values():
    assert parse_override("select.limit=50") == ("select.limit", 50)
    assert parse_override("select.relative=true") == ("select.relative", True)
    assert parse_override("select.limit=null") == ("select.limit", None)
    assert parse_override("calibration.scores=[ahon_ln, awft]") == ("calibration.scores", ["ahon_ln", "awft"])
    assert parse_override("model.id=a=b") == ("model.id", "a=b")
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_override("select.limit")


def test_overrides_apply_to_files_and_lists():
    r = load_recipe(DEMO, ["select.limit=7", "evaluate.tasks.1.limit=3", "hub.repo_id=me/demo"])
    assert (r.select.limit, r.evaluate.tasks[1].limit, r.hub.repo_id) == (7, 3, "me/demo")
    with pytest.raises(RecipeError, match="evaluate.tasks.9: no item"):
        load_recipe(DEMO, ["evaluate.tasks.9.limit=3"])
    with pytest.raises(RecipeError, match="select.nope: unknown key"):
        load_recipe(DEMO, ["select.nope=1"])
    with pytest.raises(RecipeError, match="select.limit: is a value"):
        load_recipe(DEMO, ["select.limit.x=1"])


@settings(max_examples=40, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_max_drop_accepts_exactly_the_unit_interval(x):
    ok = 0 <= x < 1
    if ok:
        assert load_recipe(minimal(), {"select.max_drop": x}).select.max_drop == pytest.approx(x)
    else:
        with pytest.raises(RecipeError, match="select.max_drop"):
            load_recipe(minimal(), {"select.max_drop": x})
