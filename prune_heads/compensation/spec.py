"""``CompensationSpec``: how the heads a plan removes are compensated, as plans and configs record it.

- ``none``: the removed heads are zeroed (the behaviour before compensation existed);
- ``mean``: their mean output over the calibration data becomes an ``o_proj`` bias (FLAP);
- ``lsq``: the kept heads' ``o_proj`` columns and an ``o_proj`` bias are refitted, in closed form, so the
  layer's attention output best reproduces the unpruned one in least squares (OBS / SlimGPT).

``sequential`` takes each layer's statistics from the model whose earlier layers are already pruned and
compensated (SparseGPT's order) instead of from the unpruned model. ``ridge`` is the relative ridge
``lambda``: the covariance gets ``lambda * mean(diag) * I`` added before it is inverted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prune_heads.errors import PruneHeadsError

MODES: tuple[str, ...] = ("none", "mean", "lsq")
#: relative ridge; chosen on SmolLM2 (benchmarks/results/compensation.md): 1e-2 was at least as good as
#: 1e-3 and 1e-4 on held-out perplexity and keeps every covariance well conditioned
DEFAULT_RIDGE = 1e-2
_KEYS = ("mode", "sequential", "ridge")


@dataclass(frozen=True)
class CompensationSpec:
    """The compensation a plan asks for (``mode``, ``sequential``, ``ridge``); see the module docstring."""

    mode: str = "lsq"
    sequential: bool = False
    ridge: float = DEFAULT_RIDGE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PruneHeadsError(f"unknown compensation {self.mode!r}; choose from {', '.join(MODES)}")
        ridge = float(self.ridge)
        if not math.isfinite(ridge) or ridge < 0:
            raise PruneHeadsError(f"the compensation ridge must be a finite number >= 0, got {self.ridge!r}")
        object.__setattr__(self, "ridge", ridge)
        if not isinstance(self.sequential, bool):
            raise PruneHeadsError(f"compensation 'sequential' must be true or false, got {self.sequential!r}")
        if self.sequential and self.mode == "none":
            raise PruneHeadsError("sequential compensation needs mode mean or lsq (mode none zeroes the heads)")

    @property
    def active(self) -> bool:
        """Whether anything beyond zeroing happens."""
        return self.mode != "none"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "sequential": self.sequential, "ridge": self.ridge}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> CompensationSpec:
        """Read a spec from a plan or recipe; a missing spec means ``none`` (plans made before compensation)."""
        if d is None:
            return cls(mode="none")
        if not isinstance(d, dict):
            raise PruneHeadsError(f"compensation must be a mapping with keys {', '.join(_KEYS)}, got {d!r}")
        unknown = sorted(set(d) - set(_KEYS) - {"moments", "statistics", "solve_seconds", "file", "fingerprint", "sha256"})
        if unknown:
            raise PruneHeadsError(f"unknown compensation key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
        return cls(mode=d.get("mode", "lsq"), sequential=bool(d.get("sequential", False)),
                   ridge=d.get("ridge", DEFAULT_RIDGE))


def as_spec(value: CompensationSpec | str | dict[str, Any] | None) -> CompensationSpec:
    """A spec from a spec, a mode name (``"lsq"``), a dict, or None (= ``none``)."""
    if isinstance(value, CompensationSpec):
        return value
    if value is None:
        return CompensationSpec(mode="none")
    if isinstance(value, str):
        return CompensationSpec(mode=value)
    return CompensationSpec.from_dict(value)
