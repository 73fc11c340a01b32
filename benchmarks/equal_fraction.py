"""Proxy scores vs measured ``ablation_kl`` at equal fractions of heads removed (SmolLM2-135M).

The budgeted comparison (``compare_selectors.py``) asks how many heads each selector may remove; this
asks what the same number of heads costs under each ranking, the issue's own table: zero the top-k
heads of each ranking statically and report held-out ARC-Easy accuracy and WikiText-2 perplexity.
Writes ``benchmarks/results/equal_fraction.md``.

    python benchmarks/equal_fraction.py [--fractions 0.05,0.1,0.15,0.2 --limit 100 --ppl-limit 16]
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
    import warnings

    import torch

    from prune_heads.data import DataSpec, calibration_sequences
    from prune_heads.evaluation import make_evaluator
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.loading import load_model
    from prune_heads.scoring.ablation import ablation_scores
    from prune_heads.scoring.calibrate import calibrate
    from prune_heads.selection.policies import candidate_units, removal_mask
    from prune_heads.selection.static import RANDOM_SCORE, ranking

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", default="0.05,0.1,0.15,0.2")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--limit", type=int, default=100, help="held-out (verify split) documents of --task")
    ap.add_argument("--ppl-limit", type=int, default=16)
    ap.add_argument("--proxy-samples", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=4, help="sequences ablation_kl is measured on")
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--scores", default="ahon_ln,awft,lthon_ln")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    loaded = load_model("smollm2", dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    layout = get_adapter(model).layout(model.config)
    proxies = args.scores.split(",")
    scores = calibrate(model, "wikitext2", tokenizer=tok, scores=proxies, num_samples=args.proxy_samples,
                       seq_len=args.calib_len, progress=False)
    seqs = calibration_sequences(DataSpec(source="wikitext2", num_samples=args.calib_samples, seq_len=args.calib_len),
                                 tok, model)  # as compare-selectors --calib-data wikitext2
    t0 = time.time()
    abl = ablation_scores(model, seqs, scores=["ablation_kl"], progress=False)
    t_abl = time.time() - t0
    acc = make_evaluator(model, tok, args.task, limit=args.limit, split="verify")
    ppl = make_evaluator(model, tok, "ppl:wikitext2", limit=args.ppl_limit)
    base_acc, base_ppl = acc(None), ppl(None)
    fracs = [float(f) for f in args.fractions.split(",")]
    rows = []
    for name in [*proxies, RANDOM_SCORE, "ablation_kl"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # awft is a raw score; the warning is expected
            inactive = ranking(abl if name == "ablation_kl" else scores, name, layout)
        units = candidate_units(inactive, layout, "free", allow_empty_layers=True)  # plain top-k, no floor
        cells = []
        for f in fracs:
            k = round(f * layout.total_heads)
            mask = removal_mask(units, k, layout)
            a, p = acc(mask), ppl(mask)
            cells.append(f"ppl {p.value:.1f}, {args.task} {a.value:.3f}")
            print(name, k, p.value, a.value, flush=True)
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    header = " | ".join(f"{f:.0%} ({round(f * layout.total_heads)} heads)" for f in fracs)
    text = "\n".join([
        "## Equal fractions: proxies vs measured `ablation_kl` (issue 6's table)\n",
        f"Command: `python benchmarks/equal_fraction.py --fractions {args.fractions} --task {args.task} --limit {args.limit} "
        f"--ppl-limit {args.ppl_limit} --proxy-samples {args.proxy_samples} --calib-samples {args.calib_samples} "
        f"--calib-len {args.calib_len}`  ",
        f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); total {time.time() - t_start:.0f} s (ablation {t_abl:.0f} s).  ",
        f"Top-k heads of each ranking zeroed together (no per-layer floor). Held-out: {args.task} verify split "
        f"({base_acc.n} documents) and WikiText-2 perplexity ({args.ppl_limit} documents).\n",
        f"Without pruning: ppl {base_ppl.value:.1f}, {args.task} {base_acc.value:.3f}.\n",
        f"| ranked by | {header} |",
        "|---|" + "---|" * len(fracs),
        *rows,
        "",
    ])
    out = HERE / "results" / "equal_fraction.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
