"""Learned head gates (Voita et al., 2019): hard-concrete gates with an L0 penalty, trained by distillation.

One stochastic gate per head multiplies the head's output before ``o_proj`` (``HeadControl.scale``
with tensors that require grad). Only the gates' ``log_alpha`` train; the model's weights are frozen.
The loss is ``KL(original || gated)`` over real next-token positions plus a penalty on the expected
number of open gates. Sparsity comes from either

- ``target_fraction``: a Lagrange multiplier is adapted toward the target expected L0, and at the end
  the heads with the smallest ``log_alpha`` are removed so the plan hits the target exactly; or
- ``l0_penalty``: a fixed penalty; heads whose deterministic gate is closed are removed.

The gates sit on the model's own device(s), so a model loaded with ``device_map="auto"`` (accelerate)
trains its gates on the GPU(s) it lives on; small models train on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prune_heads.data import batches
from prune_heads.errors import PruneHeadsError
from prune_heads.model.adapters import get_adapter
from prune_heads.model.attention import HeadControl, attach
from prune_heads.plan import Plan
from prune_heads.plan.record import Cost, GatesDetails, SelectionResult, result_dict
from prune_heads.selection.budget import assess_plan, make_budget, raise_if_unverified
from prune_heads.selection.policies import layer_floor

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
#: cache the original's log-probabilities up to this many bytes; beyond, recompute them each step
REF_CACHE_BYTES = 2**30
#: the run has converged when the expected fraction of open gates is this close to the target
TARGET_TOLERANCE = 0.1


class GatesDidNotConverge(PruneHeadsError):
    """Training ended without reaching the sparsity target (or the loss became NaN)."""


class HardConcreteGates(nn.Module):
    """``(L, H)`` hard-concrete gates (Louizos et al., 2018) with stretch ``(GAMMA, ZETA)``."""

    def __init__(self, num_layers: int, num_heads: int, init: float = 3.0, device: Any = None) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((num_layers, num_heads), float(init), device=device))

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        return (torch.sigmoid(self.log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def expected_open(self) -> torch.Tensor:
        """Expected number of non-zero gates (the differentiable L0 norm)."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()


def _removal_by_rank(log_alpha: torch.Tensor, n_remove: int, floor: int) -> list[tuple[int, int]]:
    """The ``n_remove`` heads with the smallest ``log_alpha``, each layer keeping ``floor`` heads."""
    L, H = log_alpha.shape
    left = [H - floor] * L
    heads: list[tuple[int, int]] = []
    for flat in torch.argsort(log_alpha.reshape(-1), stable=True).tolist():
        if len(heads) == n_remove:
            break
        layer, h = divmod(flat, H)
        if left[layer] > 0:
            left[layer] -= 1
            heads.append((layer, h))
    return heads


def _check_arguments(target_fraction: float | None, l0_penalty: float | None, steps: int, lr: float) -> None:
    """Refuse bad arguments before any work; each error names the flag to change."""
    if (target_fraction is None) == (l0_penalty is None):
        raise PruneHeadsError("gates need exactly one of --target-fraction and --l0-penalty")
    if target_fraction is not None and not 0.0 <= target_fraction < 1.0:
        raise PruneHeadsError(f"--target-fraction must be in [0, 1) (a fraction of all heads to remove), got {target_fraction}")
    if l0_penalty is not None and not l0_penalty > 0:
        raise PruneHeadsError(f"--l0-penalty must be > 0, got {l0_penalty}")
    if steps < 1 or lr <= 0:
        raise PruneHeadsError(f"gates need steps >= 1 and lr > 0 (got steps={steps}, lr={lr})")


@dataclass
class _Objective:
    """The sparsity term of the loss: a fixed ``l0_penalty``, or (with ``target_open``) an adapted Lagrange
    multiplier ``lam`` plus a damping quadratic, so training can be written once for both."""

    target_open: float | None
    l0_penalty: float | None
    penalty_mu: float
    lambda_lr: float
    lam: float = 0.0

    def loss(self, kl: torch.Tensor, open_frac: torch.Tensor) -> torch.Tensor:
        if self.target_open is None:
            return kl + self.l0_penalty * open_frac
        gap = open_frac - self.target_open
        return kl + self.lam * gap + self.penalty_mu * gap * gap

    def step(self, open_frac: torch.Tensor) -> None:
        """``lam += lambda_lr * gap`` after each optimiser step (nothing with a fixed penalty)."""
        if self.target_open is not None:
            self.lam += self.lambda_lr * float(open_frac.detach() - self.target_open)


