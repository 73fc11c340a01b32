"""Big models on a small machine: peak memory and time of ``export`` (with its default verification) and
``calibrate`` on random-weight checkpoints with real models' shapes, beside what the memory model predicts;
and the time the layer-sequential engine costs against the in-memory path on SmolLM2.

    python benchmarks/bench_scale.py --shape llama-3.2-1b                           # 2.3 GB of disk, minutes
    python benchmarks/bench_scale.py --shape llama-3.1-8b --stages export --keep    # 16 GB of disk, one stage
    python benchmarks/bench_scale.py --shape smollm2 --stages calibrate_memory,calibrate_sequential
    python benchmarks/bench_scale.py --part cost                                    # SmolLM2, interleaved
    python benchmarks/bench_scale.py --report                                       # the markdown only
    python benchmarks/bench_scale.py --quick                                        # a tiny shape, seconds

Memory and time do not depend on the weights' values, so the checkpoints are random (bfloat16, written shard
by shard under ``--root``, default ``/tmp/scale``, never held whole, and deleted afterwards unless ``--keep``).
``smollm2`` uses the real model (the float32 checkpoint the GGUF converts to). Each command runs as the CLI
runs it, in a child process; the peak RSS of the child and all its children is sampled from ``/proc`` every
50 ms (file pages the process maps count, as the kernel counts them), and the kernel's own high-water mark
(``ru_maxrss``: exact, but of the largest single process of the tree, not summed) is kept beside it. Each figure is given in GiB and as a multiple of the largest shard
and of one decoder layer, with the prediction of ``predict()`` and the target of ``target()`` beside it.

Every measurement is kept in ``benchmarks/results/scale.json`` (one entry per shape and stage, replaced when
measured again), so the 8B stages can be run one at a time, each in its own invocation, and
``benchmarks/results/scale.md`` is written again from all of them each time (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.md"
GIB = 2**30

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                tie_word_embeddings=True, rope_theta=500000.0)
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                tie_word_embeddings=False, rope_theta=500000.0)
LLAMA_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                 tie_word_embeddings=False, rope_theta=500000.0)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
#: shapes written as random checkpoints (``smollm2`` is the real model; ``llama-3.1-70b`` is predicted only)
SHAPES = {"llama-3.2-1b": LLAMA_1B, "llama-3.1-8b": LLAMA_8B, "tiny": TINY}
PREDICTED_ONLY = {"llama-3.1-70b": LLAMA_70B}
ALL_SHAPES = ["smollm2", *SHAPES, *PREDICTED_ONLY]
#: the published checkpoints' shard size
SHARD = {"llama-3.2-1b": "5GB", "llama-3.1-8b": "5GB", "llama-3.1-70b": "5GB", "tiny": "60KB"}
#: stages measured by default per shape (the 8B's whole-model stages need more than this machine has)
DEFAULT_STAGES = {
    "tiny": "export_no_verify,export,calibrate",
    "smollm2": "export_no_verify,export_memory,export_sequential,calibrate_memory,calibrate_sequential",
    "llama-3.2-1b": ("export_no_verify,export,calibrate_memory,calibrate_sequential,select_memory,select_sequential,"
                     "eval_memory,eval_sequential"),
    "llama-3.1-8b": "export_no_verify,export,calibrate",
}
#: the calibration the benchmark runs: a few short sequences (all forward scores and the moments)
CAL_SAMPLES, CAL_SEQ_LEN = 4, 64
#: select/eval on ``ppl:`` (both engines): short documents keep each probe's pass cheap on 2 cores
PPL_DOCS, PPL_WORDS, PPL_LIMIT = 16, 48, 8
SELECT_ARGS = ["--limit", str(PPL_LIMIT), "--max-drop", "0.01", "--relative", "--gqa", "kv-groups"]
#: the verification export runs by default (``export --verify-sequences 4 --verify-seq-len 64``)
VERIFY_TOKENS = 4 * 64


# ---- shapes -----------------------------------------------------------------------------------------
def shape_info(cfg: dict[str, Any]) -> dict[str, Any]:
    """Sizes of a Llama-shaped model computed from its config alone (the memory model's inputs).

    Per layer: q/k/v/o projections, the gated MLP and two RMSNorm gains; plus the embedding, the LM head
    (unless tied) and the final norm. The benchmark checks these against the checkpoint's own headers.
    """
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // nh
    layer = h * nh * hd * 2 + 2 * h * kv * hd + 3 * h * i + 2 * h
    params = cfg["num_hidden_layers"] * layer + v * h * (1 if cfg.get("tie_word_embeddings") else 2) + h
    return {"params": params, "layer_params": layer, "layers": cfg["num_hidden_layers"], "heads": nh,
            "kv_heads": kv, "head_dim": hd, "hidden": h, "intermediate": i, "vocab": v,
            "largest_tensor": max(v * h, h * i)}


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
    """The checkpoint's sizes read from its shard headers, beside ``shape_info`` of its config."""
    from prune_heads.model.adapters import get_adapter
    from prune_heads.model.sequential_engine import ShardReader, skeleton

    reader = ShardReader(path)
    sk = skeleton(path)
    adapter = get_adapter(sk)
    layout = adapter.layout(sk.config)
    info = shape_info(json.loads((path / "config.json").read_text()))
    layer_numel = reader.largest_layer(adapter, layout.num_layers)
    if layer_numel != info["layer_params"]:
        raise SystemExit(f"{path}: a layer has {layer_numel} parameters, shape_info() says {info['layer_params']}")
    shards = [(path / s).stat().st_size for s in reader.src.shards]
    numel, nbytes = reader.sizes()
    return {**info, "shape": shape, "params": numel, "bytes": nbytes, "largest_shard": max(shards),
            "shards": len(shards), "dtype_bytes": nbytes / numel}


def predicted_info(shape: str) -> dict:
    """``sizes()`` of a checkpoint that is not written: bfloat16, shards of the published size."""
    from prune_heads.export.streaming import parse_size

    info = shape_info(PREDICTED_ONLY[shape])
    nbytes = 2 * info["params"]
    shard = min(parse_size(SHARD[shape]), nbytes)
    return {**info, "shape": shape, "bytes": nbytes, "largest_shard": shard, "shards": -(-nbytes // shard),
            "dtype_bytes": 2}


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
def _tree_rss(pid: int) -> tuple[int, int]:
    """``(RSS, anonymous RSS)`` summed over ``pid`` and all its descendants (from ``/proc``)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = anon = 0
    for p in procs:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
        anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
    return total, anon


def measure(cmd: list[str], env: dict[str, str], interval: float = 0.05) -> dict:
    """Run ``cmd``; its wall time, exit status, and the peak RSS of its process tree (sampled), the peak of its
    anonymous part, and the kernel's high-water mark (``ru_maxrss`` of the child, which covers the descendants
    it waited for: the largest single process, exact but not summed)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = peak_anon = 0
    out_lines: list[str] = []
    reader = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss, anon = _tree_rss(proc.pid)
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        time.sleep(interval)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss": peak, "peak_anon": peak_anon,
            "hwm": usage.ru_maxrss * 1024, "output": "".join(out_lines)}


