"""Label-free budgets: perplexity (``ppl:DATASPEC``) and next-token KL from the unmasked model (``kl:DATASPEC``).

Documents come from ``prune_heads.data`` (one document per sample, truncated to ``seq_len``). Only
positions that predict a real next token count.

Long context (``score_last=N``): the documents are joined into one token stream (each starting with the
document-start token) and each window of ``seq_len`` tokens is scored only on its last ``N`` tokens. The
windows' ends are fixed points of the stream that do not depend on ``seq_len`` (``window_ends``), so two
lengths score exactly the same tokens and only the context before them changes: a length comparison is
paired, token for token. ``seq_len`` beyond the model's context (``max_position_embeddings``) is refused. Perplexity is ``exp(total NLL / tokens)``; KL is the
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


def model_context(model: Any) -> int | None:
    """The model's context length (``max_position_embeddings``, read through its family adapter), or None."""
    from prune_heads.model.adapters import get_adapter

    value = getattr(get_adapter(model).text_config(model.config), "max_position_embeddings", None)
    return int(value) if value else None


def check_seq_len(seq_len: int, context: int | None, what: str = "--seq-len") -> None:
    """One line for a length the model cannot take."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise PruneHeadsError(f"{what} must be an integer of at least 2 tokens, got {seq_len!r}")
    if context is not None and seq_len > context:
        raise PruneHeadsError(f"{what} {seq_len} is beyond the model's context of {context} tokens "
                              f"(max_position_embeddings); use at most {context}")


def window_ends(stream_len: int, limit: int, score_last: int, anchor: int) -> list[int]:
    """Ends (exclusive stream positions) of ``limit`` scored blocks of ``score_last`` tokens, spread evenly over
    the stream after its first ``anchor`` tokens.

    Nothing here depends on the window length: every ``seq_len`` up to ``anchor + score_last`` scores the same
    blocks (a window is the ``seq_len`` tokens ending at an end). Blocks do not overlap.
    """
    first = anchor + score_last
    room = stream_len - first
    n = min(limit, room // score_last + 1) if room >= 0 else 0
    if n < 1:
        return []
    if n == 1:
        return [first]
    step = room // (n - 1)
    return [first + k * step for k in range(n)]


class TextBackend:
    """Perplexity or KL on documents of a data spec; the caller decides which mask is active."""

    def __init__(self, model: Any, tokenizer: Any, kind: str, spec: str, *, limit: int | None, split: str,
                 seed: int, batch_size: int, seq_len: int | None = None, exclude: Any = None,
                 score_last: int | None = None) -> None:
        """``exclude``: document ids (``SPEC:POSITION``) to leave out, e.g. the calibration documents.

        ``score_last``: windows of ``seq_len`` tokens cut from the joined documents, scored on their last
        ``score_last`` tokens only (the same tokens at every ``seq_len``; see the module docs).
        """
        if kind not in ("ppl", "kl"):
            raise PruneHeadsError(f"unknown label-free metric {kind!r}")
        if not spec:
            raise PruneHeadsError(f"{kind}: needs a data spec, e.g. {kind}:wikitext2")
        seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
        context = model_context(model)
        check_seq_len(seq_len, context)
        if score_last is not None and not 1 <= score_last < seq_len:
            raise PruneHeadsError(f"--score-last must be between 1 and --seq-len - 1 ({seq_len - 1}), got {score_last}")
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
        #: the first target position scored in each sequence (1: every predicted token)
        self.score_from: list[int]
        if score_last is None:
            kept = tokenize([source[i] for i in idx], tokenizer, limit, seq_len, keys=idx)
            #: ``data:position`` of each document in the data source: stable ids for pairing and overlap checks
            self.doc_ids = [f"{spec}:{i}" for i, _ in kept]
            self.seqs = [ids for _, ids in kept]
            self.score_from = [1] * len(self.seqs)
        else:
            self._windows(source, idx, tokenizer, spec, limit, seq_len, score_last, context)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.reference: _Reference | None = None
        self.task_config: dict[str, Any] = {
            "task": f"{kind}:{spec}", "kind": kind, "data": spec, "metric": "perplexity" if kind == "ppl" else "kl",
            "limit": limit, "split": split, "seed": seed, "seq_len": seq_len, "min_tokens": MIN_TOKENS,
            "num_docs": len(self.seqs), "num_tokens": sum(len(s) for s in self.seqs),
            "num_positions": sum(len(s) - 1 for s in self.seqs), "stderr": f"bootstrap over documents ({BOOTSTRAP})",
            "excluded_calibration_docs": len(excluded),
        }
        if score_last is not None:
            self.task_config.update(score_last=score_last, num_positions=len(self.seqs) * score_last,
                                    windows="joined documents; window ends independent of seq_len",
                                    context_anchor=self.anchor)

    def _windows(self, source: list[str], idx: list[int], tokenizer: Any, spec: str, limit: int, seq_len: int,
                 score_last: int, context: int | None) -> None:
        """Windows of ``seq_len`` tokens ending at ``window_ends`` of the joined documents."""
        start = doc_start_ids(tokenizer)
        stream: list[int] = []
        owner: list[tuple[int, int]] = []  # (document position, offset of the document's first token)
        for i in idx:
            owner.append((i, len(stream)))
            stream += start + tokenizer(source[i], add_special_tokens=False).input_ids
        # the scored blocks sit after the longest context the model takes (or what the data leave for it)
        anchor = context if context is not None else seq_len
        anchor = max(0, min(anchor, len(stream) - limit * score_last))
        if seq_len > anchor + score_last:
            raise DataError(f"{self.kind}:{spec} has {len(stream)} tokens, too few for {limit} windows of {seq_len} "
                            f"scored on their last {score_last}: use more data, a lower --limit or a shorter --seq-len")
        ends = window_ends(len(stream), limit, score_last, anchor)
        starts = [o for _, o in owner]
        import bisect

        self.anchor = anchor
        self.seqs = [stream[e - seq_len:e] for e in ends]
        self.score_from = [seq_len - score_last] * len(ends)
        self.doc_ids = []
        for e in ends:
            d = bisect.bisect_right(starts, e - 1) - 1
            self.doc_ids.append(f"{spec}:{owner[d][0]}@{e - owner[d][1]}")

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batches(self):
        dev = self._device()
        for idx, ids, mask in batches(self.seqs, self.batch_size, self.pad_id):
            yield idx, ids.to(dev), mask.to(dev)

    def _keep(self, idx: list[int], ids: torch.Tensor) -> int:
        """Logit positions a batch needs: from the first scored target on (windows of long context: positions x
        vocabulary would not fit; batches hold sequences of one length then, so a suffix suffices)."""
        return ids.shape[1] - min(self.score_from[i] for i in idx) + 1

    @torch.no_grad()
    def _logit_batches(self) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(idx, ids, mask, logits)`` of each batch under whatever mask is active (a model loaded whole); the
        logits of the last ``_keep`` positions at least."""
        for idx, ids, mask in self._batches():
            yield idx, ids, mask, self.model(input_ids=ids, attention_mask=mask,
                                             logits_to_keep=self._keep(idx, ids)).logits

    def _scored(self, idx: list[int], mask: torch.Tensor) -> torch.Tensor:
        """``(B, T-1)``: which targets ``ids[:, 1:]`` count (real tokens from each sequence's ``score_from``)."""
        valid = mask[:, 1:].bool()
        pos = torch.arange(1, mask.shape[1], device=mask.device)
        first = torch.tensor([self.score_from[i] for i in idx], device=mask.device)
        return valid & (pos[None, :] >= first[:, None])

    def _aligned(self, idx: list[int], ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, scored, targets)``, each ``(B, K)`` over the ``K`` positions whose next token the kept
        logits predict (views of the inputs: nothing is copied)."""
        scored = self._scored(idx, mask)
        logits = logits[:, logits.shape[1] - self._keep(idx, ids):][:, :-1]
        scored = scored[:, scored.shape[1] - logits.shape[1]:]
        targets = ids[:, 1:][:, ids.shape[1] - 1 - logits.shape[1]:]
        return logits, scored, targets

    @torch.no_grad()
    def _logprobs(self, idx: list[int], ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log-probs ``(P, V)`` at scored positions (row-major), the row of each position and its target."""
        logits, scored, targets = self._aligned(idx, ids, mask, logits)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(scored)[scored]
        return torch.log_softmax(logits.float()[scored], dim=-1), rows, targets[scored]

    @torch.no_grad()
    def _nll(self, idx: list[int], ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(per-position NLL, row)`` at scored positions, in ``_logprobs``'s order and with its values, one
        sequence at a time.

        Why: ``_logprobs`` holds the float32 log-probs of every scored position of the batch at once, with a
        float32 copy of the logits beside them: three ``positions x vocab`` tensors, 3 GiB for 8 x 256 tokens of
        a 128k vocabulary (Llama-3), more than a decoder layer of a 1B. Perplexity needs only the target's
        log-prob, so each sequence's rows go through ``log_softmax`` alone (a row-wise op: the same values).
        """
        logits, scored, targets = self._aligned(idx, ids, mask, logits)
        out, rows = [], []
        for b in range(ids.shape[0]):
            lp = torch.log_softmax(logits[b][scored[b]].float(), dim=-1)
            out.append(-lp.gather(1, targets[b][scored[b]][:, None]).squeeze(1))
            rows.append(torch.full((len(out[-1]),), b, dtype=torch.long, device=ids.device))
        return torch.cat(out), torch.cat(rows)

    def prepare(self) -> None:
        """Compute the unmasked log-probs once (KL only), before any mask is entered."""
        if self.kind != "kl" or self.reference is not None:
            return
        budget = int(float(os.environ.get("PRUNE_HEADS_KL_MEMORY_MB", "1024")) * 2**20)
        ref = _Reference(budget)
        for idx, ids, mask, logits in self._logit_batches():
            ref.add(self._logprobs(idx, ids, mask, logits)[0].cpu())
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
                if self.kind == "ppl":
                    per_pos, rows = self._nll(idx, ids, mask, logits)
                    del logits
                else:
                    logp, rows, _ = self._logprobs(idx, ids, mask, logits)
                    del logits
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
