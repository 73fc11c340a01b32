"""What the files behind a recipe's strings contain, for stage keys: a stage whose model weights or data
file changed at the same path must rerun, not report "up to date" with the old numbers.

A model directory, a data file or a task file is keyed by its content (``io_utils.SignatureCache``: cheap
stat and header checks, a full hash only when they change, remembered in the work directory); a Hub model
by the commit its revision resolves to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CACHE_FILE = ".prune-heads-signatures.json"
_cache: Any = None


@contextlib.contextmanager
def signature_cache(workdir: Path) -> Iterator[None]:
    """Remember content hashes in ``workdir`` for the duration of a run (and between runs)."""
    from prune_heads.io_utils import SignatureCache

    global _cache
    _cache = SignatureCache(workdir / CACHE_FILE)
    try:
        yield
    finally:
        _cache.save()
        _cache = None


def _signature(path: Path) -> str:
    from prune_heads.io_utils import content_signature

    return content_signature(path, _cache)


def local_model_path(model: Any) -> Path | None:
    """The local checkpoint (or GGUF file) a model spec names, or None for a Hub id."""
    from prune_heads.errors import PruneHeadsError
    from prune_heads.model.loading import resolve_model_spec

    try:
        location, gguf = resolve_model_spec(model.id, model.gguf_file)
    except PruneHeadsError:
        return None  # the preflight says what is wrong
    p = Path(location)
    if gguf:
        return p / gguf
    return p if p.exists() else None


def model_signature(model: Any) -> Any:
    """Local checkpoint (or GGUF) content, or the Hub commit the revision resolves to."""
    from prune_heads.io_utils import hub_revision

    p = local_model_path(model)
    if p is not None:
        return {"local": _signature(p)}
    return {"hub": model.id, "commit": hub_revision(model.id, model.revision) or model.revision}


def local_data_path(spec: str | None) -> Path | None:
    """The local file or folder behind a data spec (``wikitext2``: the file in use), when there is one."""
    if not spec:
        return None
    if spec == "wikitext2":
        from prune_heads.data import find_wikitext

        try:
            return find_wikitext()
        except Exception:
            return None
    path = spec.split("#", 1)[0]
    if "@" in path and not Path(path).exists():
        path = path.rsplit("@", 1)[0]
    p = Path(path)
    return p if p.exists() else None


def data_signature(spec: str | None) -> Any:
    p = local_data_path(spec)
    return {"file": _signature(p)} if p is not None else None


def task_signature(task: str | None) -> Any:
    """Local files behind a task: ``mc:FILE``, ``ppl:DATA``/``kl:DATA`` (lm-eval tasks: none)."""
    if not task:
        return None
    for prefix in ("mc:", "ppl:", "kl:"):
        if task.startswith(prefix):
            return {task: data_signature(task[len(prefix):])}
    return {task: None}
