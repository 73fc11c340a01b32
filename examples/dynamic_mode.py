"""The paper's dynamic mode: zero, for each input, the heads whose score crosses a threshold.

The threshold is read off the calibration scores' quantiles so that a chosen fraction of heads is
marked; the run then reports how many heads were really zeroed and what it cost in perplexity.

    python examples/dynamic_mode.py --num-samples 4 --seq-len 32 --eval-docs 4
"""

from __future__ import annotations

import argparse
import contextlib

import prune_heads
from prune_heads.evaluation import make_evaluator
from prune_heads.scoring.calibrate import calibrate


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--score", default="ahon_ln")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-docs", type=int, default=16)
    args = ap.parse_args(argv)

    loaded = prune_heads.load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    scores = calibrate(model, "wikitext2", tokenizer=tok, scores=[args.score],
                                   num_samples=args.num_samples, seq_len=args.seq_len, batch_size=4)
    tau = prune_heads.threshold_for_fraction(scores, args.score, args.fraction)
    print(f"threshold for {args.fraction:.0%} of heads by {args.score}: {tau:.4f}")

    evaluator = make_evaluator(model, tok, "ppl:wikitext2", limit=args.eval_docs, split="verify")
    base = evaluator(None)
    runs: list = []

    @contextlib.contextmanager
    def dynamic(m):  # the evaluator enters this around its forward passes
        with prune_heads.dynamic_mask(m, args.score, tau) as stats:
            runs.append(stats)
            yield stats

    masked = evaluator(context=dynamic)
    zeroed = sum(s.zeroed for s in runs) / max(1, sum(s.total for s in runs))
    print(f"perplexity {base.value:.2f} -> {masked.value:.2f} with {zeroed:.1%} of (input, head) pairs zeroed")


if __name__ == "__main__":
    main()
