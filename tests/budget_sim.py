"""A simulated multiple-choice task with a known true accuracy curve and document-level noise.

Removing ``k`` units lowers the population accuracy from ``p0`` to ``p(k) = p0 - D(k)`` with
``D(k) = d_max * (k / K) ** power``. Document ``i`` is answered right under ``k`` when its latent
``x_i(k) < Phi^-1(p(k))``, with ``x_i(k) = (z_i + sigma W_i(k)) / sqrt(1 + sigma^2 k / K)``: ``z_i`` is the
document's difficulty and ``W_i`` a random walk over ``k`` (heads removed one after another change a
document's answer a little at a time, both ways). Every ``x_i(k)`` is standard normal, so every
document is right with probability exactly ``p(k)``: ``D(k)`` is the true drop, while the documents of
one seed are a finite, noisy sample of it, shared by all ``k`` (the paired design's situation).
The gold answer's margin is ``Phi^-1(p(k)) - x_i(k)`` (> 0: right), so the ``margin`` surrogate works.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from prune_heads.evaluation import EvalResult
from prune_heads.evaluation.paired import DocScores

_PHI_INV = np.vectorize(NormalDist().inv_cdf)


class SimulatedTask:
    def __init__(self, n_docs: int, n_units: int, seed: int, *, p0: float = 0.6, d_max: float = 0.3,
                 power: float = 1.5, sigma: float = 0.8) -> None:
        rng = np.random.default_rng(seed)
        self.n_units, self.p0, self.d_max, self.power = n_units, p0, d_max, power
        ks = np.arange(n_units + 1)
        z = rng.standard_normal(n_docs)
        walk = np.concatenate([np.zeros((n_docs, 1)),
                               np.cumsum(rng.standard_normal((n_docs, n_units)) / math.sqrt(n_units), 1)], 1)
        x = (z[:, None] + sigma * walk) / np.sqrt(1 + sigma**2 * ks / n_units)[None, :]
        threshold = _PHI_INV(np.clip(p0 - self.true_drop(ks), 1e-9, 1 - 1e-9))
        self.margin = threshold[None, :] - x
        self.ids = tuple(f"sim:{i}" for i in range(n_docs))

    def true_drop(self, k: np.ndarray | int) -> np.ndarray:
        return self.d_max * (np.asarray(k, dtype=float) / self.n_units) ** self.power

    def result(self, k: int) -> EvalResult:
        margin = self.margin[:, k]
        values = (margin > 0).astype(float)
        scores = tuple(np.array([mg / 2, -mg / 2]) for mg in margin)  # gold = choice 0, margin = mg
        docs = DocScores(self.ids, values, "mean", choice_scores=scores, gold=(0,) * len(self.ids))
        n = len(values)
        se = float(values.std(ddof=1) / math.sqrt(n))
        return EvalResult("acc", float(values.mean()), se, True, n, {}, docs)


class SimEvaluator:
    """``evaluator(mask)``: the simulated task with ``k = mask.sum()`` units removed (policy ``free``)."""

    def __init__(self, task: SimulatedTask, name: str = "sim", offset: int = 0) -> None:
        self.task = task
        self.calls = 0
        self.task_config = {"task": name, "metric": "acc"}
        self.name = name

    @property
    def doc_ids(self) -> tuple[str, ...]:
        return self.task.ids

    def __call__(self, removed=None, *, context=None) -> EvalResult:
        self.calls += 1
        k = 0 if removed is None else int(removed.sum())
        return self.task.result(k)
