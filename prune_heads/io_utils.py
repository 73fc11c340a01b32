"""Outputs that never destroy an input, never leave half-written files, and never lose the old result.

Every command writes through these helpers:

- ``check_output_dir(path, overwrite, inputs=...)`` / ``check_output_path`` refuse an output that is,
  contains, or lies inside any input (symlinks resolved), or that contains the working or home
  directory, before any work starts; ``--overwrite`` can therefore only ever remove the output itself.
- ``atomic_dir`` builds the output in a temporary directory beside it and swaps it into place. With
  ``overwrite`` the swap is one ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it, so a kill at any
  instant leaves the old or the new output; elsewhere the old output is first renamed to a recoverable
  ``.NAME.old-…`` that the next run puts back if the process died between the two renames.
- Temporary names carry their owner (``pid``, process start time, host), so ``clean_stale_temporaries``
  removes only those whose process is dead: never a live run's, never another host's.
- ``DirLock`` is an ``flock`` on a shared directory, taken before anything in it is touched.
- A full disk (``ENOSPC``, quota, file-size limit) surfaces as ``DiskFullError`` (a one-line message that
  says how much space is left and what to do); the temporary is removed, the old output stays.
- ``file_sha256``: a file's content hash (the pipeline's cache keys, ``pipeline.signatures``, build on it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_heads.errors import (
    DiskFullError,
    LockedError,
    OutputExistsError,
    OutputOverlapError,
    PruneHeadsError,
)

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
LOCK_FILE = ".prune-heads.lock"


# ---- output vs input ---------------------------------------------------------------------------
def _resolved(p: PathLike) -> Path:
    return Path(os.path.expanduser(os.fspath(p))).resolve()


def check_output_path(output: PathLike, inputs: Iterable[PathLike | None] = (), *, option: str = "-o") -> Path:
    """Refuse ``output`` when it is, contains or lies inside one of ``inputs`` (symlinks resolved).

    Also refused: an output that is or contains the working directory, the home directory or ``/``
    (relative inputs and everything else a user keeps there would go with it). Returns the resolved output.
    ``None`` inputs (an option not given) are ignored; inputs that are Hub ids rather than local paths
    never resolve to an existing path and so cannot collide.
    """
    out = _resolved(output)
    for raw, inp in _input_paths(inputs):
        if out == inp:
            raise OutputOverlapError(f"{option} {output} is the input {raw}; writing it would destroy the input: "
                                     "choose another output path")
        if inp in out.parents:
            raise OutputOverlapError(f"{option} {output} lies inside the input {raw}; choose an output outside it")
        if out in inp.parents:
            raise OutputOverlapError(f"{option} {output} contains the input {raw}, which --overwrite would remove; "
                                     "choose an output that does not contain any input")
    for guarded, label in ((Path.cwd().resolve(), "the working directory"), (Path.home().resolve(), "your home directory"),
                           (Path(out.anchor), "the filesystem root")):
        if out == guarded or out in guarded.parents:
            raise OutputOverlapError(f"{option} {output} is or contains {label}; choose a new, dedicated output path")
    return out


#: a plan ``X.json`` travels with ``X.compensation.safetensors`` (``prune_heads.compensation.plans``): reading
#: the plan reads it, so it is an input wherever the plan is, and an output wherever the plan is written
COMPANION_SUFFIX = ".compensation.safetensors"


def companion_of(path: PathLike) -> Path | None:
    """The compensation file that belongs to the plan ``path`` (``X.json`` -> ``X.compensation.safetensors``)."""
    p = Path(path)
    return p.with_name(p.stem + COMPANION_SUFFIX) if p.suffix == ".json" else None


def _input_paths(inputs: Iterable[PathLike | None], limit: int = 100_000) -> Iterator[tuple[PathLike, Path]]:
    """``(as given, resolved)`` for each local input, then for every symlink inside an input directory (a Hub
    cache snapshot is a folder of links into ``blobs/``: the blobs are the input too)."""
    seen: set[Path] = set()
    for raw in inputs:
        if raw is None or os.fspath(raw) == "":
            continue
        inp = _resolved(raw)
        if not os.path.lexists(os.path.expanduser(os.fspath(raw))) and not inp.exists():
            continue  # a Hub id or a name, not a local path
        yield raw, inp
        companion = companion_of(Path(os.path.expanduser(os.fspath(raw))).absolute())
        if companion is not None:
            yield f"{raw}'s {companion.name}", companion.resolve()
        if not inp.is_dir() or inp in seen:
            continue
        seen.add(inp)
        count = 0
        for dirpath, dirs, files in os.walk(inp, followlinks=True):
            real = Path(dirpath).resolve()
            if real in seen and real != inp:
                dirs[:] = []
                continue
            seen.add(real)
            for name in dirs + files:
                count += 1
                p = Path(dirpath) / name
                if p.is_symlink():
                    yield f"{raw} (through the link {p})", p.resolve()
            if count > limit:
                break


def check_output_dir(path: PathLike, overwrite: bool, *, inputs: Iterable[PathLike | None] = (),
                     kind: str = "directory", option: str = "-o") -> Path:
    """Fail before any work when ``path`` cannot be written as a new output.

    Refuses an existing output without ``overwrite``, an output that overlaps an input (see
    ``check_output_path``), and an unwritable parent. ``kind`` is ``"directory"`` or ``"file"``: an existing
    output of the other kind is never replaced. Also restores an output a killed run left renamed aside.
    """
    out = Path(os.path.expanduser(os.fspath(path)))
    check_output_path(out, inputs, option=option)
    recover_interrupted_swap(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it")
        if kind == "directory" and not out.is_dir():
            raise OutputExistsError(f"{out} exists and is not a directory; remove it or choose another {option}")
        if kind == "file" and out.is_dir():
            raise OutputExistsError(f"{out} is a directory, not a file; choose another {option}")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PruneHeadsError(f"cannot create {parent} ({e.strerror or e}); choose another {option}") from None
    if not os.access(parent, os.W_OK):
        raise PruneHeadsError(f"cannot write to {parent}; choose another {option}")
    return out


# ---- temporary names that carry their owner -------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname() or "localhost")


def _start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot (Linux), 0 where unknown: tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return 0


def owner_tag() -> str:
    """``PID-START-HOST`` of this process, as embedded in every temporary name."""
    pid = os.getpid()
    return f"{pid}-{_start_time(pid)}-{_host()}"


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<start>\d+)-(?P<host>[A-Za-z0-9._]+)-(?P<rand>[A-Za-z0-9_]+)$")


@dataclass(frozen=True)
class Temporary:
    """A temporary file or directory made by these helpers, and who made it."""

    path: Path
    name: str  # the output it belongs to
    kind: str  # "tmp" (being built) or "old" (an old output moved aside during a swap)
    pid: int
    start: int
    host: str

    @property
    def alive(self) -> bool | None:
        """True/False for this host's processes; None (unknown) for another host's."""
        if self.host != _host():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, belongs to someone else
        if self.start and _start_time(self.pid) not in (0, self.start):
            return False  # the pid was reused by a newer process
        return True


def parse_temporary(path: Path) -> Temporary | None:
    m = _TEMP_RE.match(path.name)
    if m is None:
        return None
    return Temporary(path, m["name"], m["kind"], int(m["pid"]), int(m["start"]), m["host"])


def temporaries(directory: PathLike, name: str | None = None) -> list[Temporary]:
    """The temporaries in ``directory`` (for the output ``name``, or all)."""
    d = Path(directory)
    try:
        entries = list(d.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [t for t in map(parse_temporary, entries) if t is not None]
    return sorted((t for t in found if name is None or t.name == name), key=lambda t: t.path.name)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover_interrupted_swap(out: PathLike) -> Path | None:
    """Put back an old output that a killed ``atomic_dir`` had renamed aside and not yet replaced.

    Only on systems without ``RENAME_EXCHANGE`` can ``out`` be missing while ``.NAME.old-…`` exists; the
    old output is complete, so it is restored (the interrupted run never reported success).
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        return None
    dead = [t for t in temporaries(out.parent, out.name) if t.kind == "old" and t.alive is False]
    if not dead:
        return None
    newest = max(dead, key=lambda t: t.path.stat().st_mtime)
    os.replace(newest.path, out)
    log.warning("restored %s from %s, left there by an interrupted run", out, newest.path.name)
    return out


