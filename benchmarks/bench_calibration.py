"""Calibration cost on SmolLM2-135M: time and peak memory against a plain forward and the paper's method.

(a) all forward-pass scores in one pass vs a plain ``sdpa`` forward over the same batches (target <= 1.5x);
(b) vs the paper's method: eager attention with the weights materialised (``output_attentions=True``) and
    one pass per raw score function, for the full set (the _ln/_hn forms come free from their raw pass);
(c) peak RSS at sequence length 2048 vs a plain forward, each in a fresh subprocess (target <= 1.3x).

    python benchmarks/bench_calibration.py            # writes benchmarks/results/calibration.md
    python benchmarks/bench_calibration.py --long 2048,4096   # only (d): long windows, long_calibration.md

(d) ``--long``: one window of each length, calibrated (every forward score and the compensation moments) and
    run through a plain ``sdpa`` forward, each in a fresh single-threaded subprocess: peak RSS above the loaded
    model and seconds per token. The attention statistics are taken in query blocks, so no T x T matrix is
    formed: the memory stays near the plain forward's as the window grows (issue 18).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "calibration.md"
RAW = ("awft", "aeqd", "ftvvn", "avvn", "lthon", "ahon", "fhon", "confidence")


def load():
    from prune_heads.model.loading import load_model

    return load_model("smollm2", dtype="float32", device="cpu")


def samples(tokenizer, n: int, seq_len: int) -> list[list[int]]:
    from prune_heads.data import DataSpec, iter_documents, tokenize_documents

    return tokenize_documents(iter_documents("wikitext2"), tokenizer,
                              DataSpec(source="wikitext2", num_samples=n, seq_len=seq_len, min_tokens=seq_len))


def plain_forward(model, seqs, batch_size: int) -> float:
    """The baseline: the model's own sdpa attention, the same batches, the same ``logits_to_keep``."""
    from prune_heads.data import batches

    model.set_attn_implementation("sdpa")
    t0 = time.perf_counter()
    with torch.no_grad():
        for _, ids, mask in batches(seqs, batch_size, 0):
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


def ours(model, seqs, batch_size: int) -> float:
    from prune_heads import calibrate

    t0 = time.perf_counter()
    calibrate(model, seqs, batch_size=batch_size, progress=False)
    return time.perf_counter() - t0


def paper_pass(model, seqs, batch_size: int, score: str) -> float:
    """One score per pass, the way the paper's code does it: eager attention, weights materialised."""
    from prune_heads.data import batches

    attns = [layer.self_attn for layer in model.model.layers]
    captured: dict[int, torch.Tensor] = {}
    handles = []
    if score in ("ftvvn", "avvn"):
        handles = [a.v_proj.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o)) for k, a in enumerate(attns)]
    elif score in ("lthon", "ahon", "fhon"):
        handles = [a.o_proj.register_forward_pre_hook(lambda m, i, k=k: captured.__setitem__(k, i[0])) for k, a in enumerate(attns)]
    heads, dim = model.config.num_attention_heads, model.config.head_dim
    kv = model.config.num_key_value_heads
    model.set_attn_implementation("eager")
    t0 = time.perf_counter()
    with torch.no_grad():
        for _, ids, mask in batches(seqs, batch_size, 0):
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1,
                        output_attentions=score in ("awft", "aeqd", "confidence"))
            m = mask.float()
            n = m.sum(-1)
            for k in range(len(attns)):
                if score == "awft":
                    v = (out.attentions[k][..., 0] * m[:, None]).sum(-1) / n[:, None]
                elif score == "aeqd":
                    a = out.attentions[k]
                    v = (-torch.special.xlogy(a, a).sum(-1) * m[:, None]).sum(-1) / n[:, None]
                elif score == "confidence":
                    v = (out.attentions[k].amax(-1) * m[:, None]).sum(-1) / n[:, None]
                elif score in ("ftvvn", "avvn"):
                    norms = captured[k].view(*ids.shape, kv, dim).norm(dim=-1)
                    v = norms[:, 0] if score == "ftvvn" else (norms * m[..., None]).sum(1) / n[:, None]
                else:
                    o = captured[k].view(*ids.shape, heads, dim)
                    if score == "fhon":
                        w = attns[k].o_proj.weight.view(-1, heads, dim)
                        o = torch.einsum("bthd,ohd->btho", o, w)
                    norms = o.norm(dim=-1)
                    last = (n.long() - 1).view(-1, 1, 1).expand(-1, 1, heads)
                    v = norms.gather(1, last)[:, 0] if score == "lthon" else (norms * m[..., None]).sum(1) / n[:, None]
                v.cpu()
    for h in handles:
        h.remove()
    model.set_attn_implementation("sdpa")
    return time.perf_counter() - t0


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(mode: str, seq_len: int, threads: int | None = None) -> None:
    """Runs in a fresh process: peak RSS of one ``seq_len`` sequence, relative to the loaded model."""
    if threads:
        torch.set_num_threads(threads)
    loaded = load()
    seq = samples(loaded.tokenizer, 1, seq_len)
    ids = torch.tensor(seq)
    with torch.no_grad():  # page in every (memory-mapped) weight, so the delta is activations only
        sum(float(p.sum()) for p in loaded.model.parameters())
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) after loading
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    if mode == "plain":
        loaded.model.set_attn_implementation("sdpa")
        with torch.no_grad():
            loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    else:
        from prune_heads import calibrate

        calibrate(loaded.model, seq, batch_size=1, progress=False)
    seconds = time.perf_counter() - t0
    from prune_heads.compensation.moments import moments_cost
    from prune_heads.model.adapters import get_adapter

    layout = get_adapter(loaded.model).layout(loaded.model.config)
    moments = moments_cost(layout.num_layers, layout.num_heads * layout.head_dim)["bytes"] if mode != "plain" else 0
    print(json.dumps({"base_mib": base / 1024, "peak_mib": _rss_kib("VmHWM") / 1024, "seconds": seconds,
                      "moments_mib": moments / 2**20}))


