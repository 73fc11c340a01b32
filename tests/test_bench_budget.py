"""benchmarks/bench_budget.py --quick: its per-(k, document) cache is exact and makes a rerun free."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_budget.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_budget", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_and_resume_from_cache(bench, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "budget.md"
    assert bench.main(["--quick", "--cache", str(cache), "--out", str(out)]) == 0
    first = json.loads(out.with_suffix(".json").read_text())
    text = out.read_text()
    assert text.count("| mc_quick_mc_") == 8 + 1 and "new (k, document) evaluations this run" in text  # + tracking
    done = [r for r in first["rows"] if r["status"] == "done"]
    assert len(done) == 8 and all(r["untouched"]["stderr"] is not None for r in done)
    # a rerun computes nothing new and reproduces the table from the cache
    assert bench.main(["--quick", "--cache", str(cache), "--out", str(out)]) == 0
    second = json.loads(out.with_suffix(".json").read_text())
    assert " 0 new (k, document) evaluations" in out.read_text()
    strip = [{k: v for k, v in r.items() if k != "extra"} for r in first["rows"]]
    assert strip == [{k: v for k, v in r.items() if k != "extra"} for r in second["rows"]]


def test_cached_results_equal_a_direct_evaluation(bench, tmp_path):
    from prune_heads.evaluation import make_evaluator
    from prune_heads.scoring.calibrate import calibrate

    model, tok, (task,), data = bench.quick_setup(tmp_path)
    scores = calibrate(model, data, scores=["ahon_ln"], batch_size=4, progress=False)
    units, layout = bench.ranking_units(model, scores)
    ct = bench.CachedTask(model, tok, task, units, layout, tmp_path / "cache", batch_size=4, deadline=None)
    direct = make_evaluator(model, tok, task, split="all", batch_size=8, metric="acc_norm")
    docs = [3, 17, 40, 41, 88]
    for k in (0, 4, 7):
        mask = ct.mask(k)
        assert int(mask.sum()) == k and torch.equal(mask, bench.CachedView(ct, docs, "acc", "x").task.mask(k))
        ref = direct(mask if k else None).docs
        for metric in ("acc", "acc_norm"):
            got = ct.result(k, docs, metric).docs
            want_ids = tuple(f"{ct.name}:{i}" for i in docs)
            assert got.ids == want_ids
            if metric == "acc_norm":
                sub = ref.subset(want_ids)
                assert got.values.tolist() == sub.values.tolist()
                for a, b in zip(got.choice_scores, sub.choice_scores):
                    assert a == pytest.approx(b, abs=1e-6)
    # a fresh task object reads the same records back from disk
    again = bench.CachedTask(model, tok, task, units, layout, tmp_path / "cache", batch_size=4, deadline=None)
    assert again.result(7, docs, "acc").docs.values.tolist() == ct.result(7, docs, "acc").docs.values.tolist()
    assert again.doc_evals == 0


def test_pools_are_disjoint_and_nested(bench):
    p = bench.make_pools(570, 1000, 100, 500, 0)
    assert (len(p.search), len(p.verify), len(p.untouched)) == (328, 100, 142)
    assert not set(p.search) & set(p.verify) and not set(p.untouched) & (set(p.search) | set(p.verify))
    q = bench.make_pools(570, 300, 100, 500, 0)
    assert q.search == p.search[:300]  # smaller limits are prefixes of the same permutation
    assert bench.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert bench.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
