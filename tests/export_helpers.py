"""Shared helpers of the export tests: build a tiny source checkpoint, compare with the masked oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from tiny_models import tiny_model

from prune_heads.model.masking import static_mask
from prune_heads.plan import Plan


def hidden_for(family: str, heads: int, head_dim: int) -> int:
    # Llama/Gemma configs require heads | hidden; phi3's tiny config forces heads * head_dim itself
    return heads * 8 if family in ("llama", "gemma2", "gemma3_text") else 32


def make_source(tmp: Path, family: str, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                seed: int = 0, max_shard_size: str | None = None, **extra):
    model = tiny_model(family, seed=seed, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       hidden=extra.pop("hidden", hidden_for(family, heads, head_dim)), **extra)
    src = tmp / f"src-{family}"
    model.save_pretrained(src, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model, src


def batch(vocab: int = 101, n: int = 3, t: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, t // 2:] = 0
    return ids, mask


@torch.no_grad()
def oracle_logits(model, plan: Plan, ids, mask) -> torch.Tensor:
    with static_mask(model, plan):
        return model(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def max_diff_vs_oracle(model, plan: Plan, exported, ids=None, mask=None) -> float:
    if ids is None:
        ids, mask = batch()
    ref = oracle_logits(model, plan, ids, mask)
    out = exported(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    return float((ref[keep] - out[keep]).abs().max())


def run_without_package(code: str, cwd: Path, timeout: int = 300) -> dict:
    """Run ``code`` in a fresh interpreter that cannot import prune_heads; it must print one JSON line.

    ``-I -S`` skips the venv's .pth files (the editable install's finder lives there) and PYTHONPATH;
    site-packages is added back by hand so transformers is importable.
    """
    site = sysconfig.get_paths()["purelib"]
    prelude = (
        "import sys\n"
        f"sys.path.append({site!r})\n"
        "try:\n    import prune_heads\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('prune_heads is importable in the fresh process')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_MODULES_CACHE"] = str(cwd / "hf_modules")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", prelude + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1])
