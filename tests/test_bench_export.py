"""``benchmarks/bench_export.py --quick``: the speed table runs end to end and its accounting is right."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith(("| prefill", "| decode"))]
    assert [r[0] for r in rows] == ["prefill 32 tokens", "decode 1 token at 16", "decode 1 token at 64"]
    for _, gather_ms, new_ms, ratio, stock_ms, ratio_stock in rows:  # the ratios are those of the reported times
        for got, num, den in ((ratio, new_ms, gather_ms), (ratio_stock, new_ms, stock_ms)):
            lo, hi = _ratio_range(num, den)
            half = 0.5 * 10 ** -_decimals(got)  # the ratio is rounded too
            assert lo - half <= float(got) <= hi + half, (got, num, den)



def test_bench_export_long_context_quick(tmp_path):
    """``--contexts``: one row per context with the KV cache measured at that context and both predictions. At the
    model's full context (256 for the quick model) prefill runs over all of it and decode on a cache short enough
    to leave room for its 4 tokens, and says so."""
    out = tmp_path / "long.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_export.py"), "--quick", "--contexts", "16,48,256",
                        "--plans", "kv-groups@0.33", "--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| kv-groups")]
    assert [r[1] for r in rows] == ["16", "48", "256"]
    assert [r[6].endswith("(on 252)") for r in rows] == [False, False, True]  # decode ms/token cell
    for r in rows:
        assert r[2].endswith("(0.667)")  # a third of the KV groups gone, at every context
        flops, bytes_ratio = float(r[8]), float(r[9])
        assert 0.5 < flops < 1 and 0.5 < bytes_ratio < 1
    # the longer the cache, the more of a decode step's reads is the KV cache, which shrinks by 1/3
    assert float(rows[1][9]) < float(rows[0][9])


def test_bench_export_long_context_prefill_only(tmp_path):
    """``--skip-decode``: the prefill columns are measured, the decode ones say they were not; with
    ``--skip-prefill`` too nothing would be measured, which is refused."""
    out = tmp_path / "long.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_export.py"), "--quick", "--contexts", "32", "--plans",
           "kv-groups@0.33", "--skip-decode", "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    [row] = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
             if line.startswith("| kv-groups")]
    assert 0.5 < float(row[5]) < 1 and float(row[4].split()[0]) > 0  # prefill FLOPs ratio and time ratio
    assert row[6:10] == ["not measured"] * 4
    p = subprocess.run([*cmd, "--skip-prefill"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "measures nothing" in p.stderr


def _decimals(text: str) -> int:
    return len(text.partition(".")[2])


def _ratio_range(num: str, den: str) -> tuple[float, float]:
    """The range of ``num / den`` for the unrounded times behind two printed, rounded ones."""
    a, b = 0.5 * 10 ** -_decimals(num), 0.5 * 10 ** -_decimals(den)
    return (float(num) - a) / (float(den) + b), (float(num) + a) / max(float(den) - b, 1e-12)


def naive_attention(q, k, v, kv_map, causal):
    """Per query head: softmax(q k^T / sqrt(d)) v with its KV head, a Python loop over heads and positions."""
    import math

    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=torch.float64)
    for h, g in enumerate(kv_map):
        s = q[0, h].double() @ k[0, g].double().T / math.sqrt(q.shape[-1])
        if causal:
            offset = k.shape[2] - q.shape[2]
            for i in range(q.shape[2]):
                s[i, i + offset + 1:] = -math.inf
        out[0, :, h] = torch.softmax(s, -1) @ v[0, g].double()
    return out


@pytest.mark.parametrize("q_len,kv_len", [(12, 12), (1, 20)])
def test_bench_attention_paths_equal_a_naive_reference(q_len, kv_len):
    """What the benchmark times is attention: both its paths (the old K/V gather and ``pruned_attention``) equal
    a naive per-head loop on the benchmark's uneven groups, for a prompt and for one decoding token."""
    import importlib.util

    from prune_heads.export.remote.modeling_pruned import pruned_attention

    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "benchmarks" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    kv_map = [0, 0, 0, 1, 1, 1, 2, 2]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, len(kv_map), q_len, 16, generator=g)
    k, v = torch.randn(1, 3, kv_len, 16, generator=g), torch.randn(1, 3, kv_len, 16, generator=g)
    causal = q_len > 1
    want = naive_attention(q, k, v, kv_map, causal)
    torch.testing.assert_close(bench.gather(q, k, v, torch.tensor(kv_map), causal).double(), want, atol=1e-5, rtol=1e-5)
    got, _ = pruned_attention(bench.Layer(kv_map), q, k, v, None, scaling=16 ** -0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
