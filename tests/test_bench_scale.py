"""``benchmarks/bench_scale.py`` and ``benchmarks/gpu_check.sh``: the memory model's inputs, the peak-memory
measurement and the results file are right, and the GPU check is a valid script that runs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_scale  # noqa: E402


@pytest.mark.parametrize("cfg", [bench_scale.TINY, bench_scale.LLAMA_1B, bench_scale.LLAMA_70B], ids=["tiny", "1b", "70b"])
def test_shape_info_counts_what_transformers_builds(cfg):
    """The sizes the memory model starts from equal the parameters of the model transformers builds (on meta)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **cfg)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    info = bench_scale.shape_info(cfg)
    assert info["params"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert info["layer_params"] == sum(p.numel() for p in model.model.layers[0].parameters())
    assert info["largest_tensor"] == max(p.numel() for p in model.parameters())


def test_measure_sums_the_whole_process_tree(tmp_path):
    """A child holding 100 MiB starts a grandchild holding 300 MiB: the tree's peak is their sum, the kernel's
    high-water mark the larger one alone.

    ``measure`` runs in a fresh interpreter, as in the benchmark (whose process imports nothing heavy): a child
    forked from this test process (torch and transformers loaded, about 1 GB) starts life with the parent's
    pages, and the kernel's high-water mark keeps them after the exec."""
    grandchild = "import time; b = b'\\x01' * (300 << 20); time.sleep(1.0)"
    child = textwrap.dedent(f"""
        import subprocess, sys
        a = b'\\x02' * (100 << 20)
        subprocess.run([sys.executable, "-c", {grandchild!r}], check=True)
    """)
    runner = (f"import json, os, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_scale; "
              f"r = bench_scale.measure([sys.executable, '-c', {child!r}], dict(os.environ)); "
              "print(json.dumps({k: r[k] for k in ('rc', 'peak_rss', 'peak_anon', 'hwm')}))")
    out = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, check=True, timeout=120)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    mib = 2**20
    assert res["peak_rss"] >= 400 * mib and res["peak_anon"] >= 400 * mib
    assert 300 * mib <= res["hwm"] < 400 * mib
    assert res["peak_rss"] < 400 * mib + 100 * mib  # three bare interpreters beside the buffers


def test_results_file_keeps_what_another_run_wrote(tmp_path):
    store = tmp_path / "scale.json"
    bench_scale.save_results(store, ("runs", "a"), {"x": 1})
    bench_scale.save_results(store, ("cost",), {"y": 2})
    data = bench_scale.save_results(store, ("runs", "b"), {"z": 3})
    assert data == json.loads(store.read_text()) == {"runs": {"a": {"x": 1}, "b": {"z": 3}}, "cost": {"y": 2},
                                                     "info": {}}


def test_predicted_peaks_order_as_the_engines_do():
    """Layer by layer needs far less than whole; the 70B whole model cannot fit one 80 GB GPU, one layer can."""
    info = bench_scale.predicted_info("llama-3.1-70b")
    base = 400 << 20
    gpu = 80 * 10**9
    assert bench_scale.predict("calibrate_memory", info, base, device="cuda") > gpu
    assert bench_scale.predict("calibrate_sequential", info, base, device="cuda") < gpu / 10
    assert bench_scale.predict("verify_sequential", info, base, device="cuda") < gpu / 2
    assert bench_scale.auto_engine("calibrate", info, base, free=24 << 30) == "sequential"
    small = info | {"params": 10**6, "bytes": 2 * 10**6, "layers": 1}
    assert bench_scale.auto_engine("calibrate", small, base, free=24 << 30) == "memory"


def test_gpu_check_is_valid_bash_and_refuses_without_cuda():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    p = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown argument --bogus" in p.stderr


@pytest.mark.slow
def test_gpu_check_without_cuda_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "gpu.md"
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(out)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 3 and "CUDA is not available" in p.stderr and "--device cpu --quick" in p.stderr
    assert not out.exists()


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """Every Python step of the GPU check runs (tiny models, --device cpu) and lands in its report."""
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable, "SCALE_ROOT": str(tmp_path / "scratch"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out",
                        str(out)], capture_output=True, text=True, timeout=600, env=env)
    text = out.read_text()
    assert p.returncode == 0, p.stderr[-3000:] + text
    for title in ("### Calibration overhead", "### Layer-sequential against in-memory", "### Export speed"):
        assert title in text
    assert "failed" not in text and "time limit" not in text
    assert "Largest score difference: 0 " in text  # the two engines agree bit for bit
    assert not (tmp_path / "scratch").exists()


@pytest.mark.slow
def test_bench_scale_quick(tmp_path):
    """The tiny shape end to end: every stage runs, the export's verification passes, the rows land in the files."""
    out = tmp_path / "scale.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--quick", "--root",
                        str(tmp_path / "scale"), "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    stages = data["runs"]["tiny"]["stages"]
    assert set(stages) == {"export_no_verify", "export", "calibrate"}
    assert stages["export"]["verification"]["passed"] and stages["export"]["verification"]["max_abs_logit_diff"] == 0
    assert stages["calibrate"]["moments"] and stages["calibrate"]["scores"]
    assert all(s["peak_rss"] > s["peak_anon"] > 0 for s in stages.values())
    assert "| `export` |" in out.read_text()
    assert not (tmp_path / "scale" / "tiny").exists()  # deleted without --keep


def test_same_outcome_ignores_only_timings_file_names_and_engine_tags():
    a = {"removed_heads": [[0, 1]], "trace": [{"k": 4, "value": 1.5, "seconds": 2.0}],
         "compensation": {"file": "plan-memory.comp", "mode": "lsq"}, "engine": "memory"}
    b = {"removed_heads": [[0, 1]], "trace": [{"k": 4, "value": 1.5, "seconds": 9.0}],
         "compensation": {"file": "plan-seq.comp", "mode": "lsq"}, "engine": "sequential"}
    assert bench_scale.same_outcome(a, b) == "identical"
    b["trace"][0]["value"] = 1.5000001
    assert bench_scale.same_outcome(a, b) == "DIFFER at trace[0].value"
    b["trace"][0]["value"], b["removed_heads"] = 1.5, [[0, 2]]
    assert bench_scale.same_outcome(a, b).startswith("DIFFER at removed_heads[0][1]")
