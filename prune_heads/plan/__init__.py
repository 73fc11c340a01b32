"""Plan files: which heads to remove, and the typed record of how that choice was made.

The only required key is ``removed_heads`` (a list of ``[layer, head]`` integer pairs), so a hand-written
plan works for masking and export (with a warning that nothing ties it to a model). Every other key is
a field of ``SelectionResult`` (``prune_heads.plan.record``), type-checked on load.
"""

from __future__ import annotations

import json
import operator
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prune_heads.errors import PruneHeadsError
from prune_heads.io_utils import write_json_atomic
from prune_heads.model.adapters import HeadLayout, get_adapter
from prune_heads.model.fingerprint import check_config, check_fingerprint
from prune_heads.plan.record import PlanFormatError, SelectionResult

Head = tuple[int, int]


def parse_heads(entries: Any, where: str = "plan") -> list[Head]:
    """``[[layer, head], ...]`` with JSON integers only: ``[0.9, 1.7]``, ``[true, "2"]`` or ``[1]`` are refused
    (``int()`` would silently turn them into other heads)."""
    if not isinstance(entries, (list, tuple)):
        raise PlanFormatError(f"{where}: removed_heads must be a list of [layer, head] pairs, not {type(entries).__name__}")
    heads = []
    for i, e in enumerate(entries):
        ok = isinstance(e, (list, tuple)) and len(e) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in e)
        if not ok:
            raise PlanFormatError(f"{where}: removed_heads[{i}] is {json.dumps(e)}; each entry must be a pair of "
                                  "non-negative integers [layer, head], e.g. [3, 5]")
        heads.append((int(e[0]), int(e[1])))
    return heads


@dataclass
class Plan:
    removed_heads: list[Head]
    selection: SelectionResult = field(default_factory=SelectionResult)
    #: the file this plan was loaded from or saved to: files that travel with it (its compensation) sit beside it
    path: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.selection, Mapping):
            self.selection = SelectionResult.from_dict(dict(self.selection))
        # operator.index: numpy/torch integers are fine here, floats are not (files are parsed strictly)
        self.removed_heads = sorted({(operator.index(a), operator.index(b)) for a, b in self.removed_heads})

    # ---- views ----------------------------------------------------------------------------
    def by_layer(self, num_layers: int) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {i: [] for i in range(num_layers)}
        for layer, h in self.removed_heads:
            out[layer].append(h)
        return out

    def mask(self, layout: HeadLayout) -> torch.Tensor:
        """``(L, H)`` bool, True = head removed."""
        m = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.bool)
        for layer, h in self.removed_heads:
            m[layer, h] = True
        return m

    @property
    def allow_empty_layers(self) -> bool:
        return self.selection.allow_empty_layers

    @property
    def handwritten(self) -> bool:
        return self.selection.method == "manual" and self.selection.fingerprint is None

    # ---- validation -----------------------------------------------------------------------
    def validate(self, model_or_config: Any, *, check_weights: Any = None) -> HeadLayout:
        """Check indices against the model; refuse emptied layers unless the plan allows them."""
        config = getattr(model_or_config, "config", model_or_config)
        from prune_heads.model.attention import is_sliced_export

        if is_sliced_export(config):  # before any work: its heads are not the original's (issue 21 class 5)
            raise PruneHeadsError(f"the model is a sliced prune-heads export ({config.model_type}): a plan applies to "
                                  "the original model (its prune_heads.json names it), not to a sliced one")
        layout = get_adapter(config).layout(config)
        for layer, h in self.removed_heads:
            if not (0 <= layer < layout.num_layers and 0 <= h < layout.num_heads):
                raise PruneHeadsError(
                    f"plan removes head [{layer}, {h}] but the model has {layout.num_layers} layers x "
                    f"{layout.num_heads} heads: the plan was made for another model"
                )
        fp = self.selection.fingerprint
        if fp is None:
            warnings.warn("plan has no model fingerprint (hand-written?); it cannot be checked against the model", stacklevel=2)
        elif check_weights is not None:
            check_fingerprint(fp, check_weights, "this plan")
        else:
            check_config(fp, config, "this plan")
        if not self.allow_empty_layers:
            counts = self.mask(layout).sum(1)
            empty = [i for i, c in enumerate(counts.tolist()) if c == layout.num_heads]
            if empty:
                raise PruneHeadsError(
                    f"plan removes every head of layer(s) {empty}; select again with --allow-empty-layers if that is intended"
                )
        return layout

    # ---- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"removed_heads": [list(x) for x in self.removed_heads], **self.selection.to_dict()}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        self.path = write_json_atomic(path, self.to_dict(), overwrite=overwrite)
        return self.path

    @classmethod
    def from_dict(cls, d: Any, where: str = "plan") -> Plan:
        if not isinstance(d, dict) or "removed_heads" not in d:
            raise PlanFormatError(f"{where} has no 'removed_heads' list")
        heads = parse_heads(d["removed_heads"], where)
        return cls(heads, SelectionResult.from_dict({k: v for k, v in d.items() if k != "removed_heads"}, where))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise PruneHeadsError(f"plan file {p} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PruneHeadsError(f"plan file {p} is not valid JSON: {e}") from e
        plan = cls.from_dict(d, f"plan file {p}")
        plan.path = p
        return plan


__all__ = ["Plan", "PlanFormatError", "SelectionResult", "parse_heads"]
