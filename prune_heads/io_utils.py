"""Atomic output directories: a run that dies leaves no half-written result behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prune_heads.errors import OutputExistsError, PruneHeadsError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory")
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PruneHeadsError(f"cannot write to {parent}")
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; rename it into place only if the block succeeds.

    The old directory (with ``overwrite``) is moved aside first and removed only after the rename, so
    an interruption at any point leaves either the old or the new output, never a mix.
    """
    out = check_output_dir(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are shared like any directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, data: Any, overwrite: bool = True) -> Path:
    """Write a JSON file through a temporary file and ``os.replace``."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.write("\n")
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, out)
    return out


def apply_umask(path: str | os.PathLike) -> None:
    """Give a file written through ``mkstemp`` (mode 0600) the mode ``open()`` would: 0666 less the umask."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")