def _train(model: nn.Module, gates: HardConcreteGates, opt: torch.optim.Optimizer,
           batch_list: list[tuple[torch.Tensor, torch.Tensor]], objective: _Objective, *, steps: int, lr: float,
           cache_ok: bool, progress: bool) -> tuple[list[dict[str, float]], int]:
    """Distil the gated model toward the original for ``steps`` steps (weights frozen, restored after).

    Returns the per-step history and the number of forward passes (the reference's are cached when
    ``cache_ok``, i.e. they fit in ``REF_CACHE_BYTES``).
    """
    L, total = gates.log_alpha.shape[0], gates.log_alpha.numel()
    ref_cache: dict[int, torch.Tensor] = {}
    history: list[dict[str, float]] = []
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    control = HeadControl()
    forwards = 0
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        bar = tqdm(range(steps), desc="training gates", unit="step", disable=not progress)
        with attach(model, control):
            for step in bar:
                b = step % len(batch_list)
                ids, mask = batch_list[b]
                valid = (mask[:, 1:] * mask[:, :-1]).float()
                ref = ref_cache.get(b)
                if ref is None:
                    control.scale = {}
                    with torch.no_grad():
                        ref = torch.log_softmax(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float(), -1)
                    forwards += 1
                    if cache_ok:
                        ref_cache[b] = ref
                z = gates.sample()
                control.scale = {i: z[i] for i in range(L)}
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
                forwards += 1
                lp = torch.log_softmax(logits, -1)
                kl = ((ref.exp() * (ref - lp)).sum(-1) * valid).sum() / valid.sum().clamp_min(1)
                open_frac = gates.expected_open() / total
                loss = objective.loss(kl, open_frac)
                if not torch.isfinite(loss):
                    raise GatesDidNotConverge(
                        f"gate training diverged at step {step} (loss {float(loss.detach())}); lower --lr (now {lr}) "
                        "or use float32 weights")
                opt.zero_grad()
                loss.backward()
                opt.step()
                objective.step(open_frac)
                history.append({"step": step, "kl": float(kl.detach()), "open_fraction": float(open_frac.detach()),
                                "lambda": objective.lam})
                bar.set_postfix(kl=f"{history[-1]['kl']:.4f}", open=f"{history[-1]['open_fraction']:.2f}")
        control.scale = {}
    finally:
        for p, req in frozen:
            p.requires_grad_(req)
    return history, forwards


def _closed_heads(gates: HardConcreteGates, log_alpha: torch.Tensor, final_open: float, target_open: float | None,
                  n_remove: int | None, floor: int, *, steps: int, lr: float) -> list[tuple[int, int]]:
    """The heads the trained gates remove: with a target, exactly ``n_remove`` by smallest ``log_alpha``
    (refused when training missed the target); with a fixed penalty, those whose deterministic gate closed."""
    if not torch.isfinite(log_alpha).all():
        raise GatesDidNotConverge("gate parameters became NaN/inf; lower --lr")
    if target_open is not None:
        if abs(final_open - target_open) > TARGET_TOLERANCE:
            raise GatesDidNotConverge(
                f"gates did not converge: {final_open:.0%} of gates expected open after {steps} steps, target "
                f"{target_open:.0%}; raise --steps (now {steps}) or --lr (now {lr}). No plan was written.")
        return _removal_by_rank(log_alpha, n_remove, floor)
    closed = gates.deterministic().detach().cpu() <= 0.5
    masked = log_alpha.masked_fill(~closed, math.inf)
    return _removal_by_rank(masked, int(closed.sum()), floor)


