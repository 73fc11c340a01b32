"""Every argument is checked before work starts (class 6), and no output may overlap an input (class 1): a table
of cases for every command and option of ``prune-heads --help`` as it is today.

Each case must end in exit code 2 with ONE line on stderr that starts with ``error:`` and names the option (or
recipe key), and no traceback. "Before work starts" is enforced literally: loading a model, streaming a
checkpoint, writing a report and running a recipe are replaced by a sentinel that fails the case, so a value
that is only noticed once work has begun (or never) fails here.

Ranges are the typed config fields' (``prune_heads.schema``): the CLI option and the recipe key share one
definition, so a case here covers both front ends.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import click
import pytest
import torch
import yaml
from click.testing import CliRunner
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer, words

from prune_heads.cli.main import COMMANDS, cli
from prune_heads.model.fingerprint import fingerprint
from prune_heads.plan import Plan


class WorkStarted(Exception):
    """Raised by the sentinels: the command began real work before refusing the argument."""


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-bad-input")
    model = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS))
    model.save_pretrained(root / "models" / "m")
    tiny_tokenizer(root / "models" / "m")
    (root / "models" / "sibling.txt").write_text("a user's file beside the model")
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": words(20, seed=i)}) for i in range(6)) + "\n")
    mc = root / "q.jsonl"
    mc.write_text("\n".join(json.dumps({"question": f"the {w}", "choices": ["film", "song"], "answer": i % 2})
                            for i, w in enumerate(["city", "river", "king", "team"])) + "\n")
    from prune_heads import calibrate

    seqs = [[1] + [len(SPECIAL) + (7 * i + j) % len(WORDS) for j in range(15)] for i in range(4)]
    calibrate(model, seqs, progress=False).save(root / "scores")
    Plan([(0, 1), (1, 2)], {"fingerprint": fingerprint(model)}).save(root / "plan.json")
    (root / "plan.compensation.safetensors").write_bytes(b"the compensation file that travels with plan.json")
    recipe = {"name": "tiny", "model": {"id": str(root / "models" / "m"), "device": "cpu"},
              "calibration": {"data": str(data), "num_samples": 4, "seq_len": 16, "batch_size": 2},
              "select": {"task": f"mc:{mc}", "limit": 4, "max_drop": 0.5, "verify": False, "compensate": "none"},
              "verify": {"num_sequences": 1, "seq_len": 8},
              "evaluate": {"tasks": [{"task": f"mc:{mc}", "limit": 4}]}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    binary = root / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    return {"root": root, "model": root / "models" / "m", "models": root / "models", "data": data, "mc": mc,
            "scores": root / "scores", "plan": root / "plan.json", "recipe": root / "recipe.yaml", "binary": binary,
            "planside": root / "plan.compensation.safetensors"}


@pytest.fixture
def sentinel(monkeypatch):
    """Real work raises WorkStarted: loading a model, streaming a checkpoint, writing a report, running a recipe."""
    import prune_heads.export.checkpoint as export_mod
    import prune_heads.model.loading as loading
    import prune_heads.pipeline.runner as runner
    import prune_heads.report as report_mod

    def started(*a, **k):
        raise WorkStarted("work started before the argument was refused")

    monkeypatch.setattr(loading, "load_model", started)
    monkeypatch.setattr(export_mod, "iter_tensors", started)
    monkeypatch.setattr(report_mod, "write_report", started)
    monkeypatch.setattr(report_mod, "write_compare", started)
    monkeypatch.setattr(runner.Runner, "run", started)


def base_args(cmd: str, env: dict[str, Path], out: Path) -> list[str]:
    """A valid invocation of ``cmd``: run as is it gets as far as real work (the sentinel)."""
    m, s, mc = str(env["model"]), str(env["scores"]), f"mc:{env['mc']}"
    return {
        "calibrate": [m, "--data", str(env["data"]), "-o", str(out), "--num-samples", "4", "--seq-len", "16"],
        "select": [s, "--model", m, "--task", mc, "--max-drop", "0.05", "-o", str(out / "plan.json")],
        "eval": [m, "--task", mc, "-o", str(out / "results.json")],
        "export": [m, "--plan", str(env["plan"]), "-o", str(out)],
        "report": [s, "-o", str(out)],
        "sweep": [s, "--model", m, "--task", mc, "-o", str(out)],
        "compare-selectors": ["--model", m, "--scores", s, "--task", mc, "--max-drop", "0.05", "-o", str(out)],
        "run": [str(env["recipe"]), "-o", str(out)],
    }[cmd]


def invoke(cmd: str, args: list[str]):
    return CliRunner().invoke(cli, [cmd, *args])


def assert_refused(r, names: tuple[str, ...], *, only_line: bool = True) -> None:
    """Exit 2, no traceback, and the error on one line naming one of ``names``; ``only_line``: nothing else on
    stderr (a refusal before work), else the error is the last line (after progress bars of real work)."""
    if isinstance(r.exception, WorkStarted):
        pytest.fail(f"accepted: work started (output: {r.output.strip()[-300:]!r})")
    assert r.exception is None or isinstance(r.exception, SystemExit), f"traceback: {r.exception!r}"
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.stderr.strip()[-300:]!r}"
    if only_line:
        assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines and lines[-1].startswith("error:") and sum(x.startswith("error:") for x in lines) == 1, lines
    assert any(n in lines[-1] for n in names), f"{lines[-1]!r} does not name {names}"
    assert "Traceback" not in r.output


# ---- the table: every numeric (and numeric-text) option of every command -----------------------------
#: (command, extra args, names one of which the error must contain)
CASES: list[tuple[str, list[str], tuple[str, ...]]] = []


def _add(cmd: str, option: str, values: list[str], pre: list[str] = ()) -> None:
    for v in values:
        CASES.append((cmd, [*pre, option, v], (option,)))


_add("calibrate", "--num-samples", ["0", "-3"])            # 0 said "128 were asked for"
_add("calibrate", "--seq-len", ["0", "1", "-5"])
_add("calibrate", "--batch-size", ["0", "-2"])            # 0 was a traceback
_add("calibrate", "--seed", ["-1", "999999999999999999999999999999"])
_add("calibrate", "--block-size", ["0", "-4"])
_add("calibrate", "--dtype", ["float8", "int4"])
_add("calibrate", "--ablation-compensate", ["lsq"])                     # no ablation score: it would do nothing
_add("calibrate", "--ablation-compensate", ["mean"], pre=["--scores", "ablation_kl", "--no-moments"])
_add("calibrate", "--ablation-compensate", ["ols"], pre=["--scores", "ablation_kl"])
_add("select", "--max-drop", ["-1", "nan"])
_add("select", "--max-drop", ["inf"])
_add("select", "--limit", ["0", "-2"])
# issue 21 class 3: every float option is finite (schema), also where no range would catch Inf
_add("select", "--max-drop", ["inf", "-inf", "1e999"], pre=["--relative"])   # wrote Infinity into the plan
_add("select", "--lr", ["inf"], pre=["--method", "gates", "--target-fraction", "0.2"])
_add("select", "--l0-penalty", ["inf"], pre=["--method", "gates"])
_add("export", "--tolerance", ["inf"])                                      # was accepted
_add("sweep", "--max-drop", ["inf"])
_add("sweep", "--fractions", ["0,inf"])
_add("compare-selectors", "--gates-lr", ["inf"])
_add("select", "--num-fewshot", ["-1"])
_add("select", "--verify-limit", ["0"])
_add("select", "--min-heads-per-layer", ["-1"])
_add("select", "--round-size", ["0", "-1"])
_add("select", "--target-fraction", ["0", "1", "1.5", "nan"], pre=["--method", "gates"])
_add("select", "--batch-size", ["0"])
_add("select", "--candidates-fraction", ["0", "1.5"], pre=["--method", "iterative"])
_add("select", "--l0-penalty", ["0", "-1"], pre=["--method", "gates"])
_add("select", "--steps", ["0"], pre=["--method", "gates", "--target-fraction", "0.2"])
_add("select", "--lr", ["0", "nan"], pre=["--method", "gates", "--target-fraction", "0.2"])
_add("select", "--gate-batch-size", ["0"], pre=["--method", "gates", "--target-fraction", "0.2"])
_add("select", "--confidence", ["1", "-0.1", "nan"])
_add("select", "--seed", ["-1", "999999999999999999999999999999"])  # 30 digits: a traceback in torch (issue 21 class 5)
_add("select", "--dtype", ["float8"])
_add("select", "--seq-len", ["1", "300"], pre=["--task", "PPL"])
_add("select", "--score-last", ["0"], pre=["--task", "PPL"])
_GUARD = ["--guard-task", "passkey:64", "--guard-max-drop", "0.1"]
_add("select", "--guard-max-drop", ["-1", "nan", "5"], pre=["--guard-task", "passkey:64"])
_add("select", "--guard-limit", ["0"], pre=_GUARD)
_add("select", "--guard-seq-len", ["1", "300"], pre=["--guard-task", "PPL", "--guard-max-drop", "0.1"])
_add("select", "--guard-score-last", ["0"], pre=["--guard-task", "PPL", "--guard-max-drop", "0.1"])
_add("select", "--guard-task", ["passkey:300", "passkey:20"], pre=["--guard-max-drop", "0.1"])
_add("select", "--guard-ppl-max-drop", ["0", "-1", "nan"], pre=_GUARD)
_add("select", "--guard-ppl-max-drop", ["0.1"])                                  # no --guard-task
_add("select", "--guard-ppl-max-drop", ["0.1"], pre=["--guard-task", "PPL", "--guard-max-drop", "0.1"])  # one already
_add("eval", "--num-fewshot", ["-1"])
_add("eval", "--limit", ["0", "-1"])
_add("eval", "--batch-size", ["0"])
_add("eval", "--seed", ["-1", "999999999999999999999999999999"])
_add("eval", "--dynamic", ["awft:nan", "awft", "awft:x", "awft:inf", "awft:-inf"])  # inf: issue 21 class 3
_add("eval", "--dynamic-fraction", ["awft:1.5", "awft:-0.1", "awft:nan"], pre=["--scores", "SCORES"])
_add("eval", "--dtype", ["float8"])
_add("eval", "--seq-len", ["1", "300"], pre=["--task", "PPL"])      # 300: beyond the tiny model's context of 256
_add("eval", "--score-last", ["0"], pre=["--task", "PPL"])
CASES.append(("eval", ["--task", "passkey:300"], ("--task",)))      # beyond the context, found before loading
CASES.append(("eval", ["--task", "passkey:20"], ("--task",)))       # a length the tokenizer cannot fill
CASES.append(("eval", ["--task", "passkey:2048:9"], ("--task",)))
_add("export", "--tolerance", ["-1", "nan", "0"])
_add("export", "--shard-size", ["0", "-5GB", "5XB", "1.2.3GB", "9" * 400 + "GB"])  # tracebacks (issue 21 class 5)
_add("export", "--dtype", ["float8"])
_add("export", "--verify-sequences", ["0", "100000000000"])
_add("export", "--verify-seq-len", ["1", "1000000000000"])
_add("report", "--fraction", ["-0.1", "1.5", "nan"])
_add("sweep", "--max-drop", ["-1", "nan"])
_add("sweep", "--limit", ["0"])
_add("sweep", "--num-fewshot", ["-1"])
_add("sweep", "--batch-size", ["0"])
_add("sweep", "--fractions", ["0,1.5", "0,nan", "0,x"])
_add("sweep", "--random-seeds", ["a", "-1", "999999999999999999999999999999"])
_add("sweep", "--dtype", ["float8"])
_add("compare-selectors", "--max-drop", ["-1", "nan", "x"])
_add("compare-selectors", "--limit", ["0"])
_add("compare-selectors", "--ppl-limit", ["0"])
_add("compare-selectors", "--budgets", ["-1", "nan", "x"])
_add("compare-selectors", "--confidence", ["1", "-0.1"])
_add("compare-selectors", "--round-size", ["0"])
_add("compare-selectors", "--candidates-fraction", ["0", "1.5"])
_add("compare-selectors", "--seq-len", ["1"])
_add("compare-selectors", "--score-last", ["0"])
_add("compare-selectors", "--guard-max-drop", ["-1", "nan"], pre=["--guard-task", "passkey:64"])
_add("compare-selectors", "--guard-limit", ["0"], pre=_GUARD)
_add("compare-selectors", "--guard-seq-len", ["1"], pre=["--guard-task", "PPL", "--guard-max-drop", "0.1"])
_add("compare-selectors", "--guard-score-last", ["0"], pre=["--guard-task", "PPL", "--guard-max-drop", "0.1"])
_add("compare-selectors", "--guard-ppl-max-drop", ["0", "nan"], pre=_GUARD)
_add("compare-selectors", "--target-fraction", ["0", "1", "nan"])
_add("compare-selectors", "--steps", ["0"])
_add("compare-selectors", "--lr", ["0", "-1"])
_add("compare-selectors", "--dtype", ["float8"])
_add("compare-selectors", "--l0-penalty", ["0", "-1"])
_add("compare-selectors", "--gate-batch-size", ["0"], pre=["--target-fraction", "0.2"])
_add("compare-selectors", "--num-fewshot", ["-1"])
_add("compare-selectors", "--verify-limit", ["0"])
_add("compare-selectors", "--min-heads-per-layer", ["-1"])
_add("compare-selectors", "--batch-size", ["0"])
_add("compare-selectors", "--seed", ["-1"])
_add("select", "--heads", ["0", "-1"])
_add("select", "--fraction", ["0", "1", "nan"])
_add("eval", "--speed-seq-len", ["-1"])
_add("eval", "--speed-repeats", ["0"])
_add("eval", "--speed-placements", ["0"])
for key, value in [
    ("calibration.num_samples", "0"), ("calibration.num_samples", "-3"), ("calibration.seq_len", "1"),
    ("calibration.batch_size", "0"), ("select.max_drop", "nan"), ("select.max_drop", "-1"),
    ("select.limit", "0"), ("verify.tol", "-1"), ("verify.seq_len", "0"),
    ("verify.seq_len", "1000000000000"),         # was found only at the verify stage
    ("verify.seq_len", "300"),                   # beyond the tiny model's context of 256: found before work
    ("verify.num_sequences", "100000000000"),
    ("calibration.seq_len", "100000000000"),
    ("export.shard_size", "-5GB"),
    ("name", "../../../tmp/x"), ("name", "a/b"), ("name", ".."),   # class 8
    ("select.max_drop", ".inf"), ("verify.tol", ".inf"), ("select.confidence", ".nan"),  # issue 21 class 3
]:
    CASES.append(("run", ["--set", f"{key}={value}"], (key,)))


def _case_id(case) -> str:
    cmd, extra, _ = case
    return f"{cmd} {' '.join(a for a in extra if a != 'SCORES')}"


@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in CASES])
def test_bad_value_is_refused_before_work(env, sentinel, tmp_path, case):
    cmd, extra, names = case
    extra = [str(env["scores"]) if a == "SCORES" else f"ppl:{env['data']}" if a == "PPL" else a for a in extra]
    r = invoke(cmd, base_args(cmd, env, tmp_path / "out") + extra)
    assert_refused(r, names)
    assert not (tmp_path / "out").exists() or cmd == "run" and not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("cmd", sorted(set(COMMANDS) - {"push"}))
def test_valid_base_invocations_reach_the_work(env, sentinel, tmp_path, cmd):
    """The control: without the bad value each base invocation is accepted, so every refusal above is the
    option's doing."""
    r = invoke(cmd, base_args(cmd, env, tmp_path / "out"))
    assert isinstance(r.exception, WorkStarted), r.output


