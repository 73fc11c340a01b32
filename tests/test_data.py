"""Calibration data sources, sampling and the errors bad data gets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer, words

from prune_heads import calibrate
from prune_heads.data import (
    DataSpec,
    as_token_lists,
    batches,
    find_wikitext,
    iter_documents,
    split_text_documents,
    tokenize_documents,
)
from prune_heads.errors import DataError

WIKI = """ = Alpha =

 Alpha was a ship .

 = = Career = =

 the ship had a war .

 = Beta =

 Beta is a band .
"""


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_wikitext_articles_split_on_top_headings_only():
    docs = split_text_documents(WIKI)
    assert len(docs) == 2
    assert docs[0].startswith("= Alpha =") and "= = Career = =" in docs[0] and "war" in docs[0]
    assert docs[1].startswith("= Beta =") and "band" in docs[1]


def test_plain_text_splits_on_blank_lines(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("one doc\nstill one\n\n\ntwo doc\n  \nthree\n")
    assert list(iter_documents(str(f))) == ["one doc\nstill one", "two doc", "three"]


def test_real_wikitext2_has_articles():
    docs = split_text_documents(find_wikitext().read_text(encoding="utf-8"))
    assert 50 < len(docs) < 200  # the WikiText-2 test split has 60-odd articles
    assert all(d.startswith("= ") for d in docs)
    assert list(iter_documents("wikitext2"))[:3] == docs[:3]


def test_jsonl_default_and_named_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"doc {i}", "body": f"b {i}"}) for i in range(3)) + "\n\n")
    assert list(iter_documents(str(f))) == ["doc 0", "doc 1", "doc 2"]
    assert list(iter_documents(f"{f}#body")) == ["b 0", "b 1", "b 2"]
    with pytest.raises(DataError, match="no field 'missing'.*#FIELD"):
        list(iter_documents(f"{f}#missing"))


def test_parquet_and_save_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["p0", "", "p2"], "other": ["x", "y", "z"]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert list(iter_documents(str(tmp_path / "d.parquet"))) == ["p0", "p2"]  # empty texts are skipped
    ds.save_to_disk(str(tmp_path / "flat"))
    assert list(iter_documents(str(tmp_path / "flat") + "#other")) == ["x", "y", "z"]
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"text": ["v0"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert list(iter_documents(str(tmp_path / "dict"))) == ["p0", "p2"]
    assert list(iter_documents(str(tmp_path / "dict") + "@validation")) == ["v0"]
    with pytest.raises(DataError, match="splits"):
        list(iter_documents(str(tmp_path / "dict") + "@test"))


def test_unknown_source_and_format(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported data file"):
        list(iter_documents(str(tmp_path / "d.csv")))


def test_samples_start_with_doc_start_and_are_truncated(tok):
    docs = [words(n, seed=n) for n in (30, 5, 40, 20, 25)]
    spec = DataSpec(source="x", num_samples=3, seq_len=12, seed=0, min_tokens=16)
    samples = tokenize_documents(docs, tok, spec)
    assert len(samples) == 3
    for s in samples:
        assert s[0] == tok.bos_token_id and len(s) == 12
        assert tok.bos_token_id not in s[1:]
    # each sample is the start of one document, in the tokenizer's own ids
    starts = {tuple(([tok.bos_token_id] + tok(d, add_special_tokens=False).input_ids)[:12]) for d in docs}
    assert {tuple(s) for s in samples} <= starts


def test_sampling_is_seeded(tok):
    docs = [words(20, seed=i) for i in range(30)]
    pick = lambda seed: tokenize_documents(docs, tok, DataSpec(source="x", num_samples=5, seq_len=64, seed=seed))  # noqa: E731
    assert pick(0) == pick(0)
    assert pick(0) != pick(1)


def test_empty_and_too_short_data(tok, tmp_path):
    with pytest.raises(DataError, match="no documents"):
        tokenize_documents([], tok, DataSpec(source="empty.txt"))
    with pytest.raises(DataError, match="at least 16 tokens"):
        tokenize_documents([words(3)], tok, DataSpec(source="short.txt"))
    with pytest.raises(DataError, match="only 2 documents.*lower --num-samples"):
        tokenize_documents([words(20), words(30), words(2)], tok, DataSpec(source="few.txt", num_samples=3))
    (tmp_path / "empty.txt").write_text("\n\n")
    model = tiny_model("llama")
    with pytest.raises(DataError, match="no documents"):
        calibrate(model, str(tmp_path / "empty.txt"), tokenizer=tok, progress=False)
    with pytest.raises(DataError, match="empty sequence"):
        calibrate(model, [[1, 2], []], progress=False)
    with pytest.raises(DataError, match="no calibration sequences"):
        calibrate(model, [], progress=False)


def test_seq_len_beyond_context(tok, tmp_path):
    model = tiny_model("llama")  # max_position_embeddings = 256
    (tmp_path / "d.txt").write_text(words(40))
    with pytest.raises(DataError, match="--seq-len 300 is beyond the model's context of 256"):
        calibrate(model, str(tmp_path / "d.txt"), tokenizer=tok, seq_len=300, num_samples=1, progress=False)
    with pytest.raises(DataError, match="beyond the model's context"):
        calibrate(model, [list(range(1, 100)) * 3], progress=False)


def test_text_spec_through_calibrate(tok, tmp_path):
    """A text spec gives the same scores as the same samples handed over pre-tokenised."""
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": words(20 + i, seed=i)}) for i in range(6)))
    model = tiny_model("llama", vocab=len(tok))
    hs = calibrate(model, str(f), tokenizer=tok, num_samples=4, seq_len=18, batch_size=2, progress=False)
    docs = hs.meta["data"].pop("documents")
    assert hs.meta["data"] == {"source": str(f), "num_samples": 4, "seq_len": 18, "seed": 0, "min_tokens": 16,
                               "split": "all"}
    assert len(docs) == 4 and len(set(docs)) == 4 and all(d.startswith(f"{f}:") for d in docs)
    assert hs.meta["num_samples"] == 4 and hs.meta["num_tokens"] == 4 * 18
    seqs = tokenize_documents(iter_documents(str(f)), tok, DataSpec(source=str(f), num_samples=4, seq_len=18))
    pre = calibrate(model, seqs, batch_size=3, progress=False)
    torch.testing.assert_close(hs.per_sample("ahon_ln"), pre.per_sample("ahon_ln"), rtol=1e-5, atol=1e-6)


def test_pre_tokenised_lists_and_tensors():
    model = tiny_model("llama")
    seqs = [[1, 5, 7, 9, 11, 3], torch.tensor([1, 4, 4, 8])]
    assert as_token_lists(seqs) == [[1, 5, 7, 9, 11, 3], [1, 4, 4, 8]]
    a = calibrate(model, seqs, progress=False)
    assert a.meta["data"]["source"] == "pre-tokenised" and a.meta["num_tokens"] == 10
    b = calibrate(model, seqs, seq_len=4, num_samples=1, progress=False)
    assert b.per_sample("awft").shape[0] == 1 and b.meta["num_tokens"] == 4
    c = calibrate(model, [seqs[0][:4]], progress=False)
    torch.testing.assert_close(b.per_sample("awft"), c.per_sample("awft"))


def test_batches_right_pad():
    out = list(batches([[5, 6, 7], [8], [9, 10]], 2, pad_id=0))
    assert [o[0] for o in out] == [[0, 1], [2]]
    assert out[0][1].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out[0][2].tolist() == [[1, 1, 1], [1, 0, 0]]


# ---- WikiText-2 ships with the package --------------------------------------------------------------
SHARED_WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
WIKITEXT_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


def test_wikitext2_resolves_to_the_packaged_file_on_a_fresh_clone(tmp_path, monkeypatch):
    """No ../shared beside the checkout, no environment variable: the packaged split, byte for byte."""
    from prune_heads.data.wikitext import PACKAGED_WIKITEXT

    monkeypatch.delenv("PRUNE_HEADS_WIKITEXT", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing named shared/ above /tmp
    assert not any((p / "shared").exists() for p in [tmp_path, *tmp_path.parents])
    assert find_wikitext() == PACKAGED_WIKITEXT
    assert hashlib.sha256(PACKAGED_WIKITEXT.read_bytes()).hexdigest() == WIKITEXT_SHA256
    docs = list(iter_documents("wikitext2"))
    assert len(docs) == 62 and docs[0].startswith("= Robert Boulter =")
    if SHARED_WIKITEXT.is_file():  # the copy CI used until now gives the same documents
        assert docs == split_text_documents(SHARED_WIKITEXT.read_text(encoding="utf-8"))


def test_wikitext2_works_in_a_fresh_interpreter_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PRUNE_HEADS_WIKITEXT"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    code = ("import json; from prune_heads.data import find_wikitext, iter_documents; "
            "d = list(iter_documents('wikitext2')); print(json.dumps([str(find_wikitext()), len(d), d[-1][-40:]]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    path, n, tail = json.loads(out.stdout.splitlines()[-1])
    from prune_heads.data.wikitext import PACKAGED_WIKITEXT

    assert Path(path) == PACKAGED_WIKITEXT and n == 62
    assert tail == split_text_documents(PACKAGED_WIKITEXT.read_text(encoding="utf-8"))[-1][-40:]


def test_wikitext_package_data_is_declared():
    """The files are in the wheel: pyproject's package-data patterns match every file of the folder."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["prune_heads"]
    files = sorted(p.relative_to(root / "prune_heads").as_posix() for p in (root / "prune_heads/data/wikitext2").iterdir())
    assert files == ["data/wikitext2/ATTRIBUTION.md", "data/wikitext2/wiki.test.raw"]
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)
    attribution = (root / "prune_heads/data/wikitext2/ATTRIBUTION.md").read_text()
    assert "CC BY-SA 3.0" in attribution and WIKITEXT_SHA256 in attribution and "Merity" in attribution


