"""Model sources for offline tests of the source options (``--revision``, ``--gguf-file``).

- A Hugging Face Hub cache on disk: ``HF_HUB_OFFLINE=1`` makes ``from_pretrained``/``snapshot_download``
  read a repository at a revision from ``HF_HUB_CACHE/models--ORG--NAME`` (``refs/<revision>`` names a
  commit, ``snapshots/<commit>/`` holds its files), which is exactly what ``add_revision`` writes.
- A GGUF source: a ``.gguf`` file whose conversion is already in prune-heads' cache (keyed by the file's
  content, as ``tests/test_gguf_cache.py`` shows), so a tiny model stands in for a real GGUF without the
  minute-long dequantisation; ``add_gguf`` writes both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_revision(cache: Path, repo_id: str, revision: str, commit: str, write: Callable[[Path], Any]) -> Path:
    """Write a snapshot of ``repo_id`` (``write(folder)`` fills it) and point ``revision`` at ``commit``."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    write(snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap


def use_cache(monkeypatch: Any, cache: Path) -> None:
    """Point huggingface_hub (and so transformers) at ``cache`` for this test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def add_gguf(folder: Path, name: str, content: bytes, write: Callable[[Path], Any]) -> Path:
    """``folder/name`` (``content``: its bytes, which key the cache) and its converted checkpoint in the cache
    (``PRUNE_HEADS_CACHE`` must point at a test folder); ``write(folder)`` fills the checkpoint."""
    from prune_heads.model import loading

    f = Path(folder) / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(b"GGUF" + content)
    converted = loading.cache_dir() / "gguf" / f"{f.stem}-{loading._gguf_cache_key(f)}"
    converted.mkdir(parents=True, exist_ok=True)
    write(converted)
    return f
