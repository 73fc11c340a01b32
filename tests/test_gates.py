"""Learned hard-concrete gates: they train, meet a sparsity target, find dead heads, and fail loudly."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from prune_heads.errors import PruneHeadsError
from prune_heads.selection.gates import (
    BETA,
    GAMMA,
    ZETA,
    GatesDidNotConverge,
    HardConcreteGates,
    select_gates,
)


def _model_with_dead_heads():
    """Heads (0, 1) and (1, 3) write nothing (zero o_proj columns): removing them costs nothing."""
    m = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    with torch.no_grad():
        m.model.layers[0].self_attn.o_proj.weight[:, 8:16] = 0
        m.model.layers[1].self_attn.o_proj.weight[:, 24:32] = 0
    return m


def _seqs(n=4, length=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 100, (length,), generator=g).tolist() for _ in range(n)]


def test_hard_concrete_expected_l0_matches_sampling():
    g = HardConcreteGates(1, 5)
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor([[-3.0, -1.0, 0.0, 1.0, 3.0]]))
    torch.manual_seed(0)
    samples = torch.stack([g.sample() for _ in range(20000)])
    assert samples.min() >= 0 and samples.max() <= 1
    # P(z > 0) in closed form (Louizos et al., eq. 12) equals the sampled frequency
    expected = torch.sigmoid(g.log_alpha - BETA * torch.log(torch.tensor(-GAMMA / ZETA)))
    torch.testing.assert_close((samples > 0).float().mean(0), expected.detach(), atol=0.015, rtol=0)
    torch.testing.assert_close(g.expected_open().detach(), expected.sum().detach())


def test_target_is_met_and_dead_heads_are_found():
    model = _model_with_dead_heads()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = select_gates(model, _seqs(), target_fraction=0.25, steps=150, lr=0.1, progress=False)
    assert len(plan.removed_heads) == 2  # exactly 25% of 8 heads
    assert plan.removed_heads == [(0, 1), (1, 3)]
    assert abs(plan.selection.details.final["expected_open_fraction"] - 0.75) <= 0.1
    assert plan.selection.method == "gates"
    # the weights stayed frozen and untouched, and trainability was restored
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad
    plan.validate(model)


def test_fixed_penalty_respects_layer_floor():
    model = _model_with_dead_heads()
    plan = select_gates(model, _seqs(2), l0_penalty=0.5, steps=40, lr=0.1, min_heads_per_layer=3, progress=False)
    counts = [sum(1 for a, _ in plan.removed_heads if a == i) for i in range(2)]
    closed = (torch.tensor(plan.selection.details.log_alpha) < 0).sum()  # a strong penalty closes gates...
    assert closed > 2 and max(counts) <= 1  # ...but each layer keeps its floor of 3 heads
    plan.validate(model)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_target_fraction(bad):
    with pytest.raises(PruneHeadsError, match="target-fraction"):
        select_gates(tiny_model("llama", layers=2), _seqs(1), target_fraction=bad, progress=False)


def test_target_beyond_layer_floor_and_missing_mode():
    model = tiny_model("llama", layers=2)
    with pytest.raises(PruneHeadsError, match="must keep"):
        select_gates(model, _seqs(1), target_fraction=0.9, progress=False)
    with pytest.raises(PruneHeadsError, match="exactly one"):
        select_gates(model, _seqs(1), progress=False)


def test_non_convergence_raises_instead_of_a_plan():
    with pytest.raises(GatesDidNotConverge, match="did not converge"):
        select_gates(tiny_model("llama", layers=2), _seqs(1), target_fraction=0.5, steps=2, progress=False)
    with pytest.raises(GatesDidNotConverge, match="diverged"):
        model = tiny_model("llama", layers=2)
        with torch.no_grad():
            model.lm_head.weight.fill_(float("nan"))
        select_gates(model, _seqs(1), target_fraction=0.25, steps=5, progress=False)
