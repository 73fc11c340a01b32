"""Label-free budgets: perplexity (``ppl:DATASPEC``) and next-token KL from the unmasked model (``kl:DATASPEC``).

Documents come from ``prune_heads.data`` (one document per sample, truncated to ``seq_len``). Only
positions that predict a real next token count. Perplexity is ``exp(total NLL / tokens)``; KL is the
mean over those positions of ``KL(p_original || p_masked)``. Both get a bootstrap standard error over
documents (documents, not tokens, are the independent units).

The unmasked log-probabilities for KL are computed once. They are large (positions x vocabulary), so
beyond ``PRUNE_HEADS_KL_MEMORY_MB`` (default 1024) they are kept in a temporary folder instead of RAM.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from prune_heads.data import batches, doc_start_ids, iter_documents
from prune_heads.data.splits import select_documents, select_indices  # noqa: F401  (re-exported)
from prune_heads.errors import DataError, PruneHeadsError
from prune_heads.evaluation.paired import DocScores

DEFAULT_DOCS = {"ppl": 32, "kl": 16}
DEFAULT_SEQ_LEN = 256
MIN_TOKENS = 16
BOOTSTRAP = 1000


def tokenize(docs: list[str], tokenizer: Any, limit: int, seq_len: int,
             keys: list[Any] | None = None) -> list[list[int]]:
    """Token lists of the first ``limit`` documents with at least ``MIN_TOKENS`` tokens.

    With ``keys`` (one per document) the result is ``(key, ids)`` pairs, so callers know which
    documents were kept.
    """
    start = doc_start_ids(tokenizer)
    seqs: list[Any] = []
    for j, d in enumerate(docs):
        ids = (start + tokenizer(d, add_special_tokens=False).input_ids)[:seq_len]
        if len(ids) >= MIN_TOKENS:
            seqs.append(ids if keys is None else (keys[j], ids))
        if len(seqs) >= limit:
            break
    if not seqs:
        raise DataError(f"no document of at least {MIN_TOKENS} tokens")
    return seqs


def bootstrap_stderr(num: torch.Tensor, den: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
                     seed: int = 0) -> float | None:
    """Std of ``fn(sum num / sum den)`` over documents resampled with replacement."""
    d = num.numel()
    if d < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d, (BOOTSTRAP, d), generator=g)
    stats = fn(num.double()[idx].sum(1) / den.double()[idx].sum(1).clamp_min(1))
    return float(stats.std())


class _Reference:
    """The unmasked model's log-probs on the valid positions of each batch, in RAM or spilled to disk."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.items: list[torch.Tensor | Path] = []
        self.bytes = 0
        self._dir: Path | None = None

    def add(self, logp: torch.Tensor) -> None:
        size = logp.numel() * logp.element_size()
        if self.bytes + size > self.budget:
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix="prune-heads-kl-"))
                weakref.finalize(self, shutil.rmtree, str(self._dir), True)
            path = self._dir / f"{len(self.items)}.pt"
            torch.save(logp, path)
            self.items.append(path)
        else:
            self.items.append(logp)
            self.bytes += size

    def get(self, i: int) -> torch.Tensor:
        item = self.items[i]
        return torch.load(item) if isinstance(item, Path) else item

    @property
    def spilled(self) -> bool:
        return self._dir is not None


