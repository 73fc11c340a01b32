"""The layer-sequential engine against the whole model on the real SmolLM2-135M (slow).

Calibration: the same scores and moments bit for bit (the same kernels on the same operands, statistics added
in the same order). Evaluation: the LM head is read 16384 rows at a time, so SmolLM2's 49152-token head is
three products instead of one; the logits agree to float32 rounding and the perplexity and KL to the bound
stated below.
"""

from __future__ import annotations

import pytest
import torch

from prune_heads.model.config import ModelConfig

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
#: relative difference of a perplexity (or KL) from chunked LM-head products against the one product
RTOL = 1e-5


@pytest.fixture(scope="module")
def smollm2_path():
    from prune_heads.export.source import resolve_source

    return resolve_source("smollm2")


def test_calibrate_layer_by_layer_on_smollm2_equals_the_whole_model(smollm2, smollm2_path, tmp_path):
    from prune_heads.compensation.moments import Moments
    from prune_heads.scoring.calibrate import calibrate
    from prune_heads.scoring.sequential import calibrate_sequential

    tok = smollm2.tokenizer
    seqs = [tok(t).input_ids[:48] for t in ("The quick brown fox jumps over the lazy dog. " * 6,
                                            "In 1905 Einstein published four papers that changed physics. " * 5,
                                            "A river flows from the mountains to the sea through the valley. " * 5)]
    want = calibrate(smollm2.model, seqs, batch_size=2, progress=False)
    got = calibrate_sequential(smollm2_path, seqs, tmp_path / "w", batch_size=2, dtype=torch.float32, progress=False)
    for sid in want.score_ids:
        assert torch.equal(want.per_sample(sid), got.per_sample(sid)), sid
    assert want.moments.fingerprint() == Moments.load(got.moments.save(tmp_path / "m.safetensors")).fingerprint()


@pytest.mark.parametrize("kind", ["ppl", "kl"])
def test_ppl_and_kl_layer_by_layer_on_smollm2_equal_the_whole_model(kind, smollm2):
    from prune_heads.evaluation import make_evaluator
    from prune_heads.model.sequential_engine import load_streamed

    streamed = load_streamed(ModelConfig(id="smollm2", dtype="float32", device="cpu"))
    mask = torch.zeros(30, 9, dtype=torch.bool)
    mask[3, :3] = mask[10, 4] = mask[20, 5:8] = True
    a = make_evaluator(smollm2.model, smollm2.tokenizer, f"{kind}:wikitext2", limit=6, batch_size=3)
    b = make_evaluator(streamed.model, streamed.tokenizer, f"{kind}:wikitext2", limit=6, batch_size=3)
    for removed in (None, mask):
        ra, rb = a(removed), b(removed)
        assert rb.value == pytest.approx(ra.value, rel=RTOL, abs=1e-7), (removed is None, ra.value, rb.value)
        assert rb.docs.values == pytest.approx(ra.docs.values, rel=RTOL, abs=1e-6)