def test_table_covers_every_numeric_option():
    """Every int/float option of every command (and the numeric text options) has a row; a new option fails
    here until it is added to the table."""
    numeric_text = {"--max-drop", "--fractions", "--random-seeds", "--shard-size", "--dynamic", "--dynamic-fraction",
                    "--dtype"}
    ctx = click.Context(cli)
    covered = {(c, a) for c, extra, _ in CASES for a in extra if a.startswith("--")}
    missing = []
    for name in COMMANDS:
        for p in cli.get_command(ctx, name).params:
            if not isinstance(p, click.Option) or p.is_flag:
                continue
            opt = max(p.opts, key=len)
            numeric = isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))
            if (numeric or opt in numeric_text) and (name, opt) not in covered and not (name == "run"):
                missing.append((name, opt))
    assert not missing, f"add rows for {missing}"


# ---- failures a user causes that used to end in a traceback (real runs, no sentinel) -----------------
def test_corrupt_shard_in_calibrate(env, tmp_path):
    import shutil

    bad = tmp_path / "m"
    shutil.copytree(env["model"], bad)
    shard = bad / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)
    r = invoke("calibrate", [str(bad), "--data", str(env["data"]), "-o", str(tmp_path / "s"), "--num-samples", "2",
                             "--seq-len", "8"])
    assert_refused(r, ("model.safetensors",))
    assert not (tmp_path / "s").exists()