class TextBackend:
    """Perplexity or KL on documents of a data spec; the caller decides which mask is active."""

    def __init__(self, model: Any, tokenizer: Any, kind: str, spec: str, *, limit: int | None, split: str,
                 seed: int, batch_size: int, seq_len: int = DEFAULT_SEQ_LEN, exclude: Any = None) -> None:
        """``exclude``: document ids (``SPEC:POSITION``) to leave out, e.g. the calibration documents."""
        if kind not in ("ppl", "kl"):
            raise PruneHeadsError(f"unknown label-free metric {kind!r}")
        if not spec:
            raise PruneHeadsError(f"{kind}: needs a data spec, e.g. {kind}:wikitext2")
        self.model, self.kind, self.batch_size = model, kind, batch_size
        limit = limit or DEFAULT_DOCS[kind]
        source = list(iter_documents(spec))
        idx = select_indices(len(source), split, seed)
        skip = set(exclude or ())
        excluded = {i for i in idx if f"{spec}:{i}" in skip}
        if excluded:  # calibration documents: scoring them would not be held out
            idx = [i for i in idx if i not in excluded]
            if not idx:
                raise DataError(f"{kind}:{spec} ({split}) has no document left once the {len(excluded)} calibration "
                                "documents are left out; calibrate on fewer documents or on one half (--split search)")
        kept = tokenize([source[i] for i in idx], tokenizer, limit, seq_len, keys=idx)
        #: ``data:position`` of each document in the data source: stable ids for pairing and overlap checks
        self.doc_ids = [f"{spec}:{i}" for i, _ in kept]
        self.seqs = [ids for _, ids in kept]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.reference: _Reference | None = None
        self.task_config: dict[str, Any] = {
            "task": f"{kind}:{spec}", "kind": kind, "data": spec, "metric": "perplexity" if kind == "ppl" else "kl",
            "limit": limit, "split": split, "seed": seed, "seq_len": seq_len, "min_tokens": MIN_TOKENS,
            "num_docs": len(self.seqs), "num_tokens": sum(len(s) for s in self.seqs),
            "num_positions": sum(len(s) - 1 for s in self.seqs), "stderr": f"bootstrap over documents ({BOOTSTRAP})",
            "excluded_calibration_docs": len(excluded),
        }

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batches(self):
        dev = self._device()
        for idx, ids, mask in batches(self.seqs, self.batch_size, self.pad_id):
            yield idx, ids.to(dev), mask.to(dev)

    @torch.no_grad()
    def _logit_batches(self) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(idx, ids, mask, logits)`` of each batch under whatever mask is active (a model loaded whole)."""
        for idx, ids, mask in self._batches():
            yield idx, ids, mask, self.model(input_ids=ids, attention_mask=mask).logits

    @staticmethod
    @torch.no_grad()
    def _logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log-probs ``(P, V)`` at valid positions (row-major) and the row of each position."""
        logits = logits[:, :-1].float()
        valid = mask[:, 1:].bool()
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(valid)[valid]
        return torch.log_softmax(logits[valid], dim=-1), rows

    def prepare(self) -> None:
        """Compute the unmasked log-probs once (KL only), before any mask is entered."""
        if self.kind != "kl" or self.reference is not None:
            return
        budget = int(float(os.environ.get("PRUNE_HEADS_KL_MEMORY_MB", "1024")) * 2**20)
        ref = _Reference(budget)
        for _, ids, mask, logits in self._logit_batches():
            ref.add(self._logprobs(logits, ids, mask)[0].cpu())
        self.reference = ref
        self.task_config["reference_storage"] = "disk" if ref.spilled else "memory"

    def run(self, enter: Callable[[], contextlib.AbstractContextManager], per_input: bool = False
            ) -> tuple[float, float | None, int, bool, dict, DocScores]:
        """Evaluate under ``enter()``; batches carry attention masks, so ``per_input`` needs nothing here."""
        n_docs = len(self.seqs)
        num = torch.zeros(n_docs, dtype=torch.float64)
        den = torch.zeros(n_docs, dtype=torch.float64)
        with enter():
            for b, (idx, ids, mask, logits) in enumerate(self._logit_batches()):
                logp, rows = self._logprobs(logits, ids, mask)
                del logits
                if self.kind == "ppl":
                    targets = ids[:, 1:][mask[:, 1:].bool()]
                    per_pos = -logp.gather(1, targets[:, None]).squeeze(1)
                else:
                    assert self.reference is not None
                    ref = self.reference.get(b).to(logp.device)
                    per_pos = (ref.exp() * (ref - logp)).sum(-1).clamp_min(0)
                doc = torch.tensor(idx, device=rows.device)[rows]
                num.index_add_(0, doc.cpu(), per_pos.double().cpu())
                den.index_add_(0, doc.cpu(), torch.ones_like(per_pos, dtype=torch.float64).cpu())
        total = float(num.sum() / den.sum())
        if self.kind == "ppl":
            value = math.exp(total)
            stderr = bootstrap_stderr(num, den, torch.exp)
            details = {"nll_per_token": total}
        else:
            value = total
            stderr = bootstrap_stderr(num, den, lambda x: x)
            details = {}
        docs = DocScores(tuple(self.doc_ids), num.numpy(), "exp_ratio" if self.kind == "ppl" else "ratio",
                         weights=den.numpy())
        return value, stderr, int(den.sum()), False, details, docs


class StreamedTextBackend(TextBackend):
    """``TextBackend`` on a layer-sequential skeleton (``model.sequential_engine``): each evaluation (the KL
    reference included) is one streamed pass over the documents, every decoder layer read once from the shards.

    The mask and compensation the evaluator enters act on the skeleton's modules, so each probe computes what
    the model loaded whole computes (``tests/test_select_sequential.py``)."""

    def __init__(self, streamed: Any, tokenizer: Any, kind: str, spec: str, **kwargs: Any) -> None:
        self.streamed = streamed
        super().__init__(streamed.model, tokenizer, kind, spec, **kwargs)
        self.task_config["engine"] = "sequential"

    def _device(self) -> torch.device:
        return self.streamed.device

    def _logit_batches(self) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        yield from self.streamed.batch_logits(list(self._batches()))
