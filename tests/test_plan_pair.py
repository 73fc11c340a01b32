"""Class 2 of issue 21: a plan and its compensation file are one unit.

``save_plan`` stages both files, then renames the compensation file and the plan (the commit point) under a lock
on the directory; the plan records the file's sha256. The reference here is the pair as written: after a kill
between the two renames, a full disk at that moment, or two writers at once, reading the plan gives exactly the
compensation written with it (byte for byte), or a one-line refusal; never another run's file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS

import prune_heads.io_utils as io_utils
from prune_heads.compensation.plans import compensation_for_plan, compensator_for, save_plan, sidecar_path
from prune_heads.errors import DiskFullError, ModelMismatchError, OutputExistsError, PruneHeadsError
from prune_heads.plan import Plan


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A scores directory with moments, and two different compensated plans (A and B) of the same model."""
    from prune_heads import calibrate

    root = tmp_path_factory.mktemp("pair")
    model = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS))
    seqs = [[1] + [len(SPECIAL) + (7 * i + j) % len(WORDS) for j in range(15)] for i in range(6)]
    scores = calibrate(model, seqs, progress=False)
    scores.save(root / "scores")
    comp = compensator_for("lsq", scores=scores)
    plans = {}
    for name, heads in (("A", [(0, 1)]), ("B", [(0, 2), (1, 3)])):
        plan = Plan(heads, {"compensation": comp.record()})
        mask = torch.zeros(2, 4, dtype=torch.bool)
        for layer, h in heads:
            mask[layer, h] = True
        plans[name] = (plan, comp(mask))
    return {"root": root, "model": model, "scores": root / "scores", "plans": plans}


def _write(pair, name: str, path: Path, overwrite: bool = True) -> Path:
    plan, comp = pair["plans"][name]
    plan = Plan(list(plan.removed_heads), dict(plan.selection.to_dict()))
    return save_plan(plan, path, compensation=comp, overwrite=overwrite)


def _snapshot(path: Path) -> tuple[bytes, bytes]:
    return path.read_bytes(), sidecar_path(path).read_bytes()


def _applied(pair, path: Path) -> str:
    """The fingerprint of the compensation that applying the plan at ``path`` uses."""
    plan = Plan.load(path)
    return compensation_for_plan(plan, config=pair["model"].config).fingerprint()


