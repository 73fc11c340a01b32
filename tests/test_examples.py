"""The scripts in examples/ run with tiny sizes and print results that check out."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
SMALL = ["--num-samples", "4", "--seq-len", "32"]


def run_example(name: str, argv: list[str], capsys) -> str:
    """Run in-process (one import of torch/transformers for all examples)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mod.main(argv)
    return capsys.readouterr().out


def _float(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text}"
    return float(m.group(1))


def test_every_example_is_tested():
    tested = {"calibrate_in_python", "custom_score", "dynamic_mode", "load_exported"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.slow
def test_calibrate_in_python(capsys, tmp_path):
    out = run_example("calibrate_in_python", [*SMALL, "--top", "5", "-o", str(tmp_path / "s")], capsys)
    assert "30 layers x 9 heads" in out
    values = [float(line.split()[2]) for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+\s+[\d.]+$", line)]
    assert len(values) == 5 and values == sorted(values)  # most inactive = lowest ahon_ln first
    from prune_heads import HeadScores

    saved = HeadScores.load(tmp_path / "s")
    assert saved.mean("ahon_ln").min().item() == pytest.approx(values[0], abs=1e-4)


def test_custom_score(capsys, monkeypatch):
    from prune_heads.scoring import score_defs

    monkeypatch.setattr(score_defs, "CUSTOM_SCORES", dict(score_defs.CUSTOM_SCORES))
    monkeypatch.setattr(score_defs, "INACTIVE_WHEN_HIGH", set(score_defs.INACTIVE_WHEN_HIGH))
    out = run_example("custom_score", SMALL, capsys)
    assert _float(r"per-sample reference\|: ([\d.e+-]+)", out) < 1e-5


@pytest.mark.slow
def test_dynamic_mode(capsys):
    out = run_example("dynamic_mode", [*SMALL, "--eval-docs", "4", "--fraction", "0.1"], capsys)
    m = re.search(r"perplexity ([\d.]+) -> ([\d.]+) with ([\d.]+)% of", out)
    assert m, out
    assert float(m.group(1)) > 1 and float(m.group(2)) > 1
    assert 0 < float(m.group(3)) < 40  # about the calibrated 10%, on other documents


@pytest.mark.slow
def test_load_exported(capsys, tmp_path):
    out = run_example("load_exported", [*SMALL, "-o", str(tmp_path / "m")], capsys)
    assert _float(r"logit difference\| vs the masked original: ([\d.e+-]+)", out) < 1e-4
    before, after = (int(x.replace(",", "")) for x in re.search(r"([\d,]+) -> ([\d,]+) parameters", out).groups())
    assert after < before
    assert "generate:" in out
