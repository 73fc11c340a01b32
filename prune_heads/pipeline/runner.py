"""A small, generic, resumable stage runner: lock, work directory, input keys, atomic stage outputs.

It knows nothing about pruning. A ``Stage`` declares its name, the stages it reads (``needs``), a ``key``
(everything its output depends on: recipe values and signatures of the local files it reads) and a ``run``
that writes into a temporary directory. Each stage's directory ``WORKDIR/<stage>/`` ends with a
``stage.json`` holding the hash of its key and of the hashes of the stages it needs, so a rerun skips a
stage whose hash matches, an interrupted run continues where it stopped, and a changed input reruns
exactly the stages downstream of it. Each directory is renamed into place whole, so none ever mixes the
outputs of different inputs.

The lock is taken before anything in the work directory is touched, so a second run on the same
directory is refused without disturbing the first.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_heads.__about__ import __version__
from prune_heads.errors import PruneHeadsError
from prune_heads.io_utils import atomic_dir, write_json_atomic

MARKER = ".prune-heads-workdir.json"
STAGE_FILE = "stage.json"


class WorkdirError(PruneHeadsError):
    """The work directory cannot be used (unwritable, foreign, or busy)."""


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran" | "cached" | "skipped"
    hash: str | None = None
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    """One step of a run. ``run(ctx, out_dir)`` returns the JSON outputs recorded in ``stage.json``."""

    name: str
    run: Callable[[Any, Path], dict[str, Any]]
    key: Callable[[Any], Any]
    needs: tuple[str, ...] = ()
    skip: Callable[[Any], str | None] = lambda ctx: None


def input_hash(obj: Any) -> str:
    text = json.dumps({"inputs": obj, "tool_version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def read_stage(wd: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((wd / name / STAGE_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


# ---- the work directory ------------------------------------------------------------------------
def check_workdir(path: str | os.PathLike) -> Path:
    """Refuse files, unwritable places and non-empty directories that ``prune-heads run`` did not make."""
    wd = Path(path).expanduser()
    if wd.exists() and not wd.is_dir():
        raise WorkdirError(f"work directory {wd} exists and is a file; choose another -o WORKDIR")
    if wd.is_dir() and not (wd / MARKER).exists() and any(wd.iterdir()):
        raise WorkdirError(
            f"{wd} is not empty and was not made by `prune-heads run` (no {MARKER}); choose an empty or new -o WORKDIR "
            "so that nothing in it is overwritten"
        )
    try:
        wd.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create work directory {wd} ({e.strerror or e}); choose a writable -o WORKDIR") from e
    if not os.access(wd, os.W_OK):
        raise WorkdirError(f"cannot write to work directory {wd}; choose a writable -o WORKDIR")
    return wd


@contextlib.contextmanager
def locked_workdir(path: str | os.PathLike, inputs: tuple[Any, ...] = ()) -> Iterator[Path]:
    """The work directory, locked for this process before anything in it is touched; then marked, and rid of
    the temporaries of dead runs (never a live process's). ``inputs`` may not lie in it, nor it in them."""
    from prune_heads.io_utils import DirLock, check_output_path, clean_stale_temporaries

    check_output_path(path, [i for i in inputs if i], option="-o WORKDIR")
    wd = check_workdir(path)
    with DirLock(wd, what="another `prune-heads run`"):
        if not (wd / MARKER).exists():
            write_json_atomic(wd / MARKER, {"tool": "prune-heads", "version": __version__,
                                            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        clean_stale_temporaries(wd)
        yield wd


# ---- the runner --------------------------------------------------------------------------------
class Runner:
    """Run ``stages`` in order in a locked work directory, skipping those whose inputs are unchanged."""

    def __init__(self, stages: list[Stage], *, force: bool = False, stop_after: str | None = None,
                 echo: Callable[[str], None] | None = print) -> None:
        names = [s.name for s in stages]
        if stop_after is not None and stop_after not in names:
            raise PruneHeadsError(f"--stop-after {stop_after!r}: choose one of {', '.join(names)}")
        self.stages, self.force, self.stop_after = stages, force, stop_after
        self.echo = echo or (lambda s: None)
        self.outcomes: dict[str, StageOutcome] = {}

    def run(self, ctx: Any, wd: Path) -> bool:
        """True when every stage finished (False after ``stop_after``)."""
        for stage in self.stages:
            self._run_stage(stage, ctx, wd)
            if stage.name == self.stop_after:
                self.echo(f"stopped after {stage.name} (--stop-after); rerun without it to continue")
                return False
        return True

    def _inputs(self, stage: Stage, ctx: Any) -> dict[str, Any]:
        return {"key": stage.key(ctx), "needs": {n: self.outcomes[n].hash for n in stage.needs}}

    def would_run(self, stage: Stage, ctx: Any, wd: Path) -> bool:
        """Whether ``stage`` (one whose needs are decided) will compute rather than reuse or skip."""
        if stage.skip(ctx) is not None:
            return False
        rec = read_stage(wd, stage.name)
        return self.force or rec is None or rec.get("hash") != input_hash(self._inputs(stage, ctx))

    def _run_stage(self, stage: Stage, ctx: Any, wd: Path) -> StageOutcome:
        why = stage.skip(ctx)
        if why is not None:
            self.echo(f"[{stage.name}] skipped ({why})")
            self.outcomes[stage.name] = StageOutcome(stage.name, "skipped")
            return self.outcomes[stage.name]
        inputs = self._inputs(stage, ctx)
        h = input_hash(inputs)
        rec = read_stage(wd, stage.name)
        if not self.force and rec is not None and rec.get("hash") == h:
            self.echo(f"[{stage.name}] up to date ({wd / stage.name})")
            self.outcomes[stage.name] = StageOutcome(stage.name, "cached", h, rec.get("seconds", 0.0), rec.get("outputs", {}))
            return self.outcomes[stage.name]
        self.echo(f"[{stage.name}] running" + (" (inputs changed)" if rec is not None else ""))
        t0 = time.time()
        with atomic_dir(wd / stage.name, overwrite=True) as tmp:
            outputs = stage.run(ctx, tmp)
            seconds = round(time.time() - t0, 2)
            write_json_atomic(tmp / STAGE_FILE, {
                "stage": stage.name, "hash": h, "inputs": inputs, "tool_version": __version__, "seconds": seconds,
                "outputs": outputs, "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        self.echo(f"[{stage.name}] done in {seconds:.1f}s")
        self.outcomes[stage.name] = StageOutcome(stage.name, "ran", h, seconds, outputs)
        return self.outcomes[stage.name]
