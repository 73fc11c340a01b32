"""Big models on a small machine: peak memory and time of ``export`` (with its default verification) and
``calibrate`` on random-weight checkpoints with real models' shapes, beside what the memory model predicts.

    python benchmarks/bench_scale.py --shape llama-3.2-1b                 # about 2 GB of disk, minutes
    python benchmarks/bench_scale.py --shape llama-3.1-8b --stages export # 16 GB of disk, 24 GB of RAM suffice
    python benchmarks/bench_scale.py --quick                              # a tiny shape, seconds (the tests run it)

Memory and time do not depend on the weights' values, so the checkpoints are random (bfloat16, written shard
by shard under ``--root``, default ``/tmp/scale``, never held whole, and deleted afterwards unless ``--keep``).
Each command runs as the CLI runs it, in a child process; the peak RSS of the child and all its children is
sampled from ``/proc`` every 20 ms (file pages the process maps count, as the kernel counts them). Each figure
is given in GiB and as a multiple of the largest shard, with the prediction of ``predict()`` beside it.
Writes ``benchmarks/results/scale.md`` (``--out`` elsewhere), one section per shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.md"
GIB = 2**30

SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False),
}
#: the published checkpoints' shard size
SHARD = {"llama-3.2-1b": "5GB", "llama-3.1-8b": "5GB", "tiny": "60KB"}


# ---- the checkpoint ---------------------------------------------------------------------------------
def write_checkpoint(shape: str, out: Path) -> dict:
    """A random bfloat16 Llama with ``shape``'s shapes, one shard buffered at a time; returns its sizes."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from prune_heads.export.streaming import ShardWriter, parse_size

    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_tokenizer import tiny_tokenizer

    cfg = AutoConfig.for_model("llama", **SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.dtype = "bfloat16"
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg)
    out.mkdir(parents=True)
    writer = ShardWriter(out, parse_size(SHARD[shape]))
    g = torch.Generator().manual_seed(0)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for name, p in skeleton.named_parameters():
        if name in tied:
            continue
        t = torch.empty(p.shape, dtype=torch.bfloat16)
        if "norm" in name:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=g)
        writer.add(name, t)
    writer.close()
    cfg.save_pretrained(out)
    tiny_tokenizer(out)
    return sizes(out, shape)


def sizes(path: Path, shape: str) -> dict:
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.sequential_engine import ShardReader, skeleton

    reader = ShardReader(path)
    sk = skeleton(path)
    adapter = get_adapter(sk)
    layout = adapter.layout(sk.config)
    layer_numel = reader.largest_layer(adapter, layout.num_layers)
    shards = [(path / s).stat().st_size for s in reader.src.shards]
    numel, nbytes = reader.sizes()
    embed = reader.shape(f"{adapter.embed_name}.weight")
    return {"shape": shape, "params": numel, "bytes": nbytes, "largest_shard": max(shards), "shards": len(shards),
            "layer_params": layer_numel, "layers": layout.num_layers, "heads": layout.num_heads,
            "kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim, "hidden": layout.hidden_size,
            "vocab": embed[0], "largest_tensor": max(reader.shape(n)[0] * (reader.shape(n)[1] if len(reader.shape(n)) > 1 else 1)
                                                     for n in reader.src.weight_map)}


def write_plan(info: dict, path: Path, fraction: float = 0.25) -> int:
    """A seeded random plan removing ``fraction`` of the heads (at least one kept per layer)."""
    import random

    rng = random.Random(0)
    removed = []
    for layer in range(info["layers"]):
        removed += [[layer, h] for h in sorted(rng.sample(range(info["heads"]), int(info["heads"] * fraction)))]
    path.write_text(json.dumps({"removed_heads": removed}))
    return len(removed)


