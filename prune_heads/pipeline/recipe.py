"""YAML recipes: one file that says how to prune one model family, checked before anything runs.

A recipe is the composition of the stage configs (``ModelConfig``, ``CalibrateConfig``, ``SelectConfig``,
``ExportConfig``, ``VerifyConfig``, ``EvaluateConfig``, ``ReportConfig``, ``PushConfig``): the same field
definitions that generate the CLI options check every recipe value, so an unknown key or a bad value fails
at load time with the dotted key path, and a typo in a recipe that would run for hours on a GPU is caught
in a second. ``--set key=value`` overrides are applied to the raw mapping before validation, so they get
the same checks.

Whether the model family is supported is not checked here: the family adapters raise
``UnsupportedArchitectureError`` when the model is loaded (the config may live on the Hub).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prune_heads.bounded import MAX_YAML_CHARS, load_yaml
from prune_heads.errors import PruneHeadsError, shown
from prune_heads.evaluation.stage import EvalTask, EvaluateConfig
from prune_heads.export.stage import ExportConfig, VerifyConfig
from prune_heads.model.config import ModelConfig
from prune_heads.publish.stage import PushConfig
from prune_heads.report.stage import ReportConfig
from prune_heads.schema import Config, ConfigError, build, option
from prune_heads.scoring.stage import CalibrateConfig
from prune_heads.selection.stage import SelectConfig, window_options


class RecipeError(PruneHeadsError):
    """A recipe file or override that does not follow the schema."""


def _name(v: Any) -> str | None:
    s = str(v)
    if not s.strip():
        return "must not be empty"
    if "/" in s or "\\" in s or s in (".", "..") or ".." in s or s.startswith("."):
        return f"{shown(s)} must be a plain name (no path separators, no '..', no leading dot): it names runs/<name>"
    return None


@dataclass
class Recipe(Config):
    name: str = option(required=True, check=_name, help="the run's name (default work directory runs/<name>)")
    model: ModelConfig = option(required=True)
    calibration: CalibrateConfig = option(required=True)
    select: SelectConfig = option(required=True)
    export: ExportConfig = option(default_factory=ExportConfig)
    verify: VerifyConfig = option(default_factory=VerifyConfig)
    evaluate: EvaluateConfig = option(default_factory=EvaluateConfig)
    report: ReportConfig = option(default_factory=ReportConfig)
    hub: PushConfig = option(default_factory=PushConfig)
    description: str = ""
    notes: str = ""

    def check(self) -> None:
        if self.export.format == "uniform" and self.select.policy != "uniform":
            raise ConfigError("export.format", "'uniform' needs select.policy: uniform (the same number of heads in "
                                               "every KV group)")
        for key in ("dynamic", "dynamic_fraction", "dynamic_mode", "threshold_method"):
            if getattr(self.evaluate, key) != EvaluateConfig.__dataclass_fields__[key].default:
                raise ConfigError(f"evaluate.{key}", "the recipe's evaluate stage measures the export against the "
                                  "original; the paper's per-input mode is `prune-heads eval MODEL --dynamic SCORE:T` "
                                  "(or --dynamic-fraction SCORE:F --scores DIR)")
        if self.hub.push and not self.hub.repo_id:
            raise ConfigError("hub.repo_id", "hub.push is true but no repo_id is given")

    def eval_tasks(self) -> list[EvalTask]:
        """The evaluate stage's tasks: the recipe's, else the selection task on its held-out documents."""
        if self.evaluate.tasks:
            return list(self.evaluate.tasks)
        s = self.select
        if not s.task:
            return []
        # the documents selection verified on: task, split, limit, seed and data folder as select's verify evaluator
        limit = s.verify_limit or s.limit
        if s.verify_task and s.verify_task != s.task:
            return [EvalTask(task=s.verify_task, num_fewshot=s.num_fewshot, limit=limit, split="all", seed=s.seed,
                             data_dir=s.data_dir, **window_options(s.verify_task, s.seq_len, s.score_last))]
        return [EvalTask(task=s.task, num_fewshot=s.num_fewshot, limit=limit, split="verify" if s.verify else "all",
                         seed=s.seed, data_dir=s.data_dir, **window_options(s.task, s.seq_len, s.score_last))]


def validate(raw: Mapping[str, Any]) -> Recipe:
    try:
        return build(Recipe, raw, "")
    except ConfigError as e:
        raise RecipeError(str(e)) from None


# ---- overrides ---------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[str, Any]:
    """``key.path=value``; the value is read as YAML, so ``8``, ``true``, ``null`` and ``[a, b]`` work."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {shown(item)}: expected KEY=VALUE, e.g. --set select.limit=50")
    try:
        value = load_yaml(text, f"--set {key}") if text.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {key}: cannot read value {shown(text)}: {e}") from e
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a copy of ``raw``; numeric parts index lists (``evaluate.tasks.0.limit``)."""
    import copy

    out = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(s) for s in overrides)
    for key, value in items:
        parts = key.split(".")
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, part, here)
                continue
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise RecipeError(f"{here}: is a value, not a section; cannot set {key}")
        last = parts[-1]
        if isinstance(node, list):
            idx = _list_index(node, last, key)
            node[idx] = value
        else:
            node[last] = value
    return out


def _list_index(node: list[Any], part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"{path}: no item {shown(part)} in a list of {len(node)}")
    return int(part)


def _list_item(node: list[Any], part: str, path: str) -> Any:
    return node[_list_index(node, part, path)]


# ---- loading -----------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {p} not found (see recipes/ for examples)")
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read(MAX_YAML_CHARS + 1)  # never a whole huge file: load_yaml refuses what is over
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {p} is not UTF-8 text: is it the right file?") from None
    try:
        raw = load_yaml(text, f"recipe {p}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"recipe {p} is not valid YAML{where}: {problem}") from e
    if raw is None:
        raise RecipeError(f"recipe {p} is empty")
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {p} must be a YAML mapping (name:, model:, calibration:, select:, ...), not a {type(raw).__name__}")
    return raw


def load_recipe(source: str | os.PathLike | Mapping[str, Any] | Recipe,
                overrides: Iterable[str] | Mapping[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe (a path, a mapping, or a ``Recipe``)."""
    if isinstance(source, Recipe):
        raw: dict[str, Any] = source.to_dict()
        origin = f"recipe {source.name!r}"
    elif isinstance(source, Mapping):
        raw, origin = dict(source), "recipe"
    else:
        raw, origin = read_yaml(source), f"recipe {source}"
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        return validate(raw)
    except RecipeError as e:
        raise RecipeError(f"{origin}: {e}") from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
