"""Where the sliced export's attention time goes: the attention function alone, old way against new.

    python benchmarks/bench_attention.py            # SmolLM2 shapes: 9 heads of 64 over 3 KV heads
    python benchmarks/bench_attention.py --quick    # tiny sizes (run by the tests)

One layer that keeps 8 of 9 query heads in uneven KV groups (3, 3, 2), float32, batch 1, CPU. Three
ways to compute the same attention, timed interleaved (median of ``--repeats``), each checked against
the first:

- ``gather``: what the sliced export did before: copy each query head's K/V (``index_select``) so
  the groups become one head each, then one SDPA call;
- ``new``: ``pruned_attention`` as it ships now (one SDPA call per KV head for a prompt, one packed
  call for a single decoding token; no K/V copy);
- ``stock 9 heads``: the unpruned layer through SDPA's own GQA, for scale.

Prefill at ``--prefill`` tokens (causal, no mask) and one decoding step at each ``--contexts`` length.
Writes ``benchmarks/results/attention.md`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "attention.md"


class Layer(nn.Module):
    is_causal = True

    def __init__(self, kv_map):
        super().__init__()
        self.pruned_kv_map = kv_map
        self.num_key_value_groups = 1


def gather(q, k, v, kv_map_t, causal):
    k, v = k.index_select(1, kv_map_t), v.index_select(1, kv_map_t)
    out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).contiguous()


def timed(fns, repeats):
    """Interleaved: every repeat runs each function once, in turn; median seconds per function."""
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for i in range(repeats):
        order = list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]
        for name, f in order:
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--contexts", default="128,512,2048")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.prefill, args.contexts, args.repeats = 32, "16,64", 3
        args.out = args.out or Path(tempfile.gettempdir()) / "bench_attention_quick.md"
    out_md = args.out or RESULTS
    torch.set_num_threads(args.threads)

    from prune_heads.export.remote.modeling_pruned import pruned_attention

    d, nkv = 64, 3
    kv_map = [0, 0, 0, 1, 1, 1, 2, 2]  # 8 of 9 heads kept: groups of 3, 3 and 2
    layer = Layer(kv_map)
    idx = torch.tensor(kv_map)
    g = torch.Generator().manual_seed(0)
    rows = []

    def case(label, q_len, kv_len):
        q = torch.randn(1, len(kv_map), q_len, d, generator=g)
        q9 = torch.randn(1, 9, q_len, d, generator=g)
        k = torch.randn(1, nkv, kv_len, d, generator=g)
        v = torch.randn(1, nkv, kv_len, d, generator=g)
        causal = q_len > 1
        want = gather(q, k, v, idx, causal)
        got, _ = pruned_attention(layer, q, k, v, None, scaling=d ** -0.5)
        assert torch.allclose(want, got, atol=1e-5), (label, float((want - got).abs().max()))
        t = timed({
            "gather": lambda: gather(q, k, v, idx, causal),
            "new": lambda: pruned_attention(layer, q, k, v, None, scaling=d ** -0.5),
            "stock": lambda: nn.functional.scaled_dot_product_attention(q9, k, v, is_causal=causal, enable_gqa=True),
        }, args.repeats)
        rows.append(f"| {label} | {1e3 * t['gather']:.3f} | {1e3 * t['new']:.3f} | {t['new'] / t['gather']:.2f} | "
                    f"{1e3 * t['stock']:.3f} | {t['new'] / t['stock']:.2f} |")
        print(rows[-1], flush=True)

    with torch.no_grad():
        case(f"prefill {args.prefill} tokens", args.prefill, args.prefill)
        for c in (int(x) for x in args.contexts.split(",")):
            case(f"decode 1 token at {c}", 1, c)

    load = os.getloadavg()
    cmd = " ".join(["python benchmarks/bench_attention.py", *sys.argv[1:]])
    lines = [
        "## Attention function alone (uneven groups), CPU",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, torch {torch.__version__}, {args.threads} thread(s), "
        f"float32; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end.  ",
        f"One layer keeping 8 of 9 query heads (head_dim {d}) over {nkv} KV heads in groups of 3, 3, 2; medians of "
        f"{args.repeats} interleaved runs, milliseconds. *gather* = the K/V copy the sliced export made before; *new* = "
        "`pruned_attention` now; *stock 9 heads* = the unpruned layer through SDPA's GQA. The new path's output equals "
        "the gather path's (checked).",
        "",
        "| workload | gather ms | new ms | new / gather | stock 9 heads ms | new / stock |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