def test_binary_file_as_model(env, tmp_path):
    r = invoke("calibrate", [str(env["binary"]), "--data", str(env["data"]), "-o", str(tmp_path / "s")])
    assert_refused(r, ("binary.txt",))


def test_binary_data_file(env, tmp_path):
    r = invoke("calibrate", [str(env["model"]), "--data", str(env["binary"]), "-o", str(tmp_path / "s"),
                             "--num-samples", "2", "--seq-len", "8"])
    assert_refused(r, ("binary.txt", "--data"))


# ---- class 1: outputs that are, contain or lie inside an input ----------------------------------------
def _digest(p: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + f.read_bytes())
    return h.hexdigest()


OVERLAP = [  # (command, args with placeholders, the input that must survive, xfail reason)
    ("calibrate", ["MODEL", "--data", "DATA", "-o", "MODEL", "--overwrite"], "model", None),
    ("calibrate", ["MODEL", "--data", "DATA", "-o", "MODELS", "--overwrite"], "models", None),
    ("calibrate", ["MODEL", "--data", "DATA", "-o", "MODEL/scores"], "model", None),
    ("calibrate", ["MODEL", "--data", "DATA", "-o", "DATA", "--overwrite"], "data", None),  # not a directory
    ("export", ["MODEL", "--plan", "PLAN", "-o", "MODELS", "--overwrite"], "models", None),  # deleted the source
    ("export", ["MODEL", "--plan", "PLAN", "-o", "MODEL", "--overwrite"], "model", None),
    ("export", ["MODEL", "--plan", "PLAN", "-o", "PLAN", "--overwrite"], "plan", None),  # not a directory
    ("select", ["SCORES", "--model", "MODEL", "--task", "MC", "--max-drop", "0.1", "-o", "SCORES", "--overwrite"],
     "scores", None),
    ("select", ["SCORES", "--model", "MODEL", "--task", "MC", "--max-drop", "0.1", "-o", "SCORES/plan.json"],
     "scores", None),
    ("select", ["SCORES", "--model", "MODEL", "--task", "MC", "--max-drop", "0.1", "-o", "MODEL/plan.json"],
     "model", None),
    ("eval", ["MODEL", "--task", "MC", "--plan", "PLAN", "-o", "PLAN", "--overwrite"], "plan", None),
    # issue 21 class 2: the compensation file beside a plan is read with it, so it is an input too
    ("eval", ["MODEL", "--task", "MC", "--plan", "PLAN", "-o", "PLANSIDE", "--overwrite"], "planside", None),
    ("export", ["MODEL", "--plan", "PLAN", "-o", "PLANSIDE", "--overwrite"], "planside", None),
    ("eval", ["MODEL", "--task", "MC", "-o", "MODEL/config.json", "--overwrite"], "model", None),
    ("eval", ["MODEL", "--task", "MC", "-o", "MCFILE", "--overwrite"], "mc", None),
    ("report", ["SCORES", "-o", "SCORES", "--overwrite"], "scores", None),
    ("sweep", ["SCORES", "--model", "MODEL", "--task", "MC", "-o", "SCORES", "--overwrite"], "scores", None),
    ("compare-selectors", ["--model", "MODEL", "--scores", "SCORES", "--task", "MC", "--max-drop", "0.1", "-o",
                           "MODELS", "--overwrite"], "models", None),
    ("run", ["RECIPE", "-o", "MODEL/run"], "model", None),
    ("run", ["RECIPE", "-o", "MODELS"], "models", None),  # foreign work directory: refused, but only in run()
]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c[0]} -o {c[1][c[1].index('-o') + 1]}",
                                               marks=[pytest.mark.xfail(reason=c[3], strict=True)] if c[3] else [])
                                  for c in OVERLAP])
