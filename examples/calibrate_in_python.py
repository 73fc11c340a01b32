"""Score every attention head of a model from Python, and list the most inactive ones.

    python examples/calibrate_in_python.py                       # SmolLM2-135M, 16 WikiText-2 samples
    python examples/calibrate_in_python.py --num-samples 4 --seq-len 32
"""

from __future__ import annotations

import argparse

import prune_heads
from prune_heads.scoring.calibrate import calibrate
from prune_heads.scoring.score_defs import inactivity


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="Hub id, local directory, or 'smollm2' (the packaged demo model)")
    ap.add_argument("--data", default="wikitext2", help="calibration data spec (see prune_heads.data)")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--score", default="ahon_ln")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("-o", "--output", default=None, help="also save the scores directory here")
    args = ap.parse_args(argv)

    loaded = prune_heads.load_model(args.model)
    scores = calibrate(loaded.model, args.data, tokenizer=loaded.tokenizer, scores=[args.score, "awft"],
                                   num_samples=args.num_samples, seq_len=args.seq_len, batch_size=4)
    print(f"{scores.num_layers} layers x {scores.num_heads} heads, {scores.meta['num_tokens']} tokens")
    order = inactivity(scores.mean(args.score), args.score).flatten().argsort(descending=True)
    print(f"most inactive heads by {args.score} (layer, head, value):")
    for i in order[: args.top].tolist():
        layer, head = divmod(i, scores.num_heads)
        print(f"  {layer:3d} {head:3d}  {scores.mean(args.score)[layer, head]:.4f}")
    if args.output:
        scores.save(args.output, overwrite=True)
        print(f"saved -> {args.output}")


if __name__ == "__main__":
    main()
