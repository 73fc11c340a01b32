"""Costs and agreement of the reliability work (issue 11), measured side by side in one run.

(a) ``attention_with_stats`` with the log1p entropy vs the previous version (``git show REF:...``), interleaved
    medians on SmolLM2's attention shapes;
(b) the fingerprint: seconds and GB/s to fingerprint SmolLM2 and to check it in the same and in another dtype;
(c) the dynamic mode during generation: how often the cached mode's decisions differ from the paper's
    (exact, no cache) along the same tokens, how often the generated text differs, and the speed of each;
(d) thresholds: the fraction of the calibration values each method's τ marks at the paper's fractions;
(e) aeqd precision: every head's aeqd against the float64 literal reference, now and before the log1p change.

    python benchmarks/bench_reliability.py            # SmolLM2; writes benchmarks/results/reliability.md
    python benchmarks/bench_reliability.py --quick    # tiny random model, seconds (the test runs this)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "reliability.md"
BASE_REF = "264c288"  # the commit before the log1p entropy


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``repeats`` times (after one warm-up each)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def old_attention(ref: str):
    src = subprocess.run(["git", "-C", str(HERE.parent), "show", f"{ref}:prune_heads/model/attention_stats.py"],
                         capture_output=True, text=True)
    if src.returncode:
        return None
    mod = types.ModuleType("attention_stats_before")
    exec(compile(src.stdout, f"{ref}:attention_stats.py", "exec"), mod.__dict__)
    return mod.attention_with_stats


def section_attention(quick: bool, ref: str) -> list[str]:
    from prune_heads.model.attention_stats import attention_with_stats

    b, hq, hkv, t, d = (1, 4, 2, 64, 16) if quick else (4, 9, 3, 512, 64)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h in (hq, hkv, hkv))
    gram = torch.randn(hq, d, d, generator=g)
    old = old_attention(ref)
    fns = {"new": lambda: attention_with_stats(q, k, v, None, d ** -0.5, o_gram=gram)}
    if old is not None:
        fns["old"] = lambda: old(q, k, v, None, d ** -0.5, o_gram=gram)
    med = interleaved(fns, 3 if quick else 15)
    lines = [f"(a) `attention_with_stats`, B={b} H={hq} (KV {hkv}) T=S={t} D={d}, all statistics, "
             f"{3 if quick else 15} interleaved repeats: new {med['new'] * 1e3:.1f} ms"]
    if "old" in med:
        lines[-1] += f", before ({ref}) {med['old'] * 1e3:.1f} ms, ratio new/old **{med['new'] / med['old']:.3f}**"
    return lines


def section_fingerprint(model) -> list[str]:
    from prune_heads.model.fingerprint import check_fingerprint, fingerprint, model_tensors

    lines = ["(b) fingerprint (every tensor; median of 3):", "",
             "| model dtype | bytes | fingerprint | check, same dtype | check of a float32 record |", "|---|---|---|---|---|"]
    fp32 = fingerprint(model)
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        nbytes = sum(t.numel() * t.element_size() for _, t, _ in model_tensors(m))
        fp = fingerprint(m)
        med = interleaved({"fp": lambda m=m: fingerprint(m), "same": lambda m=m, fp=fp: check_fingerprint(fp, m, "x"),
                           "cross": lambda m=m: check_fingerprint(fp32, m, "x")}, 3)
        gb = nbytes / 1e9
        lines.append(f"| {str(dtype).removeprefix('torch.')} | {gb:.3f} GB | {med['fp']:.2f} s ({gb / med['fp']:.2f} GB/s) | "
                     f"{med['same']:.2f} s ({gb / med['same']:.2f} GB/s) | {med['cross']:.2f} s |")
    model.to(torch.float32)
    return lines


def _decisions(stats, layers: int) -> list[torch.Tensor]:
    """Stack a recorded run into one ``(L, B, H)`` bool per forward pass."""
    out = []
    rows = [d for _, d in stats.decisions]
    for i in range(0, len(rows), layers):
        out.append(torch.stack(rows[i:i + layers]))
    return out


def section_dynamic(model, tok, prompts: list[list[int]], new_tokens: int, calib: list[list[int]], repeats: int) -> list[str]:
    from prune_heads import calibrate
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.dynamic import dynamic_mask
    from prune_heads.model.masking import threshold_for_fraction

    layers = get_adapter(model).layout(model.config).num_layers
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    model.generation_config.pad_token_id = pad
    lines = [f"(c) dynamic mode during generation: {len(prompts)} prompts of {len(prompts[0])} tokens, {new_tokens} new "
             "tokens each (greedy), τ for 10% of the calibration values.", "",
             "| score | decisions that differ (cached vs exact, same tokens) | prompts whose text differs | "
             "exact s/prompt | cached s/prompt | speed-up |", "|---|---|---|---|---|---|"]
    scores = calibrate(model, calib, scores=["ahon_ln", "awft"], progress=False)
    for sid in ("ahon_ln", "awft"):
        tau = threshold_for_fraction(scores, sid, 0.10)
        differ = total = texts = 0
        for p in prompts:
            ids = torch.tensor([p])
            with torch.no_grad():
                with dynamic_mask(model, sid, tau, record=True) as ex:
                    exact = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                with dynamic_mask(model, sid, tau, mode="cached") as _:
                    free = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
                with dynamic_mask(model, sid, tau, mode="cached", record=True) as ca:  # replay the exact tokens
                    out = model(exact[:, : len(p)], use_cache=True)
                    cache = out.past_key_values
                    for j in range(len(p), exact.shape[1] - 1):
                        cache = model(exact[:, j:j + 1], cache=cache, use_cache=True).past_key_values
            texts += int(free.tolist() != exact.tolist())
            for a, b in zip(_decisions(ex, layers), _decisions(ca, layers)):
                differ += int((a != b).sum())
                total += a.numel()
        ids = torch.tensor([prompts[0]])

        def run(mode, sid=sid, tau=tau, ids=ids):
            with torch.no_grad(), dynamic_mask(model, sid, tau, mode=mode):
                model.generate(ids, max_new_tokens=new_tokens, do_sample=False)

        med = interleaved({"exact": lambda: run("exact"), "cached": lambda: run("cached")}, repeats)
        lines.append(f"| {sid} | {differ / total:.2%} ({differ} of {total}) | {texts} of {len(prompts)} | "
                     f"{med['exact']:.2f} | {med['cached']:.2f} | x{med['exact'] / med['cached']:.2f} |")
    return lines


def section_thresholds(model, calib: list[list[int]]) -> list[str]:
    from prune_heads import calibrate
    from prune_heads.report.metrics import PAPER_FRACTIONS
    from prune_heads.scoring.score_defs import FORWARD_SCORES
    from prune_heads.scoring.thresholds import threshold

    scores = calibrate(model, calib, progress=False)
    fracs = [f for f in PAPER_FRACTIONS if f > 0]
    lines = [f"(d) fraction of the {scores.num_samples} x {scores.num_layers * scores.num_heads} calibration values "
             "marked by τ (quantile / paper):", "", "| score | " + " | ".join(f"{f:.0%}" for f in fracs) + " |",
             "|---|" + "---|" * len(fracs)]
    for sid in FORWARD_SCORES:
        vals = scores.per_sample(sid).double().numpy()
        cells = []
        for f in fracs:
            q, p = threshold(vals, sid, f, "quantile"), threshold(vals, sid, f, "paper")
            cells.append(f"{q.marked_fraction:.2%} / {p.marked_fraction:.2%}")
        lines.append(f"| {sid} | " + " | ".join(cells) + " |")
    return lines


def section_aeqd(model, seqs: list[list[int]], ref: str) -> list[str]:
    """Every head's aeqd from calibrate (float32) against the literal float64 reference of tests/reference.py
    (softmax in float64), with the log1p entropy and with the previous version's attention function."""
    import copy

    import prune_heads.model.attention as attention
    from prune_heads import calibrate

    sys.path.insert(0, str(HERE.parent / "tests"))
    import transformers.models.llama.modeling_llama as llama
    from reference import reference_scores
    from test_aeqd_precision import _eager_float64

    model64 = copy.deepcopy(model).double()
    original = llama.eager_attention_forward
    llama.eager_attention_forward = _eager_float64
    try:
        refs = torch.stack([reference_scores(model64, s)["aeqd"] for s in seqs])
    finally:
        llama.eager_attention_forward = original
    del model64
    row = []
    new_fn, old_fn = attention.attention_with_stats, old_attention(ref)
    for label, fn in (("log1p (now)", new_fn), (f"log z ({ref})", old_fn)):
        if fn is None:
            continue
        attention.attention_with_stats = fn
        try:
            got = calibrate(model, seqs, scores=["aeqd"], progress=False).per_sample("aeqd").double()
        finally:
            attention.attention_with_stats = new_fn
        row.append(f"{label}: worst relative error **{((got - refs).abs() / refs).max():.2e}**")
    return [f"(e) aeqd against float64 on {len(seqs)} sequences of {len(seqs[0])} tokens (smallest aeqd "
            f"{float(refs.min()):.1e}): " + "; ".join(row)]


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model and shapes (seconds)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--baseline-ref", default=BASE_REF)
    ap.add_argument("--sections", default="a,b,c,d,e", help="which of (a)-(e) to run, e.g. a,b")
    ap.add_argument("--aeqd-seqs", type=int, default=4, help="(e): sequences for the float64 reference (slow loops)")
    ap.add_argument("--aeqd-len", type=int, default=64)
    ap.add_argument("-o", "--output", default=None, help=f"markdown to write (default: {RESULTS}, none with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from tiny_models import tiny_model

        model, tok = tiny_model("llama", layers=2), None
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, 100, (8,), generator=g).tolist() for _ in range(2)]
        calib = [torch.randint(3, 100, (16,), generator=g).tolist() for _ in range(4)]
        new_tokens, repeats = 3, 2
    else:
        from prune_heads.data import DataSpec, iter_documents, tokenize_documents
        from prune_heads.model.loading import load_model

        loaded = load_model("smollm2", dtype="float32", device="cpu")
        model, tok = loaded.model, loaded.tokenizer
        seqs = tokenize_documents(iter_documents("wikitext2"), tok, DataSpec(
            source="wikitext2", num_samples=args.calib_samples + args.prompts, seq_len=128, min_tokens=128))
        calib, prompts = seqs[: args.calib_samples], [s[:32] for s in seqs[args.calib_samples:]]
        new_tokens, repeats = args.new_tokens, 3
    cmd = "python benchmarks/bench_reliability.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["## Reliability (issue 11)", "",
             f"`{cmd.strip()}` on {platform.machine()} with {torch.get_num_threads()} threads, torch {torch.__version__}.", ""]
    out = args.output or (None if args.quick else RESULTS)
    print("\n".join(lines), flush=True)
    sections = {
        "a": lambda: section_attention(args.quick, args.baseline_ref),
        "b": lambda: section_fingerprint(model),
        "c": lambda: section_dynamic(model, tok, prompts, new_tokens, calib, repeats),
        "d": lambda: section_thresholds(model, calib),
        "e": lambda: section_aeqd(model, [s[: args.aeqd_len] for s in calib[: args.aeqd_seqs]], args.baseline_ref),
    }
    for key in args.sections.split(","):
        part = sections[key.strip()]()
        lines += [*part, ""]
        print("\n".join(part) + "\n", flush=True)  # each section as soon as it is measured
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text("\n".join(lines))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