def measure_memory(mode: str, seq_len: int, threads: int | None = None) -> dict[str, float]:
    extra = ["--threads", str(threads)] if threads else []
    out = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--mem-seq-len", str(seq_len), *extra],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


LONG_RESULTS = Path(__file__).parent / "results" / "long_calibration.md"


def long_windows(lengths: list[int], threads: int) -> None:
    """(d): calibration against a plain forward on one window of each length (fresh processes, interleaved)."""
    load_before = os.getloadavg()
    rows = []
    for n in lengths:
        plain, ours_ = measure_memory("plain", n, threads), measure_memory("ours", n, threads)
        dp, do = plain["peak_mib"] - plain["base_mib"], ours_["peak_mib"] - ours_["base_mib"]
        fixed = ours_.get("moments_mib", 0.0)
        rows.append(f"| {n} | {dp:.0f} MiB | {do:.0f} MiB ({fixed:.0f} of them the moments) | "
                    f"{do / max(dp, 1):.2f}x ({(do - fixed) / max(dp, 1):.2f}x without the moments) | "
                    f"{plain['peak_mib']:.0f} / {ours_['peak_mib']:.0f} MiB | "
                    f"{1e3 * plain['seconds'] / n:.2f} ms | {1e3 * ours_['seconds'] / n:.2f} ms | "
                    f"{ours_['seconds'] / plain['seconds']:.2f}x |")
        print(rows[-1], flush=True)
    from prune_heads.model.attention_stats import BLOCK_ELEMENTS

    load_after = os.getloadavg()
    lines = [
        "## Calibration at long windows (SmolLM2-135M, float32, CPU)",
        "",
        f"Command: `python benchmarks/bench_calibration.py --long {','.join(map(str, lengths))} --threads {threads}`  ",
        f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}, torch {torch.__version__}), {threads} thread per "
        f"process, shared with other jobs: load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, so "
        "the times are noisy (each side measured once, in turn).  ",
        "One WikiText-2 window per length, batch 1, each side in a fresh process; calibration = every forward score "
        f"and the compensation moments (`calibrate` defaults), attention statistics in query blocks of at most "
        f"{BLOCK_ELEMENTS:,} logits; plain = the model's `sdpa` forward (`logits_to_keep=1`). The moments "
        "(two float64 Gram matrices of `o_proj`'s input per layer, `moments_cost`) are a fixed size whatever the "
        "window; what grows with the window is the activations.",
        "",
        "| tokens | plain: peak RSS above the model | calibrate: same | ratio | peak RSS (plain / calibrate) | "
        "plain: time per token | calibrate: time per token | time ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    LONG_RESULTS.write_text("\n".join(lines))
    print(f"wrote {LONG_RESULTS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--paper-samples", type=int, default=4, help="samples for the (slow) paper-method comparison")
    ap.add_argument("--mem-seq-len", type=int, default=2048)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--long", default=None, help="only (d): comma-separated window lengths, e.g. 2048,4096")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (--long: default 1)")
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.mem_seq_len, args.threads)
        return
    if args.long:
        long_windows([int(x) for x in args.long.split(",")], args.threads or 1)
        return

    loaded = load()
    model = loaded.model
    seqs = samples(loaded.tokenizer, args.num_samples, args.seq_len)
    ours(model, seqs[:1], args.batch_size)  # warm-up (allocator, first-call costs)
    plain_forward(model, seqs[:1], args.batch_size)
    t_plain = plain_forward(model, seqs, args.batch_size)
    t_ours = ours(model, seqs, args.batch_size)
    print(f"(a) plain sdpa {t_plain:.1f}s, all forward scores {t_ours:.1f}s: {t_ours / t_plain:.2f}x", flush=True)

    few = seqs[: args.paper_samples]
    t_ours_few = ours(model, few, args.batch_size)
    t_paper = {s: paper_pass(model, few, args.batch_size, s) for s in RAW}
    paper_total = sum(t_paper.values())
    print(f"(b) paper method {paper_total:.1f}s for {len(RAW)} passes vs ours {t_ours_few:.1f}s: "
          f"{paper_total / t_ours_few:.1f}x", flush=True)

    mem = {m: measure_memory(m, args.mem_seq_len) for m in ("plain", "ours")}
    peak = {m: mem[m]["peak_mib"] for m in mem}
    delta = {m: mem[m]["peak_mib"] - mem[m]["base_mib"] for m in mem}
    print(f"(c) peak RSS plain {peak['plain']:.0f} MiB, ours {peak['ours']:.0f} MiB: {peak['ours'] / peak['plain']:.2f}x "
          f"(above the loaded model: {delta['plain']:.0f} vs {delta['ours']:.0f} MiB)", flush=True)

    from prune_heads.model.attention_stats import BLOCK_ELEMENTS

    cmd = "python benchmarks/bench_calibration.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("memory_child", "long", "threads") and v != ap.get_default(k))
    lines = [
        "## Calibration cost (SmolLM2-135M, float32, CPU)",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {os.cpu_count()}-core CPU ({platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads); load average {os.getloadavg()[0]:.1f} when written.  ",
        f"Data: WikiText-2 test articles, {args.num_samples} x {args.seq_len} tokens, batch size {args.batch_size}; "
        f"query blocks of at most {BLOCK_ELEMENTS:,} logits.",
        "",
        "| measurement | baseline | prune-heads | ratio | target |",
        "|---|---|---|---|---|",
        f"| (a) time, all {16} forward scores vs plain `sdpa` forward | {t_plain:.1f} s | {t_ours:.1f} s | "
        f"{t_ours / t_plain:.2f}x | <= 1.5x |",
        f"| (b) time, paper's method (eager + `output_attentions`, one pass per raw score, {len(RAW)} passes) "
        f"on {len(few)} x {args.seq_len} | {paper_total:.1f} s | {t_ours_few:.1f} s | "
        f"{paper_total / t_ours_few:.1f}x faster | - |",
        f"| (c) peak RSS at {args.mem_seq_len} tokens vs plain `sdpa` forward | {peak['plain']:.0f} MiB | "
        f"{peak['ours']:.0f} MiB | {peak['ours'] / peak['plain']:.2f}x | <= 1.3x |",
        f"| (c') peak RSS above the loaded model (activations only) | {delta['plain']:.0f} MiB | "
        f"{delta['ours']:.0f} MiB | {delta['ours'] / max(delta['plain'], 1):.2f}x | - |",
        "",
        "Paper-method passes (s): " + ", ".join(f"{s} {t:.1f}" for s, t in t_paper.items()) + ".",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