def test_environment_variable_overrides_the_packaged_file(tmp_path, monkeypatch):
    f = tmp_path / "mine.raw"
    f.write_text(WIKI)
    monkeypatch.setenv("PRUNE_HEADS_WIKITEXT", str(f))
    assert find_wikitext() == f
    assert list(iter_documents("wikitext2")) == split_text_documents(WIKI)
    monkeypatch.setenv("PRUNE_HEADS_WIKITEXT", str(tmp_path / "missing.raw"))
    with pytest.raises(DataError, match="PRUNE_HEADS_WIKITEXT=.*not a file.*unset it"):
        list(iter_documents("wikitext2"))


def test_wikitext2_hub_reads_salesforce_wikitext(monkeypatch):
    """The Hub copy (one record per line) joins into the same documents as the packaged file."""
    import datasets

    from prune_heads.data.wikitext import PACKAGED_WIKITEXT

    lines = PACKAGED_WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": lines})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(iter_documents("wikitext2:hub")) == list(iter_documents("wikitext2"))
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]


def test_wikitext2_hub_offline_says_what_to_do(monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="cannot load Salesforce/wikitext.*--data wikitext2"):
        list(iter_documents("wikitext2:hub"))


def test_calibration_split_is_the_ppl_tasks_search_half(tmp_path, tok):
    """calibration.split=search takes only documents of the search half that ppl: tasks use with the same
    seed: the verify half (held-out verification) never contributes a calibration token."""
    from prune_heads.data import DataSpec, calibration_sequences
    from prune_heads.evaluation.perplexity import TextBackend

    docs = [words(20 + i, seed=100 + i) for i in range(30)]
    f = tmp_path / "docs.txt"
    f.write_text("\n\n".join(docs) + "\n")
    for seed in (0, 3):
        cal = calibration_sequences(DataSpec(str(f), num_samples=15, seq_len=64, seed=seed, split="search"), tok)
        m = tiny_model("llama", layers=1, heads=2, kv_heads=1, head_dim=4, vocab=tok.vocab_size)
        halves = {s: {tuple(x) for x in TextBackend(m, tok, "ppl", str(f), limit=30, split=s, seed=seed,
                                                             batch_size=4, seq_len=64).seqs}
                  for s in ("search", "verify")}
        assert len(cal) == 15 and {tuple(x) for x in cal} == halves["search"]
        assert not ({tuple(x) for x in cal} & halves["verify"])
