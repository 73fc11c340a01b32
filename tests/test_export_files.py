"""Every file an export writes gets the user's umask, like ``save_pretrained``; none is private (0600)."""

from __future__ import annotations

import os
import stat

import pytest
from export_helpers import make_source

from prune_heads.export import export_checkpoint
from prune_heads.plan import Plan

pytestmark = pytest.mark.filterwarnings("ignore:plan has no model fingerprint")


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


@pytest.mark.parametrize("fmt,shard", [("sliced", "5GB"), ("masked", "20KB"), ("uniform", "5GB")])
def test_exported_files_follow_the_umask(fmt, shard, tmp_path, umask_027):
    _, src = make_source(tmp_path, "llama", heads=4, kv_heads=2)
    for name in ("tokenizer.json", "LICENSE"):  # a source whose files are private must not leak that mode
        (src / name).write_text("{}")
        os.chmod(src / name, 0o600)
    plan = Plan([(0, 1), (0, 3), (1, 0), (1, 2)])  # one head per group: every format can write it
    export_checkpoint(str(src), plan, tmp_path / fmt, format=fmt, shard_size=shard, progress=False)
    files = sorted((tmp_path / fmt).iterdir())
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert {"README.md", "config.json", "prune_heads.json", "tokenizer.json", "LICENSE"} <= set(modes)
    assert any(n.endswith(".safetensors") for n in modes)
    if shard == "20KB":
        assert sum(n.endswith(".safetensors") for n in modes) > 1 and "model.safetensors.index.json" in modes
    assert modes == dict.fromkeys(modes, umask_027), modes
    assert stat.S_IMODE((tmp_path / fmt).stat().st_mode) == 0o750
