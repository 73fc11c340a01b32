"""Outputs never destroy inputs, never lose the old result, and never leave litter (io_utils)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune_heads import io_utils
from prune_heads.errors import DiskFullError, LockedError, OutputOverlapError, PruneHeadsError
from prune_heads.io_utils import (
    DirLock,
    atomic_dir,
    check_output_dir,
    check_output_path,
    clean_stale_temporaries,
    owner_tag,
    recover_interrupted_swap,
    temporaries,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
#: subprocesses import only io_utils: skip the package root's transformers import (seconds on a busy machine)
LIGHT = (f"import sys, types; _p = types.ModuleType('prune_heads'); _p.__path__ = [{str(ROOT / 'prune_heads')!r}]; "
         "sys.modules['prune_heads'] = _p\n")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (links as links) with a digest of its content."""
    out = {}
    for dirpath, dirs, files in os.walk(root):  # symlinks are recorded, not followed
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            else:
                out[rel] = "dir"
    return dict(sorted(out.items()))


# ---- 1. an output may never destroy an input ------------------------------------------------------
def _tree(root: Path) -> dict[str, Path]:
    (root / "models" / "m" / "sub").mkdir(parents=True)
    (root / "models" / "m" / "config.json").write_text("{}")
    (root / "models" / "m" / "sub" / "w.bin").write_bytes(b"w" * 100)
    (root / "models" / "sibling.txt").write_text("sibling")
    (root / "scores").mkdir()
    (root / "scores" / "scores.json").write_text("{}")
    (root / "plan.json").write_text('{"removed_heads": []}')
    (root / "data.txt").write_text("text")
    (root / "links").mkdir()
    (root / "links" / "to_model").symlink_to(root / "models" / "m")
    (root / "links" / "to_models").symlink_to(root / "models")
    (root / "links" / "to_plan").symlink_to(root / "plan.json")
    return {"model": root / "models" / "m", "scores": root / "scores", "plan": root / "plan.json",
            "data": root / "data.txt", "model_link": root / "links" / "to_model"}


OVERLAPS = [  # (output relative to the tree, input key, what the message says)
    ("models/m", "model", "is the input"),                  # calibrate MODEL_DIR -o MODEL_DIR
    ("models", "model", "contains the input"),              # export SRC -o PARENT_OF_SRC
    ("models/m/out", "model", "lies inside the input"),
    ("models/m/sub", "model", "lies inside the input"),
    ("links/to_model", "model", "is the input"),            # a symlink to the input
    ("links/to_models", "model", "contains the input"),     # a symlink to the input's parent
    ("links/to_model/x", "model", "lies inside the input"),
    ("models/m", "model_link", "is the input"),             # the input given through a symlink
    ("scores", "scores", "is the input"),
    (".", "plan", "contains the input"),
    ("plan.json", "plan", "is the input"),
    ("links/to_plan", "plan", "is the input"),
    ("data.txt", "data", "is the input"),
    ("data.txt/x", "data", "lies inside the input"),
]


@pytest.mark.parametrize("out,key,says", OVERLAPS)
def test_output_overlapping_an_input_is_refused(tmp_path, out, key, says):
    inputs = _tree(tmp_path)
    before = snapshot(tmp_path)
    for call in (lambda: check_output_path(tmp_path / out, [inputs[key]]),
                 lambda: check_output_dir(tmp_path / out, True, inputs=[inputs[key]]),
                 lambda: atomic_dir(tmp_path / out, True, inputs=[inputs[key]]).__enter__(),
                 lambda: write_json_atomic(tmp_path / out, {}, inputs=[inputs[key]])):
        with pytest.raises(OutputOverlapError, match=says):
            call()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("out", ["new", "models/other", "scores2", "links/new"])
def test_outputs_beside_the_inputs_are_fine(tmp_path, out):
    inputs = _tree(tmp_path)
    with atomic_dir(tmp_path / out, overwrite=True, inputs=inputs.values()) as tmp:
        (tmp / "x").write_text("new")
    assert (tmp_path / out / "x").read_text() == "new"


