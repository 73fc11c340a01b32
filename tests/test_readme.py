"""Every command block of the README runs, so the README cannot drift from the CLI.

The commands run in order in one folder (later blocks use what earlier ones wrote: ``scores/``,
``plan.json``, ``smollm2-pruned``), through the real CLI entry point, with only these substitutions
to keep them small on a CPU:

- the model ``smollm2`` is a tiny random Llama with the word-level test tokenizer (the real one is
  exercised by the slow tests and by CI's run of the first command);
- ``--limit``, ``--num-samples``, ``--seq-len`` and ``--score-last`` are capped, and ``eval``/``select``/``sweep``
  commands without ``--limit`` get a small one, and ``select``/``compare-selectors`` get ``--allow-underpowered`` (4 documents
  resolve no accuracy budget at the default ``--confidence 0.9``; not beside a fixed ``--heads``/``--fraction``,
  which refuses it), and so does the Python API's ``SelectConfig(limit=16, ...)`` (``limit=4``); MMLU (57
  subtasks) becomes ARC-Easy;
- placeholders (``base_scores/``, ``instruct_scores/``) are scores folders made here;
- ``hf auth login`` is replaced by a token in the environment, and ``push`` talks to an in-process
  fake Hub; recipes run with ``--set`` overrides that point them at the tiny model and small sizes;
- optional arguments in ``[...]`` are passed; a command the README repeats runs once.

The first block (set up + the demo, and the test command) is what CI runs; it is checked against
``.ci/run`` here rather than run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from fake_hub import FakeHub
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer

from prune_heads.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TOKEN = "hf_readme_token"
CAPS = {"--limit": 4, "--num-samples": 6, "--seq-len": 24, "--ppl-limit": 4, "--steps": 20, "--score-last": 8}
NEEDS_LIMIT = {"eval", "select", "sweep", "compare-selectors"}

pytestmark = pytest.mark.filterwarnings("ignore")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def commands(block: str) -> list[str]:
    """Shell commands of a block: continuations joined, comments and blank lines dropped."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def test_first_block_is_setup_demo_then_tests_and_ci_runs_it():
    first = commands(blocks("bash")[0])
    assert len(first) == 2
    setup, tests = first
    assert setup.startswith("python3 -m venv .venv") and "prune-heads run recipes/smollm2-135m.yaml" in setup
    assert tests == 'python -m pytest -q -m "not slow" && python -m pytest -q -m slow'
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci
    # CI runs the whole first command verbatim (on a clone without ../shared, with --set options appended)
    assert setup + " \\\n    --set " in ci and "test ! -e ../shared" in ci


def test_readme_commands_are_all_covered():
    """Each command of every bash block after the first is one the runner below knows how to run."""
    for block in blocks("bash")[1:]:
        for cmd in commands(block):
            assert cmd.startswith(("prune-heads ", "hf auth login")), cmd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme-model")
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=len(SPECIAL) + len(WORDS))
    model.config.max_position_embeddings = 512
    model.save_pretrained(root / "model")
    tiny_tokenizer(save_to=root / "model")
    return root / "model"


def shrink(argv: list[str], model: Path) -> list[str]:
    """The substitutions of the module docstring, on one command's arguments."""
    argv = [a.strip("[]") for a in argv]
    out = []
    for a in argv:
        out.append(str(model) if a == "smollm2" else ("arc_easy" if a == "mmlu" else a))
    for i, a in enumerate(out[:-1]):
        if a in CAPS:
            out[i + 1] = str(min(int(float(out[i + 1])), CAPS[a]))
    if out[0] in NEEDS_LIMIT and "--limit" not in out:
        out += ["--limit", "4"]
    if out[0] in ("select", "compare-selectors") and "--allow-underpowered" not in out \
            and not {"--heads", "--fraction"} & set(out) and "gates" not in out:  # (gates runs no power check)
        out.append("--allow-underpowered")  # 4 documents resolve no accuracy budget at --confidence 0.9
    if out[0] in ("select", "compare-selectors", "eval", "sweep") and "--num-fewshot" in out:
        j = out.index("--num-fewshot")
        out[j + 1] = "0"
    return out


def recipe_overrides(model: Path) -> list[str]:
    sets = {"model.id": str(model), "model.device": "cpu", "model.dtype": "float32", "calibration.data": "wikitext2",
            "calibration.num_samples": "6", "calibration.seq_len": "24", "select.task": "ppl:wikitext2",
            "select.limit": "4", "select.num_fewshot": "null", "select.max_drop": "0.5", "select.relative": "true",
            "evaluate.tasks": json.dumps([{"task": "ppl:wikitext2", "limit": 4}]), "evaluate.speed_seq_len": "0",
            "hub.repo_id": "tester/readme-run"}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def run_command(cmd: str, model: Path) -> None:
    argv = shlex.split(cmd)
    if argv[:3] == ["hf", "auth", "login"]:
        return  # the token is in the environment (HF_TOKEN), as the README's comment says
    assert argv[0] == "prune-heads", cmd
    args = shrink(argv[1:], model)
    if args[0] == "run":
        args += recipe_overrides(model)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, f"{cmd}\n-> {' '.join(args)}\n{r.output}"


def test_every_readme_command_runs(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "recipes", "recipes")  # the README's paths are relative to the checkout
    with FakeHub(tokens={TOKEN}) as hub:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        import huggingface_hub.constants as hc

        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False, raising=False)
        monkeypatch.setattr(hc, "ENDPOINT", hub.endpoint, raising=False)
        ran, seen = 0, set()
        for block in blocks("bash")[1:]:
            for cmd in commands(block):
                if cmd in seen:  # a command the README repeats where it explains it: already ran
                    continue
                seen.add(cmd)
                if "base_scores/" in cmd:  # the two scores folders a base/instruct comparison needs
                    for name in ("base_scores", "instruct_scores"):
                        if not Path(name).exists():
                            shutil.copytree("scores", name)
                run_command(cmd, tiny)
                ran += 1
        assert ran >= 20
        assert "tester/SmolLM2-135M-pruned" in hub.repos or "me/SmolLM2-135M-pruned" in hub.repos
    # what the commands promise exists
    for path in ("scores/scores.safetensors", "scores/moments.safetensors", "report/report.md", "plan.json",
                 "plan.compensation.safetensors", "smollm2-pruned/prune_heads.json", "smollm2-uniform/config.json",
                 "smollm2-masked/config.json", "sweep", "cmp", "selectors", "runs/llama/summary.md"):
        assert Path(path).exists(), path
    assert json.loads(Path("plan.json").read_text())["compensation"]["mode"] == "lsq"

    # the Python blocks, with the same model substitution
    for code in blocks("python"):
        code = code.replace('load_model("smollm2")', f'load_model({str(tiny)!r})')
        code = code.replace("num_samples=32, seq_len=256", "num_samples=6, seq_len=24")
        code = code.replace("limit=16,", "limit=4, allow_underpowered=True,")
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    # the Python API's plan has the command line's defaults, and its export was verified
    py_plan = json.loads(Path("plan-py.json").read_text())
    assert py_plan["compensation"]["mode"] == "lsq" and py_plan["budget"]["confidence"] == 0.9
    assert py_plan["verification"] is not None
    assert json.loads(Path("smollm2-pruned-py/prune_heads.json").read_text())["verification"]["passed"]
    assert json.loads(Path("plan-fixed.json").read_text())["details"]["search"] == "fixed"
    assert os.environ["HF_TOKEN"] == TOKEN
