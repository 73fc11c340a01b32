"""The compensation benchmark's ``--quick`` mode on a tiny random model: every part runs, and the numbers
it reports hold when checked independently (each budget plan really is within its budget, compensated
as recorded, and calibration never saw an evaluated document)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer, words

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_compensation.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_compensation", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    tok = tiny_tokenizer()
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, vocab=len(tok))
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    (tmp / "docs.txt").write_text("\n\n".join(words(90, seed=i) for i in range(16)))
    bench = _bench()
    old = bench.os.environ.get("PRUNE_HEADS_BENCH_CACHE")
    bench.os.environ["PRUNE_HEADS_BENCH_CACHE"] = str(tmp / "cache")
    try:
        out = bench.main(["--quick", "--model", str(tmp / "model"), "--data", str(tmp / "docs.txt"), "--out",
                          str(tmp / "out"), "--policies", "free,kv-groups", "--modes", "none,mean,lsq"])
    finally:
        if old is None:
            bench.os.environ.pop("PRUNE_HEADS_BENCH_CACHE")
        else:
            bench.os.environ["PRUNE_HEADS_BENCH_CACHE"] = old
    return bench, tmp, out


def _table(text: str, title: str) -> list[list[str]]:
    block = text[text.index(title):]
    block = block[:block.index("\n### ", 1)] if "\n### " in block[1:] else block
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines() if line.startswith("| `")]
    assert rows, title
    return rows


def test_quick_tables_report_the_plans_removed_heads(quick_run):
    """Each cell of the budget tables is read back from the plan it reports: the count and fraction from the plan's
    removed heads (KV groups: the distinct (layer, group) pairs, each holding both of its query heads), the
    perplexity from the plan's measured value; the other sections are there."""
    import re

    bench, _, out = quick_run
    text = out.read_text()
    parts = out.parent / "compensation_quick"
    cell = re.compile(r"\*\*([\d.]+)%\*\* \((\d+)\) ([\d.]+)(?:, KV cache ([\d.]+)%)?")
    checked = 0
    for policy, title in (("free", "### Heads (`--gqa free`)"), ("kv-groups", "### Whole KV groups")):
        for row in _table(text, title):
            ranking = row[0].strip("`")
            for (budget, mode), got in zip([(b, m) for b in (0.05, 0.10) for m in bench.MODES], row[1:]):
                path = parts / f"budget_{policy}_{mode}_{ranking}.json"
                if got == "–":
                    assert not path.exists(), path
                    continue
                plan = json.loads(path.read_text())[f"{budget:g}"]
                m = cell.fullmatch(got)
                assert m, got
                removed = {tuple(h) for h in plan["removed"]}
                if policy == "free":
                    count, total = len(removed), 8
                else:
                    groups = {(layer, head // 2) for layer, head in removed}
                    assert len(removed) == 2 * len(groups)  # whole groups only
                    count, total = len(groups), 4
                    assert float(m[4]) == pytest.approx(100 * (1 - count / total), abs=0.05)
                assert int(m[2]) == count and float(m[1]) == pytest.approx(100 * count / total, abs=0.05)
                assert m[3] == f"{plan['ppl']:.2f}"
                checked += 1
    assert checked >= 2 * 3 * 2  # both budgets, three modes, both policies at least
    for title in ("### Sequential compensation", "### Design choices", "### Cost of the statistics",
                  "### Export of the compensated", "### Iterative", "### Other rankings for `lsq` compensation"):
        assert title in text, title


def test_reported_budgets_hold_when_rechecked(quick_run):
    from prune_heads.compensation import compensator_for
    from prune_heads.evaluation import make_evaluator
    from prune_heads.model.loading import load_model
    from prune_heads.scoring.head_scores import HeadScores

    bench, tmp, out = quick_run
    parts = out.parent / "compensation_quick"
    loaded = load_model(str(tmp / "model"), dtype="float32", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    ev = make_evaluator(model, tok, f"ppl:{tmp / 'docs.txt'}", limit=6, split="verify", batch_size=8)
    ev.backend.seqs = [s[:24] for s in ev.backend.seqs]
    base = ev(None).value
    meta = json.loads((parts / "meta.json").read_text())
    hs = HeadScores.load(meta["scores_dir"])
    assert hs.moments.num_tokens == 12 * 24  # the calibration windows, all from the search documents
    checked = 0
    for f in parts.glob("budget_*.json"):
        b = json.loads(f.read_text())
        for budget in bench.BUDGETS:
            r = b[f"{budget:g}"]
            assert r["baseline"] == pytest.approx(base)
            mask = torch.zeros(2, 4, dtype=torch.bool)
            for i, h in r["removed"]:
                mask[i, h] = True
            assert (mask.sum(1) < 4).all()  # at least one head kept per layer
            comp = compensator_for(b["mode"], scores=hs)
            value = ev.with_compensation(comp)(mask).value
            assert value == pytest.approx(r["ppl"], rel=1e-6)
            assert value <= base * (1 + budget) + 1e-9
            checked += 1
    assert checked >= 2 * 3 * 4  # both budgets, three modes, four rankings (free policy at least)


def test_calibration_sizes_are_compared_on_their_own_scores(quick_run):
    """``--part calib-sizes`` calibrates again on more windows: its rows differ from the main setup's."""
    _, _, out = quick_run
    rows = json.loads((out.parent / "compensation_quick" / "choices.json").read_text())["rows"]
    sizes = {r["value"]: r["ppl"] for r in rows if r["what"] == "calibration windows" and r["fraction"] == 0.25}
    assert set(sizes) == {3, 12, 16} and sizes[16] != sizes[12]


def test_sequential_rows_extend_the_plus5_plan(quick_run):
    """The sequential part re-evaluates each budget plan as saved and, for the free +5% plan, the next heads of
    the same ranking: prefixes that grow one head at a time, the first of which one-pass mode fails."""
    bench, _, out = quick_run
    parts = out.parent / "compensation_quick"
    seq = json.loads((parts / "sequential.json").read_text())
    for mode in ("lsq", "mean"):
        plan = json.loads((parts / f"budget_free_{mode}_lsq_error.json").read_text())["0.05"]
        rows = sorted((r for r in seq["rows"] if r["mode"] == mode and r["policy"] == "free" and r["budget"] == 0.05),
                      key=lambda r: r["heads"])
        assert sorted(map(tuple, rows[0]["removed"])) == sorted(map(tuple, plan["removed"]))
        assert rows[0]["ppl"] == pytest.approx(plan["ppl"])
        for prev, row in zip(rows, rows[1:]):
            assert row["heads"] == prev["heads"] + 1
            assert set(map(tuple, prev["removed"])) < set(map(tuple, row["removed"]))
        if len(rows) > 1:  # units were left: the search saw the next one fail
            assert rows[1]["ppl"] > 1.05 * seq["baseline"]


def test_accuracy_table_has_a_row_per_plan_and_a_column_per_task(tmp_path):
    """The accuracy section: one row per plan (keyed by policy, mode, ranking, budget and head count) with a cell
    per measured (task, documents) file, ``–`` where a plan was not measured on that task; and the iterative
    part's plan is among the plans the accuracy part can evaluate, under its own name."""
    import argparse

    bench = _bench()
    args = argparse.Namespace(out=str(tmp_path), quick=False)
    parts = bench.parts_dir(args)
    row = lambda mode, ranking, budget, heads, v: {"policy": "free", "mode": mode, "ranking": ranking,  # noqa: E731
                                                  "budget": budget, "heads": heads, "value": v, "stderr": 0.02, "n": 500}
    (parts / "accuracy_arc_easy_500.json").write_text(json.dumps({
        "baseline": {"value": 0.5, "stderr": 0.022, "n": 500},
        "rows": [row("lsq", "lsq_error", 0.05, 67, 0.498), row("lsq", "iterative", 0.10, 84, 0.471)]}))
    (parts / "accuracy_hellaswag_500.json").write_text(json.dumps({
        "baseline": {"value": 0.376, "stderr": 0.022, "n": 500}, "rows": [row("lsq", "lsq_error", 0.05, 67, 0.358)]}))
    lines = bench.accuracy_lines(args)
    table = [ln for ln in lines if ln.startswith("| ")]
    assert table[0] == "| plan | heads | arc_easy (500) | hellaswag (500) |"
    assert table[1] == "| unpruned | 0 | 0.500 ± 0.022 | 0.376 ± 0.022 |"
    assert "| free / lsq / `lsq_error`, +5% ppl | 67 | 0.498 ± 0.020 | 0.358 ± 0.020 |" in table
    assert "| free / lsq / `iterative`, +10% ppl | 84 | 0.471 ± 0.020 | – |" in table
    assert len(table) == 4

    removed = [[0, 1], [1, 2]]
    (parts / "iterative_free.json").write_text(json.dumps({"heads": 2, "removed": removed}))
    (parts / "budget_free_lsq_lsq_error.json").write_text(json.dumps({
        "policy": "free", "mode": "lsq", "ranking": "lsq_error",
        "0.1": {"removed": removed + [[1, 3]]}, "0.05": {"removed": removed[:1]}}))
    plans = bench.accuracy_plans(args)
    assert [(name, p["budget"], len(p["removed"])) for name, p in plans] == [
        ("free_lsq_lsq_error", 0.10, 3), ("free_lsq_lsq_error", 0.05, 1), ("iterative_free", 0.10, 2)]
    assert plans[-1][1]["mode"] == "lsq" and plans[-1][1]["ranking"] == "iterative"


def test_rankings_part_rechecks(quick_run):
    """The rankings part: the shipped ``lsq_error`` row's fixed-k perplexities are those of its first k units,
    evaluated independently; the Fisher metric equals ``E[g g^T]`` from a naive loop that takes the gradient of
    each window's summed loss at each layer's attention output with ``torch.autograd.grad``; and the measured
    ranking keeps one head per layer and never ranks a later step of a layer's greedy order before an earlier one."""
    from prune_heads.compensation import compensator_for
    from prune_heads.evaluation import make_evaluator
    from prune_heads.scoring.head_scores import HeadScores
    from prune_heads.selection import candidate_units, removal_mask
    from prune_heads.selection.static import ranking

    bench, tmp, out = quick_run
    parts = out.parent / "compensation_quick"
    rows = {r["ranking"]: r for r in json.loads((parts / "rankings.json").read_text())["rows"]}
    assert set(rows) == {"lsq_error", "gain_next", "gain_mean", "fisher", "measured"}
    args = bench.parse(["--quick", "--model", str(tmp / "model"), "--data", str(tmp / "docs.txt"), "--out", str(tmp / "out")])
    bench.os.environ["PRUNE_HEADS_BENCH_CACHE"] = str(tmp / "cache")
    try:
        setup = bench.Setup(args)
    finally:
        bench.os.environ.pop("PRUNE_HEADS_BENCH_CACHE")
    model, layout = setup.model, setup.layout

    ev = make_evaluator(model, setup.tok, f"ppl:{tmp / 'docs.txt'}", limit=6, split="verify", batch_size=8)
    ev.backend.seqs = [s[:24] for s in ev.backend.seqs]
    ev = ev.with_compensation(compensator_for("lsq", scores=HeadScores.load(setup.scores_dir)))
    units = candidate_units(ranking(setup.scores, "lsq_error", layout), layout, "free", 1)
    assert rows["lsq_error"]["fixed"]
    for k, value in rows["lsq_error"]["fixed"].items():
        assert ev(removal_mask(units, int(k), layout)).value == pytest.approx(value, rel=1e-6)

    fisher = bench.fisher_metrics(setup, windows=5)
    layers = list(model.model.layers)
    d = model.config.hidden_size
    naive = [torch.zeros(d, d, dtype=torch.float64) for _ in layers]
    kept: dict[int, torch.Tensor] = {}
    for seq in setup.calib[:5]:
        ids = torch.tensor([seq])
        kept.clear()
        hooks = [layer.self_attn.o_proj.register_forward_hook(lambda m, a, o, i=i: kept.__setitem__(i, o))
                 for i, layer in enumerate(layers)]
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb, use_cache=False).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        grads = torch.autograd.grad(loss, [kept[i] for i in range(len(layers))])
        for h in hooks:
            h.remove()
        for i, g in enumerate(grads):
            g = g[0].double()
            naive[i] += g.T @ g
    tokens = sum(len(s) for s in setup.calib[:5])
    for mine, ref in zip(fisher, naive):
        torch.testing.assert_close(mine, ref / tokens, rtol=1e-4, atol=1e-10)

    values = bench.measured_ranking(setup)
    orders = setup.scores.meta["lsq_error"]["order"]
    for i, order in enumerate(orders):
        along = values[i, order]
        assert along[-1] == 1e9 and (along[:-1] < 1e9).all()
        assert (along[1:] >= along[:-1]).all()
