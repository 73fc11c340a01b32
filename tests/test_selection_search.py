"""The k search: exact on a monotone test, never trusts an untested k, bounded evaluation count."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from prune_heads.selection.search import max_probes, search_largest_k


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 600), data=st.data())
def test_exact_k_on_monotone_test(n, data):
    true_k = data.draw(st.integers(0, n))
    first = data.draw(st.one_of(st.none(), st.integers(1, max(1, n))))
    seen: list[int] = []

    def passes(k: int) -> bool:
        assert 1 <= k <= n, "k = 0 is the baseline and must not be probed"
        seen.append(k)
        return k <= true_k

    r = search_largest_k(n, passes, first=first)
    assert r.k == true_k
    assert len(seen) == r.num_probes <= max_probes(n)
    assert len(set(seen)) == len(seen), "a k was evaluated twice"
    # the stated bound: about log2(#units) + 3 full evaluations, baseline included
    assert r.num_probes + 1 <= math.ceil(math.log2(n + 1)) + 3


def test_bound_is_tight_enough_for_smollm2():
    # 30 layers x 9 heads: at most 11 probes + baseline = 12 evaluations, vs 271 for a linear scan
    assert max_probes(270) + 1 == 12
    assert max_probes(0) == 0


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 400), seed=st.integers(0, 10_000), p=st.floats(0.05, 0.95))
def test_noisy_test_returns_an_evaluated_passing_k(n, seed, p):
    rng = random.Random(seed)
    outcomes: dict[int, bool] = {}

    def passes(k: int) -> bool:
        outcomes[k] = rng.random() < p
        return outcomes[k]

    r = search_largest_k(n, passes)
    assert r.num_probes <= max_probes(n)
    assert r.k == 0 or outcomes[r.k] is True
    # everything above k that was probed failed... at least the smallest probe above k
    above = [k for k in outcomes if k > r.k]
    if r.k < n:
        assert above and not outcomes[min(above)]


def test_galloping_beats_bisection_for_typical_budgets():
    # budgets of interest remove up to ~20% of the heads; there the gallop needs fewer probes than
    # plain bisection (ceil(log2(271)) = 9 for SmolLM2's 270 heads)
    for true_k in range(0, 64):
        r = search_largest_k(270, lambda k, t=true_k: k <= t)
        assert r.k == true_k and r.num_probes <= 8
    r = search_largest_k(1000, lambda k: k <= 1, first=1)
    assert r.k == 1 and [k for k, _ in r.probes][:2] == [1, 2]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 600), data=st.data())
def test_ascending_search_stops_at_the_first_failure(n, data):
    from prune_heads.selection.search import max_probes_ascending, search_ascending

    true_k = data.draw(st.integers(0, n))
    first = data.draw(st.one_of(st.none(), st.integers(1, max(1, n))))
    seen: list[int] = []

    def passes(k: int) -> bool:
        assert 1 <= k <= n and (not seen or k > seen[-1]), "ascending, never k = 0"
        seen.append(k)
        return k <= true_k

    r = search_ascending(n, passes, first=first)
    # the last probe is the only failure (or the search reached n); the answer is the last pass
    assert all(k <= true_k for k in seen[:-1])
    assert r.k == max([k for k in seen if k <= true_k], default=0) <= true_k
    assert r.k == true_k or (seen and seen[-1] > true_k)
    assert len(seen) <= max_probes_ascending(n, first)
    # it lands within one growth step of the answer, unless even the first probe failed
    if r.k and r.k < n:
        assert seen[-1] <= max(r.k + 1, math.ceil(r.k * 1.25))