def test_output_overlapping_an_input_is_refused(env, sentinel, case):
    cmd, args, keep, _ = case
    subst = {"MODEL": env["model"], "MODELS": env["models"], "DATA": env["data"], "PLAN": env["plan"],
             "SCORES": env["scores"], "MC": f"mc:{env['mc']}", "MCFILE": env["mc"], "RECIPE": env["recipe"],
             "PLANSIDE": env["planside"]}
    argv = []
    for a in args:
        head, _, tail = a.partition("/")
        argv.append(str(subst[head]) + (f"/{tail}" if tail else "") if head in subst and head != "MC"
                    else subst["MC"] if a == "MC" else a)
    before = {k: _digest(env[k]) for k in ("model", "models", "data", "plan", "scores", "mc", "planside")}
    r = invoke(cmd, argv)
    assert_refused(r, ("-o", "input", "inside", "contains", str(env[keep].name), "work directory"))
    assert {k: _digest(env[k]) for k in before} == before  # nothing was touched
    assert (env["models"] / "sibling.txt").exists()


def test_select_counts_the_compensation_file_as_an_output(env, sentinel, tmp_path):
    """Issue 21 class 2: ``select -o x.json`` writes ``x.compensation.safetensors`` too; an existing one is refused
    before work without --overwrite, as the plan itself would be."""
    side = tmp_path / "out" / "plan.compensation.safetensors"
    side.parent.mkdir()
    side.write_bytes(b"a compensation file from another run")
    r = invoke("select", base_args("select", env, tmp_path / "out"))
    assert_refused(r, ("plan.compensation.safetensors",))
    assert side.read_bytes() == b"a compensation file from another run"


