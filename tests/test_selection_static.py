"""select_static against mocked evaluators on a tiny model: exact k, budget, provenance, bad input."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from prune_heads.errors import BudgetError, ModelMismatchError, PruneHeadsError
from prune_heads.model.fingerprint import fingerprint
from prune_heads.plan import Plan
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.selection import candidate_units, max_probes, select_static, within_budget
from prune_heads.selection.budget import VerificationFailed
from prune_heads.selection.policies import heads_of


@dataclass
class FakeResult:
    metric: str
    value: float
    stderr: float | None
    higher_is_better: bool
    n: int = 100
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class FakeEvaluator:
    """Metric = base -/+ the summed harm of the removed heads (monotone in any removal order)."""

    def __init__(self, harm: torch.Tensor, base: float = 0.6, higher_is_better: bool = True, noise: float = 0.0,
                 seed: int = 0, metric: str = "acc") -> None:
        self.harm, self.base, self.hib, self.noise = harm, base, higher_is_better, noise
        self.rng = random.Random(seed)
        self.calls = 0
        self.masks: list[torch.Tensor | None] = []
        self.task_config = {"task": "fake", "metric": metric}
        self.metric = metric

    def value(self, removed: torch.Tensor | None) -> float:
        loss = 0.0 if removed is None else float(self.harm[removed].sum())
        return self.base - loss if self.hib else self.base + loss

    def __call__(self, removed=None, *, context=None) -> FakeResult:
        self.calls += 1
        self.masks.append(None if removed is None else removed.clone())
        v = self.value(removed) + (self.rng.gauss(0, self.noise) if self.noise and removed is not None else 0.0)
        return FakeResult(self.metric, v, 0.01, self.hib)


def make_scores(model, values: torch.Tensor, score_id: str = "ahon_ln") -> HeadScores:
    per = values.unsqueeze(0).repeat(3, 1, 1)
    return HeadScores({score_id: per}, {"fingerprint": fingerprint(model), "num_samples": 3})


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=3, heads=4, kv_heads=2, head_dim=8)


def _layout(model):
    from prune_heads.model.adapters import get_adapter

    return get_adapter(model).layout(model.config)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), max_drop=st.floats(0.0, 0.5), policy=st.sampled_from(["free", "kv-groups", "uniform"]),
       higher=st.booleans())
def test_exact_k_against_brute_force(model, seed, max_drop, policy, higher):
    g = torch.Generator().manual_seed(seed)
    ahon = torch.rand(3, 4, generator=g)  # low ahon_ln = inactive
    harm = torch.rand(3, 4, generator=g) * 0.1
    ev = FakeEvaluator(harm, higher_is_better=higher, base=0.6 if higher else 12.0, metric="acc" if higher else "perplexity")
    scores = make_scores(model, ahon)
    plan = select_static(model, scores, ev, score_id="ahon_ln", max_drop=max_drop, policy=policy, progress=False)
    # independent reference: evaluate every prefix of the policy's units
    layout = _layout(model)
    units = candidate_units(-ahon, layout, policy)
    best = 0
    for k in range(len(units) + 1):
        mask = torch.zeros(3, 4, dtype=torch.bool)
        for layer, h in heads_of(units, k):
            mask[layer, h] = True
        if float(harm[mask].sum()) <= max_drop + 1e-9:
            best = k
    assert plan.selection.details.k == best
    assert plan.removed_heads == sorted(heads_of(units, best))
    assert plan.selection.cost.evaluations == ev.calls <= max_probes(len(units)) + 1
    assert len(plan.selection.trace) == ev.calls
    assert plan.selection.trace[0].k == 0 and ev.masks[0] is None  # baseline is the unmasked model
    assert plan.selection.per_layer_counts == plan.mask(layout).sum(1).tolist()
    plan.validate(model)  # a structure the plan loader accepts


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_noisy_evaluator_result_was_evaluated_within_budget(model, seed):
    g = torch.Generator().manual_seed(seed)
    harm = torch.rand(3, 4, generator=g) * 0.02
    ev = FakeEvaluator(harm, noise=0.02, seed=seed)
    plan = select_static(model, make_scores(model, torch.rand(3, 4, generator=g)), ev, score_id="ahon_ln",
                         max_drop=0.02, progress=False)
    hit = [t for t in plan.selection.trace if t.k == plan.selection.details.k]
    assert len(hit) == 1 and hit[0].within_budget
    assert plan.selection.baseline["value"] - plan.selection.result["value"] <= 0.02 + 1e-9


def test_plan_meta_and_verification(model, tmp_path):
    harm = torch.full((3, 4), 0.004)
    ev, ver = FakeEvaluator(harm), FakeEvaluator(harm * 2)
    scores = make_scores(model, torch.rand(3, 4))
    with pytest.raises(VerificationFailed, match="held-out") as failed:  # over budget on held-out data: an error
        select_static(model, scores, ev, score_id="ahon_ln", max_drop=0.01, verify_evaluator=ver, progress=False)
    assert failed.value.plan.selection.details.k == 2 and not failed.value.plan.selection.accepted_unverified
    with warnings.catch_warnings(), pytest.warns(UserWarning, match="held-out"):
        warnings.filterwarnings("error", message=".*not normalised")  # an LN score ranks without that warning
        plan = select_static(model, scores, ev, score_id="ahon_ln", max_drop=0.01, verify_evaluator=ver, progress=False,
                             accept_unverified=True)
    assert plan.selection.accepted_unverified
    m = plan.to_dict()  # the plan file's shape
    assert m["details"]["k"] == 2 and len(plan.removed_heads) == 2  # 2 heads x 0.004 <= 0.01 < 3 x 0.004
    for key in ("fingerprint", "score_id", "policy", "budget", "baseline", "result", "per_layer_counts", "trace",
                "verification", "tool_version", "allow_empty_layers", "cost"):
        assert key in m
    assert m["budget"] == {"max_drop": 0.01, "relative": False, "metric": "acc", "higher_is_better": True,
                           "confidence": 0.0, "resolvable_drop": None, "docs_needed": None, "underpowered": False}
    v = m["verification"]
    assert v["baseline"]["value"] == pytest.approx(0.6) and v["result"]["value"] == pytest.approx(0.6 - 0.016)
    assert v["within_budget"] is False and v["verdict"] == "over"
    assert v["drop"]["estimate"] == pytest.approx(0.016) and v["drop"]["method"] == "unpaired"
    # round trip through the plan file
    path = plan.save(tmp_path / "plan.json")
    back = Plan.load(path)
    assert back.removed_heads == plan.removed_heads and back.selection.details.k == 2
    back.validate(model)


def test_relative_budget_and_perplexity(model):
    harm = torch.full((3, 4), 0.5)
    ev = FakeEvaluator(harm, base=10.0, higher_is_better=False, metric="perplexity")
    plan = select_static(model, make_scores(model, torch.rand(3, 4)), ev, score_id="ahon_ln", max_drop=0.1,
                         relative=True, progress=False)
    assert plan.selection.details.k == 2  # +1.0 perplexity = 10% of 10


def test_within_budget_directions():
    acc = FakeResult("acc", 0.50, None, True)
    assert within_budget(acc, FakeResult("acc", 0.49, None, True), 0.01, False)
    assert not within_budget(acc, FakeResult("acc", 0.485, None, True), 0.01, False)
    assert within_budget(acc, FakeResult("acc", 0.70, None, True), 0.0, False)
    ppl = FakeResult("perplexity", 20.0, None, False)
    assert within_budget(ppl, FakeResult("perplexity", 21.0, None, False), 0.05, True)
    assert not within_budget(ppl, FakeResult("perplexity", 21.5, None, False), 0.05, True)
    assert within_budget(ppl, FakeResult("perplexity", 15.0, None, False), 0.0, False)
    assert not within_budget(acc, FakeResult("acc", math.nan, None, True), 0.5, False)
    with pytest.raises(BudgetError):
        within_budget(acc, acc, -0.01, False)


def test_bad_input_errors(model):
    ev = FakeEvaluator(torch.zeros(3, 4))
    scores = make_scores(model, torch.rand(3, 4))
    with pytest.raises(BudgetError, match="k = 0"):
        select_static(model, scores, ev, score_id="ahon_ln", max_drop=-0.01, progress=False)
    with pytest.raises(BudgetError, match="k = 0"):  # a baseline that fails its own budget (NaN metric)
        select_static(model, scores, FakeEvaluator(torch.zeros(3, 4), base=math.nan), score_id="ahon_ln",
                      max_drop=0.01, progress=False)
    with pytest.raises(PruneHeadsError, match="unknown score"):
        select_static(model, scores, ev, score_id="nope", max_drop=0.01, progress=False)
    with pytest.raises(PruneHeadsError, match="not in this scores file"):
        select_static(model, scores, ev, score_id="awft_ln", max_drop=0.01, progress=False)
    other = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8)
    with pytest.raises(ModelMismatchError):
        select_static(other, scores, ev, score_id="ahon_ln", max_drop=0.01, progress=False)
    same_shape = tiny_model("llama", seed=5, layers=3, heads=4, kv_heads=2, head_dim=8)
    with pytest.raises(ModelMismatchError, match="different weights"):
        select_static(same_shape, scores, ev, score_id="ahon_ln", max_drop=0.01, progress=False)
    with pytest.raises(PruneHeadsError, match="allow-empty-layers"):
        select_static(model, scores, ev, score_id="ahon_ln", max_drop=0.01, min_heads_per_layer=0, progress=False)


def test_empty_layers_only_with_opt_in(model):
    ev = FakeEvaluator(torch.zeros(3, 4))  # nothing hurts: the search takes everything it may
    scores = make_scores(model, torch.rand(3, 4))
    plan = select_static(model, scores, ev, score_id="ahon_ln", max_drop=0.01, progress=False)
    assert plan.selection.per_layer_counts == [3, 3, 3]
    plan = select_static(model, scores, ev, score_id="ahon_ln", max_drop=0.01, allow_empty_layers=True, progress=False)
    assert plan.selection.per_layer_counts == [4, 4, 4] and plan.selection.allow_empty_layers
    plan.validate(model)  # the plan carries the opt-in
    with pytest.raises(PruneHeadsError, match="allow-empty-layers"):
        Plan(plan.removed_heads).validate(model)


def test_raw_score_warns_and_random_ranking(model):
    ev = FakeEvaluator(torch.full((3, 4), 0.004))
    scores = make_scores(model, torch.rand(3, 4), score_id="ahon")
    with pytest.warns(UserWarning, match="not normalised per layer"):
        select_static(model, scores, ev, score_id="ahon", max_drop=0.01, progress=False)
    a = select_static(model, None, ev, score_id="random", max_drop=0.01, seed=1, progress=False)
    b = select_static(model, None, ev, score_id="random", max_drop=0.01, seed=1, progress=False)
    assert a.removed_heads == b.removed_heads and a.selection.details.seed == 1 and a.selection.details.k == 2
