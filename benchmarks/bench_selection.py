"""How many heads of SmolLM2-135M can go, statically, within a 1-point drop: the paper's comparison, made static.

For each task (ARC-Easy, HellaSwag, offline) and each ranking (``ahon_ln``, ``awft``, ``lthon_ln`` and a
random one) the static selector finds the largest number of heads whose removal keeps accuracy
within ``--max-drop`` on the task's search split. Records heads removed, accuracy before/after, the
selection cost (full evaluations and wall time) and, with ``--verify``, the held-out result.
Writes ``benchmarks/results/selection.md``.

    python benchmarks/bench_selection.py [--limit 50 --calib-docs 32 --seq-len 256 --tasks arc_easy,hellaswag]

Cost: one evaluation runs every document of the search split through the model once per answer
choice. On a 2-core CPU SmolLM2-135M takes roughly 1 s per ARC-Easy document and 3 s per HellaSwag
document, and a selection needs up to ``log2(#heads) + 3`` = 12 evaluations (about 8 for budgets
that remove under a quarter of the heads), so the defaults take about an hour on 2 cores; use
``--limit 200`` on a GPU (``--device cuda``) for tighter figures, or ``--tasks``/``--scores`` to split the run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from prune_heads.evaluation import make_evaluator  # noqa: E402
from prune_heads.model.loading import load_model  # noqa: E402
from prune_heads.scoring.calibrate import calibrate  # noqa: E402
from prune_heads.selection import RANDOM_SCORE, select_static  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="arc_easy,hellaswag")
    ap.add_argument("--scores", default="ahon_ln,awft,lthon_ln,random")
    ap.add_argument("--limit", type=int, default=50, help="documents of each task's search split")
    ap.add_argument("--calib-docs", type=int, default=32, help="WikiText-2 documents for calibration")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-drop", type=float, default=0.01, help="0.01 = one accuracy point")
    ap.add_argument("--policy", default="free", choices=["free", "kv-groups", "uniform"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="search/verify split and random ranking")
    ap.add_argument("--verify", action="store_true", help="also evaluate the held-out split")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=str(HERE / "results" / "selection.md"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    t_start = time.perf_counter()
    loaded = load_model("smollm2", dtype="float32", device=device)
    model, tok = loaded.model, loaded.tokenizer
    ids = [s.strip() for s in args.scores.split(",") if s.strip()]
    t0 = time.perf_counter()
    scores = calibrate(model, "wikitext2", tokenizer=tok, scores=[s for s in ids if s != RANDOM_SCORE] or ["ahon_ln"],
                       num_samples=args.calib_docs, seq_len=args.seq_len, batch_size=8, progress=False)
    t_calib = time.perf_counter() - t0
    total = model.config.num_hidden_layers * model.config.num_attention_heads

    results: list[dict] = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        ev = make_evaluator(model, tok, task, limit=args.limit, split="search", batch_size=args.batch_size, seed=args.seed)
        ver = (make_evaluator(model, tok, task, limit=args.limit, split="verify", batch_size=args.batch_size, seed=args.seed)
               if args.verify else None)
        for sid in ids:
            calls0 = ev.calls
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # awft is a raw score: the warning is expected here
                plan = select_static(model, scores, ev, score_id=sid, max_drop=args.max_drop, policy=args.policy,
                                     verify_evaluator=ver, seed=args.seed, progress=False)
            wall = time.perf_counter() - t0
            m = plan.to_dict()
            results.append({
                "task": task, "score": sid, "heads": len(plan.removed_heads), "pct": 100 * len(plan.removed_heads) / total,
                "baseline": m["baseline"]["value"], "result": m["result"]["value"], "metric": m["baseline"]["metric"],
                "n": m["baseline"]["n"], "evals": m["cost"]["evaluations"], "new_evals": ev.calls - calls0,
                "bound": m["cost"]["max_evaluations"], "wall": wall,
                "verify": m["verification"],
            })
            print(f"{task:10s} {sid:9s} {len(plan.removed_heads):4d} heads ({results[-1]['pct']:.1f}%) "
                  f"{m['baseline']['value']:.4f} -> {m['result']['value']:.4f}  {m['cost']['evaluations']} evals "
                  f"({ev.calls - calls0} new) {wall:.0f}s", flush=True)

    write_markdown(args, results, t_calib, time.perf_counter() - t_start, total, device)


def write_markdown(args: argparse.Namespace, results: list[dict], t_calib: float, t_total: float, total: int,
                   device: str) -> None:
    cmd = "python benchmarks/bench_selection.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "## Static selection within a 1-point drop (SmolLM2-135M, offline)",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {_machine(device)}, "
        f"Python {platform.python_version()}, torch {torch.__version__}.  ",
        f"Calibration: {args.calib_docs} WikiText-2 documents x {args.seq_len} tokens ({t_calib:.0f} s). "
        f"Budget: accuracy drop <= {args.max_drop:g} on the task's search split ({args.limit} documents, "
        f"zero-shot, lm-eval's stock metric), GQA policy `{args.policy}`, at least one head per layer. "
        f"`random` is a seeded random ranking (seed {args.seed}). Total run time {t_total:.0f} s.",
        "",
        "| task | score | heads removed | % of " + str(total) + " | baseline | after | evaluations (new) / bound | wall s |"
        + (" held-out before -> after |" if args.verify else ""),
        "|---|---|---:|---:|---:|---:|---:|---:|" + ("---|" if args.verify else ""),
    ]
    for r in results:
        row = (f"| {r['task']} | {r['score']} | {r['heads']} | {r['pct']:.1f} | {r['baseline']:.4f} | {r['result']:.4f} | "
               f"{r['evals']} ({r['new_evals']}) / {r['bound']} | {r['wall']:.0f} |")
        if args.verify:
            v = r["verify"]
            row += f" {v['baseline']['value']:.4f} -> {v['result']['value']:.4f} |" if v else " - |"
        lines.append(row)
    lines += [
        "",
        "Evaluations count the baseline (verification is extra); \"new\" excludes results the evaluator had cached "
        f"(the shared baseline). With {args.limit} documents the accuracy's standard error is up to "
        f"{100 * (0.25 / max(1, args.limit)) ** 0.5:.1f} points, so it can exceed the budget: differences of a few "
        "heads between scores are within noise. The paper's "
        "Table 2 uses dynamic (per-input) zeroing; this is the static, exportable version of the same comparison.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"-> {out}")


def _machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})"


if __name__ == "__main__":
    main()