# ---- issue 21: hostile inputs, real runs (no sentinel): one line, exit 2, no traceback, nothing written ------------
#: a YAML alias bomb: 300 bytes that expand to 9^9 strings
BOMB = "[" + ",".join(["&x0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"] + [
    f"&x{k} [" + ",".join([f"*x{k - 1}"] * 9) + "]" for k in range(1, 9)]) + "]"


@pytest.fixture(scope="module")
def hostile(env, tmp_path_factory) -> dict[str, Path]:
    """One of each hostile input of issue 21's battery, built once."""
    import math
    import warnings

    from prune_heads.export import export_checkpoint

    root = tmp_path_factory.mktemp("hostile-inputs")
    marker = root / "MARKER"
    evil = root / "evil"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(env["model"], evil)
    (evil / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(model_type="evil_llama", auto_map={"AutoConfig": "evil.C", "AutoModelForCausalLM": "evil.M"})
    (evil / "config.json").write_text(json.dumps(cfg))
    nan = root / "nan"
    model = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS))
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[1, 1] = math.nan
    model.save_pretrained(nan)
    tiny_tokenizer(nan)
    (root / "garbage.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 8 + b"PAR1")
    (root / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    sliced = root / "sliced"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_checkpoint(str(env["model"]), Plan.load(env["plan"]), sliced, progress=False, verify=False)
    recipe = yaml.safe_load(env["recipe"].read_text())
    bombs = {}
    for key in ("name", "description", "notes"):
        bombs[key] = root / f"bomb-{key}.yaml"
        bombs[key].write_text(yaml.safe_dump({**recipe, key: "BOMB"}).replace("BOMB", BOMB))
    Plan([(0, 0)]).save(root / "bare-plan.json")  # hand-written: no fingerprint ties it to the original
    for name, change in (("layers", {"num_hidden_layers": 100_000}), ("wide", {"hidden_size": 1_000_000})):
        shutil_copy(env["model"], root / f"lying-{name}")  # config.json that does not describe the weights
        cfg = json.loads((root / f"lying-{name}" / "config.json").read_text())
        (root / f"lying-{name}" / "config.json").write_text(json.dumps({**cfg, **change}))
    (root / "mc-list.jsonl").write_text("[1, 2]\n")
    (root / "mc-deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (root / "mc-binary.jsonl").write_bytes(bytes(range(128, 256)) * 8)
    return {"root": root, "evil": evil, "marker": marker, "nan": nan, "garbage": root / "garbage.parquet", "bare": root / "bare-plan.json",
            "deep": root / "deep.jsonl", "sliced": sliced, **{f"bomb-{k}": v for k, v in bombs.items()}}


HOSTILE = [  # (label, command, args with placeholders (OUT: a fresh output), names the line must contain)
    ("remote code: calibrate", "calibrate", ["EVIL", "--data", "DATA", "-o", "OUT"], ("--trust-remote-code",)),
    ("remote code: export", "export", ["EVIL", "--plan", "PLAN", "-o", "OUT", "--no-verify"],
     ("--trust-remote-code",)),
    ("remote code: eval", "eval", ["EVIL", "--task", "MC", "-o", "OUT"], ("--trust-remote-code",)),
    ("NaN weight: calibrate", "calibrate", ["NAN", "--data", "DATA", "-o", "OUT"],
     ("model.layers.0.self_attn.v_proj.weight",)),
    ("NaN weight: select", "select", ["SCORES", "--model", "NAN", "--task", "MC", "--max-drop", "0.1", "-o", "OUT"],
     ("model.layers.0.self_attn.v_proj.weight",)),
    ("NaN weight: export", "export", ["NAN", "--plan", "PLAN", "-o", "OUT"], ("model.layers.0.self_attn.v_proj.weight",)),
    ("corrupt parquet --data", "calibrate", ["MODEL", "--data", "GARBAGE", "-o", "OUT"], ("garbage.parquet",)),
    ("JSON nested 100000 deep --data", "calibrate", ["MODEL", "--data", "DEEP", "-o", "OUT"], ("deep.jsonl",)),
    ("calibrate a sliced export", "calibrate", ["SLICED", "--data", "DATA", "-o", "OUT"], ("sliced",)),
    ("export from a sliced export", "export", ["SLICED", "--plan", "PLAN", "-o", "OUT"], ("sliced",)),
    ("eval --plan on a sliced export", "eval", ["SLICED", "--task", "MC", "--plan", "BARE", "-o", "OUT"], ("sliced",)),
    ("push an unverified export", "push", ["SLICED", "org/name"], ("--allow-unverified",)),
    ("-o name too long", "calibrate", ["MODEL", "--data", "DATA", "-o", "LONG"], ("File name too long",)),
    ("--data name too long", "calibrate", ["MODEL", "--data", "LONG.txt", "-o", "OUT"], ("File name too long",)),
    ("eval -o name too long", "eval", ["MODEL", "--task", "MC", "-o", "LONG.json"], ("File name too long",)),
    # config.json claiming 100000 layers (or a 10^6 hidden size) built modules for minutes before any weight
    ("config claims 100000 layers: calibrate", "calibrate", ["LYING-LAYERS", "--data", "DATA", "-o", "OUT"],
     ("num_hidden_layers",)),
    ("config claims 100000 layers: export", "export", ["LYING-LAYERS", "--plan", "BARE", "-o", "OUT"],
     ("num_hidden_layers",)),
    ("config claims a 10^6 hidden size: eval", "eval", ["LYING-WIDE", "--task", "MC", "-o", "OUT"], ("hidden_size",)),
    *[(f"mc: file {k}", "eval", ["MODEL", "--task", f"MCFILE-{k}", "-o", "OUT"], (f"mc-{k}.jsonl",))
      for k in ("list", "deep", "binary")],  # a traceback each (AttributeError, RecursionError, UnicodeDecodeError)
    *[(f"alias bomb in {k}", "run", [f"BOMB-{k.upper()}", "-o", "OUT"], ("alias",))
      for k in ("name", "description", "notes")],
    *[(f"alias bomb in --set {k}", "run", ["RECIPE", "-o", "OUT", "--set", f"{k}={BOMB}"], ("alias",))
      for k in ("name", "description", "notes")],
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in HOSTILE])
def test_hostile_input_is_one_line(env, hostile, tmp_path, case):
    """Issue 21's battery at the command line: each hostile input ends in one ``error:`` line on stderr naming
    what to fix, exit 2, no traceback, no output, and no checkpoint code run."""
    import time

    _, cmd, args, names = case
    out = tmp_path / "out"
    subst = {"EVIL": hostile["evil"], "NAN": hostile["nan"], "GARBAGE": hostile["garbage"], "DEEP": hostile["deep"],
             "SLICED": hostile["sliced"], "DATA": env["data"], "PLAN": env["plan"], "SCORES": env["scores"],
             "MODEL": env["model"], "RECIPE": env["recipe"], "MC": f"mc:{env['mc']}", "OUT": out, "BARE": hostile["bare"],
             **{f"BOMB-{k.upper()}": hostile[f"bomb-{k}"] for k in ("name", "description", "notes")}}
    subst.update({"LYING-LAYERS": hostile["root"] / "lying-layers", "LYING-WIDE": hostile["root"] / "lying-wide"})
    subst.update({f"MCFILE-{k}": f"mc:{hostile['root'] / f'mc-{k}.jsonl'}" for k in ("list", "deep", "binary")})
    long = str(tmp_path / ("a" * 300))  # over NAME_MAX: ENAMETOOLONG was a traceback
    subst.update({"LONG": long, "LONG.txt": long + ".txt", "LONG.json": long + ".json"})
    argv = [str(subst.get(a, a)) for a in args]
    if cmd == "calibrate":
        argv += ["--num-samples", "2", "--seq-len", "8"]
    if cmd == "select" or cmd == "eval":
        argv += ["--limit", "4"]
    t0 = time.monotonic()
    r = invoke(cmd, argv)
    assert time.monotonic() - t0 < 30  # an alias bomb ran for minutes
    assert_refused(r, names, only_line=False)  # real runs: the line may follow a loading bar
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    # nothing before it but progress bars and the preflight's estimated-peak line
    assert all("%|" in x or ": estimated peak memory " in x for x in lines[:-1]), lines
    assert len(lines[-1]) < 2100  # the one line is bounded too
    assert not out.exists() or cmd == "run" and not any(out.iterdir())
    assert not hostile["marker"].exists()


def test_scores_of_other_weights_are_refused_by_every_command_that_takes_them(env, tmp_path):
    """Class 4 at the command line: a scores file and a plan made on another model of the same shape."""
    other = tmp_path / "other"
    model = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS), seed=5)
    model.save_pretrained(other)
    tiny_tokenizer(other)
    mc = f"mc:{env['mc']}"
    runs = {
        "select": ["select", str(env["scores"]), "--model", str(other), "--task", mc, "--max-drop", "0.1", "-o",
                   str(tmp_path / "p.json")],
        "eval --plan": ["eval", str(other), "--task", mc, "--plan", str(env["plan"]), "-o", str(tmp_path / "r.json")],
        "eval --dynamic-fraction": ["eval", str(other), "--task", mc, "--dynamic-fraction", "awft:0.1", "--scores",
                                    str(env["scores"]), "-o", str(tmp_path / "r2.json")],
        "sweep": ["sweep", str(env["scores"]), "--model", str(other), "--task", mc, "-o", str(tmp_path / "sw")],
    }
    for label, argv in runs.items():
        r = CliRunner().invoke(cli, argv)
        assert_refused(r, ("different weights",), only_line=False)
        assert "tensor" in r.stderr, label


def test_export_refuses_a_plan_made_on_other_weights(env, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS), seed=5).save_pretrained(other)
    r = invoke("export", [str(other), "--plan", str(env["plan"]), "-o", str(tmp_path / "out"), "--no-verify"])
    assert_refused(r, ("different weights",), only_line=False)  # found while the tensors stream by
    assert not (tmp_path / "out").exists()


def test_model_changed_in_memory_still_matches_its_own_fingerprint_file(env):
    """Sanity of the fixture used above: the plan's fingerprint matches the model it was made on."""
    from prune_heads.model.fingerprint import check_fingerprint
    from prune_heads.model.loading import load_model

    loaded = load_model(str(env["model"]))
    check_fingerprint(Plan.load(env["plan"]).selection.fingerprint, loaded.model, "the plan")
    with torch.no_grad():
        loaded.model.model.norm.weight[0] += 1
    with pytest.raises(Exception, match="model.norm.weight"):
        check_fingerprint(Plan.load(env["plan"]).selection.fingerprint, loaded.model, "the plan")
