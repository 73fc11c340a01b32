"""The prompt texts of an lm-eval task's documents, offline: calibration data that looks like the task.

Used by ``prune_heads.data`` for ``--data task:NAME``. Each document yields its zero-shot prompt as
lm-eval builds it (``doc_to_text``); for tasks whose choices are contexts (winogrande) the gold context
followed by the shared continuation. Groups (``mmlu``) yield their subtasks' documents in turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prune_heads.errors import PruneHeadsError


def _prompt(task: Any, doc: dict) -> str:
    text = task.doc_to_text(doc)
    if isinstance(text, int):  # multiple_input: doc_to_text indexes the choices, which are the contexts
        choices = task.doc_to_choice(doc)
        target = task.doc_to_target(doc)
        text = f"{choices[text]}{task.config.target_delimiter}{target}"
    if not isinstance(text, str):
        raise PruneHeadsError(f"task {task.config.task}: cannot make a text prompt from its documents")
    return text


def task_documents(name: str, limit: int | None = None, data_dir: str | None = None) -> Iterator[str]:
    """Yield up to ``limit`` prompt texts of task ``name`` (per subtask for a group), in lm-eval's order."""
    from prune_heads.evaluation import parse_task
    from prune_heads.evaluation.lmeval import load_tasks
    from prune_heads.evaluation.offline import resolve_data_dir

    kind, rest = parse_task(name)
    spec: Any = rest
    if kind == "mc":
        from prune_heads.evaluation.local_tasks import mc_task_config

        spec = mc_task_config(rest)
    elif kind != "lm-eval":
        raise PruneHeadsError(f"task:{name}: only lm-eval tasks and mc: files have documents; use --data {rest} instead")
    loaded, _ = load_tasks(spec, resolve_data_dir(data_dir))
    for task in loaded["tasks"].values():
        for i, doc in enumerate(task.eval_docs):
            if limit is not None and i >= limit:
                break
            yield _prompt(task, doc)