def test_hub_ids_and_missing_options_are_not_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_output_path(tmp_path / "out", ["HuggingFaceTB/SmolLM2-135M", None, "", "smollm2"])


@pytest.mark.parametrize("where", ["cwd", "cwd_parent", "home", "root"])
def test_output_containing_cwd_home_or_root_is_refused(tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    target = {"cwd": work, "cwd_parent": tmp_path / "a", "home": tmp_path / "home", "root": Path("/")}[where]
    with pytest.raises(OutputOverlapError, match="working directory|home directory|filesystem root"):
        check_output_dir(target, True)


NAMES = st.sampled_from(["a", "b", "c", "m", "x"])


@st.composite
def layouts(draw):
    """A random tree of files, directories and symlinks; some of its paths are inputs, one is the output."""
    paths = draw(st.lists(st.lists(NAMES, min_size=1, max_size=3), min_size=1, max_size=8))
    links = draw(st.lists(st.tuples(st.lists(NAMES, min_size=1, max_size=2), st.integers(0, 7)), max_size=3))
    inputs = draw(st.lists(st.integers(0, 7), min_size=1, max_size=3))
    out = draw(st.one_of(st.integers(0, 7), st.lists(NAMES, min_size=1, max_size=3)))
    return paths, links, inputs, out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts(), kind=st.sampled_from(["dir", "json"]))
def test_no_overwrite_removes_anything_outside_its_output(tmp_path_factory, layout, kind):
    """The proof for class 1: whatever the tree, inputs and output (symlinks included), an overwrite either
    is refused and changes nothing, or changes nothing but the output path itself; no input ever changes."""
    root = tmp_path_factory.mktemp("tree")
    paths, links, input_idx, out_choice = layout
    made: list[Path] = []
    for parts in paths:
        p = root.joinpath(*parts)
        if any(q.is_file() for q in [p, *p.parents] if q != root and root in q.parents):
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.write_text("/".join(parts))
        made.append(p)
    for parts, target in links:
        p = root.joinpath("l", *parts)
        if p.exists() or p.is_symlink() or not made:
            continue
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.symlink_to(made[target % len(made)].parent if target % 2 else made[target % len(made)])
        except OSError:  # a parent is a file or a link to one
            continue
        made.append(p)
    inputs = [made[i % len(made)] for i in input_idx]
    out = made[out_choice % len(made)] if isinstance(out_choice, int) else root.joinpath(*out_choice)
    out_real = out.resolve()
    before = snapshot(root)
    input_files = {str(f): f.read_bytes() for i in inputs for f in ([i] if i.is_file() else Path(i).rglob("*"))
                   if f.is_file()}
    try:
        if kind == "dir":
            with atomic_dir(out, overwrite=True, inputs=inputs) as tmp:
                (tmp / "result").write_text("new")
        else:
            write_json_atomic(out, {"new": 1}, overwrite=True, inputs=inputs)
    except PruneHeadsError:
        assert snapshot(root) == before
        return
    after = snapshot(root)
    rel_out = out.relative_to(root).as_posix()
    real_rel = out_real.relative_to(root).as_posix() if root.resolve() in out_real.parents else None
    for rel, digest in before.items():
        inside = any(rel == r or rel.startswith(r + "/") for r in (rel_out, real_rel) if r)
        if not inside:
            assert after.get(rel) == digest, f"{rel} outside the output {rel_out} changed"
    for f, data in input_files.items():
        assert Path(f).read_bytes() == data, f"input {f} changed"