# ---- measuring --------------------------------------------------------------------------------------
def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cmd: list[str], env: dict[str, str], interval: float = 0.02) -> dict:
    """Run ``cmd``; its wall time, exit status, and the peak RSS of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    out_lines: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(interval)
    reader.join()
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_rss": peak, "output": "".join(out_lines)}


def baseline(env: dict[str, str]) -> int:
    """RSS of an interpreter that has imported what every command imports (torch, transformers, the CLI)."""
    code = ("import torch, transformers, prune_heads.cli.main, prune_heads.model.sequential_engine\n"
            "from transformers import AutoModelForCausalLM\n"
            "print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmRSS')][0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) * 1024


# ---- the memory model --------------------------------------------------------------------------------
def predict(stage: str, info: dict, base: int, *, tokens: int = 256) -> int:
    """Predicted peak RSS of ``stage`` (bytes): what the code holds at its fullest moment.

    - ``export --no-verify``: one output shard buffered (at most the shard size) + the largest source tensor
      read and its sliced copy, beside the interpreter;
    - ``verify`` (layer-sequential, float64): one decoder layer of each model in float64, the largest tensor's
      transients while it is cast (bfloat16 read, float32, float64), one LM-head chunk likewise, activations;
    - ``calibrate`` (layer-sequential): one layer in float32 + its moments in float64 + the activations.
    """
    from prune_heads.model.sequential_engine import HEAD_CHUNK_ROWS

    shard = info["largest_shard"]
    big = info["largest_tensor"]
    act = tokens * info["hidden"] * 8 * 8 + tokens * min(info["vocab"], HEAD_CHUNK_ROWS) * 8 * 2
    if stage == "export_no_verify":
        return base + min(shard, info["bytes"]) + 2 * 2 * big
    if stage == "verify":
        chunk = min(info["vocab"], HEAD_CHUNK_ROWS) * info["hidden"]
        return base + 2 * 8 * info["layer_params"] + (2 + 4 + 8) * big + 2 * (2 + 4 + 8) * chunk + act
    if stage == "export":
        return max(predict("export_no_verify", info, base), predict("verify", info, base, tokens=tokens))
    if stage == "calibrate":
        width = info["heads"] * info["head_dim"]
        moments = info["layers"] * width * width * 8
        return base + 4 * info["layer_params"] + moments + (2 + 4) * big + act
    raise ValueError(stage)


# ---- the stages ------------------------------------------------------------------------------------
def run_stage(stage: str, src: Path, work: Path, env: dict[str, str], info: dict) -> dict:
    cli = [sys.executable, "-m", "prune_heads.cli.main"]
    if stage == "export":
        out = work / "export"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*cli, "export", str(src), "--plan", str(work / "plan.json"), "-o", str(out)]
    elif stage == "export_no_verify":
        out = work / "export-nv"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*cli, "export", str(src), "--plan", str(work / "plan.json"), "-o", str(out), "--no-verify"]
    elif stage == "calibrate":
        out = work / "scores"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*cli, "calibrate", str(src), "--data", "wikitext2", "--num-samples", "4", "--seq-len", "64",
               "--device", "cpu", "-o", str(out)]
    else:
        raise ValueError(stage)
    res = measure(cmd, env)
    res["cmd"] = " ".join(["prune-heads", *cmd[3:]]).replace(str(work), "$WORK").replace(str(src), "$MODEL")
    if stage.startswith("export") and res["rc"] == 0:
        prov = json.loads((out / "prune_heads.json").read_text())
        res["verification"] = prov.get("verification")
        shutil.rmtree(out, ignore_errors=True)  # 15 GB for the 8B: gone before the next stage
    return res


def fmt_row(stage: str, res: dict, info: dict, base: int) -> str:
    shard = info["largest_shard"]
    pred = predict(stage, info, base)
    v = res.get("verification") or {}
    verdict = ""
    if v:
        verdict = (f"{'passed' if v['passed'] else 'FAILED'}, max abs logit diff {v['max_abs_logit_diff']:.3g} "
                   f"({v.get('engine', 'memory')})")
    status = "ok" if res["rc"] == 0 else f"exit {res['rc']}"
    return (f"| `{stage}` | {res['peak_rss'] / GIB:.2f} | {res['peak_rss'] / shard:.2f}x | {pred / GIB:.2f} "
            f"({pred / shard:.2f}x) | {res['wall_s']:.0f} | {status} | {verdict} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    ap.add_argument("--quick", action="store_true", help="the tiny shape (for the tests)")
    ap.add_argument("--stages", default="export_no_verify,export,calibrate")
    ap.add_argument("--root", default="/tmp/scale")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint for another run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    shape = "tiny" if args.quick else args.shape
    root = Path(args.root)
    src, work = root / shape, root / f"{shape}-work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    try:
        t0 = time.perf_counter()
        if not (src / "config.json").is_file():
            shutil.rmtree(src, ignore_errors=True)
            info = write_checkpoint(shape, src)
        else:
            info = sizes(src, shape)
        write_s = time.perf_counter() - t0
        work.mkdir(parents=True, exist_ok=True)
        removed = write_plan(info, work / "plan.json")
        base = baseline(env)
        rows = []
        for stage in args.stages.split(","):
            res = run_stage(stage, src, work, env, info)
            print(fmt_row(stage, res, info, base), flush=True)
            if res["rc"] != 0:
                print(res["output"][-3000:], file=sys.stderr)
            rows.append((stage, res))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    write_section(Path(args.out), shape, info, base, removed, rows, write_s, args)
    return 0 if all(r["rc"] == 0 for _, r in rows) else 1


def write_section(out: Path, shape: str, info: dict, base: int, removed: int, rows: list, write_s: float,
                  args: argparse.Namespace) -> None:
    import torch

    load = os.getloadavg()
    lines = [
        f"## Scale: {shape} shapes, random bfloat16 weights, CPU",
        "",
        f"Command: `python benchmarks/bench_scale.py --shape {shape} --stages {args.stages} --threads {args.threads}`  ",
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, {_mem_total() / GIB:.0f} GiB RAM (shared), torch "
        f"{torch.__version__}; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end.  ",
        f"Checkpoint: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / GIB:.2f} GiB in {info['shards']} "
        f"shard(s), largest shard {info['largest_shard'] / GIB:.2f} GiB, {info['layers']} layers of "
        f"{info['layer_params'] / 1e6:.0f} M parameters; written in {write_s:.0f} s. Plan: {removed} of "
        f"{info['layers'] * info['heads']} heads (seeded random). Interpreter baseline (torch, transformers and the "
        f"CLI imported): {base / GIB:.2f} GiB.",
        "",
        "Peak RSS of the command's whole process tree (sampled every 20 ms), as GiB and as a multiple of the largest "
        "shard; predicted = `predict()` in this script (its docstring lists what it counts).",
        "",
        "| stage | peak RSS GiB | x largest shard | predicted GiB (x shard) | wall s | status | verification |",
        "|---|---:|---:|---:|---:|---|---|",
        *[fmt_row(stage, res, info, base) for stage, res in rows],
        "",
        "Commands (`$MODEL` = the random checkpoint, `$WORK` = scratch):",
        "",
        *[f"- `{res['cmd']}`" for _, res in rows],
        "",
    ]
    section = "\n".join(lines)
    old = out.read_text() if out.exists() else ""
    parts = [p for p in old.split("\n## ") if p.strip()]
    keep = [("## " + p if not p.startswith("## ") else p) for p in parts
            if not (p.lstrip("# ").startswith(f"Scale: {shape} "))]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join([*(k.rstrip() + "\n" for k in keep), section]))


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    sys.exit(main())