def select_gates(model: nn.Module, seqs: Sequence[Sequence[int]], *, target_fraction: float | None = None,
                 l0_penalty: float | None = None, steps: int = 200, lr: float = 0.05, batch_size: int = 4,
                 pad_id: int = 0, min_heads_per_layer: int = 1, allow_empty_layers: bool = False,
                 evaluator: Any = None, progress: bool = True, seed: int = 0, lambda_lr: float = 0.2,
                 init: float = 3.0, penalty_mu: float = 50.0, betas: tuple[float, float] = (0.5, 0.9),
                 max_drop: float | None = None, relative: bool = False, confidence: float = 0.0,
                 verify_evaluator: Any = None, accept_unverified: bool = False,
                 strict_verification: bool = False, compensation: Any = None) -> Plan:
    """Train one gate per head on ``seqs`` and return the plan of the heads whose gates close.

    Exactly one of ``target_fraction`` (fraction of all heads to remove, in [0, 1)) and
    ``l0_penalty`` (> 0) must be given. Raises ``GatesDidNotConverge`` instead of returning a plan
    when the loss becomes NaN or the expected sparsity misses the target by more than
    ``TARGET_TOLERANCE``. With a target, the loss is ``KL + lambda * gap + penalty_mu * gap**2`` where
    ``gap`` = expected open fraction - target and ``lambda`` follows ``lambda += lambda_lr * gap`` each
    step (a Lagrangian with a damping quadratic term; low Adam momentum keeps it from oscillating).

    ``compensation`` (a ``prune_heads.compensation.Compensator``): the gates still train on zeroed
    outputs (a fractional gate has no compensation), but the plan is evaluated, and recorded, compensated.

    With ``max_drop`` (and an ``evaluator``) the plan's drop is judged by ``selection.budget.judge`` at
    ``confidence`` and recorded in its trace; ``verify_evaluator``, ``accept_unverified`` and
    ``strict_verification`` work as for ``select_static``.
    """
    _check_arguments(target_fraction, l0_penalty, steps, lr)
    budget = make_budget(max_drop, relative, confidence) if max_drop is not None else None
    seqs = [list(map(int, s)) for s in seqs]
    if not seqs or any(len(s) < 2 for s in seqs):
        raise PruneHeadsError("gates need calibration sequences of at least 2 tokens")
    layout = get_adapter(model).layout(model.config)
    floor = layer_floor(layout, min_heads_per_layer, allow_empty_layers)
    L, H = layout.num_layers, layout.num_heads
    total = L * H
    n_remove = round(target_fraction * total) if target_fraction is not None else None
    if n_remove is not None and n_remove > L * (H - floor):
        raise PruneHeadsError(
            f"--target-fraction {target_fraction} removes {n_remove} heads but each layer must keep {floor} "
            f"(at most {L * (H - floor)} can go); lower the target or --min-heads-per-layer")

    device = next(model.parameters()).device
    t0 = time.time()
    torch.manual_seed(seed)
    gates = HardConcreteGates(L, H, init=init, device=device)
    opt = torch.optim.Adam(gates.parameters(), lr=lr, betas=betas)
    batch_list = [(ids.to(device), mask.to(device)) for _, ids, mask in batches(seqs, batch_size, pad_id)]
    vocab = int(getattr(get_adapter(model).text_config(model.config), "vocab_size", 0) or 0)
    cache_ok = sum(ids.numel() for ids, _ in batch_list) * vocab * 4 <= REF_CACHE_BYTES
    target_open = 1.0 - target_fraction if target_fraction is not None else None
    objective = _Objective(target_open, l0_penalty, penalty_mu, lambda_lr)
    history, forwards = _train(model, gates, opt, batch_list, objective, steps=steps, lr=lr, cache_ok=cache_ok,
                               progress=progress)
    lam = objective.lam

    log_alpha = gates.log_alpha.detach().float().cpu()
    final_open = float(gates.expected_open().detach()) / total
    heads = _closed_heads(gates, log_alpha, final_open, target_open, n_remove, floor, steps=steps, lr=lr)

    mask = torch.zeros(L, H, dtype=torch.bool)
    for i, h in heads:
        mask[i, h] = True
    from prune_heads.compensation.plans import evaluator_with, record_of

    compensation = compensation if compensation is not None else getattr(evaluator, "compensation", None)
    evaluator = evaluator_with(evaluator, compensation)
    verify_evaluator = evaluator_with(verify_evaluator, compensation)
    judged = assess_plan(evaluator, mask, len(heads), budget, verify_evaluator=verify_evaluator)
    baseline, evaluation = judged.baseline, judged.result
    selection = SelectionResult.for_removal(
        model, mask,
        method="gates",
        min_heads_per_layer=min_heads_per_layer,
        allow_empty_layers=bool(allow_empty_layers),
        task=getattr(evaluator, "task_config", None) if evaluator is not None else None,
        baseline=result_dict(baseline),
        result=result_dict(evaluation),
        budget=budget,
        trace=judged.trace,
        verification=judged.verification,
        cost=Cost(evaluations=0 if evaluator is None else (2 if heads else 1), wall_seconds=round(time.time() - t0, 2),
                  forward_equivalents=float(forwards)),
        calibration={"num_samples": len(seqs), "num_tokens": int(sum(len(s) for s in seqs))},
        details=GatesDetails(target_fraction=target_fraction, l0_penalty=l0_penalty, steps=steps, lr=lr,
                             final={"kl": history[-1]["kl"], "expected_open_fraction": final_open, "lambda": lam},
                             history=history[:: max(1, steps // 50)],
                             log_alpha=[[round(float(x), 4) for x in row] for row in log_alpha]),
        compensation=record_of(compensation),
    )
    return raise_if_unverified(Plan(heads, selection), accept_unverified=accept_unverified, strict=strict_verification)
