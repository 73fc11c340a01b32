"""Class 5 of issue 21: hostile values end in one line, in seconds, whatever field or file they arrive in.

- a YAML alias bomb (a few hundred bytes that expand to billions of values) in any field of a recipe or a
  ``--set`` override: refused by the bounded loader, and no error message ever ``repr``s an unbounded value;
- a corrupt ``.parquet`` (garbage, or a real file cut short) or a JSON line nested a million deep as ``--data``;
- calibrating (or masking) an already sliced export.
"""

from __future__ import annotations

import json
import time
import warnings

import pytest
import yaml
from click.testing import CliRunner
from tiny_models import tiny_model
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer, words

from prune_heads.cli.main import cli
from prune_heads.errors import PruneHeadsError, shown

#: a flow sequence that defines its own anchors: 9^9 = 387 million strings once expanded, 300 bytes as written
BOMB = "[" + ",".join(["&x0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"] + [
    f"&x{k} [" + ",".join([f"*x{k - 1}"] * 9) + "]" for k in range(1, 9)]) + "]"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_model("llama", layers=2, vocab=len(SPECIAL) + len(WORDS))
    model.save_pretrained(root / "m")
    tiny_tokenizer(root / "m")
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": words(20, seed=i)}) for i in range(6)) + "\n")
    mc = root / "q.jsonl"
    mc.write_text("\n".join(json.dumps({"question": f"the {w}", "choices": ["film", "song"], "answer": i % 2})
                            for i, w in enumerate(["city", "river", "king", "team"])) + "\n")
    recipe = {"name": "tiny", "model": {"id": str(root / "m"), "device": "cpu"},
              "calibration": {"data": str(data), "num_samples": 4, "seq_len": 16, "batch_size": 2},
              "select": {"task": f"mc:{mc}", "limit": 4, "max_drop": 0.5, "verify": False, "compensate": "none"},
              "verify": {"num_sequences": 1, "seq_len": 8},
              "evaluate": {"tasks": [{"task": f"mc:{mc}", "limit": 4}]}}
    return {"root": root, "model": root / "m", "data": data, "recipe": recipe}


def _one_line(r, names: tuple[str, ...]) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and "Traceback" not in r.output, (r.exit_code, r.output[-500:])
    assert lines and lines[-1].startswith("error:") and len(lines[-1]) < 2100, lines[-1:]
    assert any(n in lines[-1] for n in names), lines[-1]
    return lines[-1]


def _with_bomb(recipe: dict, dotted: str) -> str:
    """The recipe as YAML with ``dotted`` set to the bomb (its anchors inside the value itself)."""
    text = yaml.safe_dump(recipe, sort_keys=False)
    doc = yaml.safe_load(text)
    node = doc
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = "BOMB_HERE"
    return yaml.safe_dump(doc, sort_keys=False).replace("BOMB_HERE", BOMB)


FIELDS = ["name", "description", "notes", "model.id", "model.revision", "calibration.data", "select.task",
          "select.max_drop", "evaluate.tasks", "hub.repo_id", "hub.message"]


@pytest.mark.parametrize("dotted", FIELDS)
def test_alias_bomb_in_any_recipe_field_is_refused_in_seconds(env, tmp_path, dotted):
    path = tmp_path / "bomb.yaml"
    path.write_text(_with_bomb(env["recipe"], dotted))
    t0 = time.monotonic()
    r = CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "out")])
    assert time.monotonic() - t0 < 20
    _one_line(r, ("alias", "bomb.yaml"))
    assert not (tmp_path / "out").exists()


def test_alias_bomb_in_a_set_override_is_refused(env, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(env["recipe"]))
    t0 = time.monotonic()
    r = CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "out"), "--set", f"notes={BOMB}"])
    assert time.monotonic() - t0 < 20
    _one_line(r, ("--set notes", "notes"))