def clean_stale_temporaries(directory: PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporaries of dead processes of this host (for output ``name``, or all); return them.

    A live process's temporaries and those of other hosts (a shared filesystem) are never touched.
    """
    d = Path(directory)
    for output in {t.name for t in temporaries(d, name) if t.kind == "old"}:
        recover_interrupted_swap(d / output)  # an old output whose replacement never landed goes back first
    removed = []
    others = 0
    for t in temporaries(d, name):
        state = t.alive
        if state is False:
            _remove(t.path)
            removed.append(t.path)
        elif state is None:
            others += 1
    if removed:
        log.info("removed %d stale temporaries in %s: %s", len(removed), d, ", ".join(p.name for p in removed))
    if others:
        log.warning("%d temporaries in %s belong to processes on other hosts; left in place", others, d)
    return removed


# ---- disk full --------------------------------------------------------------------------------
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large", "storagefull", "os error 28")


def is_disk_full(exc: BaseException) -> bool:
    """Is ``exc`` (or what caused it) a full disk, a quota or a file-size limit? safetensors reports these
    as its own error type with the OS message inside, so the text is checked too."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(target: PathLike, exc: BaseException) -> DiskFullError:
    where = Path(target).resolve().parent
    try:
        space = f"{_human(shutil.disk_usage(where).free)} free on {where}"
    except OSError:
        space = f"cannot read the free space of {where}"
    return DiskFullError(f"no space left while writing {target} ({space}; {exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'disk full'}): free some space or choose an output "
                         "on another disk, then run again; the partial output was removed and any old output is unchanged")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---- atomic outputs ---------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_EXCHANGE = _renameat2()


def exchange(a: PathLike, b: PathLike) -> bool:
    """Atomically swap two existing paths (Linux ``RENAME_EXCHANGE``); False where unsupported."""
    if _EXCHANGE is None:
        return False
    rc = _EXCHANGE(_AT_FDCWD, os.fsencode(os.fspath(a)), _AT_FDCWD, os.fsencode(os.fspath(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # this filesystem or kernel cannot exchange: fall back to two renames
    raise OSError(err, os.strerror(err), os.fspath(a))


def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync directories
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath), directory=True)


#: test hook: called with (stage, paths) between the steps of a swap, so tests can kill the process there
_swap_hook: Any = None


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``: the old or the new output exists at every instant."""
    parent = out.parent
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        _fsync_path(parent, directory=True)
        return
    if out.is_dir() and not out.is_symlink() and exchange(tmp, out):
        if _swap_hook:
            _swap_hook("exchanged", tmp, out)
        _fsync_path(parent, directory=True)
        _remove(tmp)  # now holds the old output
        return
    old = parent / f".{out.name}.old-{owner_tag()}-{os.urandom(4).hex()}"
    os.replace(out, old)
    if _swap_hook:
        _swap_hook("moved-aside", old, out)
    os.replace(tmp, out)
    _fsync_path(parent, directory=True)
    _remove(old)


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False, *, inputs: Iterable[PathLike | None] = (),
               durable: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; swap it into place only if the block succeeds.

    Args:
        overwrite: replace an existing output (never one that overlaps ``inputs``).
        inputs: every path the command reads; an output that is, contains or lies inside one is refused.
        durable: fsync the files before the swap, so a power cut cannot leave renamed but empty files.

    An exception in the block (or a kill) leaves the old output untouched; the temporary is removed
    (or, after a kill, by the next run for the same output: ``clean_stale_temporaries``). A full disk
    is re-raised as ``DiskFullError``.
    """
    inputs = list(inputs)
    out = check_output_dir(path, overwrite, inputs=inputs)
    parent = out.absolute().parent.resolve()
    out = parent / out.name
    clean_stale_temporaries(parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{owner_tag()}-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; outputs are shared like any directory
    try:
        yield tmp
        if durable:
            _fsync_tree(tmp)
        if (out.exists() or out.is_symlink()) and not overwrite:  # someone else wrote it meanwhile
            raise OutputExistsError(f"{out} appeared while this run was writing it; pass --overwrite to replace it")
        _swap_into_place(tmp, out)
    except BaseException as e:
        _remove(tmp)
        if not isinstance(e, DiskFullError) and isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(out, e) from e
        raise


def json_bytes(data: Any) -> bytes:
    """The bytes ``write_json_atomic`` writes for ``data`` (indented, numpy/paths/sets converted)."""
    return (json.dumps(data, indent=2, default=_json_default) + "\n").encode()


def write_json_atomic(path: PathLike, data: Any, overwrite: bool = True, *,
                      inputs: Iterable[PathLike | None] = ()) -> Path:
    """Write a JSON file through an fsynced temporary and ``os.replace``: the old file or the new one."""
    out = Path(path)
    if inputs or not overwrite:
        check_output_dir(out, overwrite, inputs=inputs, kind="file")
    return write_bytes_atomic(out, json_bytes(data))  # serialised first: a bad value writes nothing


def _stage_bytes(out: Path, data: bytes) -> Path:
    """``data`` in an fsynced, owner-tagged temporary beside ``out`` (the umask's mode); removed on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-{owner_tag()}-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _flock_within(fd: int, deadline: float | None) -> bool:
    """Take an exclusive ``flock`` on ``fd``, polling until ``deadline`` (``time.monotonic()``; None: one try);
    False when another process still holds it then. Other errors (a filesystem without locks) are raised."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if deadline is None or time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


@contextlib.contextmanager
def directory_lock(directory: PathLike, *, what: str = "another prune-heads process", timeout: float = 120.0
                   ) -> Iterator[None]:
    """An exclusive ``flock`` on the directory itself (no lock file is left in a user's folder), waiting up to
    ``timeout`` seconds: writers of the same outputs take turns instead of interleaving their files."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if not _flock_within(fd, time.monotonic() + timeout):
            raise LockedError(f"{what} is writing into {directory}; wait for it to finish or choose another output")
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_files_together(files: list[tuple[PathLike, bytes]], *, overwrite: bool) -> list[Path]:
    """Write several files of one directory as one unit whose LAST file is the commit point (a plan after its
    compensation file): a reader checks the others against the last (by a hash it records).

    Every file is first staged as an fsynced temporary, so a full disk or any error leaves every old file
    exactly as it was. Then, under ``directory_lock``, each earlier file replaces its old version (kept aside as
    ``.NAME.old-…``) and the last one is renamed into place; an exception before that commit puts the old files
    back. A kill between the renames can leave new earlier files beside the old last one: the reader's hash
    check refuses them, and ``restore_aside`` brings back the old versions the dead process kept aside.
    Without ``overwrite`` any existing file of the unit is refused, also when another run wrote it meanwhile.
    """
    outs = [Path(os.path.expanduser(os.fspath(p))).absolute() for p, _ in files]
    parent = outs[-1].parent
    if any(o.parent != parent for o in outs):
        raise ValueError("write_files_together writes files of one directory")
    parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(parent, what="another prune-heads run writing the same output"):
        if not overwrite:
            for o in outs:
                if o.exists() or o.is_symlink():
                    raise OutputExistsError(f"{o} already exists (or another run wrote it meanwhile); pass --overwrite "
                                            "to replace it")
        staged: list[Path] = []
        try:
            for o, (_, data) in zip(outs, files):
                staged.append(_stage_bytes(o, data))
        except BaseException as e:
            for t in staged:
                t.unlink(missing_ok=True)
            if isinstance(e, Exception) and is_disk_full(e):
                raise disk_full_error(outs[len(staged)], e) from e
            raise
        _commit_together(list(zip(staged, outs)))
        for o in outs:  # only now: an old file a killed run kept aside may be needed until this unit lands
            clean_stale_temporaries(parent, o.name)
    return outs


def _commit_together(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each staged temporary onto its output, the last one last; undo on an exception before the last."""
    aside: list[tuple[Path | None, Path]] = []
    try:
        for tmp, out in pairs[:-1]:
            old = None
            if out.exists() or out.is_symlink():
                old = out.parent / f".{out.name}.old-{owner_tag()}-{os.urandom(4).hex()}"
                os.replace(out, old)
            aside.append((old, out))
            os.replace(tmp, out)
            if _swap_hook:
                _swap_hook("unit-partial", tmp, out)
        os.replace(*pairs[-1])
        _fsync_path(pairs[-1][1].parent, directory=True)
    except BaseException:
        for old, out in reversed(aside):
            if old is not None:
                os.replace(old, out)
            else:
                out.unlink(missing_ok=True)
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)
        raise
    for old, _ in aside:
        if old is not None:
            _remove(old)


def restore_aside(path: PathLike, accept: Any) -> bool:
    """Put back the version of ``path`` that a killed ``write_files_together`` kept aside, if ``accept(old_path)``
    says it is the one the commit file still names; True when restored."""
    out = Path(path)
    for t in sorted(temporaries(out.parent, out.name), key=lambda t: -t.path.stat().st_mtime):
        if t.kind == "old" and t.alive is False and accept(t.path):
            os.replace(t.path, out)
            _fsync_path(out.parent, directory=True)
            log.warning("restored %s from %s, left there by an interrupted run", out, t.path.name)
            return True
    return False


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """``data`` into ``path`` via a temporary beside it; a full disk leaves the old file and no temporary."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent, out.name)
    try:
        tmp = _stage_bytes(out, data)  # removes its temporary itself when the write fails
        try:
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except BaseException as e:
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(out, e) from e
        raise
    _fsync_path(out.parent, directory=True)
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


# ---- directory lock ---------------------------------------------------------------------------
class DirLock:
    """An exclusive ``flock`` on ``DIR/.prune-heads.lock``, released when the holder exits or dies.

    Take it before touching anything in a shared directory (cleaning temporaries included)::

        with DirLock(workdir, what="`prune-heads run`"):
            clean_stale_temporaries(workdir)
            ...

    A second holder is refused at once with ``LockedError`` naming the holder (pid, host, since when),
    or waits up to ``timeout`` seconds when one is given.
    """

    def __init__(self, directory: PathLike, *, what: str = "another prune-heads process", name: str = LOCK_FILE) -> None:
        self.directory = Path(directory)
        self.path = self.directory / name
        self.what = what
        self._fd: int | None = None

    def acquire(self, timeout: float | None = None) -> DirLock:

        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())  # no truncation before the lock
        try:
            locked = _flock_within(fd, None if timeout is None else time.monotonic() + timeout)
        except OSError:
            os.close(fd)
            raise
        if not locked:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(f"{self.what} is using {self.directory}{holder}; wait for it to finish or choose "
                              "another directory")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" (pid {info['pid']} on {info['host']} since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# ---- file hashes ---------------------------------------------------------------------------------
_CHUNK = 1 << 22


#: the content hash an export records per file (``prune_heads.json``: ``files``) and ``push`` checks
FILE_HASH = "xxh3_128"


def file_record(path: PathLike) -> dict[str, Any]:
    """``{"size": bytes, "xxh3_128": hex}`` of a file: what an export records so that ``push`` sends only
    files whose content is what the export wrote (xxh3 reads at several GB/s; a size says nothing of content)."""
    import xxhash

    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            size += len(block)
    return {"size": size, FILE_HASH: h.hexdigest()}


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()
