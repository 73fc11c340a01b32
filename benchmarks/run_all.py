"""Regenerate ``benchmarks/RESULTS.md``: run every benchmark script, then join their sections.

Each ``bench_*.py`` (and ``compare_selectors.py``) writes ``benchmarks/results/<name>.md``. Pass
``--only NAME`` to rerun one, ``--collect`` to rebuild RESULTS.md from the sections already there.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["calibration", "ablation", "ablation_accuracy", "selection", "compare_selectors", "export"]
SCRIPTS = {
    "calibration": "bench_calibration.py",
    "ablation": "bench_ablation.py",
    "ablation_accuracy": "check_ablation_accuracy.py",
    "selection": "bench_selection.py",
    "compare_selectors": "compare_selectors.py",
    "export": "bench_export.py",
    # not in ORDER: the full table takes hours on a CPU (run it with --only budget, or see its docstring)
    "budget": "bench_budget.py",
    "compensation": "bench_compensation.py",  # parts, resumable; see its docstring
    "long_context": "bench_long_context.py",  # SmolLM2 at 256-4096 tokens: hours on a CPU
    "scale": "bench_scale.py",  # writes 1B/8B-shaped checkpoints (about 20 GB) and runs every stage on them
}


def collect() -> Path:
    parts = [
        "# Measured results\n",
        "Regenerate with `python benchmarks/run_all.py` (all) or `python benchmarks/run_all.py --only NAME`. "
        "Each section names the command that produced it and the machine it ran on.\n",
    ]
    results = HERE / "results"
    names = ORDER + sorted(p.stem for p in results.glob("*.md") if p.stem not in ORDER)
    for name in names:
        f = results / f"{name}.md"
        if f.exists():
            parts.append(f.read_text().strip() + "\n")
    out = HERE / "RESULTS.md"
    out.write_text("\n".join(parts))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", choices=sorted(SCRIPTS), action="append")
    ap.add_argument("--collect", action="store_true", help="only rebuild RESULTS.md")
    args = ap.parse_args()
    if not args.collect:
        for name in args.only or ORDER:
            script = HERE / SCRIPTS[name]
            if not script.exists():
                print(f"skip {name}: {script.name} missing")
                continue
            print(f"== {name} ({platform.processor() or platform.machine()})", flush=True)
            rc = subprocess.call([sys.executable, str(script)])
            if rc:
                print(f"{name} failed with exit code {rc}")
                return rc
    print(f"wrote {collect()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
