"""Documents -> token-id samples, and right-padded batches of them.

A sample is one document, truncated to ``seq_len`` tokens, starting at the document's start with the
model's usual document-start token.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prune_heads.errors import DataError


@dataclass
class DataSpec:
    """How calibration samples were made; stored in the scores file."""

    source: str
    num_samples: int | None = 128
    seq_len: int = 512
    seed: int = 0
    min_tokens: int = 16
    #: ``all`` documents, or the ``search``/``verify`` half (``data.splits``, seeded by ``seed``)
    split: str = "all"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
    docs: Iterable[str], tokenizer: Any, spec: DataSpec, max_context: int | None = None,
    positions: list[int] | None = None,
) -> list[list[int]]:
    """Pick ``spec.num_samples`` documents (seeded) and tokenise each, truncated to ``spec.seq_len``.

    ``positions``: when given, the index in ``docs`` of every document taken is appended to it.
    """
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
        if positions is not None:
            positions.append(i)
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


def recorded_documents(data_meta: Any) -> list[str]:
    """The document ids a scores file's ``data`` record names (``calibration_sequences(documents=)``); empty
    for records made before documents were recorded."""
    return list(data_meta.get("documents") or []) if isinstance(data_meta, dict) else []


def calibration_sequences(spec: DataSpec, tokenizer: Any, model: Any = None,
                          documents: list[str] | None = None) -> list[list[int]]:
    """The token sequences of ``spec``: the one way every stage builds calibration data.

    ``model`` (optional) bounds ``seq_len`` by its context length. ``documents``: when given, the id
    ``SOURCE:POSITION`` of every document used is appended to it, in the form ``ppl:``/``kl:`` tasks name
    their documents, so evaluations can leave the calibration documents out.
    """
    from prune_heads.data.documents import iter_documents

    context = None
    if model is not None:
        from prune_heads.model.adapters import get_adapter

        context = getattr(get_adapter(model).text_config(model.config), "max_position_embeddings", None)
    from prune_heads.data.splits import select_indices

    docs = list(iter_documents(spec.source))
    index = select_indices(len(docs), spec.split, spec.seed)
    taken: list[int] = []
    seqs = tokenize_documents([docs[i] for i in index], tokenizer, spec, context, positions=taken)
    if documents is not None:
        documents.extend(f"{spec.source}:{index[j]}" for j in taken)
    return seqs
