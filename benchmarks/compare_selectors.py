"""Every selector on SmolLM2-135M under the two budgets of issue 6: 1 ARC-Easy point and +5% perplexity.

One process calibrates the proxy scores, measures ``ablation_kl`` and trains the gates once, then
runs ``compare-selectors`` (``prune_heads.selection.compare.run_comparison``) under each budget; the
shared measurement's cost is charged to every row that uses it. Writes
``benchmarks/results/compare_selectors.md`` and, beside it, ``compare_selectors_<budget>/`` (plot,
plans, JSON). Defaults are sized for a 2-core CPU (about 1.5 h); raise ``--limit`` and
``--calib-samples`` on a GPU for figures worth quoting.

    python benchmarks/compare_selectors.py [--limit 60 --ppl-limit 16 --calib-samples 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent


def main() -> None:
    import torch

    from prune_heads.model.loading import load_model
    from prune_heads.scoring.calibrate import calibrate
    from prune_heads.selection.compare import CompareConfig, run_comparison

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--max-drop", type=float, default=0.01, help="accuracy budget (0.01 = one point)")
    ap.add_argument("--ppl-budget", type=float, default=0.05, help="relative perplexity budget (0 to skip)")
    ap.add_argument("--limit", type=int, default=60, help="documents per evaluation split of --task")
    ap.add_argument("--ppl-data", default="wikitext2")
    ap.add_argument("--ppl-limit", type=int, default=16, help="documents per perplexity split")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--proxy-samples", type=int, default=16, help="sequences the proxy scores are calibrated on")
    ap.add_argument("--scores", default="ahon_ln,awft,lthon_ln")
    ap.add_argument("--round-size", type=int, default=8)
    ap.add_argument("--candidates-fraction", type=float, default=0.3)
    ap.add_argument("--gates-steps", type=int, default=80)
    ap.add_argument("--gates-fraction", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model("smollm2", dtype="float32", device="cpu")
    t0 = time.time()
    scores = calibrate(loaded.model, "wikitext2", tokenizer=loaded.tokenizer, scores=args.scores.split(","),
                       num_samples=args.proxy_samples, seq_len=args.calib_len, model_name="smollm2")
    common = dict(limit=args.limit, ppl_limit=args.ppl_limit, calib_data="wikitext2", calib_samples=args.calib_samples,
                  calib_len=args.calib_len, round_size=args.round_size, candidates_fraction=args.candidates_fraction,
                  gates_steps=args.gates_steps, gates_fraction=args.gates_fraction)
    shared: dict = {}
    budgets = [(args.task, args.max_drop, False, f"{args.task} within {args.max_drop * 100:g} point(s)")]
    if args.ppl_budget > 0:
        budgets.append((f"ppl:{args.ppl_data}", args.ppl_budget, True, f"perplexity within +{args.ppl_budget:.0%}"))
    sections = []
    for task, drop, relative, title in budgets:
        out = HERE / "results" / f"compare_selectors_{task.replace(':', '_')}"
        t1 = time.time()
        cfg = CompareConfig(task=task, max_drop=[drop], relative=relative,
                            ppl_data=args.ppl_data if not task.startswith("ppl:") else None, **common)
        run_comparison(cfg, loaded.model, loaded.tokenizer, scores, out, overwrite=True, shared=shared)
        sections += [f"### Budget: {title}\n",
                     f"{time.time() - t1:.0f} s for this budget. Plot: `results/{out.name}/accuracy_vs_removed.png`.\n",
                     (out / "results.md").read_text()]
    text = "\n".join([
        "## Selectors side by side (issue 6)\n",
        f"Command: `python benchmarks/compare_selectors.py --task {args.task} --max-drop {args.max_drop} "
        f"--ppl-budget {args.ppl_budget} --limit {args.limit} --ppl-limit {args.ppl_limit} "
        f"--calib-samples {args.calib_samples} --calib-len {args.calib_len} --proxy-samples {args.proxy_samples} "
        f"--round-size {args.round_size} --candidates-fraction {args.candidates_fraction} "
        f"--gates-steps {args.gates_steps}`  ",
        f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f} when written; total "
        f"{time.time() - t0:.0f} s.\n",
        "Proxy scores: calibrated on WikiText-2; measured selectors (`static:ablation_kl`, `iterative`, `gates`) "
        "measure/train on their own calibration sequences. Budgets are checked on each task's search split; "
        "`held-out` is the disjoint verify split. Wall time and forward passes include the shared ablation "
        "measurement / gate training for every selector that uses it.\n",
        *sections,
    ])
    (HERE / "results" / "compare_selectors.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
