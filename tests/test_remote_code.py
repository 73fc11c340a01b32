"""Class 1 of issue 21: no checkpoint code runs without ``--trust-remote-code``, from any command, and nothing prompts.

The hostile folder is a working tiny llama whose ``config.json`` names an unknown ``model_type`` and maps its
classes (``auto_map``) to a Python file that writes a marker file when imported. Every command that loads a
model must refuse it with one line naming ``--trust-remote-code``; the marker must never appear, whether stdin
is empty, closed, or says ``y`` (transformers' prompt reads stdin).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer, words

from prune_heads.cli.main import cli
from prune_heads.model.fingerprint import fingerprint
from prune_heads.plan import Plan

ROOT = Path(__file__).resolve().parents[1]

EVIL = '''
from pathlib import Path
Path({marker!r}).write_text("the checkpoint's code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil_llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def make_hostile(folder: Path, marker: Path, *, where: str = "config") -> Path:
    """A tiny llama in ``folder`` whose loading would import ``evil.py`` (which writes ``marker``).

    ``where``: ``config`` puts the ``auto_map`` (and the unknown model type) in config.json; ``tokenizer`` puts
    an ``auto_map`` in tokenizer_config.json of a folder whose config names an unknown model type too.
    """
    model = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS))
    model.save_pretrained(folder)
    tiny_tokenizer(folder)
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "evil_llama"
    if where == "config":
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    else:
        tcfg = json.loads((folder / "tokenizer_config.json").read_text())
        tcfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("remote-code")
    good = root / "good"
    model = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS))
    model.save_pretrained(good)
    tiny_tokenizer(good)
    marker = root / "MARKER"
    evil = make_hostile(root / "evil", marker)
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": words(20, seed=i)}) for i in range(6)) + "\n")
    mc = root / "q.jsonl"
    mc.write_text("\n".join(json.dumps({"question": f"the {w}", "choices": ["film", "song"], "answer": i % 2})
                            for i, w in enumerate(["city", "river", "king", "team"])) + "\n")
    from prune_heads import calibrate

    seqs = [[1] + [len(SPECIAL) + (7 * i + j) % len(WORDS) for j in range(15)] for i in range(4)]
    calibrate(model, seqs, progress=False).save(root / "scores")
    Plan([(0, 1), (1, 2)], {"fingerprint": fingerprint(model)}).save(root / "plan.json")
    recipe = {"name": "tiny", "model": {"id": str(evil), "device": "cpu"},
              "calibration": {"data": str(data), "num_samples": 4, "seq_len": 16, "batch_size": 2},
              "select": {"task": f"mc:{mc}", "limit": 4, "max_drop": 0.5, "verify": False, "compensate": "none"},
              "verify": {"num_sequences": 1, "seq_len": 8},
              "evaluate": {"tasks": [{"task": f"mc:{mc}", "limit": 4}]}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"root": root, "evil": evil, "marker": marker, "data": data, "mc": mc, "scores": root / "scores",
            "plan": root / "plan.json", "recipe": root / "recipe.yaml"}


def commands(env: dict[str, Path], out: Path, model: Path | None = None) -> dict[str, list[str]]:
    m, s, mc = str(model or env["evil"]), str(env["scores"]), f"mc:{env['mc']}"
    return {
        "export": ["export", m, "--plan", str(env["plan"]), "-o", str(out / "export")],
        "export --no-verify": ["export", m, "--plan", str(env["plan"]), "-o", str(out / "export2"), "--no-verify"],
        "calibrate": ["calibrate", m, "--data", str(env["data"]), "-o", str(out / "scores"), "--num-samples", "2",
                      "--seq-len", "8"],
        "select": ["select", s, "--model", m, "--task", mc, "--max-drop", "0.5", "--limit", "4", "-o",
                   str(out / "plan.json")],
        "eval": ["eval", m, "--task", mc, "--limit", "4", "-o", str(out / "r.json")],
        "run": ["run", str(env["recipe"]), "-o", str(out / "run")],
        "sweep": ["sweep", s, "--model", m, "--task", mc, "--limit", "4", "-o", str(out / "sweep")],
        "compare-selectors": ["compare-selectors", "--model", m, "--scores", s, "--task", mc, "--max-drop", "0.5",
                              "--limit", "4", "-o", str(out / "cmp")],
    }


def assert_one_line_refusal(r, label: str) -> None:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2, (label, r.exit_code, r.output[-500:])
    assert "Traceback" not in r.output, label
    assert lines and lines[-1].startswith("error:") and "--trust-remote-code" in lines[-1], (label, lines)


@pytest.mark.parametrize("stdin", ["", "y\n", "yes\ny\ny\n"])
@pytest.mark.parametrize("cmd", ["export", "export --no-verify", "calibrate", "select", "eval", "run", "sweep",
                                 "compare-selectors"])
def test_no_command_runs_the_checkpoints_code(env, tmp_path, cmd, stdin):
    argv = commands(env, tmp_path)[cmd]
    r = CliRunner().invoke(cli, argv, input=stdin)
    assert not env["marker"].exists(), f"{cmd}: the checkpoint's code ran (stdin {stdin!r})"
    assert_one_line_refusal(r, cmd)
    assert "[y/N]" not in r.output


@pytest.mark.slow  # two fresh interpreters importing torch and transformers (~25 s on 2 cores)
def test_refusal_in_a_fresh_process_with_no_terminal(env, tmp_path):
    """The real CLI, stdin closed (the case that ended in a traceback) and stdin saying y (the case that ran it);
    the default suite has the same cases in process (``test_no_command_runs_the_checkpoints_code``)."""
    for stdin in (subprocess.DEVNULL, "y\n"):
        r = subprocess.run([sys.executable, "-m", "prune_heads", "export", str(env["evil"]), "--plan", str(env["plan"]),
                            "-o", str(tmp_path / "x"), "--no-verify"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, **({"stdin": stdin} if stdin is subprocess.DEVNULL else {"input": stdin}),
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert not env["marker"].exists()
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and "--trust-remote-code" in lines[-1] and "Traceback" not in r.stderr, r.stderr[-800:]


def test_tokenizer_auto_map_is_refused_too(tmp_path):
    from prune_heads.errors import PruneHeadsError
    from prune_heads.model.loading import load_model

    marker = tmp_path / "MARKER"
    folder = make_hostile(tmp_path / "m", marker, where="tokenizer")
    with pytest.raises(PruneHeadsError, match="--trust-remote-code"):
        load_model(str(folder))
    assert not marker.exists()


def test_the_flag_is_what_lets_the_code_run(tmp_path):
    """The control: with ``trust_remote_code=True`` the same folder loads, through its own code (so the refusals
    above are the missing flag's doing, not a broken fixture)."""
    from prune_heads.model.remote_code import pretrained

    marker = tmp_path / "MARKER"
    folder = make_hostile(tmp_path / "m", marker)
    config = pretrained("config", folder, trust_remote_code=True)
    assert marker.exists() and type(config).__name__ == "EvilConfig"


def test_known_model_type_with_auto_map_loads_without_the_flag(tmp_path):
    """An ``auto_map`` beside a model type transformers knows (our sliced exports' registered types, or a stock
    llama that also ships code) loads with the stock class: no code runs, so nothing is refused."""
    from prune_heads.model.remote_code import needs_remote_code, pretrained

    marker = tmp_path / "MARKER"
    folder = make_hostile(tmp_path / "m", marker)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert not needs_remote_code(folder)
    assert type(pretrained("config", folder, trust_remote_code=False)).__name__ == "LlamaConfig"
    assert not marker.exists()


def test_every_load_goes_through_the_one_door():
    """No ``from_pretrained`` call in the package outside ``prune_heads/model/remote_code.py``: a new load that
    forgot the user's flag (and so could prompt) fails here. Names in strings (the model card) do not count."""
    offenders = []
    for path in sorted((ROOT / "prune_heads").rglob("*.py")):
        if path.name == "remote_code.py" and path.parent.name == "model":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "from_pretrained", "get_class_from_dynamic_module") or (
                    isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "pipeline"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"load through prune_heads.model.remote_code.pretrained: {offenders}"
