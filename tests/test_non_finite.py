"""Class 3 of issue 21: nothing non-finite passes.

Options: every float field of every stage config refuses NaN and ±Inf (``schema``), whatever the front end.
Weights and statistics: a checkpoint with one NaN (or Inf) weight is refused by every command with one line that
names the tensor, before any score, baseline or compensation is computed from it; statistics that come out
non-finite anyway (overflow) are refused at their chokepoint naming the layer.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import typing

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer, words

from prune_heads.cli.main import cli
from prune_heads.errors import NonFiniteError
from prune_heads.model.fingerprint import fingerprint
from prune_heads.plan import Plan
from prune_heads.schema import Config, ConfigError, check_value, coerce

STAGE_MODULES = ("prune_heads.model.config", "prune_heads.scoring.stage", "prune_heads.selection.stage",
                 "prune_heads.export.stage", "prune_heads.evaluation.stage", "prune_heads.publish.stage",
                 "prune_heads.pipeline.recipe", "prune_heads.report.stage")


def _configs() -> list[type]:
    for m in STAGE_MODULES:
        try:
            importlib.import_module(m)
        except ImportError:
            pass
    out, todo = [], list(Config.__subclasses__())
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return sorted(set(out), key=lambda c: c.__qualname__)


def _float_fields() -> list[tuple[type, str]]:
    rows = []
    for cls in _configs():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = typing.get_args(tp)
            if tp is float or float in args or (typing.get_origin(tp) is list and args == (float,)):
                rows.append((cls, f.name))
    return rows


FLOAT_FIELDS = _float_fields()


def test_there_are_float_fields_to_check():
    names = {f for _, f in FLOAT_FIELDS}
    assert {"max_drop", "tol", "confidence"} <= names, names


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("cls,name", FLOAT_FIELDS, ids=[f"{c.__name__}.{n}" for c, n in FLOAT_FIELDS])
def test_every_float_field_refuses_non_finite_values(cls, name, value):
    """What ``Config.__post_init__`` runs on each field (so recipes, --set and the CLI all get it)."""
    hints = typing.get_type_hints(cls)
    given = [value] if typing.get_origin(hints[name]) is list else value
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    with pytest.raises(ConfigError) as e:
        check_value(meta, coerce(given, hints[name], name), name)
    assert e.value.field.split(".")[0] == name and "finite" in str(e.value), str(e.value)


# ---- weights ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    good = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS))
    good.save_pretrained(root / "good")
    tiny_tokenizer(root / "good")
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": words(20, seed=i)}) for i in range(8)) + "\n")
    mc = root / "q.jsonl"
    mc.write_text("\n".join(json.dumps({"question": f"the {w}", "choices": ["film", "song"], "answer": i % 2})
                            for i, w in enumerate(["city", "river", "king", "team"])) + "\n")
    from prune_heads import calibrate

    seqs = [[1] + [len(SPECIAL) + (7 * i + j) % len(WORDS) for j in range(15)] for i in range(4)]
    calibrate(good, seqs, progress=False).save(root / "scores")
    bad = {}
    for kind, v in (("nan", math.nan), ("inf", math.inf)):
        m = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS))
        with torch.no_grad():
            m.model.layers[1].self_attn.q_proj.weight[2, 3] = v
        m.save_pretrained(root / kind)
        tiny_tokenizer(root / kind)
        bad[kind] = root / kind
    Plan([(0, 1)], {"fingerprint": fingerprint(good)}).save(root / "plan.json")
    Plan([(0, 1)]).save(root / "bare-plan.json")  # hand-written: nothing ties it to weights
    return {"root": root, "bad": bad, "data": data, "mc": mc, "scores": root / "scores", "plan": root / "plan.json",
            "bare": root / "bare-plan.json"}


def _commands(env, m, out):
    mc = f"mc:{env['mc']}"
    return {
        "calibrate": ["calibrate", str(m), "--data", str(env["data"]), "-o", str(out / "s"), "--num-samples", "2",
                      "--seq-len", "8"],
        "eval": ["eval", str(m), "--task", mc, "--limit", "4", "-o", str(out / "r.json")],
        "eval --plan": ["eval", str(m), "--task", mc, "--limit", "4", "--plan", str(env["bare"]), "-o",
                        str(out / "r2.json")],
        "select": ["select", str(env["scores"]), "--model", str(m), "--task", mc, "--limit", "4", "--max-drop", "0.5",
                   "-o", str(out / "p.json")],
        "export": ["export", str(m), "--plan", str(env["plan"]), "-o", str(out / "e")],
        "export (hand-written plan)": ["export", str(m), "--plan", str(env["bare"]), "-o", str(out / "e2")],
    }


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("cmd", ["calibrate", "eval", "eval --plan", "select", "export", "export (hand-written plan)"])
def test_non_finite_weights_are_refused_naming_the_tensor(env, tmp_path, cmd, kind):
    r = CliRunner().invoke(cli, _commands(env, env["bad"][kind], tmp_path)[cmd])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and "Traceback" not in r.output, (r.exit_code, r.output[-800:])
    assert lines[-1].startswith("error:") and "model.layers.1.self_attn.q_proj.weight" in lines[-1], lines[-1]
    assert ("NaN" if kind == "nan" else "Inf") in lines[-1]
    assert not any(p.name in ("s", "r.json", "r2.json", "p.json", "e", "e2") for p in tmp_path.iterdir())


# ---- statistics that come out non-finite anyway -------------------------------------------------------
def test_non_finite_statistics_are_refused_at_their_chokepoints():
    """Overflowing statistics (simulated by poisoning what each chokepoint receives) name the layer."""
    from prune_heads.compensation.compensator import Compensator
    from prune_heads.scoring.calibrate import calibrate

    model = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS))
    seqs = [[1] + [len(SPECIAL) + (7 * i + j) % len(WORDS) for j in range(15)] for i in range(4)]
    scores = calibrate(model, seqs, progress=False)
    moments = scores.moments
    moments.sums[1] = moments.sums[1].clone()
    moments.sums[1][0] = math.nan
    comp = Compensator("lsq", moments=moments)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 0] = True
    with pytest.raises(NonFiniteError, match="statistics of layer 1"):
        comp(mask)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 0] = True
    assert comp(mask).layers[0].offset.isfinite().all()  # layer 0 is fine, and is solved


def test_a_non_finite_metric_is_refused_naming_the_task():
    from prune_heads.evaluation import make_evaluator

    tok = tiny_tokenizer()
    model = tiny_model("llama", layers=2, vocab=len(tok))
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp())
    (d / "docs.txt").write_text("\n\n".join(words(30, seed=i) for i in range(6)))
    ev = make_evaluator(model, tok, f"ppl:{d / 'docs.txt'}", limit=4)
    assert math.isfinite(ev().value)
    with torch.no_grad():
        model.lm_head.weight.fill_(math.inf)
    ev = make_evaluator(model, tok, f"ppl:{d / 'docs.txt'}", limit=4)
    with pytest.raises(NonFiniteError, match="ppl"):
        ev()


# ---- statistics read back from files (a forged hash, an older file, other code) --------------------------------
def test_non_finite_scores_and_compensation_files_are_refused_on_read(env, tmp_path):
    """The sha256 ties catch an edit, not a file whose record was rewritten with it (or an older one without):
    a NaN score would rank silently (NaN compares false), a NaN compensation would give ``pruned nan``."""
    import hashlib
    import shutil

    from safetensors.torch import load_file, save_file

    from prune_heads.compensation.plans import compensator_for
    from prune_heads.compensation.solve import Compensation
    from prune_heads.scoring.head_scores import META_FILE, SCORES_FILE, HeadScores

    scores = tmp_path / "scores"
    shutil.copytree(env["scores"], scores)
    tensors = load_file(scores / SCORES_FILE)
    key = sorted(k for k in tensors if not k.startswith("per_sample/"))[0]
    tensors[key][1, 2] = math.nan
    save_file(tensors, scores / SCORES_FILE, metadata={"format": "prune-heads-scores/1"})
    meta = json.loads((scores / META_FILE).read_text())
    meta["tensors_sha256"] = hashlib.sha256((scores / SCORES_FILE).read_bytes()).hexdigest()
    (scores / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(NonFiniteError, match=f"scores in .*{key}.*NaN"):
        HeadScores.load(scores)
    r = CliRunner().invoke(cli, ["select", str(scores), "--model", str(env["root"] / "good"), "--task",
                                 f"mc:{env['mc']}", "--limit", "4", "--max-drop", "0.5", "-o", str(tmp_path / "p.json")])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and "Traceback" not in r.output and key in lines[-1], r.output[-500:]
    assert not (tmp_path / "p.json").exists()

    comp = compensator_for("lsq", scores=HeadScores.load(env["scores"]))(
        torch.tensor([[True, False, False, False], [False, False, False, False]]))
    comp.layers[0].offset[0] = math.inf
    comp.save(tmp_path / "c.safetensors")
    with pytest.raises(NonFiniteError, match="layers.0.offset.*Inf"):
        Compensation.load(tmp_path / "c.safetensors")


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 24])
@pytest.mark.parametrize("shape", [(), (5,), (4, 6), (2, 3, 5)])
def test_the_first_bad_element_is_found_chunk_by_chunk(monkeypatch, chunk, shape):
    """``first_bad`` checks ``FINITE_CHUNK`` elements at a time (a whole embedding's ``isfinite`` set the peak
    of layer-by-layer eval); it names the same element as the independent reference, the first non-finite
    element of ``t.flatten()`` in row-major order, for every chunk size, shape and position."""
    from prune_heads import finite

    monkeypatch.setattr(finite, "FINITE_CHUNK", chunk)
    n = math.prod(shape)
    assert finite.first_bad(torch.ones(shape, dtype=torch.bfloat16)) is None
    for pos in range(n):
        for bad in (float("nan"), float("inf")):
            t = torch.zeros(n)
            t[pos] = bad
            later = (pos + 1 + n // 2) % n
            if later > pos:  # a second bad element after the first: the first is still the one named
                t[later] = -math.inf
            want = next(i for i, v in enumerate(t.tolist()) if not math.isfinite(v))
            got = finite.first_bad(t.reshape(shape))
            assert got == tuple(int(x) for x in torch.unravel_index(torch.tensor(want), shape)), (pos, got)