def baseline(env: dict[str, str]) -> int:
    """RSS of an interpreter that has imported what every command imports (torch, transformers, the CLI)."""
    code = ("import torch, transformers, prune_heads.cli.main, prune_heads.model.sequential_engine\n"
            "from transformers import AutoModelForCausalLM\n"
            "print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmRSS')][0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1]) * 1024


# ---- the memory model --------------------------------------------------------------------------------
def activations(info: dict, tokens: int, width: int, *, batch: int = 1, seq: int = 64) -> int:
    """What one layer's forward holds besides weights: hidden states in and out and the residual (3 x tokens x
    hidden), the MLP's gate/up/product (3 x tokens x intermediate), q/k/v/attention output (4 x tokens x
    heads x head_dim) and the attention probabilities (batch x heads x seq^2), each ``width`` bytes."""
    n = info["heads"] * info["head_dim"]
    return width * (tokens * (3 * info["hidden"] + 3 * info["intermediate"] + 4 * n) + batch * info["heads"] * seq * seq)


def moments_bytes(info: dict) -> int:
    """One layer's float64 o_proj-input moments: the Gram matrix and its relative twin (n x n each) and the
    vectors beside them (sum, sum_rel, residuals: a few x n)."""
    n = info["heads"] * info["head_dim"]
    return 8 * (2 * n * n + 6 * n)


def solve_bytes(info: dict) -> int:
    """What solving compensation holds: one layer's moments read from the file, the precisions the compensator
    keeps (at most ``PRECISION_CACHE_BYTES``) and the solved layers it keeps (at most ``LAYER_CACHE_BYTES``, with
    their copies in the run dtype: up to half as much again), and one probe's compensation of every layer (at most
    ``(n / 2)^2`` float64 values a layer, ``n = H D``)."""
    from prune_heads.compensation.compensator import LAYER_CACHE_BYTES, PRECISION_CACHE_BYTES

    n = info["heads"] * info["head_dim"]
    probe = info["layers"] * 8 * (n // 2) ** 2 * 3 // 2  # one probe's compensation, every layer, + run-dtype copy
    return (moments_bytes(info) + min(PRECISION_CACHE_BYTES, info["layers"] * 8 * n * n) + LAYER_CACHE_BYTES * 3 // 2
            + probe)


def predict(stage: str, info: dict, base: int, *, tokens: int = VERIFY_TOKENS, cal_tokens: int = CAL_SAMPLES * CAL_SEQ_LEN,
            device: str = "cpu") -> int:
    """Predicted peak memory of ``stage`` (bytes): what the code holds at its fullest moment.

    ``device="cpu"`` predicts the RSS of the process (``base``, the interpreter, included); ``"cuda"`` the
    device memory (no interpreter; weights are read on the host and moved one tensor at a time, so the host
    transients are left out). With ``L`` the largest layer's parameters, ``P`` all parameters, ``w`` the
    checkpoint's bytes per parameter, ``C = min(vocab, HEAD_CHUNK_ROWS)`` LM-head rows:

    - ``export_no_verify``: one output shard buffered (at most the shard size) + the largest source tensor
      read and its sliced copy (``2 x w x largest``);
    - ``verify`` layer by layer (float64, then float32 again): one layer of each model in float64
      (``2 x 8 L``), the cast's transients of the layer's largest weight (``w + 4 + 8`` bytes each), an LM-head chunk of
      each model in float64 with its logits (``2 x 8 C (hidden + tokens)``), and both models' hidden states in
      float64 and float32 with one layer's activations;
    - ``verify`` in memory: both models whole in float64 (``2 x 8 P``) + the activations and full logits;
      every whole-model stage (``*_memory``) also counts the checkpoint's file pages, which ``from_pretrained``
      maps and reads (they count in RSS on the CPU);
    - ``export``: the larger of ``export_no_verify`` and the verification its ``auto`` engine chooses;
    - layer by layer, on the CPU, the shard pages of the layer being read count too (``w L`` per model: the
      shards are memory-mapped while a layer is read);
    - ``calibrate`` layer by layer: one layer in the checkpoint dtype (``w L``) + the largest tensor's read,
      one layer's float64 moments, every sequence's hidden states (float32) and one layer's activations
      (float32);
    - ``calibrate`` in memory: the model whole (``w P``) + every layer's float64 moments + the activations;
    - ``select``/``eval`` on ``ppl:``: in memory the model whole + one batch with its logits; layer by layer two
      layers, every document's hidden states, one LM-head chunk and one batch with its logits; ``select`` with
      compensation also ``solve_bytes()`` (one layer's moments, the compensator's bounded caches).
    """
    from prune_heads.model.sequential_engine import HEAD_CHUNK_ROWS

    gpu = device != "cpu"
    base = 0 if gpu else base
    # from_pretrained maps the shards (safetensors mmap): the pages it has read count in RSS until unmapped
    mapped = 0 if gpu else info["bytes"]
    w = info["dtype_bytes"]
    big = info["largest_tensor"]
    # a decoder layer's largest weight (the MLP's or the attention's): layer by layer the embedding and LM head
    # are read by rows, never whole
    layer_big = info["hidden"] * max(info["intermediate"], info["heads"] * info["head_dim"])
    chunk = min(info["vocab"], HEAD_CHUNK_ROWS)
    if stage == "export_no_verify":
        return base + min(info["largest_shard"], info["bytes"]) + 2 * big * w
    if stage == "verify_sequential":
        read = 0 if gpu else (w + 4 + 8) * layer_big + 2 * w * info["layer_params"]  # + both layers' mapped pages
        states = 2 * tokens * info["hidden"] * (8 + 4)
        return (base + 2 * 8 * info["layer_params"] + read + 2 * 8 * chunk * (info["hidden"] + tokens) + states
                + activations(info, tokens, 8, batch=4, seq=tokens // 4))
    if stage == "verify_memory":
        return (base + 2 * 8 * info["params"] + 2 * mapped + 2 * 8 * tokens * info["vocab"]
                + activations(info, tokens, 8, batch=4, seq=tokens // 4))
    if stage in ("export", "export_sequential", "export_memory"):
        verify = "verify_memory" if stage == "export_memory" else "verify_sequential"
        if stage == "export" and auto_engine("verify", info, base) == "memory":
            verify = "verify_memory"
        return max(predict("export_no_verify", info, base), predict(verify, info, base, tokens=tokens))
    if stage.startswith(("select_", "eval_")):
        # every document's tokens; one batch of 8 in flight with its logits (the model's dtype, float32 and log-probs)
        doc_tokens = PPL_LIMIT * (PPL_WORDS + 1)
        batch = min(8, PPL_LIMIT) * (PPL_WORDS + 1)
        act = activations(info, batch, w, batch=min(8, PPL_LIMIT), seq=PPL_WORDS + 1) + batch * info["vocab"] * (w + 8)
        if stage.startswith("select_") and not gpu:  # compensation is solved on the host, from the moments file
            act += solve_bytes(info)
        if stage.endswith("_memory"):
            return base + w * info["params"] + mapped + act
        read = 0 if gpu else 4 * layer_big
        return base + 2 * w * info["layer_params"] + read + 2 * doc_tokens * info["hidden"] * w + w * chunk * info["hidden"] + act
    act = activations(info, cal_tokens, 4, batch=CAL_SAMPLES, seq=CAL_SEQ_LEN)
    hidden = cal_tokens * info["hidden"] * 4
    if stage == "calibrate_sequential":
        read = 0 if gpu else 4 * layer_big + w * info["layer_params"]  # + the layer's mapped file pages
        return base + w * info["layer_params"] + read + moments_bytes(info) + 2 * hidden + act
    if stage == "calibrate_memory":
        return base + w * info["params"] + mapped + info["layers"] * moments_bytes(info) + 2 * hidden + act
    if stage == "calibrate":
        return predict(f"calibrate_{auto_engine('calibrate', info, base)}", info, base)
    raise ValueError(stage)


def auto_engine(what: str, info: dict, base: int, free: int | None = None) -> str:
    """The engine ``auto`` should pick by this memory model: the whole model if it fits in 70% of the
    memory available (``prune_heads.model.sequential_engine.HEADROOM``), else layer by layer."""
    from prune_heads.model.sequential_engine import HEADROOM, available_memory

    free = available_memory() if free is None else free
    whole = predict(f"{what}_memory", info, base) - base
    return "memory" if whole <= HEADROOM * free else "sequential"


def target(stage: str, info: dict) -> tuple[int, str] | None:
    """The issue's bound for ``stage`` on the 8B shape (bytes) and how it reads, or None.

    export: 1.6 x the largest shard. calibrate: the largest shard + 2 layers (checkpoint dtype) + the
    activations, taken as ``predict``'s calibration activations, every sequence's hidden states and one layer's
    float64 moments (the interpreter is not in the bound: it is reported beside it).
    """
    shard = info["largest_shard"]
    if info.get("shape") != "llama-3.1-8b":  # the issue sets them for the 8B (a small model's interpreter dominates)
        return None
    if stage in ("export", "export_sequential"):
        return int(1.6 * shard), "1.6 x shard"
    if stage in ("calibrate", "calibrate_sequential"):
        cal_tokens = CAL_SAMPLES * CAL_SEQ_LEN
        act = (activations(info, cal_tokens, 4, batch=CAL_SAMPLES, seq=CAL_SEQ_LEN) + 2 * cal_tokens * info["hidden"] * 4
               + moments_bytes(info))
        return int(shard + 2 * info["dtype_bytes"] * info["layer_params"] + act), "shard + 2 layers + act."
    return None


# ---- the stages ------------------------------------------------------------------------------------
def stage_command(stage: str, src: Path, work: Path) -> tuple[list[str], Path]:
    cli = [sys.executable, "-m", "prune_heads.cli.main"]
    plan = ["--plan", str(work / "plan.json")]
    if stage.startswith("export"):
        out = work / stage
        extra = {"export": [], "export_no_verify": ["--no-verify"], "export_memory": ["--engine", "memory"],
                 "export_sequential": ["--engine", "sequential"]}[stage]
        return [*cli, "export", str(src), *plan, "-o", str(out), *extra], out
    if stage.startswith("calibrate"):
        out = work / stage
        extra = {"calibrate": [], "calibrate_memory": ["--engine", "memory"],
                 "calibrate_sequential": ["--engine", "sequential"]}[stage]
        return [*cli, "calibrate", str(src), "--data", "wikitext2", "--num-samples", str(CAL_SAMPLES), "--seq-len",
                str(CAL_SEQ_LEN), "--device", "cpu", "-o", str(out), *extra], out
    engine = stage.rpartition("_")[2]
    task = ["--task", f"ppl:{work / 'docs.jsonl'}"]
    if stage in ("select_memory", "select_sequential"):
        out = work / f"{stage}.json"
        return [*cli, "select", str(work / "calibrate_sequential"), "--model", str(src), *task, *SELECT_ARGS,
                "--device", "cpu", "--engine", engine, "-o", str(out)], out
    if stage in ("eval_memory", "eval_sequential"):
        out = work / f"{stage}.json"
        plan = work / "select_memory.json"  # the plan select found, else the seeded random one
        plan = plan if plan.is_file() else work / "plan.json"
        return [*cli, "eval", str(src), "--plan", str(plan), *task, "--limit", str(PPL_LIMIT),
                "--device", "cpu", "--engine", engine, "-o", str(out)], out
    raise SystemExit(f"unknown stage {stage!r}")


def write_docs(path: Path) -> None:
    """``PPL_DOCS`` WikiText-2 paragraphs cut to ``PPL_WORDS`` words each, as the ``ppl:`` task's documents."""
    from prune_heads.data.documents import iter_documents

    docs = []
    for text in iter_documents("wikitext2"):
        words = text.split()
        if len(words) >= PPL_WORDS:
            docs.append(" ".join(words[:PPL_WORDS]))
        if len(docs) == PPL_DOCS:
            break
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def _current(plan: dict) -> dict:
    """A plan written before several guards (one ``guard`` record or null) in today's form (``guards``), as
    ``SelectionResult.from_dict`` reads it, so a plan kept from an earlier run compares by content."""
    if isinstance(plan, dict) and "guard" in plan and "guards" not in plan:
        plan = {k: v for k, v in plan.items() if k != "guard"} | {"guards": [plan["guard"]] if plan["guard"] else []}
    return plan


def same_outcome(a: dict, b: dict) -> str:
    """Whether two engines' plans (or eval results) agree: every number and decision, but for timings, file
    names (each run writes its own compensation file), the date and the engine tags (``tests/test_select_sequential.py``
    compares the same way)."""
    skip = {"seconds", "wall_seconds", "engine", "file", "date"}

    def diffs(x: Any, y: Any, where: str) -> list[str]:
        if isinstance(x, dict) and isinstance(y, dict):
            out = []
            for k in sorted((set(x) | set(y)) - skip):
                out += diffs(x.get(k), y.get(k), f"{where}.{k}" if where else k)
            return out
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            return [d for i, (u, v) in enumerate(zip(x, y, strict=True)) for d in diffs(u, v, f"{where}[{i}]")]
        return [] if x == y else [where or "."]

    found = diffs(_current(a), _current(b), "")
    return "identical" if not found else "DIFFER at " + ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")


def package_estimate(stage: str, src: Path) -> int | None:
    """The package's own estimate of ``stage``'s peak (``sequential_engine.Footprint.peaks``, the numbers
    ``--engine auto`` and the recipe preflight judge by), with the keywords its stage passes for this run;
    without the interpreter. None for the export stages (their verification judges the fit apart)."""
    try:
        from prune_heads.evaluation.perplexity import DEFAULT_SEQ_LEN
        from prune_heads.model.sequential_engine import Footprint
    except ImportError:  # a package without the memory model
        return None
    kind, _, engine = stage.partition("_")
    if kind == "calibrate":
        kw = {"batch_tokens": 8 * CAL_SEQ_LEN, "all_tokens": CAL_SAMPLES * CAL_SEQ_LEN, "moments": "stream",
              "logits": False}
    elif kind in ("select", "eval"):  # select solves lsq compensation from the moments; eval applies a plan's
        kw = {"batch_tokens": 8 * DEFAULT_SEQ_LEN, "all_tokens": PPL_LIMIT * DEFAULT_SEQ_LEN,
              "moments": "solve" if kind == "select" else "none"}
    else:
        return None
    whole, streamed = Footprint(src).peaks(**kw)
    return whole if engine == "memory" else streamed


def run_stage(stage: str, src: Path, work: Path, env: dict[str, str]) -> dict:
    cmd, out = stage_command(stage, src, work)
    shutil.rmtree(out, ignore_errors=True)
    load0 = os.getloadavg()[0]
    res = measure(cmd, env)
    res["load"] = [load0, os.getloadavg()[0]]
    res["when"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res["cmd"] = " ".join(["prune-heads", *cmd[3:]]).replace(str(work), "$WORK").replace(str(src), "$MODEL")
    res["engine"] = stage.rpartition("_")[2] if stage.endswith(("_memory", "_sequential")) else None
    res["package_estimate"] = package_estimate(stage if stage != "calibrate" else "calibrate_sequential", src)
    if stage.startswith("export") and res["rc"] in (0, 1) and (out / "prune_heads.json").is_file():
        prov = json.loads((out / "prune_heads.json").read_text())
        res["verification"] = prov.get("verification")
        if res["verification"]:
            res["engine"] = res["verification"].get("engine")
    if stage == "calibrate":
        res["engine"] = "sequential" if "runs layer by layer" in res["output"] else "memory"
    if stage.startswith("calibrate") and res["rc"] == 0:
        meta = json.loads((out / "scores.json").read_text()) if (out / "scores.json").is_file() else {}
        res["scores"] = meta.get("scores")
        res["moments"] = (out / "moments.safetensors").is_file()
    if stage.startswith(("select", "eval")) and res["rc"] == 0:
        res["result"] = json.loads(out.read_text())
        if stage.endswith("_sequential") and (out.parent / out.name.replace("sequential", "memory")).is_file():
            res["same_as_memory"] = same_outcome(json.loads((out.parent / out.name.replace("sequential", "memory"))
                                                            .read_text()), res["result"])
        if stage.startswith("select"):
            res["removed"] = len(res["result"].get("removed_heads", []))
        else:
            task = res["result"]["tasks"][0]
            res["values"] = [task["baseline"]["value"], task["pruned"]["value"]]
        res.pop("result")
    if stage == "calibrate_sequential" and res["rc"] == 0:
        res["output"] = res["output"][-4000:]
        return res  # its scores feed select_*: kept until the work directory goes
    if not stage.startswith("select"):
        shutil.rmtree(out, ignore_errors=True)  # 15 GB for the 8B export: gone before the next stage
    res["output"] = res["output"][-4000:]
    return res


def source_for(shape: str, root: Path, keep: bool) -> tuple[Path, dict, float, bool]:
    """``(checkpoint, sizes, seconds to write it, delete it afterwards)``."""
    if shape == "smollm2":
        from prune_heads.model.loading import gguf_to_plain, resolve_model_spec

        src = gguf_to_plain(*resolve_model_spec("smollm2"), progress=False)
        return src, sizes(src, shape), 0.0, False
    src = root / shape
    if (src / "config.json").is_file():
        return src, sizes(src, shape), 0.0, not keep
    shutil.rmtree(src, ignore_errors=True)
    t0 = time.perf_counter()
    info = write_checkpoint(shape, src)
    return src, info, time.perf_counter() - t0, not keep


# ---- the cost of the engine (SmolLM2, in one process) -------------------------------------------------
def score_gap(a: Any, b: Any) -> float:
    """Largest |difference| between two ``HeadScores``' means and per-sample values, over every score."""
    if a.score_ids != b.score_ids:
        raise SystemExit(f"the engines scored different ids: {a.score_ids} against {b.score_ids}")
    gaps = [float((a.mean(k).double() - b.mean(k).double()).abs().max()) for k in a.score_ids]
    gaps += [float((a.per_sample_values[k].double() - b.per_sample_values[k].double()).abs().max())
             for k in a.score_ids if k in a.per_sample_values]
    return max(gaps)


def cost(repeats: int, num_samples: int, seq_len: int) -> dict:
    """Layer by layer against in memory on SmolLM2, ``repeats`` interleaved pairs (order alternating) of
    ``calibrate`` (load + all forward scores + moments) and of the export's verification (both engines on the
    same export): each time end to end, as the stage runs it. Also the largest difference of their results."""
    import torch

    from prune_heads.data import DataSpec, calibration_sequences
    from prune_heads.export.checkpoint import export_checkpoint
    from prune_heads.export.verify import verify_export
    from prune_heads.model.loading import gguf_to_plain, load_model, resolve_model_spec
    from prune_heads.plan import Plan
    from prune_heads.scoring.calibrate import calibrate
    from prune_heads.scoring.sequential import calibrate_sequential

    torch.set_num_threads(1)
    src = gguf_to_plain(*resolve_model_spec("smollm2"), progress=False)
    loaded = load_model(str(src), device="cpu")
    seqs = calibration_sequences(DataSpec(source="wikitext2", num_samples=num_samples, seq_len=seq_len),
                                 loaded.tokenizer, loaded.model)
    pad = int(loaded.tokenizer.pad_token_id or 0)
    info = sizes(src, "smollm2")
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-cost-"))
    try:
        write_plan(info, tmp / "plan.json")
        plan = Plan.load(tmp / "plan.json")
        export_checkpoint(str(src), plan, tmp / "export", verify=False, progress=False)
        del loaded

        def cal_memory() -> Any:
            m = load_model(str(src), device="cpu")
            return calibrate(m.model, seqs, batch_size=8, tokenizer=m.tokenizer, progress=False)

        def cal_sequential() -> Any:
            work = tmp / "layers"
            shutil.rmtree(work, ignore_errors=True)
            return calibrate_sequential(src, seqs, work, batch_size=8, pad_id=pad, progress=False)

        def ver(engine: str) -> dict:
            return verify_export(str(src), tmp / "export", plan, engine=engine)

        jobs = {"calibrate": {"memory": cal_memory, "sequential": cal_sequential},
                "verify": {"memory": lambda: ver("memory"), "sequential": lambda: ver("sequential")}}
        times: dict[str, dict[str, list[float]]] = {k: {"memory": [], "sequential": []} for k in jobs}
        last: dict[str, dict[str, Any]] = {k: {} for k in jobs}
        for r in range(repeats):
            for what, pair in jobs.items():
                order = ["memory", "sequential"] if r % 2 == 0 else ["sequential", "memory"]
                for engine in order:
                    t0 = time.perf_counter()
                    last[what][engine] = pair[engine]()
                    times[what][engine].append(time.perf_counter() - t0)
                    print(f"{what} {engine} {times[what][engine][-1]:.2f} s", flush=True)
        out: dict[str, Any] = {"repeats": repeats, "num_samples": num_samples, "seq_len": seq_len,
                               "tokens": int(sum(map(len, seqs))), "threads": torch.get_num_threads(),
                               "load": os.getloadavg()[0],
                               "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        for what in jobs:
            mem, seq = times[what]["memory"], times[what]["sequential"]
            out[what] = {"memory": mem, "sequential": seq, "ratio": statistics.median(seq) / statistics.median(mem),
                         "pair_ratios": [s / m for s, m in zip(seq, mem, strict=True)]}
        a, b = last["calibrate"]["memory"], last["calibrate"]["sequential"]
        out["calibrate"]["max_score_diff"] = score_gap(a, b)
        out["calibrate"]["scores"] = list(a.score_ids)
        va, vb = last["verify"]["memory"], last["verify"]["sequential"]
        out["verify"]["diffs"] = [va["max_abs_logit_diff"], vb["max_abs_logit_diff"]]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the GPU check (benchmarks/gpu_check.sh runs these; --device cpu --quick dry-runs them) -----------
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> str:
    import torch

    return f"{torch.cuda.max_memory_allocated() / GIB:.2f}" if device.startswith("cuda") else "–"


def _gpu_source(name: str, root: Path, quick: bool) -> Path:
    """SmolLM2 (``smollm2``) or a random checkpoint of ``name``'s shapes; ``quick`` swaps both for ``tiny``."""
    if quick:
        name = "tiny"
    if name == "smollm2":
        from prune_heads.model.loading import gguf_to_plain, resolve_model_spec

        return gguf_to_plain(*resolve_model_spec("smollm2"), progress=False)
    src = root / name
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        write_checkpoint(name, src)
    return src


def _timed(fn: Any, device: str) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def gpu_overhead(device: str, root: Path, quick: bool, repeats: int) -> list[str]:
    """calibrate() (every forward score + the moments) against a plain forward of the same batches with the
    model's own attention (sdpa), SmolLM2 in bfloat16 on ``device``: interleaved medians."""
    import torch

    from prune_heads.data import DataSpec, calibration_sequences
    from prune_heads.model.loading import load_model
    from prune_heads.scoring.calibrate import calibrate

    src = _gpu_source("smollm2", root, quick)
    n, seq_len, batch = (4, 32, 2) if quick else (32, 512, 8)
    m = load_model(str(src), dtype="bfloat16", device=device)
    seqs = calibration_sequences(DataSpec(source="wikitext2", num_samples=n, seq_len=seq_len), m.tokenizer, m.model)
    ids = torch.tensor([s[:seq_len] for s in seqs if len(s) >= seq_len] or [seqs[0]], device=device)

    @torch.no_grad()
    def plain() -> None:
        for i in range(0, len(ids), batch):
            m.model(input_ids=ids[i:i + batch], use_cache=False)

    def scored() -> Any:
        return calibrate(m.model, [list(map(int, r)) for r in ids.tolist()], batch_size=batch, tokenizer=m.tokenizer,
                         progress=False)

    plain(), scored()  # warm-up: kernels, allocator
    times: dict[str, list[float]] = {"plain": [], "calibrate": []}
    for r in range(repeats):
        for what in (("plain", "calibrate") if r % 2 == 0 else ("calibrate", "plain")):
            times[what].append(_timed(plain if what == "plain" else scored, device)[0])
    p, c = statistics.median(times["plain"]), statistics.median(times["calibrate"])
    attn = getattr(m.model.config, "_attn_implementation", "?")
    return [f"### Calibration overhead ({'tiny' if quick else 'SmolLM2-135M'}, bfloat16, {device})", "",
            f"{len(ids)} sequences x {ids.shape[1]} tokens, batch {batch}; {repeats} interleaved repeats after a "
            f"warm-up. Plain = the model's forward (attention `{attn}`), calibrate = `calibrate()` with every "
            "forward score and the moments.", "",
            "| plain forward s (median) | calibrate s (median) | overhead |", "|---:|---:|---:|",
            f"| {p:.3f} | {c:.3f} | {c / p:.2f}x |", ""]


def gpu_engines(device: str, root: Path, quick: bool, repeats: int) -> list[str]:
    """calibrate in memory (load + calibrate()) against layer by layer (calibrate_sequential) on a 1B-shaped
    random bfloat16 checkpoint on ``device``: interleaved medians, peak device memory, largest score gap."""
    from transformers import AutoTokenizer

    from prune_heads.data import DataSpec, calibration_sequences
    from prune_heads.model.loading import load_model
    from prune_heads.model.sequential_engine import skeleton
    from prune_heads.scoring.calibrate import calibrate
    from prune_heads.scoring.sequential import calibrate_sequential

    src = _gpu_source("llama-3.2-1b", root, quick)
    n, seq_len = (4, 32) if quick else (32, 512)
    tok = AutoTokenizer.from_pretrained(str(src))
    seqs = calibration_sequences(DataSpec(source="wikitext2", num_samples=n, seq_len=seq_len), tok, skeleton(src))
    work = root / "gpu-layers"

    def memory() -> Any:
        m = load_model(str(src), device=device)
        try:
            return calibrate(m.model, seqs, batch_size=8, tokenizer=m.tokenizer, progress=False)
        finally:
            del m

    def sequential() -> Any:
        shutil.rmtree(work, ignore_errors=True)
        return calibrate_sequential(src, seqs, work, batch_size=8, pad_id=int(tok.pad_token_id or 0), device=device,
                                    progress=False)

    times: dict[str, list[float]] = {"memory": [], "sequential": []}
    peaks: dict[str, str] = {}
    results: dict[str, Any] = {}
    for r in range(repeats):
        for what in (("memory", "sequential") if r % 2 == 0 else ("sequential", "memory")):
            _peak_reset(device)
            t, results[what] = _timed(memory if what == "memory" else sequential, device)
            times[what].append(t)
            peaks[what] = _peak(device)
    shutil.rmtree(work, ignore_errors=True)
    a, b = results["memory"], results["sequential"]
    diff = score_gap(a, b)
    mm, ss = statistics.median(times["memory"]), statistics.median(times["sequential"])
    return [f"### Layer-sequential against in-memory calibrate ({'tiny' if quick else 'Llama-3.2-1B'} shapes, "
            f"random bfloat16, {device})", "",
            f"{len(seqs)} wikitext2 sequences x {seq_len} tokens, batch 8, every forward score and the moments; "
            f"{repeats} interleaved repeats, each end to end (the in-memory one loads the model).", "",
            "| engine | s (median) | peak device GiB |", "|---|---:|---:|",
            f"| memory | {mm:.2f} | {peaks['memory']} |", f"| sequential | {ss:.2f} | {peaks['sequential']} |", "",
            f"Ratio sequential / memory: {ss / mm:.2f}. Largest score difference: {diff:.3g} over "
            f"{len(a.score_ids)} scores.", ""]


def gpu_speed(device: str, root: Path, quick: bool, repeats: int) -> list[str]:
    """Prefill and decode of a 25%-sliced export against its original (``compare_speed``) on SmolLM2 and a
    1B shape, bfloat16 on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    from prune_heads.evaluation.speed import compare_speed
    from prune_heads.export.checkpoint import export_checkpoint
    from prune_heads.plan import Plan

    prefill, decode, context = (32, 4, 16) if quick else (512, 32, 128)
    lines = [f"### Export speed (bfloat16, {device}, `compare_speed`, {repeats} interleaved repeats)", "",
             f"A seeded random plan removing 25% of the heads, format sliced. Prefill: {prefill} tokens, batch 1; "
             f"decode: {decode} one-token steps after {context} tokens. Ratio = export / original (below 1 is "
             "faster).", "",
             "| model | mode | original ms | export ms | ratio (IQR) | FLOPs ratio |", "|---|---|---:|---:|---|---:|"]
    for name in ("smollm2",) if quick else ("smollm2", "llama-3.2-1b"):
        src = _gpu_source(name, root, quick)
        info = sizes(src, name)
        out = root / f"gpu-export-{name}"
        shutil.rmtree(out, ignore_errors=True)
        write_plan(info, root / "gpu-plan.json")
        plan = Plan.load(root / "gpu-plan.json")
        export_checkpoint(str(src), plan, out, verify=False, progress=False)
        try:
            a = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16).to(device).eval()
            b = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).to(device).eval()
            with torch.no_grad():
                for mode, tokens in (("prefill", prefill), ("decode", decode)):
                    r = compare_speed(a, b, mode=mode, tokens=tokens, context=context, repeats=repeats)
                    q = r.spread
                    lines.append(f"| {'tiny' if quick else name} | {mode} | {1e3 * r.original_median:.2f} | "
                                 f"{1e3 * r.pruned_median:.2f} | {r.ratio:.3f} ({q[0]:.2f}–{q[1]:.2f}) | "
                                 f"{r.flops_ratio:.3f} |")
            del a, b
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return [*lines, ""]


GPU_PARTS = {"gpu-overhead": gpu_overhead, "gpu-engines": gpu_engines, "gpu-speed": gpu_speed}


# ---- the results file and the report -------------------------------------------------------------
def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"runs": {}, "info": {}}


def save_results(path: Path, keys: tuple[str, ...], value: Any) -> dict:
    """Set ``data[keys...] = value`` in the results file read afresh (another run of this script may have
    written other entries meanwhile); returns everything it holds."""
    from prune_heads.io_utils import write_json_atomic

    data = load_results(path)
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    write_json_atomic(path, data)
    return data


def _g(n: float) -> str:
    return f"{n / GIB:.2f}"


def fmt_row(stage: str, res: dict, info: dict, base: int) -> str:
    shard, layer = info["largest_shard"], info["dtype_bytes"] * info["layer_params"]
    pred = predict(stage, info, base)
    peak = res["peak_rss"]
    v = res.get("verification") or {}
    verdict = ""
    if v:
        verdict = f"{'passed' if v['passed'] else 'FAILED'}, max abs logit diff {v['max_abs_logit_diff']:.3g}"
    tg = target(stage, info)
    tgt = "–"
    if tg is not None:
        tgt = f"{_g(tg[0])} ({tg[1]}): **{'met' if peak <= tg[0] else 'missed'}**"
    if res.get("scores"):
        verdict = f"{len(res['scores'])} scores" + (" + moments" if res.get("moments") else "")
    if "removed" in res:
        verdict = f"{res['removed']} heads removed"
    if "values" in res:
        verdict = f"ppl {res['values'][0]:.6g} -> {res['values'][1]:.6g}"
    if "same_as_memory" in res:
        verdict += f"; against `_memory`: **{res['same_as_memory']}**"
    status = "ok" if res["rc"] == 0 else f"exit {res['rc']}"
    anon, hwm, load = res.get("peak_anon"), res.get("hwm"), res.get("load")
    return (f"| `{stage}` | {res.get('engine') or '–'} | {_g(peak)} | {_g(anon) if anon else '–'} | "
            f"{_g(hwm) if hwm else '–'} | {peak / shard:.2f}x | {peak / layer:.1f}x | {_g(pred)} | {tgt} | "
            f"{res['wall_s']:.0f} | {f'{load[0]:.1f}' if load else '–'} | {status} | {verdict} |")


def shape_section(shape: str, entry: dict) -> list[str]:
    info, base, rows = entry["info"], entry["base"], entry["stages"]
    lines = [
        f"### {shape}" + (" (the real SmolLM2-135M, float32)" if shape == "smollm2" else
                          " shapes, random bfloat16 weights"),
        "",
        f"Checkpoint: {info['params'] / 1e9:.2f} B parameters, {info['bytes'] / GIB:.2f} GiB in {info['shards']} "
        f"shard(s), largest shard {info['largest_shard'] / GIB:.2f} GiB, {info['layers']} layers of "
        f"{info['layer_params'] / 1e6:.0f} M parameters ({info['dtype_bytes'] * info['layer_params'] / GIB:.2f} GiB)"
        + (f"; written in {entry['write_s']:.0f} s" if entry.get("write_s") else "")
        + f". Plan: {entry['removed']} of {info['layers'] * info['heads']} heads (seeded random). Interpreter "
        f"baseline (torch, transformers and the CLI imported): {_g(base)} GiB.",
        "",
        "| stage | engine | peak RSS GiB (tree) | anon GiB | HWM GiB | x largest shard | x layer | predicted GiB "
        "| target GiB | wall s | load | status | result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
        *[fmt_row(stage, res, info, base) for stage, res in rows.items()],
        "",
        *[f"- `{stage}` ({res.get('when', '?')}): `{res['cmd']}`" + (f" — {res['note']}" if res.get("note") else "")
          for stage, res in rows.items()],
        "",
    ]
    return lines


def memory_model_table(data: dict) -> list[str]:
    """Predicted against measured peak per stage for every measured shape, and the predicted peaks of 70B."""
    lines = ["| model | stage | predicted GiB (`predict`) | package estimate GiB (+ interpreter) | measured GiB | "
             "of which anon GiB | measured / predicted |", "|---|---|---:|---:|---:|---:|---:|"]
    for shape in ALL_SHAPES:
        entry = data["runs"].get(shape)
        if not entry or shape == "tiny":
            continue
        for stage, res in entry["stages"].items():
            pred = predict(stage, entry["info"], entry["base"])
            pkg = res.get("package_estimate")
            if pkg is None and not stage.startswith("export"):
                pkg = res["package_estimate"] = _estimate_if_present(stage, shape)
            pkg_s = f"{_g(pkg + entry['base'])}" if pkg else "–"
            lines.append(f"| {shape} | `{stage}` ({res.get('engine') or '–'}) | {_g(pred)} | {pkg_s} | "
                         f"{_g(res['peak_rss'])} | {_g(res['peak_anon']) if res.get('peak_anon') else '–'} | "
                         f"{res['peak_rss'] / pred:.2f} |")
    return lines


def _estimate_if_present(stage: str, shape: str) -> int | None:
    """``package_estimate`` for a row measured before the package had one, when its checkpoint is still here."""
    if shape == "smollm2":
        from prune_heads.model.loading import gguf_to_plain, resolve_model_spec

        src = gguf_to_plain(*resolve_model_spec("smollm2"), progress=False)
    else:
        src = Path("/tmp/scale") / shape
    if not (src / "config.json").is_file():
        return None
    return package_estimate(stage if stage != "calibrate" else "calibrate_sequential", src)


def gpu_70b_table(base: int) -> list[str]:
    info = predicted_info("llama-3.1-70b")
    gpu = 80 * 10**9
    lines = [f"Llama-3.1-70B shapes (bfloat16, {info['params'] / 1e9:.1f} B parameters, {info['bytes'] / GIB:.0f} GiB; "
             f"one layer {2 * info['layer_params'] / GIB:.2f} GiB) on one 80 GB GPU (74.5 GiB), `--device cuda`: "
             "device memory by `predict(..., device='cuda')` (no interpreter; host-side read transients left out).",
             "", "| stage | predicted device GiB | fits 80 GB |", "|---|---:|---|"]
    for stage in ("calibrate_memory", "calibrate_sequential", "verify_memory", "verify_sequential", "select_memory",
                  "select_sequential"):
        p = predict(stage, info, base, device="cuda")
        lines.append(f"| `{stage}` | {_g(p)} | {'yes' if p <= gpu else 'no'} |")
    p = predict("export_no_verify", info, base)
    lines += ["", f"`export --no-verify` itself runs on the host: predicted RSS {_g(p)} GiB "
                  f"({p / info['largest_shard']:.2f}x the largest shard). `select` solves compensation on the host: "
                  f"at most {_g(solve_bytes(info))} GiB there (`solve_bytes`: one layer's moments read from the "
                  f"{info['layers'] * moments_bytes(info) / GIB:.0f} GiB file, the compensator's bounded caches, and "
                  "one probe's compensation of every layer, which is most of it and largest when half of each "
                  "layer's heads go)."]
    return lines


def cost_section(c: dict) -> list[str]:
    lines = [
        "### Cost of the layer-sequential engine (SmolLM2-135M, CPU)",
        "",
        f"Command: `python benchmarks/bench_scale.py --part cost --repeats {c['repeats']}` ({c['when']}, "
        f"{c['threads']} thread, load average {c['load']:.1f}). {c['repeats']} interleaved pairs, order "
        "alternating; each end to end as the stage runs it: calibrate = load the model + every forward score + the "
        f"moments on {c['num_samples']} x {c['seq_len']} wikitext2 tokens ({c['tokens']} tokens, batch 8) against "
        "`calibrate_sequential` streaming the shards; verify = `verify_export` of a 25% sliced export (4 x 64 "
        "tokens, float64 then float32) with `engine='memory'` against `engine='sequential'`.",
        "",
        "| stage | in memory s (median) | layer by layer s (median) | ratio of medians | per-pair ratios | target | "
        "results |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for what in ("calibrate", "verify"):
        d = c[what]
        same = (f"max score diff {d['max_score_diff']:.3g} over {len(d['scores'])} scores" if what == "calibrate"
                else f"max abs logit diff {d['diffs'][0]:.3g} / {d['diffs'][1]:.3g}")
        lines.append(f"| {what} | {statistics.median(d['memory']):.2f} | {statistics.median(d['sequential']):.2f} | "
                     f"{d['ratio']:.2f} | {', '.join(f'{r:.2f}' for r in d['pair_ratios'])} | ≤ 1.3: "
                     f"**{'met' if d['ratio'] <= 1.3 else 'missed'}** | {same} |")
    return lines


def write_report(out: Path, data: dict) -> None:
    import torch

    from prune_heads.model.sequential_engine import HEAD_CHUNK_ROWS

    base = next((e["base"] for e in data["runs"].values()), 400 * 2**20)
    lines = [
        "## Scale: big models on a small machine (layer-sequential engine)",
        "",
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU, {_mem_total() / GIB:.0f} GiB RAM shared with other "
        f"jobs (the load average is given per row), torch {torch.__version__}. Script: `benchmarks/bench_scale.py` "
        "(its docstring says how each figure is taken); rows are kept in `benchmarks/results/scale.json` and each "
        "was measured in its own run, one big process at a time.",
        "",
        "Peak RSS (tree) = the command's whole process tree, sampled every 50 ms from `/proc` (file pages it maps "
        "count); anon = its anonymous part (the heap, without mapped shard pages); HWM = the kernel's exact "
        "high-water mark of the largest single process of the tree (`ru_maxrss`). Predicted = `predict()` (the memory model below); target = the "
        "issue's bound. Calibration: `--data wikitext2 --num-samples 4 --seq-len 64`, every forward score and the "
        "moments. Export: a seeded random plan removing 25% of the heads, format sliced, default verification "
        f"(4 x 64 random tokens in float64 and float32; LM head read {HEAD_CHUNK_ROWS} rows at a time).",
        "",
    ]
    for shape in ALL_SHAPES:
        if shape in data["runs"]:
            lines += shape_section(shape, data["runs"][shape])
    if "cost" in data:
        lines += cost_section(data["cost"]) + [""]
    lines += ["### The memory model", "",
              "`predict()` in `benchmarks/bench_scale.py` computes each stage's peak from the shapes alone "
              "(`shape_info()`: per-layer and total parameters from config.json, checked against the shard headers) "
              "and what the code holds at its fullest moment (its docstring lists each term); the interpreter "
              f"baseline ({_g(base)} GiB here) is included on the CPU.", "",
              *memory_model_table(data), "", *gpu_70b_table(base), ""]
    if data.get("notes"):
        lines += ["### Notes", "", data["notes"].strip(), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["smollm2", *SHAPES], default="llama-3.2-1b")
    ap.add_argument("--quick", action="store_true", help="the tiny shape (for the tests)")
    ap.add_argument("--part", choices=("stages", "cost", *GPU_PARTS), default="stages")
    ap.add_argument("--device", default="cuda", help="--part gpu-*: the device (cpu for a dry run)")
    ap.add_argument("--report", action="store_true", help="only write the markdown from the results file")
    ap.add_argument("--stages", default=None, help="comma-separated (default: per shape, DEFAULT_STAGES)")
    ap.add_argument("--root", default="/tmp/scale")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint for another run")
    ap.add_argument("--no-clean", action="store_true",
                    help="keep the work directory (scores, plans) for stages run by another invocation beside this one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="--part cost: interleaved pairs")
    ap.add_argument("--cost-samples", type=int, default=8)
    ap.add_argument("--cost-seq-len", type=int, default=128)
    ap.add_argument("--merge", nargs="*", default=[], help="results files (.json) of runs with another --out to take in")
    ap.add_argument("--notes", default=None, help="a markdown file: the report's closing notes (kept in the results)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    out = Path(args.out)
    store = out.with_suffix(".json")
    data = load_results(store)
    for other in map(Path, args.merge):  # stage by stage: a shape measured in two runs keeps both
        theirs = load_results(other)
        for shape, entry in theirs.get("runs", {}).items():
            mine = load_results(store)["runs"].get(shape, {"stages": {}})
            entry["stages"] = {**mine.get("stages", {}), **entry["stages"]}
            data = save_results(store, ("runs", shape), {**mine, **entry})
        if "cost" in theirs:
            data = save_results(store, ("cost",), theirs["cost"])
    if args.notes:
        data = save_results(store, ("notes",), Path(args.notes).read_text())
    if args.report or args.merge or args.notes:
        write_report(out, data)
        return 0
    if args.part in GPU_PARTS:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{args.part}: CUDA is not available (torch {torch.__version__}); use --device cpu for a dry run",
                  file=sys.stderr)
            return 3
        torch.manual_seed(0)
        root = Path(args.root)
        root.mkdir(parents=True, exist_ok=True)
        lines = GPU_PARTS[args.part](args.device, root, args.quick, args.repeats)
        with open(args.out, "a") as f:  # gpu_check.sh gives each part the same file, header first
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    if args.part == "cost":
        data = save_results(store, ("cost",), cost(args.repeats, args.cost_samples, args.cost_seq_len))
        write_report(out, data)
        print(out.read_text())
        return 0
    shape = "tiny" if args.quick else args.shape
    stages = (args.stages or DEFAULT_STAGES[shape]).split(",")
    root = Path(args.root)
    work = root / f"{shape}-work"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    src, info, write_s, delete = source_for(shape, root, args.keep)
    failed = False
    try:
        work.mkdir(parents=True, exist_ok=True)
        removed = write_plan(info, work / "plan.json")
        write_docs(work / "docs.jsonl")
        base = baseline(env)
        entry = data["runs"].get(shape, {"stages": {}})
        entry.update(info=info, base=base, removed=removed)
        if write_s:
            entry["write_s"] = write_s
        for stage in stages:
            res = run_stage(stage, src, work, env)
            entry["stages"][stage] = res
            print(fmt_row(stage, res, info, base), flush=True)
            if res["rc"] != 0:
                failed = True
                print(res["output"][-3000:], file=sys.stderr)
            entry["stages"] = {**load_results(store)["runs"].get(shape, {}).get("stages", {}), **entry["stages"]}
            write_report(out, save_results(store, ("runs", shape), entry))
    finally:
        if not args.no_clean:
            shutil.rmtree(work, ignore_errors=True)
        if delete:
            shutil.rmtree(src, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
