"""Typed configuration: one field definition gives the Python check, the recipe key and the CLI option.

A stage config is a dataclass deriving from ``Config`` whose fields are declared with ``option(...)``
(default, help text, choices, numeric range, CLI spelling). From that single definition:

- constructing the dataclass in Python checks every value (``ConfigError`` names the field);
- ``build(cls, mapping, path)`` reads a recipe section, refusing unknown keys and bad values with the
  dotted key path (``select.max_drop: must be a number >= 0``);
- ``click_options(cls)`` generates the command-line options and ``from_cli(cls, kwargs)`` builds the
  config from them, naming the option in errors (``--num-samples: must be an integer >= 1, got -3``).

So an option is added once, and the CLI and the recipe runner cannot drift apart (mergekit generates its
options from ``MergeOptions.model_fields`` the same way).

A field may hold a *variant*: ``option(variants={"static": StaticMethod, ...}, key="method")`` reads the
variant's name from ``key`` and its own fields from the same (flat) mapping or command line, so
``select.method: iterative`` with ``select.round_size: 2`` builds ``IterativeMethod(round_size=2)``, and a
key of another variant is refused by name.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

from prune_heads.errors import PruneHeadsError, shown


class ConfigError(PruneHeadsError):
    """A config value that is out of range, of the wrong type, or unknown. ``field`` is the key that failed."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")

    def relabel(self, label: str) -> ConfigError:
        return ConfigError(label, self.message)


def option(default: Any = MISSING, *, help: str = "", choices: tuple[Any, ...] = (), ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None, cli: str | bool = True,
           short: str | None = None, flag: str | None = None, required: bool = False,
           check: Callable[[Any], str | None] | None = None, variants: dict[str, type] | None = None,
           key: str | None = None, default_factory: Any = MISSING, metavar: str | None = None) -> Any:
    """A config field.

    Args:
        cli: the option's long name without dashes (default: the field name with ``-``), or False for a
            recipe-only field.
        flag: for booleans, ``"pair"`` gives ``--x/--no-x``; the default is a single ``--x`` flag (or
            ``--no-x`` when the default is True).
        check: extra validation returning an error message or None.
    """
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "cli": cli, "short": short,
            "flag": flag, "required": required, "check": check, "variants": variants, "key": key,
            "metavar": metavar}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---- checking -----------------------------------------------------------------------------------
_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), type(None) in typing.get_args(tp)
    return tp, False


def _as_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, not {shown(value)}")
    return value


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, not {shown(value)}")
    if not -(2**63) <= value < 2**63:  # every int option ends in torch/numpy (seeds, sizes): 64 bits at most
        raise ConfigError(name, f"must fit in 64 bits, got an integer of {len(str(abs(value)))} digits")
    return value


def _as_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, f"must be a number, not {shown(value)}")
    if not math.isfinite(value):  # every float option and recipe key: NaN/Inf would pass every range check
        raise ConfigError(name, f"must be a finite number, got {value}")
    return float(value)


