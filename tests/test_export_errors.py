"""Bad input gets a clear error and leaves nothing half-written; streaming holds about one shard."""

from __future__ import annotations

import hashlib
import importlib
import json
import weakref

import pytest
from click.testing import CliRunner
from export_helpers import make_source

from prune_heads.errors import OutputExistsError, PruneHeadsError
from prune_heads.export import export_checkpoint as export
from prune_heads.plan import Plan

pytestmark = pytest.mark.filterwarnings("ignore:plan has no model fingerprint")
# the exporter's own module, whose names the tests patch
export_mod = importlib.import_module("prune_heads.export.checkpoint")


def tree_hash(path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def no_leftovers(tmp_path, name="out"):
    return not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}.tmp-*"))


def test_existing_output_refused_unless_overwrite(tmp_path):
    _, src = make_source(tmp_path, "llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export(str(src), Plan([(0, 0)]), tmp_path / "out", progress=False, verify=False)
    assert (tmp_path / "out" / "keep.txt").exists()
    export(str(src), Plan([(0, 0)]), tmp_path / "out", progress=False, verify=False, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()


def test_output_inside_source_refused(tmp_path):
    _, src = make_source(tmp_path, "llama")
    with pytest.raises(PruneHeadsError, match="is the input"):
        export(str(src), Plan([(0, 0)]), src, progress=False, overwrite=True)
    assert (src / "config.json").exists()


def test_plan_for_another_model(tmp_path):
    _, src = make_source(tmp_path, "llama", heads=4)
    with pytest.raises(PruneHeadsError, match="another model"):
        export(str(src), Plan([(0, 7)]), tmp_path / "out", progress=False)
    other = {"format": "prune-heads-fingerprint/2", "config": "0123456789abcdef", "tensors": {}}
    with pytest.raises(PruneHeadsError, match="different architecture"):
        export(str(src), Plan([(0, 1)], {"fingerprint": other}), tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path)


def test_emptied_layer_refused_unless_allowed(tmp_path):
    _, src = make_source(tmp_path, "llama", heads=4)
    with pytest.raises(PruneHeadsError, match="every head of layer"):
        export(str(src), Plan([(1, h) for h in range(4)]), tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path)


def test_unsupported_format_and_bad_shard_size(tmp_path):
    _, src = make_source(tmp_path, "llama")
    with pytest.raises(PruneHeadsError, match="unknown format"):
        export(str(src), Plan([(0, 0)]), tmp_path / "out", format="gguf", progress=False)
    with pytest.raises(PruneHeadsError, match="shard size"):
        export(str(src), Plan([(0, 0)]), tmp_path / "out", shard_size="lots", progress=False)
    assert no_leftovers(tmp_path)


def test_unsupported_family(tmp_path):
    _, src = make_source(tmp_path, "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PruneHeadsError):
        export(str(src), Plan([(0, 0)]), tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path)


def test_missing_and_corrupt_shards(tmp_path):
    _, src = make_source(tmp_path, "llama", layers=3, max_shard_size="20KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 2
    before = tree_hash(src)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(PruneHeadsError, match="corrupt or truncated"):
        export(str(src), Plan([(0, 0)]), tmp_path / "out", progress=False)
    shards[1].write_bytes(b"\x00" * 16)  # garbage header
    with pytest.raises(PruneHeadsError, match="corrupt"):
        export(str(src), Plan([(0, 0)]), tmp_path / "out", progress=False)
    shards[1].unlink()
    with pytest.raises(PruneHeadsError, match="missing"):
        export(str(src), Plan([(0, 0)]), tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path)
    shards[1].write_bytes(data)
    assert tree_hash(src) == before


def test_streaming_sharded_input_holds_about_one_shard(tmp_path, monkeypatch):
    """Count the bytes of source tensors alive at once, and of the writer's buffer."""
    model, src = make_source(tmp_path, "qwen2", layers=12, heads=6, kv_heads=2, max_shard_size="30KB")
    assert len(list(src.glob("model-*.safetensors"))) > 4
    before = tree_hash(src)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    largest = max(p.numel() * p.element_size() for p in model.state_dict().values())
    live = {"now": 0, "peak": 0}
    original = export_mod.iter_tensors

    def tracked(*a, **k):
        for name, t in original(*a, **k):
            n = t.numel() * t.element_size()
            live["now"] += n
            live["peak"] = max(live["peak"], live["now"])
            weakref.finalize(t, lambda n=n: live.__setitem__("now", live["now"] - n))
            yield name, t

    monkeypatch.setattr(export_mod, "iter_tensors", tracked)
    shard = 30_000
    res = export(str(src), Plan([(i, 1) for i in range(12)] + [(0, 0)]), tmp_path / "out", shard_size=shard,
                 progress=False)
    assert res.verification["passed"]
    # source tensors are dropped as soon as they are written or sliced (the writer keeps its own copy)
    assert live["peak"] <= 2 * largest + shard, (live, largest)
    assert res.peak_buffer_bytes <= shard + largest
    assert live["peak"] + res.peak_buffer_bytes < total / 3
    out_shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(out_shards) > 2 and all(f.stat().st_size <= shard + largest + 10_000 for f in out_shards)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in out_shards}
    assert tree_hash(src) == before  # the source is never modified


def test_cli_export_and_failed_verification_exit_code(tmp_path, monkeypatch):
    import prune_heads.export.checkpoint as export_pkg
    from prune_heads.cli.main import cli

    _, src = make_source(tmp_path, "llama", heads=4)
    plan = tmp_path / "plan.json"
    Plan([(0, 1), (1, 2)]).save(plan)
    runner = CliRunner()
    r = runner.invoke(cli, ["export", str(src), "--plan", str(plan), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "verification" in r.output and "ok" in r.output
    r = runner.invoke(cli, ["export", str(src), "--plan", str(plan), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "already exists" in r.output
    # an impossible tolerance is refused before any work
    r = runner.invoke(cli, ["export", str(src), "--plan", str(plan), "-o", str(tmp_path / "bad"), "--tolerance", "-1"])
    assert r.exit_code == 2 and "--tolerance: must be a number > 0" in r.output and not (tmp_path / "bad").exists()
    # a verification that fails: the output is written (for inspection) but the exit status says so
    real = export_pkg.verify_export

    def failing(*a, **k):
        return {**real(*a, **k), "max_abs_logit_diff": 1.0, "passed": False}

    monkeypatch.setattr(export_pkg, "verify_export", failing)
    r = runner.invoke(cli, ["export", str(src), "--plan", str(plan), "-o", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "EXCEEDED" in r.output
    assert json.loads((tmp_path / "bad" / "prune_heads.json").read_text())["verification"]["passed"] is False
    r = runner.invoke(cli, ["export", str(src), "--plan", str(plan), "-o", str(tmp_path / "m"), "--format", "masked",
                            "--no-verify"])
    assert r.exit_code == 0 and json.loads((tmp_path / "m" / "prune_heads.json").read_text())["verification"] is None
