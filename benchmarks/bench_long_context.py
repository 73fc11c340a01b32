"""Long context on SmolLM2-135M-Instruct (CPU): do plans chosen on 256-token windows hold at 1k-4k tokens, and
what does a guard at 2048 tokens change?

    python benchmarks/bench_long_context.py --plans free-lsq,kv-lsq,free-none,kv-none --lengths 256,1024,2048
    python benchmarks/bench_long_context.py --plans free-lsq@2048 --lengths 256,1024,2048,4096
    python benchmarks/bench_long_context.py --why 2048           # rankings/moments from 2k windows vs 256
    python benchmarks/bench_long_context.py --render             # the table from every cell measured so far

Plans are chosen exactly as the demo recipe chooses them (``run_select``: static ranking, ascending search at
confidence 0.9, +10% perplexity on 8 WikiText-2 articles of 256 tokens, the demo's calibration of 24 articles x
256 tokens), one per ``POLICY-COMPENSATION`` (``free``/``kv-groups`` x ``lsq``/``none``; the default ranking
score of each: ``lsq_error``, ``lsq_error_group``, ``ahon_ln``); ``@LEN`` adds the guard ``passkey:LEN`` (6
search keys, at most 0.10 lost at the 90% bound: no key of 6 lost), as the demo recipe does at 2048, and
``@LEN+ppl`` also the perplexity guard at that length (``--guard-ppl-max-drop 0.10``: 6 WikiText-2 windows of
LEN tokens of the search half, scored on their last LEN/4, +10% at the 90% bound). The
search's own held-out verification is skipped (the table below is the held-out check).

Each plan is then measured at each length against the original on held-out data, both sides on the same
inputs: perplexity on ``--ppl-windows`` WikiText-2 windows (verify half, calibration articles left out) scored
on their last ``--score-last`` tokens (the same scored tokens at every length), as the paired ratio with its
one-sided 90% bounds; and ``passkey:LEN`` exact match on ``--passkey-docs`` keys of the verify half (keys,
depths and fillers the guard never saw), with standard errors and the paired drop.

``--why LEN``: the ranking and the compensation of the free/lsq plan taken from calibration on LEN-token
windows (the same number of tokens as the demo's 256-token calibration) instead of 256, crossed: which heads
each ranking removes, and pass-key accuracy at LEN for each (ranking, moments) pair at the same head count.

Every measurement is a cell cached in ``--cells`` (pickle), so runs can be split and resumed; ``--render``
(also done after every run) writes ``benchmarks/results/long_context.md`` from all cells.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results" / "long_context.md"
SCRATCH = Path(os.environ.get("LONG_CONTEXT_SCRATCH", "/tmp/prune_heads_long_context"))
DEFAULT_SCORE = {("free", "lsq"): "lsq_error", ("kv-groups", "lsq"): "lsq_error_group",
                 ("free", "none"): "ahon_ln", ("kv-groups", "none"): "ahon_ln"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", default="", help="comma list of free-lsq, kv-lsq, free-none, kv-none, each with an "
                                                "optional @GUARDLEN")
    ap.add_argument("--lengths", default="256,1024,2048")
    ap.add_argument("--ppl-windows", type=int, default=3)
    ap.add_argument("--score-last", type=int, default=128)
    ap.add_argument("--passkey-docs", type=int, default=6)
    ap.add_argument("--why", type=int, default=0, help="calibrate on windows of this length too and cross them")
    ap.add_argument("--why-passkey", type=int, default=1, help="0: --why compares the rankings only (no pass keys)")
    ap.add_argument("--why-combos", default="", help="only these ranking:moments pairs, e.g. r2048:m2048,r256:m2048 "
                                                      "(r256:m256 is the free-lsq plan's own cell)")
    ap.add_argument("--render", action="store_true", help="only write the table from the cached cells")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cells", type=Path, default=SCRATCH)
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args()


def parse_plan(name: str) -> tuple[str, str, int | None]:
    base, _, guard = name.partition("@")
    policy, comp = base.split("-")
    return {"free": "free", "kv": "kv-groups"}[policy], comp, int(guard.removesuffix("+ppl")) if guard else None


# ---- cached pieces ---------------------------------------------------------------------------------------
def calibration(lm, seq_len: int, cells: Path):
    """The demo's calibration (24 articles x 256 tokens), or the same tokens' worth at ``seq_len``."""
    from prune_heads import calibrate
    from prune_heads.scoring.head_scores import HeadScores

    where = cells / f"scores{seq_len}"
    if where.exists():
        try:
            return HeadScores.load(where)
        except Exception:  # noqa: BLE001 - a half-written cache from a killed run: recompute
            pass
    n = max(1, 24 * 256 // seq_len)
    tic = time.time()
    s = calibrate(lm.model, "wikitext2", tokenizer=lm.tokenizer, num_samples=n, seq_len=seq_len,
                  batch_size=max(1, 8 * 256 // seq_len), scores=["ahon_ln", "lsq_error"],
                  progress=False)
    print(f"calibration at {seq_len}: {n} articles, {time.time() - tic:.0f} s", flush=True)
    s.save(where, overwrite=True)
    return s


def choose(lm, scores, name: str, cells: Path):
    """The plan ``run_select`` chooses for ``name`` (cached as a plan file)."""
    from prune_heads.plan import Plan
    from prune_heads.selection.stage import SelectConfig, StaticMethod, run_select

    path = cells / "plans" / f"{name}.json"
    if path.exists():
        return Plan.load(path)
    policy, comp, guard = parse_plan(name)
    cfg = SelectConfig(method=StaticMethod(score=DEFAULT_SCORE[policy, comp]), task="ppl:wikitext2", limit=8,
                       max_drop=0.10, relative=True, compensate=comp, policy=policy, verify=False)
    if guard:
        cfg.guard_task, cfg.guard_max_drop, cfg.guard_limit = f"passkey:{guard}", 0.10, 6
        if name.endswith("+ppl"):  # and perplexity at the guard's length: +10%, as the search's budget
            cfg.guard_ppl_max_drop = 0.10
    cfg.check()
    tic = time.time()
    plan = run_select(cfg, lm, scores, None, model_id="smollm2", progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.save(path, overwrite=True)
    (path.with_suffix(".seconds")).write_text(f"{time.time() - tic:.0f}")
    print(f"plan {name}: {len(plan.removed_heads)} heads in {time.time() - tic:.0f} s", flush=True)
    return plan


def compensation(lm, scores, comp: str):
    from prune_heads.compensation.plans import compensator_for
    from prune_heads.compensation.spec import CompensationSpec

    return compensator_for(CompensationSpec(mode=comp), scores=scores, model=lm.model) if comp != "none" else None


def mask_of(lm, heads):
    from prune_heads.model.adapters import get_adapter

    layout = get_adapter(lm.model).layout(lm.model.config)
    m = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.bool)
    for layer, head in heads:
        m[layer, head] = True
    return m


def cell(cells: Path, key: str, compute):
    """An ``EvalResult`` cached under ``key`` (with per-document scores, for the paired statistics)."""
    path = cells / "cells" / f"{key}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    tic = time.time()
    r = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps({"result": r, "seconds": time.time() - tic}))
    tmp.replace(path)
    print(f"  {key}: {r.value:.4f} (n={r.n}) {time.time() - tic:.0f} s", flush=True)
    return {"result": r, "seconds": time.time() - tic}


def measure(lm, scores, exclude, args, name: str, heads, comp: str, L: int) -> None:
    """Original and plan at length ``L``: held-out ppl windows and pass keys (cells)."""
    from prune_heads.evaluation import make_evaluator

    c = compensation(lm, scores, comp)
    mask = mask_of(lm, heads)
    n_ppl, n_key = args.ppl_windows, args.passkey_docs

    def ppl(comp_obj):
        return make_evaluator(lm.model, lm.tokenizer, "ppl:wikitext2", split="verify", limit=n_ppl, seq_len=L,
                              score_last=args.score_last, batch_size=1, compensation=comp_obj, exclude_docs=exclude)

    def key(comp_obj):
        return make_evaluator(lm.model, lm.tokenizer, f"passkey:{L}", split="verify", limit=n_key, batch_size=1,
                              compensation=comp_obj)

    tag = f"{L}_w{n_ppl}_s{args.score_last}"
    cell(args.cells, f"original_ppl_{tag}", lambda: ppl(None)(None))
    cell(args.cells, f"original_key_{L}_k{n_key}", lambda: key(None)(None))
    cell(args.cells, f"{name}_ppl_{tag}", lambda: ppl(c)(mask))
    cell(args.cells, f"{name}_key_{L}_k{n_key}", lambda: key(c)(mask))


# ---- the why: rankings and moments from long windows -----------------------------------------------------
def why(lm, s256, exclude, args) -> None:
    from prune_heads.compensation.greedy import ensure_lsq_scores
    from prune_heads.evaluation import make_evaluator
    from prune_heads.model.adapters import get_adapter
    from prune_heads.plan import Plan
    from prune_heads.selection.policies import candidate_units, removal_mask
    from prune_heads.selection.static import ranking

    L = args.why
    long = calibration(lm, L, args.cells)
    base = Plan.load(args.cells / "plans" / "free-lsq.json")
    k_heads = len(base.removed_heads)
    layout = get_adapter(lm.model).layout(lm.model.config)
    info = {"k": k_heads}
    masks = {}
    for tag, s in (("r256", s256), (f"r{L}", long)):
        s = ensure_lsq_scores(s, lm.model, "lsq_error")
        units = candidate_units(ranking(s, "lsq_error", layout), layout, "free", 1, False)
        masks[tag] = removal_mask(units, k_heads, layout)
    a, b = masks["r256"], masks[f"r{L}"]
    info["overlap"] = int((a & b).sum())
    info["same_as_plan"] = int((a & mask_of(lm, base.removed_heads)).sum())
    info["layers_256"] = [int(x) for x in a.sum(1)]
    info[f"layers_{L}"] = [int(x) for x in b.sum(1)]
    (args.cells / f"why{L}.json").write_text(json.dumps(info))
    print(f"why {L}: {info}", flush=True)
    if not args.why_passkey:
        return
    combos = set(args.why_combos.split(",")) if args.why_combos else None
    for rtag, m in masks.items():
        for mtag, s in (("m256", s256), (f"m{L}", long)):
            if combos is not None and f"{rtag}:{mtag}" not in combos:
                continue
            c = compensation(lm, s, "lsq")
            ev = make_evaluator(lm.model, lm.tokenizer, f"passkey:{L}", split="verify", limit=args.passkey_docs,
                                batch_size=1, compensation=c)
            cell(args.cells, f"why_{rtag}_{mtag}_key_{L}_k{args.passkey_docs}", lambda ev=ev, m=m: ev(m))
    cell(args.cells, f"original_key_{L}_k{args.passkey_docs}",
         lambda: make_evaluator(lm.model, lm.tokenizer, f"passkey:{L}", split="verify", limit=args.passkey_docs,
                                batch_size=1)(None))


# ---- the table -------------------------------------------------------------------------------------------
def load_cells(cells: Path) -> dict:
    return {p.stem: pickle.loads(p.read_bytes()) for p in sorted((cells / "cells").glob("*.pkl"))}


def acc(r) -> str:
    k = round(r.value * r.n)
    se = math.sqrt(max(r.value * (1 - r.value), 0) / max(r.n - 1, 1))
    return f"{k}/{r.n} ({r.value:.2f} ± {se:.2f})"


def render(args, meta: dict) -> str:
    from prune_heads.evaluation.paired import paired_drop
    from prune_heads.plan import Plan

    cells = load_cells(args.cells)
    plans = {p.stem: Plan.load(p) for p in sorted((args.cells / "plans").glob("*.json"))}
    rows = []
    orig_rows = {}
    for key, v in cells.items():
        if key.startswith("original_key_"):
            L = int(key.split("_")[2])
            orig_rows[L] = f"| {L} | {acc(v['result'])} | {v['seconds']:.0f} s |"
    for name, plan in plans.items():
        policy, comp, guard = parse_plan(name)
        heads = len(plan.removed_heads)
        gs = plan.selection.guards
        for key, v in cells.items():
            if not key.startswith(f"{name}_ppl_"):
                continue
            L = int(key.split("_")[2])
            tag = key[len(f"{name}_ppl_"):]
            base = cells.get(f"original_ppl_{tag}")
            keyc = [k for k in cells if k.startswith(f"{name}_key_{L}_")]
            if base is None:
                continue
            pd = paired_drop(base["result"], v["result"], relative=True, confidence=0.9)
            ratio = (f"x{1 + pd.estimate:.3f} [{1 + pd.lower:.3f}, {1 + pd.upper:.3f}] "
                     f"({base['result'].value:.1f} -> {v['result'].value:.1f}, {v['result'].n} tokens)")
            kp = kb = "—"
            drop = "—"
            if keyc and (ob := cells.get("original_key_" + keyc[0][len(f"{name}_key_"):])):
                kr = cells[keyc[0]]["result"]
                kp, kb = acc(kr), acc(ob["result"])
                d = paired_drop(ob["result"], kr, confidence=0.9)
                drop = f"{d.estimate:+.2f} (90% upper {d.upper:.2f})"
            chosen = " + ".join(f"guard {g.task['task'].split('/')[-1]} ({len(g.refused)} probe(s) refused)"
                                for g in gs) if guard and gs else "256 only"
            rows.append((name, L, f"| {policy} | {comp} | {chosen} | {heads} | {L} | {ratio} | {kb} | {kp} | {drop} |"))
    rows.sort(key=lambda r: (r[0], r[1]))
    why_lines = []
    for w in sorted(args.cells.glob("why*.json")):
        L = int(w.stem[3:])
        info = json.loads(w.read_text())
        why_lines.append(f"Calibration on {max(1, 24 * 256 // L)} articles x {L} tokens vs the demo's 24 x 256 (the "
                         f"same number of tokens), free policy, the {info['k']} heads `lsq_error` ranks first: the two "
                         f"rankings share {info['overlap']} of {info['k']} heads. Pass-key accuracy at {L} tokens "
                         f"({args.passkey_docs} held-out keys), original {acc(cells[f'original_key_{L}_k{args.passkey_docs}']['result']) if f'original_key_{L}_k{args.passkey_docs}' in cells else '—'}:")
        if "layers_256" in info:
            why_lines += ["", f"Heads removed per layer (layer 0 first): 256-token ranking {info['layers_256']}; "
                              f"{L}-token ranking {info[f'layers_{L}']}."]
        why_lines += ["", "| ranking from | lsq moments from | passkey |", "|---|---|---:|"]
        for r in ("r256", f"r{L}"):
            for m in ("m256", f"m{L}"):
                c = cells.get(f"why_{r}_{m}_key_{L}_k{args.passkey_docs}")
                if c is None and (r, m) == ("r256", "m256") and info.get("same_as_plan") == info["k"]:
                    c = cells.get(f"free-lsq_key_{L}_k{args.passkey_docs}")  # the same heads and compensation
                why_lines.append(f"| {r[1:]} tokens | {m[1:]} tokens | {acc(c['result']) if c else '—'} |")
        why_lines.append("")
    text = "\n".join([
        "## Long context: plans chosen at 256 tokens, with and without a 2k guard — SmolLM2-135M-Instruct, CPU",
        "",
        f"Commands: {meta.get('commands', '')}  ",
        f"Machine: {platform.machine()} {os.cpu_count()}-core CPU shared with other jobs (load average "
        f"{meta.get('load', '?')}), {args.threads} thread(s), torch {torch.__version__}, float32.  ",
        "Plans: `run_select` as the demo recipe (static, ascending at confidence 0.9, +10% perplexity on 8 "
        "WikiText-2 articles x 256 tokens, calibration 24 x 256); `@LEN` plans add the guard `passkey:LEN` on 6 "
        "search keys (0.10 at the 90% bound). Held-out measurements: perplexity on "
        f"{args.ppl_windows} WikiText-2 windows of the verify half (calibration articles left out) scored on their "
        f"last {args.score_last} tokens, the same tokens at every length: the paired ratio pruned/original with "
        "its one-sided 90% bounds; pass key: exact match on held-out keys (verify half), accuracy ± its standard "
        "error, and the paired drop. Few documents (a shared 2-core CPU): the standard errors are wide; a 6/6 vs "
        "0/6 difference is clear, one key is not.",
        "",
        "Original pass-key accuracy (the baseline, checked at each length):",
        "",
        "| context | original passkey | time |",
        "|---:|---:|---:|",
        *[orig_rows[L] for L in sorted(orig_rows)],
        "",
        "| policy | compensation | chosen with | heads removed | context | ppl ratio [90% bounds] | passkey original "
        "| passkey plan | paired drop |",
        "|---|---|---|---:|---:|---|---:|---:|---|",
        *[r[2] for r in rows],
        "",
        *(["### Why the unguarded plan breaks: ranking or compensation", "", *why_lines] if why_lines else []),
    ])
    return text


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.cells.mkdir(parents=True, exist_ok=True)
    log = args.cells / "commands.txt"
    load = os.getloadavg()
    if not args.render:
        with log.open("a") as f:
            f.write("python benchmarks/bench_long_context.py " + " ".join(sys.argv[1:]) + "\n")
        from prune_heads import load_model
        from prune_heads.data.tokens import recorded_documents

        lm = load_model("smollm2")
        s256 = calibration(lm, 256, args.cells)
        exclude = recorded_documents(s256.meta.get("data"))
        names = [n for n in args.plans.split(",") if n]
        plans = {n: choose(lm, s256, n, args.cells) for n in names}
        for L in [int(x) for x in args.lengths.split(",") if x]:
            for n, plan in plans.items():
                measure(lm, s256, exclude, args, n, plan.removed_heads, parse_plan(n)[1], L)
        if args.why:
            why(lm, s256, exclude, args)
    cmds = sorted(set(log.read_text().splitlines())) if log.exists() else []
    text = render(args, {"commands": "; ".join(f"`{c}`" for c in cmds),
                         "load": f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
