"""``passkey:LEN`` (and ``passkey:LEN:NEEDLES``): synthetic long-context retrieval, seeded and offline.

Each document is a prompt of exactly ``LEN`` tokens: an instruction, filler text repeated to length, a
needle ("The pass key is 71432. Remember it. 71432 is the pass key.") at a fixed depth of the filler,
and the question "What is the pass key? The pass key is". The model passes the document when greedy
decoding would write the key: the answer's tokens are appended and the document scores 1 when every answer
token is the model's argmax given everything before it (teacher forcing: the same decision as greedy
generation, in one forward and with no cache). The metric is exact-match accuracy, with a 0/1 score per
document, so drops are paired (``evaluation.paired``) like any accuracy.

With ``NEEDLES`` > 1 (at most ``len(LABELS)``) the prompt holds that many keys, each with a colour
("The red pass key is ..."), spread over the filler, and the question asks for one of them: the others
are distractors (RULER's multi-key needle).

Documents come from a fixed pool of ``POOL`` ids; the ``search``/``verify`` halves are the seeded split
every stage uses (``data.splits``), so they are disjoint, and a document's keys, depth and asked label
depend only on ``(seed, id, LEN)``. The depth of document ``i`` is ``DEPTHS[i % len(DEPTHS)]`` (the
fraction of the filler that comes before the needle). The prompt's pieces are tokenised separately and
joined as token ids, so the length is exact whatever the tokenizer; a ``LEN`` too short for the fixed
parts, a tokenizer that cannot write the key's digits, or a ``LEN`` beyond the model's context is refused
with one line.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prune_heads.errors import PruneHeadsError

POOL = 1000
DEFAULT_DOCS = 20
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
LABELS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
KEY_DIGITS = 5

INTRO = "There is a pass key hidden in this text. Find it and remember it."
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The {label}pass key is {key}. Remember it. {key} is the {label}pass key."
QUESTION = " What is the {label}pass key? The {label}pass key is"


def parse_passkey(spec: str) -> tuple[int, int]:
    """``LEN`` or ``LEN:NEEDLES`` -> ``(length, needles)``; one line for anything else."""
    parts = str(spec).split(":")
    try:
        if len(parts) > 2:
            raise ValueError
        length, needles = int(parts[0]), int(parts[1]) if len(parts) == 2 else 1
    except ValueError:
        raise PruneHeadsError(f"passkey:{spec}: expected passkey:LENGTH or passkey:LENGTH:NEEDLES with integers, "
                              "e.g. passkey:2048 or passkey:2048:4") from None
    if length < 16:
        raise PruneHeadsError(f"passkey:{spec}: the length must be at least 16 tokens")
    if not 1 <= needles <= len(LABELS):
        raise PruneHeadsError(f"passkey:{spec}: between 1 and {len(LABELS)} needles, got {needles}")
    return length, needles


def task_length(task: str | None) -> int | None:
    """The prompt length a ``passkey:LEN[:NEEDLES]`` task names (None for other tasks, or one ``parse_passkey``
    will refuse: the checks that read it run before the task is parsed)."""
    if task and task.startswith("passkey:"):
        head = task.split(":")[1]
        return int(head) if head.isdigit() else None
    return None


@dataclass
class PasskeyDoc:
    """One prompt: its tokens (exactly the requested length), the answer's tokens, and where the needles sit."""

    id: str
    prompt: list[int]
    answer: list[int]
    key: str
    depth: float
    #: token position where each needle starts, and which of them is asked for
    needle_starts: list[int]
    asked: int


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _check_key(tokenizer: Any, key: str, ids: list[int], spec: str) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids) or key not in tokenizer.decode(ids):
        raise PruneHeadsError(f"passkey:{spec}: this tokenizer cannot write the key's digits ({key!r} does not "
                              "survive encoding and decoding); use another task")


