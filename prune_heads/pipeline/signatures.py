"""What the files behind a recipe's strings contain, for stage keys: a stage whose model weights or data
file changed at the same path must rerun, not report "up to date" with the old numbers.

A model directory, a data file or a task file is summarised by ``io_utils.content_signature`` (cheap: sizes,
modification times and hashes of headers, confirmed by a content hash when they change); a Hub model by
the commit its revision resolves to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _signature(path: Path) -> Any:
    from prune_heads import io_utils

    fn = getattr(io_utils, "content_signature", None)
    if fn is not None:
        return fn(path)
    return _fallback_signature(path)


def _fallback_signature(path: Path) -> Any:
    """Sizes, mtimes and a hash of the first and last 64 KiB of every file (until io_utils has its own)."""
    import hashlib

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        st = f.stat()
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
            if st.st_size > 1 << 17:
                fh.seek(-(1 << 16), 2)
                h.update(fh.read())
        out.append([str(f.relative_to(path)) if path.is_dir() else f.name, st.st_size, st.st_mtime_ns, h.hexdigest()[:16]])
    return out


def model_signature(model: Any) -> Any:
    """Local checkpoint (or GGUF) content, or the Hub commit the revision resolves to."""
    from prune_heads.errors import PruneHeadsError
    from prune_heads.model.loading import resolve_model_spec

    try:
        location, gguf = resolve_model_spec(model.id, model.gguf_file)
    except PruneHeadsError:
        return None  # the preflight says what is wrong
    p = Path(location)
    if gguf:
        return {"gguf": _signature(p / gguf)}
    if p.is_dir():
        return {"local": _signature(p)}
    return {"hub": hub_commit(location, model.revision)}


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit ``revision`` of a Hub model resolves to: asked online, else the local cache's snapshot."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=["config.json"])
        return Path(path).name
    except Exception:  # not cached: ask the Hub
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(repo_id, revision=revision).sha
        except Exception:
            return None


def data_signature(spec: str | None) -> Any:
    """The local file (or folder) behind a data spec, when there is one."""
    if not spec:
        return None
    if spec == "wikitext2":
        from prune_heads.data import find_wikitext

        try:
            return {"wikitext2": _signature(find_wikitext())}
        except Exception:
            return None
    path = spec.split("#", 1)[0]
    if "@" in path and not Path(path).exists():
        path = path.rsplit("@", 1)[0]
    p = Path(path)
    return {"file": _signature(p)} if p.exists() else None


def task_signature(task: str | None) -> Any:
    """Local files behind a task: ``mc:FILE``, ``ppl:DATA``/``kl:DATA`` (lm-eval tasks: their data package)."""
    if not task:
        return None
    for prefix in ("mc:", "ppl:", "kl:"):
        if task.startswith(prefix):
            rest = task[len(prefix):]
            return {task: data_signature(rest) if prefix != "mc:" else ({"file": _signature(Path(rest))}
                                                                       if Path(rest).exists() else None)}
    return {task: None}
