"""CUDA against the CPU on tiny models (``pytest -m cuda``; skipped without a GPU, run by benchmarks/gpu_check.sh).

The CPU result is the reference. GPU kernels sum in another order, so values agree to float32 rounding (the
bound is stated per check), while decisions built on them (the plan) are the same; the two engines on the GPU
agree with each other the same way. bf16 weights run on the GPU end to end.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from export_helpers import make_source
from tiny_tokenizer import SPECIAL, WORDS, tiny_tokenizer, words

from prune_heads.cli.main import cli
from prune_heads.compensation.moments import Moments
from prune_heads.model.config import ModelConfig
from prune_heads.model.sequential_engine import load_streamed
from prune_heads.scoring.calibrate import calibrate
from prune_heads.scoring.head_scores import HeadScores
from prune_heads.scoring.sequential import calibrate_sequential

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore:layer \\d+. the covariance", "ignore:verification inconclusive")]
VOCAB = len(SPECIAL) + len(WORDS)
SEQS = [[1, 5, 9, 13, 2, 7, 30, 4, 8, 8, 3, 50, 51], [1, 8, 8, 4, 17, 6, 70, 71, 72], [1, 60, 3, 17, 22, 5, 5, 9]]
#: float32 on the GPU against float32 on the CPU: relative bound on scores, moments, perplexities
RTOL = 1e-4


def _world(tmp_path, family="llama"):
    model, src = make_source(tmp_path, family, layers=3, vocab=VOCAB, max_shard_size="20KB")
    tiny_tokenizer(save_to=src)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(words(20 + i % 7, seed=i) for i in range(24)) + "\n")
    return model, src, docs


def test_calibrate_on_cuda_equals_the_cpu(tmp_path):
    model, src, _ = _world(tmp_path, "qwen3")
    want = calibrate(model, SEQS, batch_size=2, progress=False)
    on_gpu = calibrate(model.to("cuda"), SEQS, batch_size=2, progress=False)
    streamed = calibrate_sequential(src, SEQS, tmp_path / "work", batch_size=2, device="cuda", progress=False)
    got_moments = Moments.load(streamed.moments.save(tmp_path / "m.safetensors"))
    for got in (on_gpu, streamed):
        for sid in want.score_ids:
            torch.testing.assert_close(got.per_sample(sid), want.per_sample(sid), rtol=RTOL, atol=1e-6)
    for a, b in zip(want.moments._tensors(), got_moments._tensors(), strict=True):
        torch.testing.assert_close(b.cpu(), a.cpu(), rtol=RTOL, atol=1e-6)


def test_ppl_and_kl_on_cuda_equal_the_cpu_in_both_engines(tmp_path):
    from prune_heads.evaluation import make_evaluator

    model, src, docs = _world(tmp_path)
    tok = tiny_tokenizer()
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = True
    cpu = {k: make_evaluator(model, tok, f"{k}:{docs}", limit=6, batch_size=3) for k in ("ppl", "kl")}
    want = {k: (ev(None).value, ev(mask).value) for k, ev in cpu.items()}
    gpu_whole = ModelConfig(id=str(src), device="cuda").load().model
    gpu_streamed = load_streamed(ModelConfig(id=str(src), device="cuda")).model
    for m in (gpu_whole, gpu_streamed):
        for k in ("ppl", "kl"):
            ev = make_evaluator(m, tok, f"{k}:{docs}", limit=6, batch_size=3)
            got = (ev(None).value, ev(mask).value)
            assert got == pytest.approx(want[k], rel=RTOL, abs=1e-6), (k, got, want[k])


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_calibrate_select_eval_with_cuda_and_bf16_weights(tmp_path):
    _, src, docs = _world(tmp_path)
    out = {}
    for device in ("cpu", "cuda"):
        d = tmp_path / device
        common = ("--device", device, "--dtype", "bfloat16")
        r = _invoke("calibrate", src, "--data", docs, "--num-samples", 8, "--seq-len", 24, "--batch-size", 4,
                    "--scores", "ahon_ln", *common, "-o", d / "scores")
        assert r.exit_code == 0, r.output
        for engine in ("memory", "sequential"):
            r = _invoke("select", d / "scores", "--model", src, "--task", f"ppl:{docs}", "--limit", 6, "--max-drop",
                        5.0, "--relative", "--accept-unverified", "--engine", engine, *common,
                        "-o", d / f"plan-{engine}.json")
            assert r.exit_code == 0, r.output
            r = _invoke("eval", src, "--plan", d / f"plan-{engine}.json", "--task", f"ppl:{docs}", "--limit", 6,
                        "--engine", engine, *common, "-o", d / f"eval-{engine}.json")
            assert r.exit_code == 0, r.output
            out[device, engine] = (json.loads((d / f"plan-{engine}.json").read_text())["removed_heads"],
                                   json.loads((d / f"eval-{engine}.json").read_text())["tasks"][0])
        out[device, "scores"] = HeadScores.load(d / "scores")
    a, b = out["cpu", "scores"], out["cuda", "scores"]
    # bf16 weights: activations round to bf16 (2^-8 relative) between kernels that sum in another order on each
    # device, and the rounding compounds over the layers: a loose bound, a sanity check of the GPU path
    torch.testing.assert_close(b.per_sample("ahon_ln"), a.per_sample("ahon_ln"), rtol=5e-2, atol=5e-3)
    for engine in ("memory", "sequential"):
        plan_gpu, res_gpu = out["cuda", engine]
        _, res_cpu = out["cpu", engine]
        assert res_gpu["baseline"]["value"] == pytest.approx(res_cpu["baseline"]["value"], rel=2e-2)
    # on one device the two engines run the same kernels on the same operands
    assert out["cuda", "memory"][0] == out["cuda", "sequential"][0]
    assert out["cuda", "memory"][1]["pruned"]["value"] == pytest.approx(out["cuda", "sequential"][1]["pruned"]["value"],
                                                                        rel=1e-3)