# ---- 7. a kill at any instant leaves the old or the new output -------------------------------------
SWAPPER = LIGHT + textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from prune_heads import io_utils
    out = Path(sys.argv[1]); mode = sys.argv[2]; stop = sys.argv[3]
    if mode == "rename":
        io_utils._EXCHANGE = None
    if stop != "never":
        def hook(stage, a, b):
            if stage == stop:
                os._exit(137)
        io_utils._swap_hook = hook
    i = int((out / "version").read_text())
    while True:
        i += 1
        with io_utils.atomic_dir(out, overwrite=True) as tmp:
            for k in range(20):
                (tmp / f"part{k}").write_bytes(str(i).encode() * 2000)
            (tmp / "version").write_text(str(i))
        if stop != "never":
            break
        # after a completed swap, so every run advances the version however slow the machine is, and the
        # kill lands somewhere in the swaps that follow (before, a loaded CPU killed every run before its
        # first swap and the versions never differed)
        (out.parent / "progress").write_text(str(i))
""")


def _complete(out: Path) -> bool:
    v = (out / "version").read_text()
    return all((out / f"part{k}").read_bytes() == v.encode() * 2000 for k in range(20))


def _seed(out: Path) -> None:
    with atomic_dir(out) as tmp:
        for k in range(20):
            (tmp / f"part{k}").write_bytes(b"0" * 2000)
        (tmp / "version").write_text("0")


@pytest.mark.parametrize("mode,stop,expect", [("exchange", "exchanged", "new"), ("rename", "moved-aside", "old")])
def test_kill_between_the_steps_of_a_swap(tmp_path, mode, stop, expect):
    if mode == "exchange" and not io_utils.exchange(*_two_dirs(tmp_path)):
        pytest.skip("no RENAME_EXCHANGE on this filesystem")
    out = tmp_path / "out"
    _seed(out)
    r = subprocess.run([sys.executable, "-c", SWAPPER, str(out), mode, stop], cwd=ROOT, env=_env())
    assert r.returncode == 137
    if expect == "old":
        assert not out.exists() and sorted(t.kind for t in temporaries(tmp_path, "out")) == ["old", "tmp"]
    else:
        assert out.exists() and (out / "version").read_text() == "1"
    clean_stale_temporaries(tmp_path, None if mode == "rename" else "out")  # what the next run does first
    assert (out / "version").read_text() == ("1" if expect == "new" else "0") and _complete(out)
    assert temporaries(tmp_path) == []


def _two_dirs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "probe_a", tmp_path / "probe_b"
    a.mkdir()
    b.mkdir()
    return a, b


@pytest.mark.parametrize("mode", ["exchange", "rename"])
def test_random_kills_never_leave_neither(tmp_path, mode):
    """SIGKILL a process that overwrites an output in a loop, at random instants, 12 times: after the
    next run's recovery the output is always complete (old or new), and the stale temporaries go."""
    import random

    rng = random.Random(0)
    out = tmp_path / "out"
    _seed(out)
    seen = set()
    for _ in range(12):
        (tmp_path / "progress").unlink(missing_ok=True)
        p = subprocess.Popen([sys.executable, "-c", SWAPPER, str(out), mode, "never"], cwd=ROOT, env=_env())
        _wait_for(tmp_path / "progress")  # inside the loop
        time.sleep(rng.random() * 0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        recover_interrupted_swap(out)
        assert out.is_dir() and _complete(out), os.listdir(tmp_path)
        seen.add((out / "version").read_text())
        clean_stale_temporaries(tmp_path, "out")
        assert temporaries(tmp_path) == []
    assert len(seen) > 1  # the kills did land at different points


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_exception_in_block_keeps_old_and_leaves_no_temporary(tmp_path):
    _seed(tmp_path / "out")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "version").write_text("partial")
        raise RuntimeError("boom")
    assert (tmp_path / "out" / "version").read_text() == "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_symlinked_output_is_replaced_not_its_target(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "keep").write_text("keep")
    (tmp_path / "link").symlink_to(target)
    with atomic_dir(tmp_path / "link", overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert (target / "keep").read_text() == "keep" and not (tmp_path / "link").is_symlink()
    assert (tmp_path / "link" / "new").read_text() == "new"


# ---- stale temporaries: only dead owners' --------------------------------------------------------
def _fake_temp(parent: Path, name: str, pid: int, host: str | None = None, kind: str = "tmp") -> Path:
    host = host or io_utils._host()
    p = parent / f".{name}.{kind}-{pid}-{io_utils._start_time(pid)}-{host}-abc123"
    p.mkdir()
    (p / "big").write_bytes(b"x" * 10)
    return p


def test_clean_removes_dead_owners_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = _fake_temp(tmp_path, "out", os.getpid())
    gone = _fake_temp(tmp_path, "out", dead.pid)
    other_host = _fake_temp(tmp_path, "out", dead.pid, host="elsewhere.example")
    other_name = _fake_temp(tmp_path, "other", dead.pid)
    legacy = tmp_path / ".out.tmp-k2j3h4"  # made by an older version: owner unknown, kept
    legacy.mkdir()
    removed = clean_stale_temporaries(tmp_path, "out")
    assert removed == [gone]
    assert mine.exists() and other_host.exists() and other_name.exists() and legacy.exists()
    assert clean_stale_temporaries(tmp_path) == [other_name]  # all outputs of the directory


def test_reused_pid_counts_as_dead(tmp_path):
    p = tmp_path / f".out.tmp-{os.getpid()}-1-{io_utils._host()}-abc"
    p.mkdir()
    t = io_utils.parse_temporary(p)
    assert t is not None and t.pid == os.getpid()
    if io_utils._start_time(os.getpid()) == 0:
        pytest.skip("no /proc start times here")
    assert t.alive is False  # same pid, another start time: not this process


def test_temporary_names_carry_the_owner(tmp_path):
    seen = []

    def spy(stage, a, b):
        seen.append(a.name)

    with atomic_dir(tmp_path / "out.d") as tmp:
        t = io_utils.parse_temporary(tmp)
        assert t is not None and t.name == "out.d" and t.pid == os.getpid() and t.alive is True
        assert tmp.name.startswith(f".out.d.tmp-{owner_tag()}-")


# ---- the lock, two processes ----------------------------------------------------------------------
RUNNER = LIGHT + textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from prune_heads.io_utils import DirLock, atomic_dir, clean_stale_temporaries, write_json_atomic
    from prune_heads.errors import PruneHeadsError
    wd = Path(sys.argv[1]); gate = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    try:
        with DirLock(wd, what="`prune-heads run`"):
            clean_stale_temporaries(wd)
            for stage in ("calibrate", "select", "export"):
                with atomic_dir(wd / stage, overwrite=True) as tmp:
                    (tmp / "out.txt").write_text(stage * 100)
                    if gate is not None and stage == "select":
                        (gate / "held").write_text("1")
                        while not (gate / "go").exists():
                            time.sleep(0.02)
                    (tmp / "more.txt").write_text(stage.upper())
                write_json_atomic(wd / "summary.json", {"last": stage})
    except PruneHeadsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
""")


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def test_second_run_is_refused_before_touching_anything(tmp_path):
    wd, gate = tmp_path / "wd", tmp_path / "gate"
    gate.mkdir()
    first = subprocess.Popen([sys.executable, "-c", RUNNER, str(wd), str(gate)], cwd=ROOT, env=_env(),
                             stderr=subprocess.PIPE, text=True)
    _wait_for(gate / "held")  # the first run is inside its select stage, with a live temporary
    before = snapshot(wd)
    assert any(".select.tmp-" in k for k in before)
    second = subprocess.run([sys.executable, "-c", RUNNER, str(wd)], cwd=ROOT, env=_env(), capture_output=True,
                            text=True)
    assert second.returncode == 2
    assert second.stderr.startswith("error: `prune-heads run` is using") and f"pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert snapshot(wd) == before  # refused before removing or writing anything
    (gate / "go").write_text("1")
    assert first.wait(60) == 0, first.stderr.read()
    alone = tmp_path / "alone"
    subprocess.run([sys.executable, "-c", RUNNER, str(alone)], cwd=ROOT, env=_env(), check=True)
    strip = {k: v for k, v in snapshot(wd).items() if k != ".prune-heads.lock"}
    assert strip == {k: v for k, v in snapshot(alone).items() if k != ".prune-heads.lock"}


def test_a_killed_run_leaves_temporaries_the_next_run_removes(tmp_path):
    wd, gate = tmp_path / "wd", tmp_path / "gate"
    gate.mkdir()
    first = subprocess.Popen([sys.executable, "-c", RUNNER, str(wd), str(gate)], cwd=ROOT, env=_env())
    _wait_for(gate / "held")
    first.kill()
    first.wait()
    assert [t.name for t in temporaries(wd)] == ["select"]
    subprocess.run([sys.executable, "-c", RUNNER, str(wd)], cwd=ROOT, env=_env(), check=True)
    assert temporaries(wd) == [] and (wd / "export" / "more.txt").read_text() == "EXPORT"


def test_lock_in_process(tmp_path):
    with DirLock(tmp_path, what="a test") as lock:
        assert lock.held
        with pytest.raises(LockedError, match=f"a test is using {re.escape(str(tmp_path))}.*pid {os.getpid()}"):
            DirLock(tmp_path, what="a test").acquire()
    DirLock(tmp_path).acquire().release()  # free again


# ---- full disk -------------------------------------------------------------------------------------
FILLER = LIGHT + textwrap.dedent("""
    import json, os, resource, signal, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from prune_heads.io_utils import atomic_dir, write_json_atomic
    from prune_heads.errors import DiskFullError
    d = Path(sys.argv[1]); limit = sys.argv[2]
    write_json_atomic(d / "plan.json", {"removed_heads": [[0, 1]]})
    with atomic_dir(d / "scores") as tmp:
        (tmp / "old").write_text("old")
    if limit == "rlimit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    results = []
    try:
        write_json_atomic(d / "plan.json", {"removed_heads": [[i, i] for i in range(20000)]})
    except DiskFullError as e:
        results.append(str(e))
    try:
        with atomic_dir(d / "scores", overwrite=True) as tmp:
            save_file({"x": torch.zeros(100000)}, str(tmp / "scores.safetensors"))
    except DiskFullError as e:
        results.append(str(e))
    print(json.dumps(results))
""")


def _check_full_disk(d: Path, stdout: str) -> None:
    messages = json.loads(stdout.strip().splitlines()[-1])
    assert len(messages) == 2, messages
    for m in messages:
        assert "no space left while writing" in m and "free some space" in m and "\n" not in m
    assert json.loads((d / "plan.json").read_text()) == {"removed_heads": [[0, 1]]}  # the old file, whole
    assert (d / "scores" / "old").read_text() == "old"
    assert sorted(p.name for p in d.iterdir()) == ["plan.json", "scores"]  # no temporaries


def test_file_size_limit_is_a_clean_error(tmp_path):
    r = subprocess.run([sys.executable, "-c", FILLER, str(tmp_path), "rlimit"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _check_full_disk(tmp_path, r.stdout)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a small tmpfs")
def test_full_tmpfs_is_a_clean_error(tmp_path):
    """A real full disk: a 64 KiB tmpfs in a private mount namespace (checked from inside it)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "filler.py"
    script.write_text(FILLER)
    check = (f"mount -t tmpfs -o size=64k tmpfs {mnt} || exit 99; {sys.executable} {script} {mnt} tmpfs && "
             f"echo ---; ls -A {mnt}; echo ---; cat {mnt}/plan.json")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", check], cwd=ROOT, env=_env(), capture_output=True, text=True)
    if r.returncode == 99 or (r.returncode != 0 and "unshare" in r.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr
    results, listing, plan = r.stdout.split("---\n")
    messages = json.loads(results.strip().splitlines()[-1])
    assert len(messages) == 2 and all("no space left while writing" in m for m in messages), messages
    assert listing.split() == ["plan.json", "scores"]  # no temporaries left on the full disk
    assert json.loads(plan) == {"removed_heads": [[0, 1]]}  # the old plan, whole


def test_disk_full_inside_block_is_translated(tmp_path, monkeypatch):
    import errno

    with pytest.raises(DiskFullError, match="no space left"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
