"""Register your own score function and compute it in the same single calibration pass.

A custom score receives one layer's raw per-sequence statistics (``(B, H)`` tensors keyed by raw
score id: awft, aeqd, ftvvn, avvn, lthon, ahon, fhon, confidence) and returns a ``(B, H)`` tensor.

    python examples/custom_score.py --num-samples 4 --seq-len 32
"""

from __future__ import annotations

import argparse

import torch

import prune_heads
from prune_heads.scoring.calibrate import calibrate


def output_per_value(raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """How much of its values a head passes on: average output norm over average value norm.

    A head that attends to a sink token writes little even when its values are large, so a low ratio
    is a hint of inactivity that does not depend on the layer's scale.
    """
    return raw["ahon"] / raw["avvn"].clamp_min(1e-12)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args(argv)

    prune_heads.register_score("output_per_value", output_per_value, inactive_when="low")
    loaded = prune_heads.load_model(args.model)
    scores = calibrate(loaded.model, "wikitext2", tokenizer=loaded.tokenizer,
                                   scores=["output_per_value", "ahon", "avvn"],
                                   num_samples=args.num_samples, seq_len=args.seq_len, batch_size=4)
    custom = scores.mean("output_per_value")
    # a score is computed per sequence, then averaged: the same as dividing the per-sample raw values
    reference = (scores.per_sample("ahon") / scores.per_sample("avvn")).mean(0)
    print(f"output_per_value: mean {custom.mean():.4f}, min {custom.min():.4f} at head "
          f"{divmod(int(custom.argmin()), scores.num_heads)}")
    print(f"max |custom - per-sample reference|: {(custom - reference).abs().max():.2e}")
    print(f"max |custom - ratio of the means|: {(custom - scores.mean('ahon') / scores.mean('avvn')).abs().max():.2e}")


if __name__ == "__main__":
    main()
