"""benchmarks/bench_reliability.py --quick runs, and its threshold table checks out."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_reliability.py"


def test_quick_mode(capsys):
    spec = importlib.util.spec_from_file_location("bench_reliability", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    text = mod.main(["--quick"])
    for part in ("(a) `attention_with_stats`", "(b) fingerprint", "(c) dynamic mode", "(d) fraction of the 4 x 8",
                 "(e) aeqd against float64"):
        assert part in text
    # 32 calibration values: torch.quantile's tau marks the fraction to within one value, the paper's never more
    rows = [line for line in text.splitlines() if line.startswith("| ahon_ln | 6")]
    cells = re.findall(r"([\d.]+)% / ([\d.]+)%", rows[-1])
    for f, (q, p) in zip((0.05, 0.10, 0.15, 0.20, 0.25, 0.30), cells):
        assert abs(float(q) / 100 - f) <= 1 / 32 + 1e-9 and float(p) <= float(q)
    assert re.search(r"\| ahon_ln \| [\d.]+% \(\d+ of 48\) \| \d of 2 \|", text)
