"""Package attributes imported on first use, so importing a package (or a sibling module of it, such as a
stage's config) does not import torch, transformers or matplotlib: ``prune-heads --help`` stays instant."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that resolves ``name`` from ``exports[name]`` (a module path) when first used."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        import sys

        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
