"""Export benchmark on the real SmolLM2-135M-Instruct (CPU): is the sliced export as fast as its FLOPs say?

    python benchmarks/bench_export.py                       # every plan, 1 and 2 threads (about 25 min)
    python benchmarks/bench_export.py --plans free@0.10 --threads 1 --repeats 5
    python benchmarks/bench_export.py --quick               # tiny random model, seconds (run by the tests)
    python benchmarks/bench_export.py --shape llama-3.2-1b --plans free@0.25,uniform@0.25 --threads 2
                                                            # random weights, a 1B model's shapes (10 GB RAM)
    python benchmarks/bench_export.py --contexts 2048,4096,8192 --plans kv-groups@0.25 --threads 2 \
        --repeats 1 --placements 1 --decode-tokens 8   # long context: prefill and decode with a long cache

For ``free``, ``kv-groups`` and ``uniform`` plans at 10%, 25% and 33% of the heads (a seeded random
ranking: speed depends on how many heads each layer and KV group keeps, not on which), it exports the
``sliced`` checkpoint (and the ``uniform`` one where the plan allows it) and measures, against the
original and side by side (``prune_heads.evaluation.speed.compare_speed``: interleaved runs, ratio of
medians):

- prefill: one forward pass over ``--prefill-tokens`` tokens;
- decode: ``--decode-tokens`` one-token steps after a ``--decode-context``-token prompt;

at each ``--threads`` setting, beside the FLOPs ratio (``flops_per_token`` on the real weights), plus
the KV cache a ``--kv-tokens`` prompt leaves (``kv_cache_bytes``), parameters and file sizes, and the
peak memory of one streaming export. Writes ``benchmarks/results/export.md`` (``--out`` elsewhere).

``--contexts 2048,4096,8192`` adds a long-context table (issue 18): at each context C, prefill of C tokens,
and ``--decode-tokens`` one-token steps on a C-token cache, with the KV cache at C and two predictions of
the time ratio: the FLOPs ratio (attention grows with C, and removed query heads cut it), and the ratio of
bytes one decode step reads (every weight plus the whole KV cache, which dominates at long context and
which only removed KV groups shrink).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
RESULTS = Path(__file__).parent / "results" / "export.md"
LONG_RESULTS = Path(__file__).parent / "results" / "long_context_speed.md"
PLANS = ("free@0.10", "free@0.25", "free@0.33", "kv-groups@0.10", "kv-groups@0.25", "kv-groups@0.33",
         "uniform@0.10", "uniform@0.25", "uniform@0.33")


@dataclass
class Case:
    policy: str
    fraction: float
    plan: object | None      # None: the policy cannot reach this fraction
    note: str = ""


def make_case(spec: str, layout) -> Case:
    """The plan of ``policy@fraction``: the policy's first units of a seeded random ranking."""
    from prune_heads.plan import Plan
    from prune_heads.selection.policies import candidate_units, heads_of

    policy, frac = spec.split("@")
    fraction = float(frac)
    gen = torch.Generator().manual_seed(0)
    units = candidate_units(torch.rand(layout.num_layers, layout.num_heads, generator=gen), layout, policy)
    size = len(units[0]) if units else 0
    k = round(fraction * layout.total_heads / size) if size else 0
    if k < 1 or k > len(units) or abs(k * size / layout.total_heads - fraction) > 0.05:
        return Case(policy, fraction, None, f"n/a: {policy} removes {size} heads at a time")
    return Case(policy, fraction, Plan(heads_of(units, k), {"policy": policy}))


def quick_source(tmp: Path) -> Path:
    """A small random Llama with SmolLM2's group structure (9 query heads over 3 KV heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=512, hidden_size=144, intermediate_size=256, num_hidden_layers=4,
                               num_attention_heads=9, num_key_value_heads=3, head_dim=16, max_position_embeddings=256,
                               tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "quick-src")
    return tmp / "quick-src"


#: random-weight stand-ins with a real model's shapes (speed does not depend on the weights' values): does
#: the export keep up with its FLOPs where the per-op overheads of a 135M model no longer dominate?
SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=True),
}


def shaped_source(tmp: Path, name: str) -> Path:
    """A random Llama with the shapes of ``name`` (``SHAPES``), float32 on disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **SHAPES[name])
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / name)
    return tmp / name


