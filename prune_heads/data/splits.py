"""The two disjoint halves of a document source (``search`` and ``verify``), one definition for every stage.

Calibration (``calibration.split``), ``ppl:``/``kl:`` tasks and the held-out verification all cut a
source's documents with these functions and the same seed, so "held out" means the same documents
everywhere: a plan verified on the ``verify`` half was never calibrated, searched or fitted on it.
"""

from __future__ import annotations

import random
from typing import TypeVar

from prune_heads.errors import PruneHeadsError

T = TypeVar("T")
SPLITS = ("all", "search", "verify")


def select_indices(n: int, split: str, seed: int) -> list[int]:
    """Source positions of a split: ``all`` in order; ``search``/``verify``: halves of a seeded permutation."""
    if split == "all":
        return list(range(n))
    if split not in ("search", "verify"):
        raise PruneHeadsError(f"split must be 'search', 'verify' or 'all', not {split!r}")
    perm = list(range(n))
    random.Random(f"{seed}:text").shuffle(perm)
    half = n // 2
    return sorted(perm[:half] if split == "search" else perm[half:])


def select_documents(docs: list[T], split: str, seed: int) -> list[T]:
    """``all`` in source order; ``search``/``verify``: disjoint halves of a seeded permutation."""
    return [docs[i] for i in select_indices(len(docs), split, seed)]
