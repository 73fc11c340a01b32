"""YAML recipes: one file that says how to prune one model family, checked before anything runs.

A recipe is validated by hand against the dataclasses below (no schema dependency): an unknown key or
a bad value fails at load time with the dotted key path in the message, so a typo in a recipe that
would run for hours on a GPU is caught in a second. ``--set key=value`` overrides are applied to the
raw mapping before validation, so they get the same checks.

Whether the model family is supported is not checked here: the family adapters raise
``UnsupportedArchitectureError`` when the model is loaded (the config may live on the Hub).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prune_heads.errors import PruneHeadsError


class RecipeError(PruneHeadsError):
    """A recipe file or override that does not follow the schema."""


def _meta(help: str = "", *, required: bool = False, choices: tuple[Any, ...] = (),
          check: Callable[[Any], str | None] | None = None) -> dict[str, Any]:
    return {"help": help, "required": required, "choices": choices, "check": check}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False) -> Callable[[Any], str | None]:
    """A check that the value lies in an interval, with the interval in the message."""
    def check(v: Any) -> str | None:
        bad = (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi)))
        if not bad and not (isinstance(v, float) and math.isnan(v)):
            return None
        what = "an integer" if integer else "a number"
        if lo is not None and hi is not None:
            return f"must be {what} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        if lo is not None:
            return f"must be {what} {'>' if lo_open else '>='} {lo:g}"
        return f"must be {what} {'<' if hi_open else '<='} {hi:g}"
    return check


def _score_id(v: Any) -> str | None:
    from prune_heads.scoring.score_defs import all_score_ids

    known = all_score_ids()
    if v == "random":  # the selector's random-ranking baseline
        return None
    return None if v in known else f"unknown score {v!r}; known: {', '.join(known)}"


def _score_ids(v: Any) -> str | None:
    for s in v:
        msg = _score_id(s) if s != "random" else "'random' is a ranking, not a calibration score"
        if msg:
            return msg
    return None


def _nonempty(v: Any) -> str | None:
    return None if str(v).strip() else "must not be empty"


# ---- schema ------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    id: str = field(default="", metadata=_meta("Hub id, local directory, GGUF path, or 'smollm2'", required=True, check=_nonempty))
    dtype: str = field(default="float32", metadata=_meta(choices=("float32", "bfloat16", "float16", "auto")))
    device: str | None = field(default=None, metadata=_meta("cpu, cuda, cuda:1 (default: cuda if available)"))
    device_map: str | None = field(default=None, metadata=_meta("'auto' to spread the model over GPUs"))
    revision: str | None = None
    gguf_file: str | None = None
    trust_remote_code: bool = False


@dataclass
class CalibrationSection:
    data: str = field(default="", metadata=_meta("data spec (see prune_heads.data)", required=True, check=_nonempty))
    offline_data: str | None = field(default=None, metadata=_meta("used instead of a hub: spec when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"))
    num_samples: int = field(default=128, metadata=_meta(check=_range(1, integer=True)))
    seq_len: int = field(default=512, metadata=_meta(check=_range(2, integer=True)))
    batch_size: int = field(default=8, metadata=_meta(check=_range(1, integer=True)))
    seed: int = 0
    scores: list[str] | None = field(default=None, metadata=_meta("score ids (default: every forward score)", check=_score_ids))
    block_size: int | None = field(default=None, metadata=_meta(check=_range(1, integer=True)))


@dataclass
class SelectSection:
    method: str = field(default="static", metadata=_meta(choices=("static", "iterative", "gates")))
    score: str = field(default="ahon_ln", metadata=_meta(check=_score_id))
    task: str = field(default="", metadata=_meta("lm-eval task, mc:FILE.jsonl, ppl:DATA or kl:DATA", required=True, check=_nonempty))
    num_fewshot: int | None = field(default=None, metadata=_meta(check=_range(0, integer=True)))
    limit: int | None = field(default=None, metadata=_meta(check=_range(1, integer=True)))
    max_drop: float = field(default=0.01, metadata=_meta(
        "allowed loss: accuracy points/100, a fraction with relative, or perplexity/KL units for ppl:/kl: tasks",
        check=_range(0)))
    relative: bool = False
    policy: str = field(default="free", metadata=_meta(choices=("free", "kv-groups", "uniform")))
    min_heads_per_layer: int = field(default=1, metadata=_meta(check=_range(0, integer=True)))
    allow_empty_layers: bool = False
    verify: bool = field(default=True, metadata=_meta("check the plan on held-out documents of the task"))
    verify_task: str | None = None
    verify_limit: int | None = field(default=None, metadata=_meta(check=_range(1, integer=True)))
    batch_size: int = field(default=8, metadata=_meta(check=_range(1, integer=True)))
    seed: int = 0
    # measured selectors
    round_size: int = field(default=4, metadata=_meta(check=_range(1, integer=True)))
    candidates_fraction: float | None = field(default=None, metadata=_meta(check=_range(0, 1, lo_open=True)))
    target_fraction: float | None = field(default=None, metadata=_meta(check=_range(0, 1, lo_open=True, hi_open=True)))
    l0_penalty: float | None = field(default=None, metadata=_meta(check=_range(0, lo_open=True)))
    steps: int = field(default=200, metadata=_meta(check=_range(1, integer=True)))
    lr: float = field(default=0.05, metadata=_meta(check=_range(0, lo_open=True)))


@dataclass
class ExportSection:
    format: str = field(default="sliced", metadata=_meta(choices=("sliced", "uniform", "masked")))
    dtype: str | None = field(default=None, metadata=_meta(choices=(None, "float32", "bfloat16", "float16")))
    shard_size: str = "5GB"
    approximate_norms: bool = False
    verify: bool = True
    verify_tol: float = field(default=1e-4, metadata=_meta(check=_range(0, lo_open=True)))
    verify_num_sequences: int = field(default=4, metadata=_meta(check=_range(1, integer=True)))
    verify_seq_len: int = field(default=64, metadata=_meta(check=_range(2, integer=True)))


@dataclass
class EvalTaskSection:
    task: str = field(default="", metadata=_meta(required=True, check=_nonempty))
    num_fewshot: int | None = field(default=None, metadata=_meta(check=_range(0, integer=True)))
    limit: int | None = field(default=None, metadata=_meta(check=_range(1, integer=True)))
    split: str = field(default="all", metadata=_meta(choices=("all", "search", "verify")))


@dataclass
class EvaluateSection:
    tasks: list[EvalTaskSection] = field(default_factory=list, metadata=_meta(
        "tasks to report; empty = the selection task on its held-out (verify) documents"))
    batch_size: int = field(default=8, metadata=_meta(check=_range(1, integer=True)))
    speed_seq_len: int = field(default=128, metadata=_meta("prefill length for the speed check; 0 skips it", check=_range(0, integer=True)))
    speed_repeats: int = field(default=3, metadata=_meta(check=_range(1, integer=True)))


@dataclass
class ReportSection:
    enabled: bool = field(default=True, metadata=_meta("plots of the calibration scores beside the summary"))
    scores: list[str] | None = field(default=None, metadata=_meta("score ids to plot (default: the report's choice)", check=_score_ids))
    fraction: float = field(default=0.1, metadata=_meta(check=_range(0, 1, lo_open=True)))


@dataclass
class HubSection:
    repo_id: str | None = None
    private: bool = False
    push: bool = field(default=False, metadata=_meta("push after a successful run (CLI: --push/--no-push)"))
    revision: str | None = None


@dataclass
class Recipe:
    name: str = field(default="", metadata=_meta(required=True, check=_nonempty))
    model: ModelSection = field(default_factory=ModelSection, metadata=_meta(required=True))
    calibration: CalibrationSection = field(default_factory=CalibrationSection, metadata=_meta(required=True))
    select: SelectSection = field(default_factory=SelectSection, metadata=_meta(required=True))
    export: ExportSection = field(default_factory=ExportSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    report: ReportSection = field(default_factory=ReportSection)
    hub: HubSection = field(default_factory=HubSection)
    description: str = ""
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Every key, defaults filled in: what the pipeline hashes and records."""
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))

    def calibration_data(self) -> str:
        """The data spec to use now: the offline alternative when the Hub is switched off."""
        cal = self.calibration
        if cal.offline_data and cal.data.startswith("hub:") and hub_offline():
            return cal.offline_data
        return cal.data


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# ---- validation --------------------------------------------------------------------------------
_TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return _convert(value, inner[0], path)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: must be a list")
        return [_convert(v, args[0], f"{path}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{path}: must be a number, not {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RecipeError(f"{path}: must be a string, not {value!r}")
        return str(value)
    raise TypeError(f"schema type {tp} at {path}")


def _build(cls: type, raw: Any, path: str) -> Any:
    where = path or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: must be a mapping of keys to values, not {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise RecipeError(f"{key}: unknown key; {where} accepts {', '.join(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        meta = f.metadata
        if name not in raw:
            if meta.get("required"):
                raise RecipeError(f"{key}: required key is missing" + (f" ({meta['help']})" if meta.get("help") else ""))
            continue
        value = _convert(raw[name], hints[name], key)
        if value is not None:
            choices = meta.get("choices") or ()
            if choices and value not in choices:
                shown = ", ".join("null" if c is None else str(c) for c in choices)
                raise RecipeError(f"{key}: must be one of {shown}, not {value!r}")
            check = meta.get("check")
            msg = check(value) if check else None
            if msg:
                raise RecipeError(f"{key}: {msg}")
        kwargs[name] = value
    return cls(**kwargs)


def _cross_checks(r: Recipe) -> None:
    label_free = r.select.task.startswith(("ppl:", "kl:"))
    if not label_free and not 0 <= r.select.max_drop < 1:
        raise RecipeError("select.max_drop: must be a number in [0, 1) (0.01 = one accuracy point, or 1% with "
                          "select.relative); only ppl:/kl: tasks take larger values")
    if r.export.format == "uniform" and r.select.policy != "uniform":
        raise RecipeError("export.format: 'uniform' needs select.policy: uniform (the same heads count in every KV group)")
    if r.select.method == "gates" and r.select.target_fraction is None and r.select.l0_penalty is None:
        raise RecipeError("select.target_fraction: the gates method needs select.target_fraction or select.l0_penalty")
    if r.hub.push and not r.hub.repo_id:
        raise RecipeError("hub.repo_id: hub.push is true but no repo_id is given")


def validate(raw: Mapping[str, Any]) -> Recipe:
    recipe = _build(Recipe, raw, "")
    _cross_checks(recipe)
    return recipe


# ---- overrides ---------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[str, Any]:
    """``key.path=value``; the value is read as YAML, so ``8``, ``true``, ``null`` and ``[a, b]`` work."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set select.limit=50")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"--set {key}: cannot read value {text!r}: {e}") from e
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
        raise RecipeError(f"{path}: no item {part!r} in a list of {len(node)}")
    return int(part)


def _list_item(node: list[Any], part: str, path: str) -> Any:
    return node[_list_index(node, part, path)]


# ---- loading -----------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe {p} not found (see recipes/ for examples)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
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