def export_rss(src: Path, plan_path: Path, out: Path, shard: str) -> dict:
    # VmHWM (peak RSS of this process image); ru_maxrss would inherit the parent's peak across fork+exec
    code = (
        "import json, sys, warnings; warnings.filterwarnings('ignore')\n"
        "def hwm():\n"
        "    return int([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])\n"
        "from prune_heads.export import export_checkpoint as export; from prune_heads.plan import Plan\n"
        "base = hwm()\n"
        f"r = export({str(src)!r}, Plan.load({str(plan_path)!r}), {str(out)!r}, shard_size={shard!r}, verify=False,"
        " progress=False)\n"
        "print(json.dumps({'after_imports_kb': base, 'peak_kb': hwm(),"
        " 'peak_buffer_bytes': r.peak_buffer_bytes}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


def weights_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def measure(original, exported, args, threads: list[int]) -> dict:
    from prune_heads.evaluation.speed import compare_speed

    out = {}
    for n in threads:
        out[("prefill", n)] = compare_speed(original, exported, mode="prefill", tokens=args.prefill_tokens,
                                            repeats=args.repeats, threads=n, clock=args.clock,
                                            placements=args.placements)
        out[("decode", n)] = compare_speed(original, exported, mode="decode", tokens=args.decode_tokens,
                                           context=args.decode_context, repeats=args.repeats, threads=n,
                                           clock=args.clock, placements=args.placements)
    return out


def fmt_ratio(r) -> str:
    lo, hi = r.spread
    verdict = "" if r.ratio <= r.flops_ratio + max(0.01, (hi - lo) / 2) else " **slow**"
    return f"{r.ratio:.3f} ({lo:.2f}–{hi:.2f}){verdict}"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", default=None, help=f"comma-separated policy@fraction (default {','.join(PLANS)})")
    ap.add_argument("--threads", default=None, help="comma-separated CPU thread counts (default 1,2)")
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-context", type=int, default=128)
    ap.add_argument("--kv-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved pairs per placement")
    ap.add_argument("--placements", type=int, default=3,
                    help="rounds with both models' weights moved to fresh memory (compare_speed's placements)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time, robust to other load on a shared machine (meaningful at 1 thread)")
    ap.add_argument("--no-rss", action="store_true", help="skip the export peak-memory measurement")
    ap.add_argument("--quick", action="store_true", help="a tiny random model, three plans, small sizes (for tests)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="a random-weight model with these real shapes instead of SmolLM2 (speed only)")
    ap.add_argument("--skip-prefill", action="store_true",
                    help="--contexts: no prefill comparison, and decode timed on one prompt cache per model, "
                         "deep-copied for each of --repeats interleaved runs (a long prefill per run is slow on a CPU)")
    ap.add_argument("--skip-decode", action="store_true",
                    help="--contexts: prefill only (decode on a long cache is measured apart, with --skip-prefill)")
    ap.add_argument("--contexts", default=None,
                    help="comma-separated context lengths of a long-context table (e.g. 2048,4096,8192)")
    ap.add_argument("--out", type=Path, default=None, help=f"markdown output (default {RESULTS})")
    args = ap.parse_args()
    if args.skip_prefill and args.skip_decode:
        ap.error("--skip-prefill with --skip-decode measures nothing; drop one")
    if args.quick:
        args.prefill_tokens, args.decode_tokens, args.decode_context, args.kv_tokens = 32, 4, 8, 64
        args.repeats, args.placements, args.no_rss = 1, 2, True
        args.plans = args.plans or "free@0.25,kv-groups@0.33,uniform@0.10,uniform@0.33"
        args.threads = args.threads or "1"
        args.out = args.out or Path(tempfile.gettempdir()) / "bench_export_quick.md"
    args.plans = (args.plans or ",".join(PLANS)).split(",")
    args.threads = [int(t) for t in (args.threads or "1,2").split(",")]
    args.contexts = [int(c) for c in args.contexts.split(",")] if args.contexts else []
    args.out = args.out or (LONG_RESULTS if args.contexts and not args.quick else RESULTS)
    return args


def uneven_layers(plan, layout) -> int:
    from prune_heads.export.slicing import layer_heads

    def counts(lh):
        return {sum(1 for q in lh.kept if layout.kv_of(q) == g) for g in lh.kept_kv}

    return sum(1 for lh in layer_heads(plan, layout) if len(counts(lh)) > 1)


def bench_export(case: Case, fmt: str, src: Path, original, layout, kv_original: int, tmp: Path, args):
    """Export one plan in one format; its table row and size row."""
    from transformers import AutoModelForCausalLM

    from prune_heads.evaluation.speed import kv_cache_bytes
    from prune_heads.export import export_checkpoint

    d = tmp / f"{case.policy}-{case.fraction}-{fmt}"
    t = time.perf_counter()
    res = export_checkpoint(str(src), case.plan, d, format=fmt, verify=False, progress=False, shard_size="100MB")
    export_s = time.perf_counter() - t
    exported = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    m = measure(original, exported, args, args.threads)
    kv = kv_cache_bytes(exported, args.kv_tokens)
    cells = [c for mode in ("prefill", "decode") for n in args.threads
             for c in (fmt_ratio(m[(mode, n)]), f"{m[(mode, n)].flops_ratio:.3f}")]
    removed = len(case.plan.removed_heads)
    medians = " | ".join(f"{1e3 * m[(mode, n)].original_median:.0f} / {1e3 * m[(mode, n)].pruned_median:.0f}"
                         for mode in ("prefill", "decode") for n in args.threads)
    row = (f"| {case.policy} | {removed / layout.total_heads:.0%} ({removed}) | `{fmt}` | "
           f"{uneven_layers(case.plan, layout)}/{layout.num_layers} | {kv / kv_original:.3f} ({kv / 2**20:.1f} MiB) | "
           + " | ".join(cells) + " |")
    size = (f"| {case.policy} {removed / layout.total_heads:.0%} `{fmt}` | {res.params_after:,} | "
            f"{res.params_after / res.params_before:.3f} | "
            f"{'exact' if res.predicted_params_after == res.params_after else 'off'} | "
            f"{weights_bytes(d) / weights_bytes(src):.3f} | {export_s:.1f} | {medians} |")
    return row, size


def weights_in_memory(model) -> int:
    """Bytes of every parameter (a batch-1 decode step reads each of them once, the LM head included)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def decode_on_cache(original, exported, context: int, steps: int, repeats: int, threads: int):
    """Per-token decode on a ``context``-token cache, side by side: each model's prompt cache is built once
    (the long prefill is the slow part on a CPU) and deep-copied before every timed run; runs interleave the
    two models, the first pair is a warm-up. Returns ``(ms/token original, ms/token export, median ratio,
    (lowest, highest) per-pair ratio)``."""
    import copy
    import statistics

    from prune_heads.evaluation.speed import _cache_of

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        vocab = original.config.vocab_size
        prompt = torch.randint(0, vocab, (1, context), generator=gen)
        tokens = torch.randint(0, vocab, (1, steps), generator=gen)
        caches = {}
        for key, m in (("o", original), ("p", exported)):
            caches[key] = _cache_of(m(input_ids=prompt, use_cache=True, logits_to_keep=1))

        def run(key, m):
            name, cache = caches[key]
            cache = copy.deepcopy(cache)
            t = time.perf_counter()
            for i in range(steps):
                cache = m(input_ids=tokens[:, i:i + 1], use_cache=True, **{name: cache})[name]
            return time.perf_counter() - t

        times = {"o": [], "p": []}
        for r in range(repeats + 1):
            to, tp = run("o", original), run("p", exported)
            if r:
                times["o"].append(to)
                times["p"].append(tp)
    finally:
        torch.set_num_threads(before)
    ratios = [b / a for a, b in zip(times["o"], times["p"])]
    mo, mp = statistics.median(times["o"]), statistics.median(times["p"])
    return 1e3 * mo / steps, 1e3 * mp / steps, mp / mo, (min(ratios), max(ratios))


def long_context_rows(case: Case, fmt: str, original, exported, layout, args) -> list[str]:
    """One row per context: prefill and decode time ratios beside the FLOPs and bytes-read predictions."""
    from prune_heads.evaluation.speed import compare_speed, kv_cache_bytes

    rows = []
    w_o, w_p = weights_in_memory(original), weights_in_memory(exported)
    removed = len(case.plan.removed_heads)
    limit = int(getattr(original.config, "max_position_embeddings", 0) or 0)
    for c in args.contexts:
        kv_o, kv_p = kv_cache_bytes(original, c), kv_cache_bytes(exported, c)
        cells = []
        # decode needs room for its tokens: at the model's full context it runs on a cache that many tokens shorter
        dc = min(c, limit - args.decode_tokens) if limit else c
        on = f" (on {dc})" if dc != c else ""
        bytes_ratio = (w_p + kv_cache_bytes(exported, dc)) / (w_o + kv_cache_bytes(original, dc))  # decode's cache
        for n in args.threads:
            pre = None if args.skip_prefill else compare_speed(
                original, exported, mode="prefill", tokens=c, repeats=args.repeats, threads=n, clock=args.clock,
                placements=args.placements)
            cells += ([f"{pre.tokens_per_s[0]:.0f} / {pre.tokens_per_s[1]:.0f}", fmt_ratio(pre), f"{pre.flops_ratio:.3f}"]
                      if pre is not None else ["not measured"] * 3)
            if args.skip_decode:
                cells += ["not measured"] * 4
                continue
            if args.skip_prefill:  # one prompt cache per model, copied for every run
                from prune_heads.evaluation.speed import flops_per_token

                ms_o, ms_p, ratio, (lo, hi) = decode_on_cache(original, exported, dc, args.decode_tokens, args.repeats, n)
                avg = dc + (args.decode_tokens + 1) / 2
                flops = flops_per_token(exported, avg) / flops_per_token(original, avg)
                cells += [f"{ms_o:.1f} / {ms_p:.1f}{on}", f"{ratio:.3f} ({lo:.2f}–{hi:.2f})", f"{flops:.3f}",
                          f"{bytes_ratio:.3f}"]
                continue
            dec = compare_speed(original, exported, mode="decode", tokens=args.decode_tokens, context=dc,
                                repeats=args.repeats, threads=n, clock=args.clock, placements=args.placements)
            cells += [f"{1e3 * dec.original_median / dec.tokens:.1f} / {1e3 * dec.pruned_median / dec.tokens:.1f}{on}",
                      fmt_ratio(dec), f"{dec.flops_ratio:.3f}", f"{bytes_ratio:.3f}"]
        rows.append(f"| {case.policy} {removed / layout.total_heads:.0%} ({removed}) `{fmt}` | {c} | "
                    f"{kv_o / 2**20:.1f} / {kv_p / 2**20:.1f} ({kv_p / kv_o:.3f}) | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def render_long(args, layout, load, rows) -> str:
    head = ["plan", "context", "KV cache MiB (orig / export)"]
    for n in args.threads:
        head += [f"prefill tok/s, {n} thr", "time ratio (IQR)", "FLOPs ratio", f"decode ms/token, {n} thr",
                 "time ratio (IQR)", "FLOPs ratio", "bytes-read ratio"]
    cmd = "python benchmarks/bench_export.py " + " ".join(sys.argv[1:])
    return "\n".join([
        "## Export at long context" + (" (quick check, tiny model)" if args.quick else " — SmolLM2-135M-Instruct, CPU"),
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, torch {torch.__version__}, float32; load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) when the measurement started.  ",
        f"Source: {layout.num_layers} layers x {layout.num_heads} heads ({layout.num_kv_heads} KV heads). Prefill: one "
        f"forward over `context` tokens; decode: {args.decode_tokens} one-token steps on a `context`-token cache. "
        + (f"Time ratio = median export time / median original time over {args.placements} placements x "
           f"{args.repeats} interleaved runs (`compare_speed`), IQR of the per-pair ratios; **slow** as in the export "
           "table. " if not args.skip_prefill else "") + "FLOPs ratio: multiply-adds per token at that context (attention included). Bytes-read ratio: "
        "(weights + KV cache at `context`) of the export over the original's, what a memory-bound decode step "
        "reads." + (f" With `--skip-prefill`, decode is timed on one prompt cache per model, deep-copied for each of "
                    f"{args.repeats} interleaved runs after a warm-up pair; the parentheses give the lowest and highest "
                    "per-pair ratio." if args.skip_prefill else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *rows,
        "",
    ])


def render(args, layout, kv_original: int, load, rows, size_rows, rss, src: Path) -> str:
    timing_head = [f"{mode} {n} thr ms (orig / export)" for mode in ("prefill", "decode") for n in args.threads]
    head = ["policy", "heads removed", "format", "uneven layers", f"KV cache at {args.kv_tokens} tokens"]
    for mode, tok in (("prefill", args.prefill_tokens), ("decode", args.decode_tokens)):
        for n in args.threads:
            head += [f"{mode} {tok} tok, {n} thr: time ratio (IQR)", "FLOPs ratio"]
    cmd = "python benchmarks/bench_export.py " + " ".join(sys.argv[1:])
    lines = [
        "## Export (quick check, tiny model)" if args.quick else
        f"## Export (sliced) — random weights with {args.shape}'s shapes, CPU" if args.shape else
        "## Export (sliced) — SmolLM2-135M-Instruct, CPU",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, torch {torch.__version__}, float32; load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) when the measurement started.  ",
        f"Source: {layout.num_layers} layers x {layout.num_heads} heads ({layout.num_kv_heads} KV heads, groups of "
        f"{layout.group_size}); KV cache at {args.kv_tokens} tokens {kv_original / 2**20:.1f} MiB. Plans: the first "
        "units of each GQA policy on a seeded random ranking.",
        "",
        f"Time ratio = median {'CPU' if args.clock == 'cpu' else 'wall'} time of the export / median time of the "
        f"original over {args.placements} placements x {args.repeats} interleaved runs each "
        "(`prune_heads.evaluation.speed.compare_speed`; before each placement both models' weights move to fresh "
        "memory, since batch-1 CPU decode speed follows where the weights sit), with the interquartile range of the "
        "per-pair ratios; "
        "below 1 is faster. FLOPs ratio = multiply-adds per token of the real weights at the average context "
        "(`flops_per_token`). **slow** marks a time ratio above the FLOPs ratio by more than half the IQR (and 1%). "
        f"Decode = {args.decode_tokens} one-token steps after a {args.decode_context}-token prompt. "
        "*Uneven layers*: layers whose kept KV heads keep different numbers of query heads.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *rows,
        "",
        "| plan | parameters | ratio | vs prediction | weight files ratio | export s | " + " | ".join(timing_head) + " |",
        "|---|---:|---:|---|---:|---:|" + "---:|" * len(timing_head),
        *size_rows,
        "",
    ]
    if rss:
        lines += [
            f"Export peak memory (child process, VmHWM, the first kv-groups plan): {rss['peak_kb'] / 1024:.0f} MiB, "
            f"of which {rss['after_imports_kb'] / 1024:.0f} MiB is the interpreter with torch/transformers imported; "
            f"the export added {(rss['peak_kb'] - rss['after_imports_kb']) / 1024:.0f} MiB for a "
            f"{weights_bytes(src) / 2**20:.0f} MiB model (shard size 100MB; largest writer buffer "
            f"{rss['peak_buffer_bytes'] / 2**20:.0f} MiB). VmHWM also counts the source's memory-mapped pages.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    from prune_heads.export import register_auto_classes
    from prune_heads.model.loading import gguf_to_plain, resolve_model_spec

    register_auto_classes()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as name:  # exports are model-sized: never left behind
        tmp = Path(name)
        if args.quick:
            src = quick_source(tmp)
        elif args.shape:
            src = shaped_source(tmp, args.shape)
        else:
            src = gguf_to_plain(*resolve_model_spec("smollm2"), progress=False)
        text = run(args, src, tmp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


def run(args, src: Path, tmp: Path) -> str:
    """Every plan's rows, as the markdown text."""
    from transformers import AutoModelForCausalLM

    from prune_heads.evaluation.speed import kv_cache_bytes
    from prune_heads.model.adapters import get_adapter

    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    layout = get_adapter(original).layout(original.config)
    load = os.getloadavg()
    if args.contexts:
        return run_long(args, src, tmp, original, layout, load)
    kv_original = kv_cache_bytes(original, args.kv_tokens)
    rows, size_rows, rss = [], [], None
    for spec in args.plans:
        case = make_case(spec, layout)
        if case.plan is None:
            rows.append(f"| {case.policy} | {case.fraction:.0%} | – | – | {case.note} |" + " – |" * (4 * len(args.threads)))
            continue
        for fmt in ["sliced"] + (["uniform"] if case.policy == "uniform" else []):
            row, size = bench_export(case, fmt, src, original, layout, kv_original, tmp, args)
            rows.append(row)
            size_rows.append(size)
            print(row, flush=True)
        if rss is None and not args.no_rss and case.policy == "kv-groups":
            case.plan.save(tmp / "plan.json")
            rss = export_rss(src, tmp / "plan.json", tmp / "rss", "100MB")
    return render(args, layout, kv_original, load, rows, size_rows, rss, src)


def run_long(args, src: Path, tmp: Path, original, layout, load) -> str:
    """The long-context table only (``--contexts``): each plan's sliced export (and uniform where it applies)."""
    from transformers import AutoModelForCausalLM

    from prune_heads.export import export_checkpoint

    rows = []
    for spec in args.plans:
        case = make_case(spec, layout)
        if case.plan is None:
            continue
        for fmt in ["sliced"] + (["uniform"] if case.policy == "uniform" else []):
            d = tmp / f"{case.policy}-{case.fraction}-{fmt}"
            export_checkpoint(str(src), case.plan, d, format=fmt, verify=False, progress=False, shard_size="100MB")
            exported = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            rows += long_context_rows(case, fmt, original, exported, layout, args)
    return render_long(args, layout, load, rows)


if __name__ == "__main__":
    main()