def build_document(tokenizer: Any, length: int, needles: int, index: int, seed: int, spec: str,
                   start: list[int] | None = None) -> PasskeyDoc:
    """Document ``index`` of ``passkey:LENGTH[:NEEDLES]`` under ``seed``: deterministic, exactly ``length`` tokens."""
    if start is None:
        from prune_heads.data import doc_start_ids

        start = doc_start_ids(tokenizer)
    rng = random.Random(f"passkey:{seed}:{length}:{needles}:{index}")
    keys: list[str] = []
    while len(keys) < needles:
        k = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
        if k not in keys:
            keys.append(k)
    labels = [""] if needles == 1 else [f"{c} " for c in rng.sample(LABELS, needles)]
    asked = rng.randrange(needles)
    depth = DEPTHS[index % len(DEPTHS)]
    depths = sorted(((depth + m / needles) % 1.0, m) for m in range(needles))
    intro, filler = _encode(tokenizer, INTRO), _encode(tokenizer, FILLER)
    pieces = {m: _encode(tokenizer, NEEDLE.format(label=labels[m], key=keys[m])) for m in range(needles)}
    question = _encode(tokenizer, QUESTION.format(label=labels[asked]))
    answer = _encode(tokenizer, " " + keys[asked])
    _check_key(tokenizer, keys[asked], answer, spec)
    fixed = len(start) + len(intro) + sum(len(p) for p in pieces.values()) + len(question)
    room = length - fixed
    if room < 0 or not filler:
        raise PruneHeadsError(f"passkey:{spec}: {length} tokens cannot hold the prompt's fixed parts ({fixed} tokens "
                              f"with this tokenizer); use a length of at least {fixed}")
    text = (filler * (room // len(filler) + 1))[:room]
    prompt, starts, used = list(start) + intro, [0] * needles, 0
    for d, m in depths:
        cut = round(d * room)
        prompt += text[used:cut]
        used = cut
        starts[m] = len(prompt)
        prompt += pieces[m]
    prompt += text[used:] + question
    assert len(prompt) == length
    return PasskeyDoc(f"passkey:{spec}:{index}", prompt, answer, keys[asked], depth, starts, asked)


class PasskeyBackend:
    """Exact-match pass-key retrieval on ``limit`` seeded documents; the caller decides which mask is active."""

    def __init__(self, model: Any, tokenizer: Any, spec: str, *, limit: int | None, split: str, seed: int,
                 batch_size: int) -> None:
        from prune_heads.data import doc_start_ids
        from prune_heads.data.splits import select_indices
        from prune_heads.evaluation.perplexity import model_context

        length, needles = parse_passkey(spec)
        self.model, self.batch_size = model, batch_size
        limit = limit or DEFAULT_DOCS
        if limit > POOL // 2:
            raise PruneHeadsError(f"passkey: at most {POOL // 2} documents per split, got --limit {limit}")
        index = select_indices(POOL, split, seed)[:limit]
        start = doc_start_ids(tokenizer)
        self.docs = [build_document(tokenizer, length, needles, i, seed, spec, start) for i in index]
        context = model_context(model)
        longest = length + max(len(d.answer) for d in self.docs)
        if context is not None and longest > context:
            raise PruneHeadsError(f"passkey:{spec} needs {longest} tokens with its answer, beyond the model's context "
                                  f"of {context} tokens (max_position_embeddings); use a length of at most "
                                  f"{context - (longest - length)}")
        self.doc_ids = [d.id for d in self.docs]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.task_config: dict[str, Any] = {
            "task": f"passkey:{spec}", "kind": "passkey", "metric": "exact_match", "seq_len": length,
            "needles": needles, "limit": limit, "split": split, "seed": seed, "depths": list(DEPTHS),
            "num_docs": len(self.docs), "scoring": "greedy exact match of the key (teacher-forced argmax)",
        }

    def prepare(self) -> None:
        """Nothing to precompute."""

    def _correct(self, docs: list[PasskeyDoc]) -> list[bool]:
        import torch

        from prune_heads.data import batches

        seqs = [d.prompt + d.answer for d in docs]
        length = len(docs[0].prompt)
        dev = next(self.model.parameters()).device
        out: list[bool] = []
        for idx, ids, mask in batches(seqs, len(seqs), self.pad_id):
            keep = ids.shape[1] - length + 1  # logits from the question's last token on
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), logits_to_keep=keep).logits
            pred = logits[:, -keep:].argmax(-1).cpu()
            for r, i in enumerate(idx):
                ans = torch.tensor(docs[i].answer)
                out.append(bool((pred[r, : len(ans)] == ans).all()))
        return out

    def run(self, enter: Callable[[], contextlib.AbstractContextManager], per_input: bool = False
            ) -> tuple[float, float | None, int, bool, dict, Any]:
        import numpy as np

        from prune_heads.evaluation.paired import DocScores

        hits: list[bool] = []
        with enter():
            for b0 in range(0, len(self.docs), self.batch_size):
                hits += self._correct(self.docs[b0:b0 + self.batch_size])
        values = np.asarray(hits, dtype=np.float64)
        n = len(values)
        acc = float(values.mean())
        stderr = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else None
        by_depth = {f"{d:g}": float(values[[doc.depth == d for doc in self.docs]].mean())
                    for d in DEPTHS if any(doc.depth == d for doc in self.docs)}
        return acc, stderr, n, True, {"by_depth": by_depth}, DocScores(tuple(self.doc_ids), values, "mean")
