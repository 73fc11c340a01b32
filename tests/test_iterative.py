"""Iterative selection against a brute-force greedy search with the same objective."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from tiny_models import tiny_model

from prune_heads.errors import PruneHeadsError
from prune_heads.model.masking import static_mask
from prune_heads.selection.iterative import select_iterative


@dataclass
class FakeResult:
    metric: str
    value: float
    stderr: float | None = None
    higher_is_better: bool = True
    n: int = 1
    details: dict = field(default_factory=dict)

    def to_dict(self):
        return {"metric": self.metric, "value": self.value, "higher_is_better": self.higher_is_better}


class CountingEvaluator:
    """A budget on the number of heads: metric = -heads removed, so ``max_drop=k`` allows exactly k."""

    task_config = {"name": "count"}

    def __init__(self):
        self.calls = 0
        self.seen: list[int] = []

    def __call__(self, removed=None, *, context=None):
        self.calls += 1
        n = 0 if removed is None else int(removed.sum())
        self.seen.append(n)
        return FakeResult("neg_heads", -float(n))


def _seqs(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (n,), generator=g).tolist() for n in lengths]


def mean_kl(model, seqs, heads):
    """Mean over sequences of the per-sequence mean next-token KL(original || heads zeroed), full forwards."""
    total = 0.0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            ref = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            with static_mask(model, heads):
                out = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            total += float((ref.exp() * (ref - out)).sum(-1).mean())
    return total / len(seqs)


def greedy_brute_force(model, seqs, k, floor=1):
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    chosen: list[tuple[int, int]] = []
    for _ in range(k):
        best = None
        for i in range(L):
            if H - sum(1 for a, _ in chosen if a == i) - 1 < floor:
                continue
            for h in range(H):
                if (i, h) in chosen:
                    continue
                v = mean_kl(model, seqs, [*chosen, (i, h)])
                if best is None or v < best[0]:
                    best = (v, (i, h))
        chosen.append(best[1])
    return chosen


def test_round_size_one_equals_greedy_brute_force():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    seqs = _seqs(0, (10, 7, 10))
    k = 3
    ev = CountingEvaluator()
    plan = select_iterative(model, seqs, ev, max_drop=k, round_size=1, progress=False)
    expected = greedy_brute_force(model, seqs, k)
    order = [tuple(r["heads"][0]) for r in plan.selection.details.rounds if r["accepted_units"]]
    assert order == expected
    assert plan.removed_heads == sorted(expected)
    assert plan.selection.method == "iterative" and plan.selection.details.stop_reason == "budget reached"
    # the round that broke the budget is recorded with its evaluation and nothing accepted
    assert plan.selection.details.rounds[-1]["accepted_units"] == 0
    assert len(plan.selection.details.rounds) == k + 1


def test_overshooting_round_is_bisected():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    seqs = _seqs(1, (9, 9))
    ev = CountingEvaluator()
    plan = select_iterative(model, seqs, ev, max_drop=4, round_size=3, progress=False)
    assert len(plan.removed_heads) == 4
    r1, r2 = plan.selection.details.rounds
    assert r1["accepted_units"] == 3 and r2["accepted_units"] == 1
    assert sorted(map(tuple, r1["heads"] + r2["heads"][:1])) == plan.removed_heads
    assert [b["units"] for b in r2["backoff"]] == [1, 2]  # bisection of the 3-head round
    assert plan.selection.result["value"] == -4
    # within a round, heads are the least harmful given round 1 (measured conditionally)
    assert r2["scores"] == sorted(r2["scores"])


def test_floor_and_kv_groups_policy():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    seqs = _seqs(2, (8,))
    plan = select_iterative(model, seqs, CountingEvaluator(), max_drop=100, round_size=2, min_heads_per_layer=3,
                            progress=False)
    assert [sum(1 for a, _ in plan.removed_heads if a == i) for i in range(2)] == [1, 1]
    assert plan.selection.details.stop_reason == "no removable units left"
    plan = select_iterative(model, seqs, CountingEvaluator(), max_drop=100, round_size=1, policy="kv-groups",
                            min_heads_per_layer=2, progress=False)
    assert len(plan.removed_heads) == 4
    for i in range(2):
        heads = sorted(h for a, h in plan.removed_heads if a == i)
        assert heads in ([0, 1], [2, 3])  # one whole KV group per layer
    plan.validate(model)


def test_candidates_fraction_restricts_later_rounds():
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    seqs = _seqs(3, (8, 8))
    plan = select_iterative(model, seqs, CountingEvaluator(), max_drop=3, round_size=1, candidates_fraction=0.5,
                            progress=False)
    assert plan.selection.details.rounds[0]["measured"]["n"] == 8
    assert plan.selection.details.rounds[1]["measured"]["n"] == 3  # 4 kept candidates minus the one removed
    assert len(plan.removed_heads) == 3


def test_bad_arguments():
    model = tiny_model("llama", layers=2)
    with pytest.raises(PruneHeadsError, match="round-size"):
        select_iterative(model, [[1, 2, 3]], CountingEvaluator(), max_drop=1, round_size=0, progress=False)
    with pytest.raises(PruneHeadsError, match="uniform"):
        select_iterative(model, [[1, 2, 3]], CountingEvaluator(), max_drop=1, policy="uniform", progress=False)
    with pytest.raises(PruneHeadsError, match="ablation"):
        select_iterative(model, [[1, 2, 3]], CountingEvaluator(), max_drop=1, score_id="awft", progress=False)
