"""``make_evaluator``: one evaluation task prepared once, then scored under any head mask.

``make_evaluator`` prepares a task once (data, documents, few-shot prompts, reference log-probs) and
returns a callable that scores the model under a head mask. Results of static masks are cached by
mask, because a selector asks for the same mask (at least the empty one) more than once.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from prune_heads.errors import PruneHeadsError
from prune_heads.evaluation.paired import DocScores
from prune_heads.model.masking import heads_to_mask, static_mask


@dataclass
class EvalResult:
    """One evaluation: the metric, its standard error over documents, and each document's score.

    ``docs`` (the per-document scores, aligned by document id) make paired statistics possible
    (``prune_heads.evaluation.paired``); they stay in memory and are not written into plan files.
    """

    metric: str
    value: float
    stderr: float | None
    higher_is_better: bool
    n: int
    details: dict = field(default_factory=dict)
    docs: DocScores | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "docs"}


def parse_task(task: str) -> tuple[str, str]:
    """``(kind, rest)``: kind is ``mc``, ``ppl``, ``kl`` or ``lm-eval``."""
    if not isinstance(task, str) or not task.strip():
        from prune_heads.evaluation.lmeval import TASK_NAMING_HELP

        raise PruneHeadsError(f"empty task name; {TASK_NAMING_HELP}")
    for kind in ("mc", "ppl", "kl"):
        if task.startswith(kind + ":"):
            return kind, task[len(kind) + 1:]
    return "lm-eval", task


class Evaluator:
    """Callable: ``evaluator(removed)`` -> ``EvalResult`` of the model with ``removed`` heads zeroed.

    ``removed`` is an ``(L, H)`` bool mask (True = zeroed), a ``Plan`` or ``[(layer, head)]``; None is the
    unmasked model. ``context=`` (a callable ``model -> context manager``) replaces the static mask, for
    instance ``lambda m: dynamic_mask(m, "awft", 0.3)``; such results are not cached.

    ``compensation`` (a ``prune_heads.compensation.Compensator``): every static mask is evaluated with its
    removed heads compensated, the same model the export writes.
    """

    def __init__(self, model: Any, backend: Any, task_config: dict[str, Any], compensation: Any = None) -> None:
        self.model = model
        self.backend = backend
        self.task_config = task_config
        self.compensation = compensation
        self.calls = 0
        self.seconds = 0.0
        self._cache: dict[bytes, EvalResult] = {}

    @property
    def doc_ids(self) -> tuple[str, ...]:
        """Stable ids of the documents this evaluator scores (``task:index``): overlap checks compare them."""
        return tuple(self.backend.doc_ids)

    def _key(self, mask: torch.Tensor) -> bytes:
        return bytes(mask.shape) + mask.to(torch.uint8).flatten().numpy().tobytes()

    def __call__(self, removed: Any = None, *, context: Callable[[Any], Any] | None = None) -> EvalResult:
        if context is None:
            if removed is None:
                from prune_heads.model.adapters import get_adapter

                layout = get_adapter(self.model).layout(self.model.config)
                mask = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.bool)
            else:
                mask = heads_to_mask(self.model, removed).cpu()
            key = self._key(mask)
            if key in self._cache:
                return self._cache[key]
            def enter() -> Any:
                if not mask.any():
                    return contextlib.nullcontext()
                comp = self.compensation(mask) if self.compensation is not None else None
                return static_mask(self.model, mask, compensation=comp)
        else:
            key = None
            def enter() -> Any:
                return context(self.model)
        self.backend.prepare()
        t0 = time.perf_counter()
        value, stderr, n, hib, details, docs = self.backend.run(enter, per_input=context is not None)
        elapsed = time.perf_counter() - t0
        self.calls += 1
        self.seconds += elapsed
        details = {**details, "seconds": round(elapsed, 3)}
        if self.compensation is not None and context is None:
            details["compensation"] = self.compensation.spec.mode
        result = EvalResult(self.task_config["metric"], float(value), stderr, hib, int(n), details, docs)
        if key is not None:
            self._cache[key] = result
        return result

    def with_compensation(self, compensation: Any) -> Evaluator:
        """This evaluator (same prepared data) with another compensation; results are cached apart."""
        if compensation is self.compensation:
            return self
        return Evaluator(self.model, self.backend, self.task_config, compensation)

    def cache_info(self) -> dict[str, int]:
        return {"calls": self.calls, "cached": len(self._cache)}


def make_evaluator(model: Any, tokenizer: Any, task: str, *, limit: int | None = None, num_fewshot: int | None = None,
                   split: str = "all", data_dir: str | None = None, batch_size: int = 8, seed: int = 0,
                   metric: str | None = None, compensation: Any = None, exclude_docs: Any = None) -> Evaluator:
    """Prepare ``task`` on ``model``; see the module docs of ``lmeval``, ``local_tasks`` and ``perplexity``.

    ``exclude_docs``: ``ppl:``/``kl:`` tasks leave out these document ids (``SOURCE:POSITION``, as the
    scores record their calibration documents), so a held-out perplexity never scores calibration text.

    ``split``: ``search`` and ``verify`` use disjoint halves of the task's documents (seeded by ``seed``),
    ``all`` uses them in order; ``limit`` caps the documents taken (per subtask for groups).
    ``compensation``: a ``Compensator`` applied to every mask (see ``Evaluator``).
    """
    if split not in ("search", "verify", "all"):
        raise PruneHeadsError(f"split must be 'search', 'verify' or 'all', not {split!r}")
    if limit is not None and limit < 1:
        raise PruneHeadsError(f"limit must be at least 1, got {limit}")
    kind, rest = parse_task(task)
    backend: Any
    from prune_heads.model.sequential_engine import streamed_of

    streamed = streamed_of(model)
    if kind in ("ppl", "kl"):
        from prune_heads.evaluation.perplexity import StreamedTextBackend, TextBackend

        if num_fewshot:
            raise PruneHeadsError(f"--num-fewshot does not apply to {kind}: tasks")
        kw = dict(limit=limit, split=split, seed=seed, batch_size=batch_size, exclude=exclude_docs)
        backend = (StreamedTextBackend(streamed, tokenizer, kind, rest, **kw) if streamed is not None
                   else TextBackend(model, tokenizer, kind, rest, **kw))
    elif streamed is not None:
        from prune_heads.model.sequential_engine import refuse_whole_model_task

        refuse_whole_model_task(streamed, task)
    else:
        from prune_heads.evaluation.lmeval import LMEvalBackend

        spec: Any = rest
        if kind == "mc":
            from prune_heads.evaluation.local_tasks import mc_task_config

            spec = mc_task_config(rest)
        backend = LMEvalBackend(model, tokenizer, spec, limit=limit, num_fewshot=num_fewshot, split=split,
                                data_dir=data_dir, batch_size=batch_size, seed=seed, metric=metric, kind=kind)
        if kind == "mc":
            backend.task_config["task"] = task
    return Evaluator(model, backend, backend.task_config, compensation)
