"""Long context on SmolLM2-135M-Instruct (CPU): does a plan chosen on 256-token windows hold at 1k-2k tokens?

    python benchmarks/bench_long_context.py                                  # 256, 1024, 2048 (slow on a CPU)
    python benchmarks/bench_long_context.py --lengths 256,1024 --passkey-docs 4 --ppl-windows 3

The plan is the demo's unguarded one rebuilt without a search: the ``--heads`` (default 75) heads that
``lsq_error`` ranks first (free policy, one head per layer kept), compensated by ``lsq`` from the moments of
the demo's calibration (24 WikiText-2 articles of 256 tokens). At each length it measures, on the original
and on the compensated masked original (the model the export writes, exactly):

- perplexity on WikiText-2 windows scored on their last ``--score-last`` tokens (``ppl:`` with
  ``score_last``: the same scored tokens at every length, calibration articles left out), as the ratio
  pruned / original with its paired one-sided 90% bounds;
- ``passkey:LEN`` exact match (the same keys and depths for both models), with the paired drop.

Writes ``benchmarks/results/long_context.md`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results" / "long_context.md"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="256,1024,2048")
    ap.add_argument("--heads", type=int, default=75, help="heads the plan removes (the demo's unguarded plan: 75)")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--score-last", type=int, default=128)
    ap.add_argument("--passkey-docs", type=int, default=6)
    ap.add_argument("--split", default="search", choices=("search", "verify"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args()


def demo_plan(lm, heads: int):
    """The demo's calibration, the ``heads`` first units of ``lsq_error`` and their lsq compensation."""
    from prune_heads import calibrate
    from prune_heads.compensation.greedy import ensure_lsq_scores
    from prune_heads.compensation.plans import compensator_for
    from prune_heads.compensation.spec import CompensationSpec
    from prune_heads.model.adapters import get_adapter
    from prune_heads.selection.policies import candidate_units, removal_mask
    from prune_heads.selection.static import ranking

    scores = calibrate(lm.model, "wikitext2", tokenizer=lm.tokenizer, num_samples=24, seq_len=256, batch_size=8,
                       scores=["ahon_ln"], progress=False)
    scores = ensure_lsq_scores(scores, lm.model, "lsq_error")
    layout = get_adapter(lm.model).layout(lm.model.config)
    units = candidate_units(ranking(scores, "lsq_error", layout), layout, "free", 1, False)
    mask = removal_mask(units, heads, layout)
    comp = compensator_for(CompensationSpec(mode="lsq"), scores=scores, model=lm.model)
    return scores, mask, comp


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from prune_heads import load_model
    from prune_heads.data.tokens import recorded_documents
    from prune_heads.evaluation import make_evaluator
    from prune_heads.evaluation.paired import paired_drop

    t0 = time.time()
    load = os.getloadavg()
    lm = load_model("smollm2")
    scores, mask, comp = demo_plan(lm, args.heads)
    exclude = recorded_documents(scores.meta.get("data"))
    rows = []
    for L in [int(x) for x in args.lengths.split(",")]:
        ppl = make_evaluator(lm.model, lm.tokenizer, "ppl:wikitext2", split=args.split, limit=args.ppl_windows,
                             seq_len=L, score_last=args.score_last, batch_size=1, compensation=comp,
                             exclude_docs=exclude)
        pb, pp = ppl(None), ppl(mask)
        pd = paired_drop(pb, pp, relative=True, confidence=0.9)
        key = make_evaluator(lm.model, lm.tokenizer, f"passkey:{L}", split=args.split, limit=args.passkey_docs,
                             batch_size=1, compensation=comp)
        kb, kp = key(None), key(mask)
        kd = paired_drop(kb, kp, confidence=0.9)
        row = (f"| {L} | {pb.value:.2f} | {pp.value:.2f} | x{1 + pd.estimate:.3f} (90% bounds x{1 + pd.lower:.3f} .. "
               f"x{1 + pd.upper:.3f}) | {int(kb.value * kb.n)}/{kb.n} | {int(kp.value * kp.n)}/{kp.n} | "
               f"{kd.estimate:+.2f} (upper {kd.upper:.2f}) | {time.time() - t0:.0f} |")
        rows.append(row)
        print(row, flush=True)
    cmd = "python benchmarks/bench_long_context.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "## Long context: the unguarded demo plan at 256 to 2048 tokens — SmolLM2-135M-Instruct, CPU",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, {args.threads} thread(s), torch {torch.__version__}, "
        f"float32; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} when it started (a shared machine).  ",
        f"Plan: the {args.heads} heads `lsq_error` ranks first (free policy), `lsq`-compensated from the demo's "
        "calibration (24 WikiText-2 articles x 256 tokens): the demo's plan before the guard, rebuilt without its "
        "search. Both models scored on the same windows and keys (the compensated masked original is what the "
        f"export writes). Perplexity: {args.ppl_windows} WikiText-2 windows ({args.split} half, calibration "
        f"articles left out) scored on their last {args.score_last} tokens, the same tokens at every length. "
        f"Pass key: `passkey:LEN`, {args.passkey_docs} keys of the {args.split} half.",
        "",
        "| context | ppl original | ppl pruned | ratio (paired) | passkey original | passkey pruned | "
        "paired drop (90% upper) | s elapsed |",
        "|---:|---:|---:|---|---:|---:|---|---:|",
        *rows,
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