def test_error_messages_never_repr_an_unbounded_value():
    """The shared list of a bomb (9^9 leaves) is shown in a few dozen characters, at once."""
    a = ["lol"] * 9
    for _ in range(8):
        a = [a] * 9
    t0 = time.monotonic()
    text = shown(a)
    assert time.monotonic() - t0 < 1 and len(text) <= 80
    from prune_heads.schema import ConfigError, coerce

    with pytest.raises(ConfigError) as e:
        coerce(a, str, "name")
    assert len(str(e.value)) < 200


@pytest.mark.parametrize("depth", [100, 5_000, 100_000])
def test_a_deep_yaml_document_is_refused(tmp_path, depth):
    path = tmp_path / "deep.yaml"
    path.write_text("name: " + "[" * depth + "]" * depth + "\n")
    r = CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "out")])
    line = _one_line(r, ("deep.yaml",))
    assert "nest" in line or "longer than" in line, line


def test_many_deeply_nested_values_are_refused_in_seconds(tmp_path):
    """PyYAML's pure-Python scanner is quadratic in flow nesting: 400 values nested 480 deep (each under the
    recursion limit) took minutes. The text is bounded before it is parsed, and parsed by libyaml."""
    path = tmp_path / "wide.yaml"
    path.write_text("".join(f"k{i}: " + "[" * 480 + "]" * 480 + "\n" for i in range(400)))
    t0 = time.monotonic()
    r = CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "out")])
    assert time.monotonic() - t0 < 20
    _one_line(r, ("wide.yaml",))


# ---- data files ------------------------------------------------------------------------------------------
def _garbage_parquet(tmp_path):
    p = tmp_path / "garbage.parquet"
    p.write_bytes(b"PAR1" + bytes(range(256)) * 20 + b"PAR1")
    return p


def _cut_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"text": [words(30, seed=i) for i in range(200)]}), p, row_group_size=20)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _deep_jsonl(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text('{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    return p


def _wide_record(tmp_path):
    p = tmp_path / "wide.jsonl"
    p.write_text(json.dumps({f"k{i}": i for i in range(200_000)}) + "\n")
    return p


@pytest.mark.parametrize("make", [_garbage_parquet, _cut_parquet, _deep_jsonl, _wide_record])
def test_a_corrupt_data_file_gives_one_line(env, tmp_path, make):
    bad = make(tmp_path)
    r = CliRunner().invoke(cli, ["calibrate", str(env["model"]), "--data", str(bad), "-o", str(tmp_path / "s"),
                                 "--num-samples", "2", "--seq-len", "8"])
    _one_line(r, (bad.name,))
    assert not (tmp_path / "s").exists()


def test_a_good_parquet_file_still_reads(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prune_heads.data import iter_documents

    p = tmp_path / "ok.parquet"
    docs = [words(10, seed=i) for i in range(50)]
    pq.write_table(pa.table({"body": docs, "n": list(range(50))}), p, row_group_size=7)
    assert list(iter_documents(f"{p}#body")) == docs
    with pytest.raises(PruneHeadsError, match="no column 'text'"):
        list(iter_documents(str(p)))


# ---- a sliced export is not a model to score ----------------------------------------------------------------
def test_calibrating_a_sliced_export_says_what_to_do(env, tmp_path):
    from prune_heads.export import export_checkpoint
    from prune_heads.plan import Plan

    out = tmp_path / "sliced"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_checkpoint(str(env["model"]), Plan([(0, 1), (1, 2)]), out, progress=False, verify=False)
    r = CliRunner().invoke(cli, ["calibrate", str(out), "--data", str(env["data"]), "-o", str(tmp_path / "s"),
                                 "--num-samples", "2", "--seq-len", "8"])
    line = _one_line(r, ("sliced",))
    assert "not supported" in line and "original model" in line
    r = CliRunner().invoke(cli, ["export", str(out), "--plan", str(tmp_path / "p.json"), "-o", str(tmp_path / "e")]
                           if Plan([(0, 0)]).save(tmp_path / "p.json") else [])
    _one_line(r, ("sliced",))
