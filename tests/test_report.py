"""``write_report`` / ``write_compare`` / ``prune-heads report`` on synthetic scores (no model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import wasserstein_distance

from prune_heads.cli.main import cli
from prune_heads.errors import OutputExistsError, PruneHeadsError
from prune_heads.report import write_compare, write_report
from prune_heads.scoring.head_scores import HeadScores

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N, L, H = 5, 4, 3


def synthetic(seed: int = 0, n: int = N, layers: int = L, heads: int = H, scale: float = 1.0) -> HeadScores:
    g = torch.Generator().manual_seed(seed)
    per = {sid: torch.rand(n, layers, heads, generator=g) * scale for sid in ("awft", "ahon_ln", "lthon_ln", "ftvvn")}
    hs = HeadScores(per, {"model": f"synthetic-{seed}", "data": "synthetic", "num_samples": n, "num_tokens": n * 16})
    hs.means["ablation_kl"] = torch.rand(layers, heads, generator=g)  # whole-set score: no per-sample values
    return hs


def is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 100 and data[:8] == PNG_SIGNATURE


def top_set(mean: np.ndarray, high: bool, k: int) -> set:
    cells = sorted(((mean[i, j], i, j) for i in range(mean.shape[0]) for j in range(mean.shape[1])), reverse=high)
    return {(i, j) for _, i, j in cells[:k]}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    hs = synthetic()
    out = write_report(hs, tmp_path_factory.mktemp("r") / "report", score_ids=["awft", "ahon_ln", "ablation_kl"],
                       fraction=0.25)
    return hs, out


def test_report_writes_pngs_markdown_and_json(made):
    _, out = made
    for sid in ("awft", "ahon_ln", "ablation_kl"):
        assert is_png(out / f"heatmap_{sid}.png")
        assert is_png(out / f"dist_{sid}.png")
    assert is_png(out / "overlap_iou.png") and is_png(out / "overlap_precision.png")
    md = (out / "report.md").read_text()
    for link in ("heatmap_awft.png", "dist_ablation_kl.png", "overlap_iou.png"):
        assert f"]({link})" in md
    assert "| A \\ B | `awft` | `ahon_ln` | `ablation_kl` |" in md
    assert "| score | 0% | 5% | 10% | 15% | 20% | 25% | 30% |" in md
    assert not list(out.parent.glob(".report.tmp-*"))  # atomic: no temp dir left


def test_report_overlap_numbers_match_python_sets(made):
    hs, out = made
    data = json.loads((out / "report.json").read_text())
    k = round(0.25 * L * H)
    assert data["top_k"] == k
    sets = {sid: top_set(hs.mean(sid).double().numpy(), sid == "awft", k) for sid in ("awft", "ahon_ln", "ablation_kl")}
    for sid, s in sets.items():
        assert {tuple(x) for x in data["scores"][sid]["inactive_set"]} == s
        assert data["scores"][sid]["inactive_per_layer"] == [sum(1 for (i, _) in s if i == layer) for layer in range(L)]
    ids = data["overlap"]["ids"]
    for i, a in enumerate(ids):
        for j, b in enumerate(ids):
            inter = len(sets[a] & sets[b])
            assert data["overlap"]["iou"][i][j] == pytest.approx(inter / len(sets[a] | sets[b]))
            assert data["overlap"]["precision"][i][j] == pytest.approx(inter / len(sets[a]))
    md = (out / "report.md").read_text()
    iou_row = "| `awft` | " + " | ".join(f"{v:.4g}" for v in data["overlap"]["iou"][0]) + " |"
    assert iou_row in md


def test_report_thresholds_use_per_sample_quantiles(made):
    hs, out = made
    data = json.loads((out / "report.json").read_text())
    per = hs.per_sample("ahon_ln").double().numpy().reshape(-1)
    mean = hs.mean("ahon_ln").double().numpy()
    row = next(r for r in data["scores"]["ahon_ln"]["thresholds"] if r["fraction"] == 0.25)
    tau = float(np.quantile(per, 0.25))
    assert row["tau"] == pytest.approx(tau)
    assert row["values_marked"] == pytest.approx((per < tau).mean())
    assert row["per_layer"] == (mean < tau).sum(1).tolist()
    # awft is inactive when HIGH: τ is the upper quantile and marks values above it
    awft = next(r for r in data["scores"]["awft"]["thresholds"] if r["fraction"] == 0.25)
    assert awft["tau"] == pytest.approx(float(np.quantile(hs.per_sample("awft").double().numpy(), 0.75)))
    # whole-set score: τ over head means, marks exactly the fraction of heads
    abl = next(r for r in data["scores"]["ablation_kl"]["thresholds"] if r["fraction"] == 0.25)
    assert abl["heads_marked"] == int((hs.mean("ablation_kl").double().numpy() < abl["tau"]).sum()) == 3
    md = (out / "report.md").read_text()
    assert "| **total** |" in md


def test_report_refuses_existing_output_and_bad_input(made, tmp_path):
    hs, out = made
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_report(hs, out, score_ids=["awft"])
    with pytest.raises(PruneHeadsError, match="not in this scores file"):
        write_report(hs, tmp_path / "x", score_ids=["aeqd"])
    with pytest.raises(PruneHeadsError, match="fraction"):
        write_report(hs, tmp_path / "y", fraction=0.0)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_report_overwrite_replaces_and_defaults(tmp_path):
    hs = synthetic(1)
    hs2 = HeadScores({"awft": hs.per_sample("awft")})
    out = tmp_path / "r"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_report(hs2, out, overwrite=True)  # defaults: only awft is present among them
    assert not (out / "stale.txt").exists()
    assert is_png(out / "heatmap_awft.png") and not (out / "overlap_iou.png").exists()


def test_compare_same_grid_matches_scipy_and_hand_differences(tmp_path):
    a, b = synthetic(0), synthetic(1, n=7, scale=1.3)
    out = write_compare(a, b, tmp_path / "c", score_ids=["awft", "ahon_ln", "ablation_kl"], fraction=0.25)
    data = json.loads((out / "compare.json").read_text())
    assert data["same_grid"]
    for sid in ("awft", "ahon_ln"):
        ua, vb = a.per_sample(sid).double().numpy().ravel(), b.per_sample(sid).double().numpy().ravel()
        assert data["scores"][sid]["w1"] == pytest.approx(wasserstein_distance(ua, vb), rel=1e-9)
        d = b.mean(sid).double().numpy() - a.mean(sid).double().numpy()
        assert data["scores"][sid]["mean_abs_diff"] == pytest.approx(np.abs(d).mean())
        assert data["scores"][sid]["max_abs_diff"] == pytest.approx(np.abs(d).max())
        i, j = data["scores"][sid]["max_at"]
        assert abs(d[i, j]) == pytest.approx(np.abs(d).max())
        sa = top_set(a.mean(sid).double().numpy(), sid == "awft", 3)
        sb = top_set(b.mean(sid).double().numpy(), sid == "awft", 3)
        assert data["scores"][sid]["inactive_iou"] == pytest.approx(len(sa & sb) / len(sa | sb))
    # whole-set score: W1 over head means
    assert data["scores"]["ablation_kl"]["pooled_over"] == "head means"
    assert data["scores"]["ablation_kl"]["w1"] == pytest.approx(
        wasserstein_distance(a.mean("ablation_kl").numpy().ravel(), b.mean("ablation_kl").numpy().ravel()), rel=1e-6)
    md = (out / "compare.md").read_text()
    assert "| score | W1 | W1/std |" in md and "| score | mean \\|Δ\\| | max \\|Δ\\| | at |" in md
    assert f"| `awft` | {data['scores']['awft']['w1']:.4g} |" in md
    assert "## Per-head differences" in md and "Pearson r" in md
    assert is_png(out / "compare_cdfs.png") and is_png(out / "diff_awft.png")


def test_compare_identical_files_is_zero(tmp_path):
    a = synthetic(2)
    data = json.loads((write_compare(a, a, tmp_path / "c", score_ids=["ahon_ln"]) / "compare.json").read_text())
    r = data["scores"]["ahon_ln"]
    assert r["w1"] == 0 and r["mean_abs_diff"] == 0 and r["inactive_iou"] == 1


def test_compare_different_grids_keeps_pooled_w1_only(tmp_path):
    a, b = synthetic(0), synthetic(1, layers=6, heads=2)
    out = write_compare(a, b, tmp_path / "c", score_ids=["lthon_ln"])
    data = json.loads((out / "compare.json").read_text())
    assert not data["same_grid"]
    assert "mean_abs_diff" not in data["scores"]["lthon_ln"]
    assert data["scores"]["lthon_ln"]["w1"] == pytest.approx(wasserstein_distance(
        a.per_sample("lthon_ln").numpy().ravel(), b.per_sample("lthon_ln").numpy().ravel()), rel=1e-6)
    assert "different head grids (4x3 vs 6x2)" in (out / "compare.md").read_text()


def test_compare_errors(tmp_path):
    a = synthetic(0)
    b = HeadScores({"aeqd": torch.rand(2, L, H)})
    with pytest.raises(PruneHeadsError, match="share no score"):
        write_compare(a, b, tmp_path / "c")
    with pytest.raises(PruneHeadsError, match="awft \\(in B\\)"):
        write_compare(a, b, tmp_path / "c", score_ids=["awft"])


def test_cli_report_and_compare(tmp_path):
    a_dir, b_dir = synthetic(0).save(tmp_path / "a"), synthetic(1).save(tmp_path / "b")
    runner = CliRunner()
    res = runner.invoke(cli, ["report", str(a_dir), "-o", str(tmp_path / "rep"), "--scores", "awft", "--fraction", "0.5"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["fraction"] == 0.5 and data["top_k"] == 6 and list(data["scores"]) == ["awft"]
    assert is_png(tmp_path / "rep" / "heatmap_awft.png")

    res = runner.invoke(cli, ["report", str(a_dir), "-o", str(tmp_path / "rep"), "--scores", "awft"])
    assert res.exit_code == 2 and "already exists" in res.output

    res = runner.invoke(cli, ["report", str(a_dir), "--compare", "-o", str(tmp_path / "cmp")])
    assert res.exit_code == 2 and "two scores directories" in res.output

    res = runner.invoke(cli, ["report", str(a_dir), str(b_dir), "--compare", "-o", str(tmp_path / "cmp"),
                              "--scores", "ahon_ln", "--labels", "base,instruct"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "- A: `base`" in md and "- B: `instruct`" in md
    expected = wasserstein_distance(synthetic(0).per_sample("ahon_ln").numpy().ravel(),
                                    synthetic(1).per_sample("ahon_ln").numpy().ravel())
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["scores"]["ahon_ln"]["w1"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_report_on_real_smollm2_scores(smollm2, tmp_path):
    """Real calibration metadata (dict data spec, GQA) flows into the report; awft is a probability."""
    from prune_heads.scoring.calibrate import calibrate

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(10, 1000, (40,), generator=g) for _ in range(2)]
    hs = calibrate(smollm2.model, seqs, scores=["awft", "ahon_ln"], batch_size=2, progress=False, model_name="smollm2")
    out = write_report(hs, tmp_path / "r", fraction=0.1)
    data = json.loads((out / "report.json").read_text())
    assert data["num_layers"] == 30 and data["num_heads"] == 9 and data["top_k"] == 27
    assert 0.0 <= hs.mean("awft").min() and hs.mean("awft").max() <= 1.0
    assert {tuple(x) for x in data["scores"]["awft"]["inactive_set"]} == top_set(hs.mean("awft").double().numpy(), True, 27)
    md = (out / "report.md").read_text()
    assert "3 KV heads per layer" in md and "| `awft` |" in md
    assert is_png(out / "heatmap_awft.png") and is_png(out / "overlap_iou.png")
