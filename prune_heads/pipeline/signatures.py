"""What the files behind a recipe's strings contain, for stage keys: a stage whose model weights or data
file changed at the same path must rerun, not report "up to date" with the old numbers.

A model directory, a data file or a task file is keyed by its content (``SignatureCache`` below: cheap
stat and header checks, a full hash only when they change, remembered in the work directory); a Hub model
by the commit its revision resolves to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prune_heads.errors import PruneHeadsError
from prune_heads.io_utils import PathLike, file_sha256, write_json_atomic

CACHE_FILE = ".prune-heads-signatures.json"
_cache: Any = None


# ---- content signatures of local files and folders ----------------------------------------------
_EDGE = 1 << 16  # bytes hashed at each end of a file for the cheap signature


def _cheap_file(path: Path, st: os.stat_result) -> list[Any]:
    """Size, mtime, ctime, inode, and a hash of the first and last 64 KiB and of a safetensors header.

    ``ctime`` changes with every write and cannot be set back by a user, so an edit that restores the
    mtime (``touch -r``, ``cp -p``) still changes this signature.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if st.st_size > 2 * _EDGE:
            f.seek(st.st_size - _EDGE)
            h.update(f.read(_EDGE))
        if path.suffix == ".safetensors" and st.st_size >= 8:
            f.seek(0)
            n = int.from_bytes(f.read(8), "little")
            if 0 < n <= min(st.st_size - 8, 100_000_000):
                h.update(f.read(n))
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, h.hexdigest()[:32]]


def _files_of(root: Path) -> list[tuple[str, Path]]:
    """Regular files under ``root`` (symlinks followed), skipping hidden entries (temporaries, .git, caches)."""
    if root.is_file():
        return [("", root)]
    out = []
    for dirpath, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith("."):
                p = Path(dirpath) / f
                out.append((p.relative_to(root).as_posix(), p))
    return out


class SignatureCache:
    """Content signatures of local files and directories, remembered between runs.

    ``signature(path)`` is the sha256 of the content (for a directory: of every non-hidden file's path
    and content hash). It is a cache key that changes exactly when bytes change: a ``touch`` or a copy
    gives the same key, an edit of any byte a new one. The full hash is computed only for files whose
    cheap signature (size, mtime, ctime, inode, hash of both ends and of a safetensors header) differs
    from the one remembered, so an unchanged 140 GB model costs a few stat calls and 128 KiB reads per
    shard. ``cache_file`` (JSON) keeps the remembered signatures between processes; None keeps them in
    memory only.

    File timestamps advance in ticks (a kernel jiffy on local disks, up to a second or two on network and
    FAT filesystems), so a file changed again within the tick of its last change keeps its ctime. As git
    does with "racily clean" index entries, a signature taken less than ``racy_margin_s`` after the file's
    last change is not trusted: the next lookup hashes that file in full again, until one lookup sees it
    older than the margin. Only files written moments before a run pay this second hash.
    """

    def __init__(self, cache_file: PathLike | None = None, racy_margin_s: float = 2.0) -> None:
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self.racy_ns = int(racy_margin_s * 1e9)
        self.entries: dict[str, dict[str, Any]] = {}
        self.full_hashes = 0  # files hashed in full by this object (for tests and logs)
        if self.cache_file is not None and self.cache_file.is_file():
            try:
                data = json.loads(self.cache_file.read_text())
                self.entries = {k: v for k, v in data.get("files", {}).items() if isinstance(v, dict)}
            except (OSError, ValueError, AttributeError):
                self.entries = {}

    def file_digest(self, path: Path) -> str:
        key = str(path.resolve())
        now = time.time_ns()  # before the stat: a change after it gets a ctime of at least this
        st = path.stat()
        cheap = _cheap_file(path, st)
        known = self.entries.get(key)
        if known is not None and known.get("cheap") == cheap and not known.get("racy"):
            return str(known["sha256"])
        digest = file_sha256(path)
        self.full_hashes += 1
        racy = now - max(st.st_ctime_ns, st.st_mtime_ns) < self.racy_ns
        self.entries[key] = {"cheap": cheap, "sha256": digest, "racy": racy}
        return digest

    def signature(self, target: PathLike) -> str:
        p = Path(os.path.expanduser(os.fspath(target)))
        if not p.exists():
            raise PruneHeadsError(f"{target} does not exist, so it cannot be part of a cache key")
        h = hashlib.sha256()
        for rel, f in _files_of(p):
            h.update(f"{rel}\0{self.file_digest(f)}\n".encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.cache_file is not None:
            write_json_atomic(self.cache_file, {"format": 1, "files": self.entries})


def content_signature(target: PathLike, cache: SignatureCache | None = None) -> str:
    """The content key of a local file or directory (see ``SignatureCache``)."""
    return (cache or SignatureCache()).signature(target)


def hub_revision(repo_id: str, revision: str | None = None) -> str | None:
    """The commit sha a Hub model id resolves to: asked of the Hub when online, read from the local cache's
    ``refs`` offline; None when neither knows (the caller should then key on ``repo_id@revision``)."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:
        return None
    if not constants.is_offline_mode():
        try:
            return HfApi().model_info(repo_id, revision=revision).sha
        except Exception:  # unreachable Hub, unknown repo: fall back to the cache
            pass
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


@contextlib.contextmanager
def signature_cache(workdir: Path) -> Iterator[None]:
    """Remember content hashes in ``workdir`` for the duration of a run (and between runs)."""
    global _cache
    _cache = SignatureCache(workdir / CACHE_FILE)
    try:
        yield
    finally:
        _cache.save()
        _cache = None


def _signature(path: Path) -> str:
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
