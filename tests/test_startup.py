"""Start-up cost: ``import prune_heads`` and ``prune-heads --help`` load no heavy library, yet the
pruned model types are registered as soon as transformers' Auto classes are imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from export_helpers import make_source

from prune_heads.export import export_checkpoint
from prune_heads.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lm_eval", "matplotlib", "datasets", "numpy")


def run(code: str, cwd: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_import_and_help_load_no_heavy_library():
    out = run(
        "import json, sys\n"
        "import prune_heads\n"
        "from click.testing import CliRunner\n"
        "from prune_heads.cli.main import COMMANDS, cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\n"
        "assert r.exit_code == 0 and 'calibrate' in r.output, r.output\n"
        "for name in COMMANDS:\n"
        "    assert CliRunner().invoke(cli, [name, '--help']).exit_code == 0, name\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    assert out == []


@pytest.mark.filterwarnings("ignore:plan has no model fingerprint")
def test_import_prune_heads_then_from_pretrained_needs_no_remote_code(tmp_path):
    _, src = make_source(tmp_path, "qwen2", heads=4, kv_heads=2)
    export_checkpoint(str(src), Plan([(0, 1), (1, 3)]), tmp_path / "s", verify=False, progress=False)
    code = (
        "import json, sys\n"
        "import prune_heads\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 's')!r})\n"
        "print(json.dumps([type(m).__module__, type(m).__name__]))\n"
    )
    assert run(code, cwd=tmp_path) == ["prune_heads.export.remote.modeling_pruned", "PrunedQwen2ForCausalLM"]


def test_registration_when_transformers_came_first(tmp_path):
    code = (
        "import json\n"
        "from transformers import AutoConfig\n"
        "import prune_heads\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "print(json.dumps(['pruned_llama' in CONFIG_MAPPING, 'pruned_phi3' in CONFIG_MAPPING]))\n"
    )
    assert run(code, cwd=tmp_path) == [True, True]


def test_registration_waits_until_transformers_has_finished_importing(tmp_path):
    """transformers imports its Auto classes from inside ``modeling_utils``; registering right then fails.

    The hook must wait until the outermost import is done, then register once and leave ``sys.meta_path``.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = (
        "import json, sys\n"
        "import prune_heads\n"
        "import prune_heads.model.attention  # transformers.modeling_utils -> quantizers -> models.auto\n"
        "prune_heads.refresh_card\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "hooks = [type(f).__name__ for f in sys.meta_path if 'Register' in type(f).__name__]\n"
        "print(json.dumps(['pruned_llama' in CONFIG_MAPPING, hooks]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "could not register" not in p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == [True, []]


def test_stage_configs_and_package_tables_load_no_heavy_library():
    """Each stage's config module, and each stage package's lazy table, import nothing heavy: the CLI and
    the recipe runner build their options from these, so one top-level ``import torch`` here costs every
    ``--help`` seconds."""
    modules = ["prune_heads.scoring.stage", "prune_heads.selection.stage", "prune_heads.selection.compare",
               "prune_heads.export.stage", "prune_heads.evaluation.stage", "prune_heads.report.stage",
               "prune_heads.publish.stage", "prune_heads.export", "prune_heads.evaluation", "prune_heads.selection",
               "prune_heads.pipeline"]
    out = run(
        "import importlib, json, sys\n"
        f"loaded = {{m: [h for h in {HEAVY!r} if importlib.import_module(m) and h in sys.modules] for m in {modules!r}}}\n"
        "print(json.dumps(loaded))\n"
    )
    assert out == {m: [] for m in modules}
