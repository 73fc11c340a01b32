"""The largest ``k`` that passes a (presumed monotone) test, in few evaluations.

Two searches:

- ``search_largest_k`` (gallop, then bisection) is the fewest evaluations for a test that is exact.
  With a noisy test it retries after every failure, and each retry near the answer is another chance
  for a lucky pass: the returned ``k`` is over budget more often than one test's error rate.
- ``search_ascending`` tests increasing ``k`` and stops at the first failure (fixed-sequence testing,
  as in "Learn then Test", Angelopoulos et al. 2021): only the first ``k`` beyond the true answer can
  pass by luck, so when each test passes a ``k`` over budget with probability at most ``alpha``, the
  returned ``k`` is over budget with probability at most about ``alpha`` (exactly, when the steps
  do not depend on the data). It spends a few more evaluations and lands up to one step short.

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


#: growth factor of the ascending search's steps when nothing better is known
GROWTH = 1.25


def geometric_step(lo: int) -> int:
    return max(lo + 1, math.ceil(lo * GROWTH))


def max_probes_ascending(n: int, first: int | None = None, growth: float = GROWTH) -> int:
    """Probes ``search_ascending`` makes with geometric steps when every probe passes."""
    if n <= 0:
        return 0
    k, count = min(n, first if first is not None else default_first_probe(n)), 1
    while k < n:
        k = min(n, max(k + 1, math.ceil(k * growth)))
        count += 1
    return count


def search_ascending(n: int, passes: Callable[[int], bool], *, first: int | None = None,
                     next_k: Callable[[int], int] | None = None, max_evaluations: int | None = None,
                     progress: Any = None) -> SearchResult:
    """Largest ``k`` in ``[0, n]`` reached by testing increasing ``k`` until the first failure.

    ``next_k(lo)`` proposes the probe after a pass at ``lo`` (clamped to ``[lo + 1, n]``); the default
    grows ``k`` by ``GROWTH``. ``max_evaluations`` caps the probes (the last passing ``k`` is returned).
    """
    probes: list[tuple[int, bool]] = []
    if n <= 0:
        return SearchResult(k=0, probes=probes)
    step = next_k or geometric_step
    lo, k = 0, max(1, min(n, first if first is not None else default_first_probe(n)))
    cap = max_evaluations if max_evaluations is not None else 4 * max_probes_ascending(n, first)
    while len(probes) < cap:
        ok = bool(passes(k))
        probes.append((k, ok))
        if progress is not None:
            progress.update(1)
        if not ok:
            break
        lo = k
        if lo >= n:
            break
        k = min(n, max(lo + 1, int(step(lo))))
    return SearchResult(k=lo, probes=probes)


__all__ = ["GROWTH", "SearchResult", "default_first_probe", "geometric_step", "max_probes", "max_probes_ascending",
           "search_ascending", "search_largest_k"]
