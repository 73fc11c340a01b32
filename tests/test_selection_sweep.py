"""The paper's sweep: right heads per fraction, Table 2 against a reference, dynamic fraction measured."""

from __future__ import annotations

import torch
from test_selection_static import FakeEvaluator, FakeResult, make_scores
from tiny_models import tiny_model

from prune_heads.scoring.calibrate import calibrate
from prune_heads.selection.sweep import load_sweep, run_sweep


def test_static_sweep_masks_and_table(tmp_path):
    model = tiny_model("llama", layers=4, heads=5, kv_heads=5, head_dim=8, hidden=40)  # 20 heads: 5% = 1 head
    g = torch.Generator().manual_seed(0)
    awft = torch.rand(4, 5, generator=g)  # high awft = inactive
    harm = torch.rand(4, 5, generator=g) * 0.006
    ev = FakeEvaluator(harm)
    scores = make_scores(model, awft, score_id="awft")
    res = run_sweep(model, scores, ev, score_ids=["awft"], fractions=[0, 0.05, 0.1, 0.2, 0.3], random_seeds=[0, 1],
                    progress=False)
    order = torch.argsort(-awft.reshape(-1), stable=True)
    for row in (r for r in res.rows if r["score"] == "awft"):
        k = round(row["fraction"] * 20)
        removed = torch.zeros(20, dtype=torch.bool)
        removed[order[:k]] = True
        assert row["heads_zeroed"] == k
        assert abs(row["value"] - (0.6 - float(harm.reshape(-1)[removed].sum()))) < 1e-9
    # each (score, nonzero fraction) is one evaluation; the baseline is shared
    assert ev.calls == 1 + 3 * 4
    # Table 2 reference: largest grid fraction whose value is within 0.01 of 0.6
    table = {r["score"]: r for r in res.table()}
    ref = max(f for f in (0, 0.05, 0.1, 0.2, 0.3)
              if float(harm.reshape(-1)[order[: round(f * 20)]].sum()) <= 0.01 + 1e-12)
    assert table["awft"]["max_fraction"] == ref
    assert set(table) == {"awft", "random"}
    res.save(tmp_path / "out")
    for name in ("sweep.json", "sweep.csv", "table.md", "table.csv", "sweep.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    back = load_sweep(tmp_path / "out")
    assert back.table() == res.table()
    assert "| awft |" in (tmp_path / "out" / "table.md").read_text()


class ForwardEvaluator:
    """Runs the model on fixed sequences under the given context; value = 1 - fraction zeroed."""

    def __init__(self, model, seqs):
        self.model, self.ids, self.calls = model, torch.tensor(seqs), 0
        self.task_config = {"task": "forward"}

    def __call__(self, removed=None, *, context=None):
        self.calls += 1
        import contextlib

        from prune_heads.model.masking import static_mask

        cm = context(self.model) if context is not None else (
            static_mask(self.model, removed) if removed is not None else contextlib.nullcontext())
        with cm as stats, torch.no_grad():
            self.model(input_ids=self.ids)
        frac = getattr(stats, "fraction_zeroed", 0.0)
        return FakeResult("acc", 1.0 - frac, None, True)


def test_dynamic_sweep_zeroes_the_target_fraction_on_calibration_data():
    # one layer: zeroing a head cannot change a later layer's scores, so the calibration quantile is exact
    model = tiny_model("qwen2", layers=1, heads=4, kv_heads=2, head_dim=8)
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(3, 100, (16, 12), generator=g).tolist()
    scores = calibrate(model, seqs, scores=["awft", "ahon_ln"], batch_size=16, progress=False)
    ev = ForwardEvaluator(model, seqs)
    res = run_sweep(model, scores, ev, score_ids=["awft", "ahon_ln"], fractions=[0, 0.25, 0.5], dynamic=True,
                    random_seeds=[], progress=False)
    cells = 16 * 4
    for r in res.rows:
        # reference: the threshold is the calibration quantile, so on the same data the measured fraction is
        # the target (up to quantile interpolation: one cell)
        assert abs(r["pct_zeroed"] / 100 - r["fraction"]) <= 1.0 / cells + 1e-9, r
        assert abs(r["value"] - (1 - r["pct_zeroed"] / 100)) < 1e-9
    assert res.mode == "dynamic"
