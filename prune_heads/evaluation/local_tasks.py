"""``mc:/path/file.jsonl``: a local multiple-choice task, run through lm-eval like the stock ones.

Each line is ``{"question": str, "choices": [str, ...], "answer": int}``. The prompt is
``"Question: {question}\\nAnswer:"`` (ARC's format) and each choice is scored as the continuation
``" " + choice``; the metric is accuracy (``acc``, and ``acc_norm``). The task is an lm-eval config
(``dataset_path: json`` with the absolute file), so lm-eval tokenises and scores it exactly as it
does its own tasks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prune_heads.errors import DataError

PROMPT = "Question: {{question}}\nAnswer:"


def check_mc_file(path: str | Path) -> int:
    """Validate the JSONL and return its number of questions; errors name the bad line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"multiple-choice file {p} not found (mc:/path/to/file.jsonl)")
    try:
        return _check_mc_lines(p)
    except UnicodeDecodeError:
        raise DataError(f"{p} is not UTF-8 text: is it the right file? (one JSON object per line)") from None


def _check_mc_lines(p: Path) -> int:
    n = 0
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e})") from e
            except RecursionError:
                raise DataError(f"{p}:{lineno}: JSON nested too deeply; one flat JSON object per line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{p}:{lineno}: each line must be a JSON object (question, choices, answer)")
            q, ch, a = rec.get("question"), rec.get("choices"), rec.get("answer")
            if not isinstance(q, str) or not q.strip():
                raise DataError(f"{p}:{lineno}: 'question' must be a non-empty string")
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                raise DataError(f"{p}:{lineno}: 'choices' must be a list of at least two non-empty strings")
            if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(ch):
                raise DataError(f"{p}:{lineno}: 'answer' must be the index (0..{len(ch) - 1}) of the right choice")
            n += 1
    if n == 0:
        raise DataError(f"{p} has no questions")
    return n


def mc_task_config(path: str | Path) -> dict[str, Any]:
    """The lm-eval task config (what a generated YAML would hold) for a local multiple-choice file."""
    p = Path(path).expanduser().resolve()
    check_mc_file(p)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()[:10]
    return {
        "task": f"mc_{''.join(c if c.isalnum() else '_' for c in p.stem)}_{digest}",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(p)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": PROMPT,
        "doc_to_target": "answer",
        "doc_to_choice": "choices",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0, "file_sha256_10": digest},
    }
