"""The largest ``k`` that passes a (presumed monotone) test, in few evaluations.

Every probe is a full task evaluation, so the count matters more than anything else. The search
gallops upward from a first guess (doubling while the test passes), then bisects the bracket it
found. Each probe is clamped so that, whatever the outcome, the rest of the search still fits in
``max_probes(n)`` evaluations: galloping pays off when the answer is small, and can never cost more
than ``ceil(log2(n + 1)) + 2`` probes (plus the baseline: ``log2(#units) + 3`` full evaluations).

``k = 0`` is never probed here: it is the unmasked baseline, which the caller evaluates and checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: extra probes over plain bisection that the galloping phase may spend
SLACK = 2


def max_probes(n: int) -> int:
    """Upper bound on the probes ``search_largest_k`` makes for ``n`` units (``k = 0`` excluded)."""
    return 0 if n <= 0 else math.ceil(math.log2(n + 1)) + SLACK


def default_first_probe(n: int) -> int:
    """Start near 1/16 of the units: budgets of interest remove a few to a few tens of percent of the
    heads, so starting at 1 would spend probes on values that nearly always pass."""
    return max(1, n // 16)


@dataclass
class SearchResult:
    k: int
    probes: list[tuple[int, bool]] = field(default_factory=list)  # (k, passed) in evaluation order

    @property
    def num_probes(self) -> int:
        return len(self.probes)


def search_largest_k(n: int, passes: Callable[[int], bool], *, first: int | None = None,
                     progress: Any = None) -> SearchResult:
    """Largest ``k`` in ``[0, n]`` with ``passes(k)`` (``passes(0)`` is assumed true).

    With a monotone test the answer is exact. With a noisy one the returned ``k`` is still one that
    was evaluated and passed (or 0), so the result never rests on an untested value.
    """
    lo, hi = 0, n + 1  # lo passed (or is 0); hi failed (or is the sentinel n + 1)
    left = max_probes(n)
    probes: list[tuple[int, bool]] = []
    bracketed = False
    nxt = min(n, first if first is not None else default_first_probe(n))
    while hi - lo > 1:
        if bracketed:
            p = (lo + hi) // 2
        else:
            p = max(nxt, lo + 1)
        # after this probe, both outcomes must still be settled by bisection in left - 1 probes
        span = 2 ** (left - 1)
        p = min(max(p, hi - span), lo + span, hi - 1)
        p = max(p, lo + 1)
        ok = bool(passes(p))
        probes.append((p, ok))
        left -= 1
        if progress is not None:
            progress.update(1)
        if ok:
            lo = p
            nxt = 2 * p
        else:
            hi = p
            bracketed = True
        if left <= 0 and hi - lo > 1:  # cannot happen by construction; keep the guarantee explicit
            raise AssertionError(f"search ran out of probes with bracket ({lo}, {hi})")
    return SearchResult(k=lo, probes=probes)


__all__ = ["SearchResult", "default_first_probe", "max_probes", "search_largest_k"]