def _as_str(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(name, f"must be a string, not {shown(value)}")
    return str(value)


def _as_dict(value: Any, name: str) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(name, f"must be a mapping, not {shown(value)}")
    return dict(value)


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {bool: _as_bool, int: _as_int, float: _as_float, str: _as_str,
                                                   dict: _as_dict}


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` as type ``tp`` (ints are numbers, YAML scalars are strings); ``ConfigError`` otherwise."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional or base is Any:
            return None
        raise ConfigError(name, "a value is required")
    origin = typing.get_origin(base)
    if origin is list:
        (inner,) = typing.get_args(base) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"must be a list, not {shown(value)}")
        return [coerce(v, inner, f"{name}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(base):
        return value if isinstance(value, base) else build(base, value, name)
    checker = _SCALARS.get(origin or base)
    return checker(value, name) if checker is not None else value


def _cli_item(text: str, tp: Any, name: str) -> Any:
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(name, f"must be a comma-separated list of {_WORDS[tp]}s, not {shown(text)}") from None
    return text


def _range_text(meta: Mapping[str, Any], integer: bool) -> str:
    what = "an integer" if integer else "a number"
    lo = (">=", meta["ge"]) if meta["ge"] is not None else (">", meta["gt"]) if meta["gt"] is not None else None
    hi = ("<=", meta["le"]) if meta["le"] is not None else ("<", meta["lt"]) if meta["lt"] is not None else None
    if lo and hi:
        left = "[" if lo[0] == ">=" else "("
        right = "]" if hi[0] == "<=" else ")"
        return f"must be {what} in {left}{lo[1]:g}, {hi[1]:g}{right}"
    op, v = lo or hi  # type: ignore[misc]
    return f"must be {what} {op} {v:g}"


def check_value(meta: Mapping[str, Any], value: Any, name: str) -> None:
    """Choices, numeric range and the field's own check; ``None`` (unset optional) always passes."""
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        listed = ", ".join("none" if c is None else str(c) for c in meta["choices"])
        raise ConfigError(name, f"must be one of {listed}, not {shown(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bad = isinstance(value, float) and math.isnan(value)
        bad |= meta.get("ge") is not None and value < meta["ge"]
        bad |= meta.get("gt") is not None and value <= meta["gt"]
        bad |= meta.get("le") is not None and value > meta["le"]
        bad |= meta.get("lt") is not None and value >= meta["lt"]
        if bad:
            raise ConfigError(name, f"{_range_text(meta, isinstance(value, int))}, got {shown(value)}")
    if meta.get("check"):
        msg = meta["check"](value)
        if msg:
            raise ConfigError(name, msg)


@dataclass
class Config:
    """Base of every stage config: values are coerced and checked when the object is made."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.metadata.get("variants"):
                continue
            value = coerce(getattr(self, f.name), hints[f.name], f.name)
            check_value(f.metadata, value, f.name)
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Checks across fields (override); raise ``ConfigError`` naming the field to fix."""

    def to_dict(self) -> dict[str, Any]:
        """Flat mapping in recipe form (a variant's fields beside its key)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("variants"):
                out[f.metadata["key"]] = variant_name(f.metadata["variants"], value)
                out.update(value.to_dict())
            elif isinstance(value, Config):
                out[f.name] = value.to_dict()
            elif isinstance(value, list):
                out[f.name] = [v.to_dict() if isinstance(v, Config) else v for v in value]
            else:
                out[f.name] = value
        return out


def variant_name(variants: Mapping[str, type], value: Any) -> str:
    for name, cls in variants.items():
        if type(value) is cls:
            return name
    raise TypeError(f"{type(value).__name__} is not one of {', '.join(variants)}")


# ---- recipes ------------------------------------------------------------------------------------
def _variant_field(cls: type) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(cls) if f.metadata.get("variants")), None)


def build(cls: type, raw: Any, path: str = "", root: str = "recipe") -> Any:
    """``cls`` from a mapping, with dotted key paths in every error (``path`` prefixes them; ``root`` names
    the whole mapping in messages)."""
    where = path or root
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, f"must be a mapping of keys to values, not {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    vf = _variant_field(cls)
    variant_cls, own = None, dict(raw)
    if vf is not None:
        variants, key = vf.metadata["variants"], vf.metadata["key"]
        name = own.pop(key, next(iter(variants)))
        if name not in variants:
            raise ConfigError(_join(path, key), f"must be one of {', '.join(variants)}, not {shown(name)}")
        variant_cls = variants[name]
        mine = {f.name for f in dataclasses.fields(variant_cls)}
        others = {f.name: n for n, c in variants.items() if c is not variant_cls for f in dataclasses.fields(c)}
        sub = {k: own.pop(k) for k in list(own) if k in mine and k not in fields}
        for k in own:
            if k in others and k not in fields:
                raise ConfigError(_join(path, k), f"applies to {key} {others[k]}, not {name}")
    unknown = [k for k in own if k not in fields or (vf is not None and k == vf.name)]
    if unknown:
        accepted = [n for n in fields if vf is None or n != vf.name]
        if vf is not None:
            accepted += [vf.metadata["key"], *[f.name for f in dataclasses.fields(variant_cls)]]
        raise ConfigError(_join(path, str(unknown[0])), f"unknown key; {where} accepts {', '.join(accepted)}")
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for name, f in fields.items():
        if vf is not None and name == vf.name:
            kwargs[name] = build(variant_cls, sub, path)
            continue
        if name not in own:
            if f.metadata.get("required"):
                hint = f" ({f.metadata['help']})" if f.metadata.get("help") else ""
                raise ConfigError(_join(path, name), f"required key is missing{hint}")
            continue
        kwargs[name] = coerce(own[name], hints[name], _join(path, name))
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.relabel(_join(path, e.field)) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---- command line -------------------------------------------------------------------------------
def cli_name(f: dataclasses.Field) -> str | None:
    c = f.metadata.get("cli", True)
    if c is False:
        return None
    return c if isinstance(c, str) else f.name.replace("_", "-")


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """``(field, owner class)`` for every CLI option of ``cls``, variants' fields included."""
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("variants"):
            seen = {x.name for x, _ in out}
            for vcls in f.metadata["variants"].values():
                for g in dataclasses.fields(vcls):
                    if g.name not in seen and cli_name(g):
                        out.append((g, vcls))
                        seen.add(g.name)
        elif cli_name(f):
            out.append((f, cls))
    return out


def click_options(cls: type, *, skip: tuple[str, ...] = (), defaults: Mapping[str, Any] | None = None) -> Callable:
    """Decorator adding one click option per CLI field of ``cls`` (variant fields default to unset)."""
    import click

    hints: dict[str, Any] = {}
    for c in [cls, *[v for f in dataclasses.fields(cls) for v in (f.metadata.get("variants") or {}).values()]]:
        hints.update(typing.get_type_hints(c))
    defaults = dict(defaults or {})
    decorators = []
    for f, owner in cli_fields(cls):
        if f.name in skip:
            continue
        decorators.append(_click_option(click, f, hints[f.name], owner is not cls, defaults.get(f.name, MISSING)))
    vf = _variant_field(cls)
    if vf is not None and vf.metadata["key"] not in skip:
        names = list(vf.metadata["variants"])
        decorators.append(click.option(f"--{vf.metadata['key']}", "variant_choice", type=click.Choice(names),
                                       default=names[0], show_default=True, help=vf.metadata.get("help") or None))

    def apply(fn: Callable) -> Callable:
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _click_option(click: Any, f: dataclasses.Field, tp: Any, from_variant: bool, override: Any) -> Callable:
    meta = f.metadata
    name = cli_name(f)
    base, _ = _unwrap_optional(tp)
    default = override if override is not MISSING else _field_default(f)
    help_text = meta.get("help") or ""
    decls = [f"--{name}"] + ([meta["short"]] if meta.get("short") else [])
    if base is bool:
        if meta.get("flag") == "pair":
            return click.option(f"--{name}/--no-{name}", f.name, default=None if from_variant else default,
                                show_default=not from_variant, help=help_text)
        flag = f"--no-{name}" if default is True and not from_variant else f"--{name}"
        return click.option(flag, f.name, is_flag=True, default=None, help=help_text)
    ctype: Any = {int: click.INT, float: click.FLOAT}.get(base, click.STRING)
    if meta.get("choices") and base is str:
        ctype = click.Choice([c for c in meta["choices"] if c is not None])
    if typing.get_origin(base) is list:
        help_text = (help_text + " (comma-separated)").strip()
        default = ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in default) \
            if isinstance(default, list) else default
    show = not from_variant and default is not None
    return click.option(*decls, f.name, type=ctype, default=None if from_variant else default, show_default=show,
                        help=help_text or None, metavar=meta.get("metavar"))


def from_cli(cls: type, values: Mapping[str, Any], **fixed: Any) -> Any:
    """``cls`` from parsed click values (plus ``fixed`` fields), errors naming the ``--option``.

    Unset options (``None``) keep the config's default; a single boolean flag given toggles its default.
    """
    labels = {f.name: f"--{cli_name(f)}" for f, _ in cli_fields(cls) if cli_name(f)}
    hints: dict[str, Any] = {}
    for c in {owner for _, owner in cli_fields(cls)} | {cls}:
        hints.update(typing.get_type_hints(c))
    raw: dict[str, Any] = {}
    for f, _owner in cli_fields(cls):
        value = values.get(f.name)
        if value is None:
            continue
        base = _unwrap_optional(hints[f.name])[0]
        if base is bool and f.metadata.get("flag") != "pair":
            if not value:
                continue
            value = not bool(_field_default(f))
        elif typing.get_origin(base) is list and isinstance(value, str):  # comma-separated on the command line
            (inner,) = typing.get_args(base) or (str,)
            try:
                value = [_cli_item(v.strip(), inner, f.name) for v in value.split(",") if v.strip()]
            except ConfigError as e:
                raise e.relabel(labels.get(f.name, f.name)) from None
        raw[f.name] = value
    vf = _variant_field(cls)
    if vf is not None and values.get("variant_choice") is not None:
        raw[vf.metadata["key"]] = values["variant_choice"]
    raw.update(fixed)
    try:
        return build(cls, raw)
    except ConfigError as e:
        field = e.field.split(".")[0]
        raise e.relabel(labels.get(field, e.field)) from None


__all__ = ["Config", "ConfigError", "build", "check_value", "cli_fields", "click_options", "coerce", "from_cli",
           "option", "variant_name"]
