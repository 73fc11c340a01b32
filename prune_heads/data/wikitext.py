"""WikiText-2 (raw test split): where its text comes from, and how it splits into articles.

The ``wikitext2`` data spec must work on a fresh install with no network, so the split ships with the
package (``prune_heads/data/wikitext2/``, CC BY-SA 3.0, attributed in ``ATTRIBUTION.md`` there).
``PRUNE_HEADS_WIKITEXT`` overrides it with another copy of ``wiki.test.raw``; ``wikitext2:hub`` reads the
Hub copy (``Salesforce/wikitext``, ``wikitext-2-raw-v1``, split ``test``) instead, where the Hub is
reachable. All three yield the same documents.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from prune_heads.errors import DataError

#: the packaged copy of the raw test split
PACKAGED_WIKITEXT = Path(__file__).parent / "wikitext2" / "wiki.test.raw"
#: where the split lies under a data folder (``shared/data`` of the project's CI)
WIKITEXT_REL = Path("data") / "wikitext-2-raw" / "wiki.test.raw"
ENV_VAR = "PRUNE_HEADS_WIKITEXT"
HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
#: the ``wikitext2`` specs ``iter_documents`` understands
SPECS = ("wikitext2", "wikitext2:hub")
_HEADING = re.compile(r"^ ?= [^=](?:.*[^=])? = ?$")  # WikiText " = Title = " (trailing space optional)


def find_wikitext() -> Path:
    """The raw test split: ``PRUNE_HEADS_WIKITEXT`` when set, else the copy shipped with the package."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env)
        if not path.is_file():
            raise DataError(f"{ENV_VAR}={env} is not a file: point it at wiki.test.raw, or unset it to use the "
                            "copy shipped with prune-heads")
        return path
    if PACKAGED_WIKITEXT.is_file():
        return PACKAGED_WIKITEXT
    raise DataError(
        f"WikiText-2 is missing from this installation ({PACKAGED_WIKITEXT}): reinstall prune-heads with its package "
        f"data, set {ENV_VAR} to a copy of wiki.test.raw, or use --data wikitext2:hub where the Hub is reachable"
    )


def wikitext_documents(spec: str = "wikitext2") -> list[str]:
    """The articles of the split named by ``spec`` (``wikitext2`` or ``wikitext2:hub``)."""
    if spec == "wikitext2":
        from prune_heads.data.documents import read_text

        return split_text_documents(read_text(find_wikitext()))
    if spec == "wikitext2:hub":
        return split_text_documents(_hub_text())
    raise DataError(f"unknown WikiText spec {spec!r}; use one of {', '.join(SPECS)}")


def _hub_text() -> str:
    """The Hub copy holds one line per record; joined, they are the raw file's text."""
    import datasets

    name, config, split = HUB_DATASET
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise DataError(f"cannot load {name} ({config}, {split}) from the Hub ({type(e).__name__}: {e}); offline? "
                        "Use --data wikitext2 (shipped with prune-heads) instead") from e
    return "".join(ds["text"])


def split_text_documents(text: str) -> list[str]:
    """One document per WikiText article (top-level `` = Title = `` lines), else per blank-line block."""
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