def _litter(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_the_pair_round_trips_and_records_the_files_hash(pair, tmp_path):
    out = _write(pair, "A", tmp_path / "p.json", overwrite=False)
    entry = Plan.load(out).selection.compensation
    assert entry["file"] == "p.compensation.safetensors"
    assert entry["sha256"] == hashlib.sha256(sidecar_path(out).read_bytes()).hexdigest()
    assert _applied(pair, out) == pair["plans"]["A"][1].fingerprint()


def test_an_existing_compensation_file_is_an_output(pair, tmp_path):
    """``select -o x.json`` must not silently replace ``x.compensation.safetensors``."""
    side = sidecar_path(tmp_path / "x.json")
    side.write_bytes(b"someone's file")
    with pytest.raises(OutputExistsError, match="compensation.safetensors"):
        _write(pair, "A", tmp_path / "x.json", overwrite=False)
    assert side.read_bytes() == b"someone's file" and not (tmp_path / "x.json").exists()


def test_a_stale_compensation_file_is_refused_on_read(pair, tmp_path):
    a = _write(pair, "A", tmp_path / "a.json")
    b = _write(pair, "B", tmp_path / "b.json")
    sidecar_path(a).write_bytes(sidecar_path(b).read_bytes())  # B's file beside A's plan
    with pytest.raises(ModelMismatchError, match="not the compensation this plan was selected with"):
        _applied(pair, a)


def test_an_exception_between_the_two_renames_puts_the_old_pair_back(pair, tmp_path, monkeypatch):
    out = _write(pair, "A", tmp_path / "p.json")
    before = _snapshot(out)

    def interrupted(stage, *paths):
        if stage == "unit-partial":
            raise KeyboardInterrupt

    monkeypatch.setattr(io_utils, "_swap_hook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write(pair, "B", out)
    assert _snapshot(out) == before and _litter(tmp_path) == []
    monkeypatch.setattr(io_utils, "_swap_hook", None)
    assert _applied(pair, out) == pair["plans"]["A"][1].fingerprint()


class _Frozen:
    """A compensation whose bytes, fingerprint and record were computed in the parent: the forked child below
    only writes files (no torch work after ``fork``)."""

    def __init__(self, comp) -> None:
        self._bytes, self._fp, self._record = comp.to_bytes(), comp.fingerprint(), comp.record()

    def to_bytes(self) -> bytes:
        return self._bytes

    def fingerprint(self) -> str:
        return self._fp

    def record(self) -> dict:
        return dict(self._record)


def _killed_while_writing(pair, name: str, out: Path, stage: str = "unit-partial") -> int:
    """``save_plan`` of plan ``name`` in a forked child that dies (``os._exit``: no ``finally``, no cleanup, as
    under SIGKILL) at ``stage`` of the commit; returns the child's exit status."""
    plan, comp = pair["plans"][name]
    plan, frozen = Plan(list(plan.removed_heads), dict(plan.selection.to_dict())), _Frozen(comp)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            io_utils._swap_hook = lambda s, *p: os._exit(9) if s == stage else None
            save_plan(plan, out, compensation=frozen, overwrite=True)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_kill_between_the_two_renames_never_pairs_the_plan_with_the_new_file(pair, tmp_path):
    """``select --overwrite`` killed after the compensation file landed and before the plan: the old plan is read
    with its own (restored) file, not the new one."""
    out = _write(pair, "A", tmp_path / "p.json")
    before = _snapshot(out)
    assert _killed_while_writing(pair, "B", out) == 9
    assert out.read_bytes() == before[0] and sidecar_path(out).read_bytes() != before[1]  # killed there
    assert _applied(pair, out) == pair["plans"]["A"][1].fingerprint()
    assert _snapshot(out) == before
    _write(pair, "B", out)  # the dead run's staged plan is cleaned by the next write
    assert _applied(pair, out) == pair["plans"]["B"][1].fingerprint() and _litter(tmp_path) == []


def test_a_kill_leaves_a_pair_a_later_writer_replaces_whole(pair, tmp_path):
    """After the same kill, the next ``select --overwrite`` (not a reader) writes its pair over the dead run's
    half: the plan on disk applies its own file, and nothing the dead run left remains."""
    out = _write(pair, "A", tmp_path / "p.json")
    assert _killed_while_writing(pair, "B", out) == 9
    _write(pair, "A", out)
    assert _applied(pair, out) == pair["plans"]["A"][1].fingerprint() and _litter(tmp_path) == []


def test_a_full_disk_at_that_moment_leaves_the_old_pair_and_says_so_truthfully(pair, tmp_path, monkeypatch):
    out = _write(pair, "A", tmp_path / "p.json")
    before = _snapshot(out)
    real = io_utils._stage_bytes
    calls = []

    def full(path, data):
        calls.append(path.name)
        if path.name == "p.json":  # the compensation file is staged, the plan does not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(io_utils, "_stage_bytes", full)
    with pytest.raises(DiskFullError, match="any old output is unchanged"):
        _write(pair, "B", out)
    assert calls == ["p.compensation.safetensors", "p.json"]
    assert _snapshot(out) == before and _litter(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_writers_on_the_same_output_leave_one_whole_pair(pair, tmp_path, overwrite):
    """Two selects finishing at once on the same ``-o``: without --overwrite exactly one succeeds; with it both
    do, one after the other; either way the plan on disk applies its own file."""
    out = tmp_path / "p.json"
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def writer(name):
        barrier.wait()
        try:
            for _ in range(1 if not overwrite else 5):
                _write(pair, name, out, overwrite=overwrite)
            results[name] = "ok"
        except PruneHeadsError as e:
            results[name] = e

    threads = [threading.Thread(target=writer, args=(n,)) for n in "AB"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not overwrite:
        assert sorted(str(type(v).__name__) for v in results.values()) == ["OutputExistsError", "str"], results
    else:
        assert results == {"A": "ok", "B": "ok"}
    winner = Plan.load(out)
    name = "A" if len(winner.removed_heads) == 1 else "B"
    assert _applied(pair, out) == pair["plans"][name][1].fingerprint()
    assert _litter(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_second_writer_waits_while_the_first_is_between_its_renames(pair, tmp_path, monkeypatch, overwrite):
    """The interleaving that paired a plan with another run's file: run B arrives while run A has renamed its
    compensation file and not yet its plan. B waits for A's unit (the lock), then is refused (no --overwrite:
    A's pair stays) or replaces A's whole pair; at no point does a plan sit beside the other run's file."""
    out = tmp_path / "p.json"
    seen: list[str] = []
    results: dict[str, object] = {}

    def b_writes():
        try:
            _write(pair, "B", out, overwrite=overwrite)
            results["B"] = "ok"
        except PruneHeadsError as e:
            results["B"] = e

    b = threading.Thread(target=b_writes)

    def paused(stage, *paths):
        if stage == "unit-partial" and not b.is_alive() and "B" not in results:
            monkeypatch.setattr(io_utils, "_swap_hook", None)  # B's own commit is not paused
            b.start()
            b.join(0.5)
            seen.append("B finished while A was mid-commit" if not b.is_alive() else "B waited")

    monkeypatch.setattr(io_utils, "_swap_hook", paused)
    _write(pair, "A", out, overwrite=overwrite)
    b.join(30)
    assert seen == ["B waited"] and not b.is_alive()
    if overwrite:
        assert results == {"B": "ok"} and _applied(pair, out) == pair["plans"]["B"][1].fingerprint()
    else:
        assert isinstance(results["B"], OutputExistsError)
        assert _applied(pair, out) == pair["plans"]["A"][1].fingerprint()
    assert _litter(tmp_path) == []


def test_a_plan_without_compensation_replaces_the_whole_pair(pair, tmp_path):
    out = _write(pair, "A", tmp_path / "p.json")
    save_plan(Plan([(0, 1)]), out, overwrite=True)
    assert not sidecar_path(out).exists() and Plan.load(out).selection.compensation is None


def test_equal_compensations_are_equal_bytes_in_any_process(tmp_path):
    """A plan records its compensation file's sha256, so equal compensations must be equal bytes: safetensors
    writes its metadata map in a per-process hash order (six orders in thirty saves, measured), which the
    writer sorts away. Two fresh interpreters write the same compensation; the bytes agree and load back."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from prune_heads.compensation.record import Compensation, LayerCompensation\n"
            "from prune_heads.compensation.spec import CompensationSpec\n"
            "lc = LayerCompensation((0,), (1,), 2, torch.arange(2.0, dtype=torch.float64), "
            "torch.ones(2, 2, dtype=torch.float64))\n"
            "c = Compensation(CompensationSpec('lsq'), {0: lc}, 1, 2, 2, {'b': 1, 'a': 'données/x.txt'})\n"
            "[c.save(sys.argv[1] + f'-{i}.safetensors') for i in range(5)]\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for run in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / run)], check=True, env=env, timeout=120)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 10 and len({hashlib.sha256(f.read_bytes()).hexdigest() for f in files}) == 1
    from prune_heads.compensation.record import Compensation

    back = Compensation.load(files[0])
    assert back.statistics == {"b": 1, "a": "données/x.txt"} and torch.equal(back.layers[0].weight, torch.ones(2, 2,
                                                                                                   dtype=torch.float64))
