"""Calibration data sources, sampling and the errors bad data gets."""

from __future__ import annotations

import json

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
    assert hs.meta["data"] == {"source": str(f), "num_samples": 4, "seq_len": 18, "seed": 0, "min_tokens": 16}
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
