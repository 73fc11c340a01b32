"""Hostile values get a bound before they are used: YAML with aliases, and text shown in messages.

A YAML alias bomb (``a: &a [x, x, ...]``, ``b: &b [*a, *a, ...]``, ...) is a few hundred bytes that PyYAML turns
into a tree of shared lists; nothing is copied, so loading is instant, but anything that walks it (``repr`` in an
error message, ``json.dumps`` of a recipe's signature, a deep copy into a model card) visits every one of its
billions of paths. ``load_yaml`` counts the expanded size of what it loaded (each distinct node once, memoised,
so counting is linear in the file) and refuses more than ``MAX_NODES``. ``errors.shown`` bounds the ``repr``.
"""

from __future__ import annotations

from typing import Any

from prune_heads.errors import PruneHeadsError

#: expanded nodes a recipe, an override or a model card's metadata may hold (a large recipe has a few hundred)
MAX_NODES = 100_000

#: characters of YAML read at all (a large recipe is a few KB): PyYAML's time grows with nesting, so the
#: text itself needs a bound for the time to have one
MAX_YAML_CHARS = 200_000

#: levels of nesting a recipe may have (recipes use four or five)
MAX_DEPTH = 64


class _TooDeep(Exception):
    pass


def expanded_size(value: Any, limit: int = MAX_NODES, max_depth: int | None = None) -> int:
    """Number of nodes ``value`` has when every shared (aliased) part is counted each time it appears; stops
    counting past ``limit``. Linear in the number of distinct containers. Nesting deeper than ``max_depth``
    raises ``ValueError`` (without it, deeper than 200 counts as too large)."""
    memo: dict[int, int] = {}

    def size(v: Any, depth: int) -> int:
        if not isinstance(v, (list, tuple, dict)):
            return 1
        if id(v) in memo:
            return memo[id(v)]
        if max_depth is not None and depth >= max_depth:
            raise _TooDeep
        if depth > 200:
            return limit + 1  # nested deeper than any recipe: treat as too large (and never recurse further)
        memo[id(v)] = limit + 1  # a self-reference counts as unbounded
        items = list(v.keys()) + list(v.values()) if isinstance(v, dict) else v
        total = 1
        for item in items:
            total += size(item, depth + 1)
            if total > limit:
                break
        memo[id(v)] = min(total, limit + 1)
        return memo[id(v)]

    return size(value, 0)


def load_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)``, refusing (one line naming ``what``) a document whose aliases expand it past
    ``MAX_NODES`` nodes, or longer than ``MAX_YAML_CHARS``. YAML errors propagate as ``yaml.YAMLError`` for the
    caller to word.

    libyaml's loader is used where PyYAML has it (the same safe constructor): the pure-Python scanner is
    quadratic in flow nesting (a few hundred ``[`` cost seconds per value), libyaml is linear and refuses nesting
    beyond 1000 levels itself."""
    import yaml

    if len(text) > MAX_YAML_CHARS:
        raise PruneHeadsError(f"{what} is longer than {MAX_YAML_CHARS:,} characters of YAML (a recipe is a few "
                              "KB): is it the right file?")
    try:
        value = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except RecursionError:
        raise PruneHeadsError(f"{what} is nested too deeply to read; write it flat") from None
    try:
        size = expanded_size(value, max_depth=MAX_DEPTH)
    except _TooDeep:
        raise PruneHeadsError(f"{what} is nested more than {MAX_DEPTH} levels deep; write it flat") from None
    if size > MAX_NODES:
        raise PruneHeadsError(f"{what} expands to more than {MAX_NODES:,} values through YAML aliases (&anchor/*alias); "
                              "write the values out instead")
    return value
