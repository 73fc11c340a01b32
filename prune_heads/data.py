"""Calibration data: documents from many sources, tokenised one document per sample.

A sample is one document, truncated to ``seq_len`` tokens, starting at the document's start with the
model's usual document-start token. Sources (``--data SPEC``):

- ``path/to/file.txt``: one document per WikiText article (`` = Title = `` lines) when the file has
  such headings, else per blank-line-separated block;
- ``file.jsonl`` (``text`` field, or ``file.jsonl#field``), ``file.parquet`` (same), or a
  ``datasets.save_to_disk`` folder (``folder#field``, ``folder@split``);
- ``hub:ID[?name=CONFIG&split=SPLIT&field=FIELD]``: a Hub dataset (where the Hub is reachable; the
  paper uses ``hub:HuggingFaceFW/fineweb-edu?name=sample-10BT``), streamed;
- ``task:NAME``: the documents (prompts) of an lm-eval task, offline when the data is installed;
- ``wikitext2``: the raw WikiText-2 test split from ``../shared/data`` or ``PRUNE_HEADS_WIKITEXT``.

The Python API also takes pre-tokenised sequences.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import torch

from .errors import DataError

WIKITEXT_REL = Path("data") / "wikitext-2-raw" / "wiki.test.raw"
_HEADING = re.compile(r"^ ?= [^=](?:.*[^=])? = ?$")  # WikiText " = Title = " (trailing space optional)


@dataclass
class DataSpec:
    """How calibration samples were made; stored in the scores file."""

    source: str
    num_samples: int | None = 128
    seq_len: int = 512
    seed: int = 0
    min_tokens: int = 16

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def find_wikitext() -> Path:
    """WikiText-2 raw test split: ``PRUNE_HEADS_WIKITEXT``, else ``shared/data`` beside or above the cwd."""
    env = os.environ.get("PRUNE_HEADS_WIKITEXT")
    if env:
        return Path(env)
    here = Path.cwd().resolve()
    for base in [here, *here.parents]:
        for cand in (base / "shared" / WIKITEXT_REL, base.parent / "shared" / WIKITEXT_REL):
            if cand.is_file():
                return cand
    raise DataError(
        "WikiText-2 not found: set PRUNE_HEADS_WIKITEXT to wiki.test.raw, or run from a checkout that has "
        "../shared/data/wikitext-2-raw/wiki.test.raw"
    )


def split_text_documents(text: str) -> list[str]:
    lines = text.splitlines()
    if any(_HEADING.match(line) for line in lines):
        docs, cur = [], []
        for line in lines:
            if _HEADING.match(line) and cur:
                docs.append("\n".join(cur))
                cur = []
            cur.append(line)
        if cur:
            docs.append("\n".join(cur))
    else:
        docs = re.split(r"\n\s*\n", text)
    return [d.strip() for d in docs if d.strip()]


def _split_field(spec: str, default_field: str = "text") -> tuple[str, str]:
    if "#" in spec:
        path, field = spec.rsplit("#", 1)
        return path, field
    return spec, default_field


def _texts_from_records(records: Iterable[dict[str, Any]], field: str, where: str) -> Iterator[str]:
    for rec in records:
        if field not in rec:
            raise DataError(f"{where}: record has no field {field!r} (fields: {', '.join(rec)}); choose one with {where}#FIELD")
        value = rec[field]
        if isinstance(value, str) and value.strip():
            yield value


def iter_documents(source: str) -> Iterator[str]:
    """Yield the text documents of a data spec, in source order."""
    if source == "wikitext2":
        yield from split_text_documents(find_wikitext().read_text(encoding="utf-8"))
        return
    if source.startswith("hub:"):
        yield from _hub_documents(source[4:])
        return
    if source.startswith("task:"):
        from .evaluation.task_data import task_documents

        yield from task_documents(source[5:])
        return
    path_s, field = _split_field(source)
    split = None
    if "@" in path_s and not Path(path_s).exists():
        path_s, split = path_s.rsplit("@", 1)
    path = Path(path_s)
    if not path.exists():
        raise DataError(f"data source {source!r} not found (a file, a save_to_disk folder, hub:ID, task:NAME or wikitext2)")
    if path.is_dir():
        yield from _disk_documents(path, split, field)
    elif path.suffix == ".txt" or path.suffix == ".raw":
        yield from split_text_documents(path.read_text(encoding="utf-8"))
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            recs = (json.loads(line) for line in f if line.strip())
            yield from _texts_from_records(recs, field, str(path))
    elif path.suffix == ".parquet":
        import datasets

        ds = datasets.Dataset.from_parquet(str(path))
        yield from _texts_from_records(ds, field, str(path))
    else:
        raise DataError(f"unsupported data file {path.name}: use .txt, .jsonl, .parquet or a save_to_disk folder")


def _disk_documents(path: Path, split: str | None, field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path} is not a datasets.save_to_disk folder: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise DataError(f"{path} has splits {list(ds)}, not {split!r}")
        ds = ds[split]
    yield from _texts_from_records(ds, field, str(path))


def _hub_documents(spec: str) -> Iterator[str]:
    import datasets

    ds_id, _, query = spec.partition("?")
    opts = {k: v[0] for k, v in parse_qs(query).items()}
    try:
        ds = datasets.load_dataset(ds_id, opts.get("name"), split=opts.get("split", "train"), streaming=True)
    except Exception as e:
        raise DataError(
            f"cannot load Hub dataset {ds_id!r} ({type(e).__name__}: {e}). Offline? Use a local file or "
            "'wikitext2' instead."
        ) from e
    yield from _texts_from_records(ds, opts.get("field", "text"), f"hub:{ds_id}")


def doc_start_ids(tokenizer: Any) -> list[int]:
    """The token(s) a document starts with: whatever the tokenizer adds, else its BOS token, else none."""
    probe = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    if len(probe) > len(plain) and probe[-len(plain):] == plain:
        return list(probe[: len(probe) - len(plain)])
    if tokenizer.bos_token_id is not None:
        return [int(tokenizer.bos_token_id)]
    return []


def tokenize_documents(
    docs: Iterable[str], tokenizer: Any, spec: DataSpec, max_context: int | None = None
) -> list[list[int]]:
    """Pick ``spec.num_samples`` documents (seeded) and tokenise each, truncated to ``spec.seq_len``."""
    if max_context is not None and spec.seq_len > max_context:
        raise DataError(f"--seq-len {spec.seq_len} is beyond the model's context of {max_context} tokens")
    start = doc_start_ids(tokenizer)
    docs = list(docs)
    if not docs:
        raise DataError(f"data source {spec.source!r} has no documents")
    order = list(range(len(docs)))
    random.Random(spec.seed).shuffle(order)
    samples: list[list[int]] = []
    for i in order:
        ids = start + tokenizer(docs[i], add_special_tokens=False).input_ids
        if len(ids) < spec.min_tokens:
            continue
        samples.append(ids[: spec.seq_len])
        if spec.num_samples and len(samples) >= spec.num_samples:
            break
    if not samples:
        raise DataError(f"data source {spec.source!r} has no document of at least {spec.min_tokens} tokens")
    if spec.num_samples and len(samples) < spec.num_samples:
        raise DataError(
            f"data source {spec.source!r} has only {len(samples)} documents of at least {spec.min_tokens} tokens; "
            f"{spec.num_samples} were asked for (lower --num-samples)"
        )
    return samples


def as_token_lists(data: Iterable[Sequence[int] | torch.Tensor]) -> list[list[int]]:
    out = []
    for seq in data:
        ids = seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)
        if not ids:
            raise DataError("empty sequence in calibration data")
        out.append([int(x) for x in ids])
    if not out:
        raise DataError("no calibration sequences")
    return out


def batches(seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Right-padded batches ``(indices, input_ids, attention_mask)``; lengths may differ in a batch."""
    for b0 in range(0, len(seqs), batch_size):
        idx = list(range(b0, min(len(seqs), b0 + batch_size)))
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        yield idx, ids, mask
