"""Every selector on SmolLM2-135M under the same budget (thin wrapper over ``compare-selectors``).

Writes ``benchmarks/results/compare_selectors.md`` (the table) and, beside it,
``compare_selectors/`` (plot, plans, JSON). Defaults are small so it runs on a 2-core CPU; raise
``--limit`` / ``--calib-samples`` for figures worth quoting.

    python benchmarks/compare_selectors.py [--task arc_easy --max-drop 0.01 --limit 50]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent


def main() -> None:
    from prune_heads.calibrate import calibrate
    from prune_heads.cli.compare_cmd import run_comparison
    from prune_heads.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--max-drop", default="0.01")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--ppl-data", default="wikitext2")
    ap.add_argument("--ppl-limit", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--scores", default="awft_ln,ahon_ln,lthon_hn")
    args = ap.parse_args()

    loaded = load_model("smollm2", dtype="float32", device="cpu")
    t0 = time.time()
    scores = calibrate(loaded.model, "wikitext2", tokenizer=loaded.tokenizer, scores=args.scores.split(","),
                       num_samples=args.calib_samples, seq_len=args.calib_len, model_name="smollm2")
    out = HERE / "results" / "compare_selectors"
    drops = [float(x) for x in args.max_drop.split(",")]
    rows = run_comparison(loaded.model, loaded.tokenizer, scores, args.task, drops, out, ppl_data=args.ppl_data,
                          limit=args.limit, ppl_limit=args.ppl_limit, calib_samples=args.calib_samples,
                          calib_len=args.calib_len, overwrite=True)
    table = (out / "results.md").read_text()
    text = "\n".join([
        "## Selectors side by side\n",
        f"Command: `python benchmarks/compare_selectors.py --task {args.task} --max-drop {args.max_drop} "
        f"--limit {args.limit} --ppl-data {args.ppl_data} --ppl-limit {args.ppl_limit} "
        f"--calib-samples {args.calib_samples} --calib-len {args.calib_len}`  ",
        f"Machine: {os.cpu_count()}-core CPU; total {time.time() - t0:.0f} s. Plot: `results/compare_selectors/accuracy_vs_removed.png`.\n",
        table,
    ])
    (HERE / "results" / "compare_selectors.md").write_text(text)
    print(text)
    print(f"{len(rows)} rows")


if __name__ == "__main__":
    main()
