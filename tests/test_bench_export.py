"""``benchmarks/bench_export.py --quick``: the speed table runs end to end and its accounting is right."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_export_quick(tmp_path):
    out = tmp_path / "export.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_export.py"), "--quick", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    text = out.read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| policy", "| plan"))]
    speed = {(r[0], r[2]): r for r in rows if len(r) == 9 and r[2] != "–"}
    assert set(speed) == {("free", "`sliced`"), ("kv-groups", "`sliced`"), ("uniform", "`sliced`"),
                          ("uniform", "`uniform`")}
    # 4 layers x 9 heads over 3 KV heads: a third of the groups gone -> two thirds of the KV cache
    assert speed[("kv-groups", "`sliced`")][4].startswith("0.667")
    assert speed[("free", "`sliced`")][4].startswith("1.000")  # free keeps every KV head here
    for r in speed.values():
        for ratio in (r[5], r[7]):
            assert re.fullmatch(r"\d+\.\d{3} \(\d+\.\d\d–\d+\.\d\d\)( \*\*slow\*\*)?", ratio), ratio
        assert 0.8 < float(r[6]) < 1 and 0.8 < float(r[8]) < 1  # FLOPs ratios
    assert any(r[0] == "uniform" and "n/a" in r[4] for r in rows)  # 10% is not a multiple of a uniform unit
    assert "load average" in text and "--quick" in text


def test_bench_attention_quick(tmp_path):
    out = tmp_path / "attention.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--quick", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| prefill", "| decode"))]
    assert len(rows) == 3  # prefill and two decode contexts, each checked against the gather path


def test_bench_export_long_context_quick(tmp_path):
    """``--contexts``: one row per context with the KV cache measured at that context and both predictions."""
    out = tmp_path / "long.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_export.py"), "--quick", "--contexts", "16,48",
                        "--plans", "kv-groups@0.33", "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| kv-groups")]
    assert [r[1] for r in rows] == ["16", "48"]
    for r in rows:
        assert r[2].endswith("(0.667)")  # a third of the KV groups gone, at every context
        flops, bytes_ratio = float(r[8]), float(r[9])
        assert 0.5 < flops < 1 and 0.5 < bytes_ratio < 1
    # the longer the cache, the more of a decode step's reads is the KV cache, which shrinks by 1/3
    assert float(rows[1][9]) < float(rows[0][9])
