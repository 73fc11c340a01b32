"""WikiText-2 (raw test split): where to find it, and how its text splits into articles."""

from __future__ import annotations

import os
import re
from pathlib import Path

from prune_heads.errors import DataError

WIKITEXT_REL = Path("data") / "wikitext-2-raw" / "wiki.test.raw"
_HEADING = re.compile(r"^ ?= [^=](?:.*[^=])? = ?$")  # WikiText " = Title = " (trailing space optional)


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
