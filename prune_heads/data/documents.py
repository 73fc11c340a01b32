"""Documents of a data spec, from many sources. Sources (``--data SPEC``):

- ``path/to/file.txt``: one document per WikiText article (`` = Title = `` lines) when the file has
  such headings, else per blank-line-separated block;
- ``file.jsonl`` (``text`` field, or ``file.jsonl#field``), ``file.parquet`` (same), or a
  ``datasets.save_to_disk`` folder (``folder#field``, ``folder@split``);
- ``hub:ID[?name=CONFIG&split=SPLIT&field=FIELD]``: a Hub dataset (where the Hub is reachable; the
  paper uses ``hub:HuggingFaceFW/fineweb-edu?name=sample-10BT``), streamed;
- ``task:NAME``: the documents (prompts) of an lm-eval task, offline when the data is installed;
- ``wikitext2``: the raw WikiText-2 test split, shipped with the package (``PRUNE_HEADS_WIKITEXT``
  overrides the file); ``wikitext2:hub`` reads the same split from the Hub (``Salesforce/wikitext``).

The Python API also takes pre-tokenised sequences.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from prune_heads.errors import DataError

from .wikitext import SPECS as WIKITEXT_SPECS
from .wikitext import split_text_documents, wikitext_documents

#: ``prefix -> documents(rest)`` for specs such as ``task:NAME``: stages that own a kind of document
#: register it here, so this module never imports them. A value may be ``"module:function"`` (imported
#: on first use, so registering costs nothing).
_SOURCES: dict[str, Callable[[str], Iterable[str]] | str] = {
    "task:": "prune_heads.evaluation.task_data:task_documents",
}


def offline_requested() -> bool:
    """True when the user switched the Hub off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    import os

    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def register_source(prefix: str, documents: Callable[[str], Iterable[str]] | str) -> None:
    """Make ``--data PREFIX...`` yield ``documents(rest of the spec)``."""
    _SOURCES[prefix] = documents


def _registered(source: str) -> Iterator[str] | None:
    for prefix, fn in _SOURCES.items():
        if source.startswith(prefix):
            if isinstance(fn, str):
                import importlib

                module, attr = fn.split(":")
                fn = getattr(importlib.import_module(module), attr)
                _SOURCES[prefix] = fn
            return iter(fn(source[len(prefix):]))
    return None


def read_text(path: Path) -> str:
    """A data file's text; a file that is not UTF-8 text is refused by name instead of a decode traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); give a "
                        ".txt/.jsonl file of text, a .parquet file or a save_to_disk folder") from None


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); one JSON object per line") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: JSON nested too deeply; one flat JSON object per line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: each line must be a JSON object with a text field")
        yield rec


def _split_field(spec: str, default_field: str = "text") -> tuple[str, str]:
    if "#" in spec:
        path, field = spec.rsplit("#", 1)
        return path, field
    return spec, default_field


def _texts_from_records(records: Iterable[dict[str, Any]], field: str, where: str) -> Iterator[str]:
    for rec in records:
        if field not in rec:
            raise DataError(f"{where}: record has no field {field!r} (fields: {', '.join(map(str, list(rec)[:20]))}); "
                            f"choose one with {where}#FIELD")
        value = rec[field]
        if isinstance(value, str) and value.strip():
            yield value


def iter_documents(source: str) -> Iterator[str]:
    """Yield the text documents of a data spec, in source order."""
    if source in WIKITEXT_SPECS:
        yield from wikitext_documents(source)
        return
    if source.startswith("hub:"):
        yield from _hub_documents(source[4:])
        return
    registered = _registered(source)
    if registered is not None:
        yield from registered
        return
    path_s, field = _split_field(source)
    split = None
    if "@" in path_s and not Path(path_s).exists():
        path_s, split = path_s.rsplit("@", 1)
    path = Path(path_s)
    if not path.exists():
        raise DataError(f"data source {source!r} not found (a file, a save_to_disk folder, hub:ID, task:NAME, wikitext2 or wikitext2:hub)")
    if path.is_dir():
        yield from _disk_documents(path, split, field)
    elif path.suffix == ".txt" or path.suffix == ".raw":
        yield from split_text_documents(read_text(path))
    elif path.suffix in (".jsonl", ".json"):
        yield from _texts_from_records(_json_lines(path), field, str(path))
    elif path.suffix == ".parquet":
        yield from _parquet_texts(path, field)
    else:
        raise DataError(f"unsupported data file {path.name}: use .txt, .jsonl, .parquet or a save_to_disk folder")


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    """The ``field`` column of a parquet file, read batch by batch with pyarrow (no cache copy); a file that is
    not parquet, or is damaged anywhere, is refused in one line instead of a pyarrow traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def refused(e: BaseException) -> DataError:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return DataError(f"{path} is not a readable parquet file ({type(e).__name__}: {first}); re-create it, or give "
                         "a .txt/.jsonl file or a save_to_disk folder")

    try:
        pf = pq.ParquetFile(str(path))
        names = pf.schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as e:
        raise refused(e) from None
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(names[:20])}); choose one with {path}#COLUMN")
    try:
        for batch in pf.iter_batches(columns=[field], batch_size=256):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str) and value.strip():
                    yield value
    except (pa.ArrowException, OSError, ValueError) as e:
        raise refused(e) from None


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
