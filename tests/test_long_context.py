"""Long-context evaluation: ``ppl:``/``kl:`` windows at any length scored on the same tokens, against a naive
per-window reference computed with plain forwards of a zeroed copy (no masking code, no batching)."""

from __future__ import annotations

import random

import pytest
import torch
from test_evaluation import REMOVED, char_tokenizer, zeroed_copy
from tiny_models import tiny_model

from prune_heads.errors import PruneHeadsError
from prune_heads.evaluation import make_evaluator


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8), char_tokenizer()


def write_text(path, n=24, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "far", "away"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(n)]
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


@torch.no_grad()
def naive_windows(model, ref_model, windows, score_last):
    """Per window: summed NLL and summed KL(ref || model) of its last ``score_last`` tokens, one forward each."""
    nll, kl = [], []
    for w in windows:
        x = torch.tensor([w])
        lp = model(x).logits[0].log_softmax(-1)
        lr = ref_model(x).logits[0].log_softmax(-1)
        n = k = 0.0
        for t in range(len(w) - score_last, len(w)):  # target t is predicted at position t - 1
            n -= float(lp[t - 1, w[t]])
            k += float((lr[t - 1].exp() * (lr[t - 1] - lp[t - 1])).sum())
        nll.append(n)
        kl.append(k)
    return nll, kl


def test_windows_score_the_same_tokens_at_every_length(tiny, tmp_path):
    model, tok = tiny
    data = write_text(tmp_path / "t.txt")
    evs = {L: make_evaluator(model, tok, f"ppl:{data}", limit=5, seq_len=L, score_last=16, batch_size=2)
           for L in (17, 40, 128, 256)}
    ids = {L: ev.doc_ids for L, ev in evs.items()}
    assert len(set(ids.values())) == 1 and len(ids[17]) == 5
    scored = {L: [tuple(s[-16:]) for s in ev.backend.seqs] for L, ev in evs.items()}
    assert all(scored[L] == scored[17] for L in scored)
    for L, ev in evs.items():
        assert all(len(s) == L for s in ev.backend.seqs)
        assert ev.task_config["num_positions"] == 5 * 16 and ev.task_config["score_last"] == 16
    # longer windows are the shorter ones with earlier context prepended
    for a, b in zip(evs[40].backend.seqs, evs[256].backend.seqs):
        assert b[-40:] == a
    # the scored blocks are cut from the text: the stream, not padding, and they do not overlap
    ends = [int(d.rsplit("@", 1)[1]) for d in ids[17]]
    assert len(set(ids[17])) == 5 and all(e > 0 for e in ends)


@pytest.mark.parametrize("L", [24, 128, 256])
def test_window_loss_matches_naive_reference(tiny, tmp_path, L):
    model, tok = tiny
    data = write_text(tmp_path / "t.txt")
    ev = make_evaluator(model, tok, f"ppl:{data}", limit=4, seq_len=L, score_last=12, batch_size=3)
    windows = ev.backend.seqs
    ref = zeroed_copy(model, REMOVED)
    base_nll, _ = naive_windows(model, model, windows, 12)
    masked_nll, masked_kl = naive_windows(ref, model, windows, 12)
    b, m = ev(), ev(REMOVED)
    assert b.n == 4 * 12
    assert b.docs.values == pytest.approx(base_nll, rel=1e-5)
    assert b.value == pytest.approx(torch.tensor(sum(base_nll) / 48).exp().item(), rel=1e-5)
    assert m.docs.values == pytest.approx(masked_nll, rel=1e-5) and m.value != pytest.approx(b.value)
    kl = make_evaluator(model, tok, f"kl:{data}", limit=4, seq_len=L, score_last=12, batch_size=3)
    assert kl.doc_ids == ev.doc_ids
    km = kl(REMOVED)
    assert km.docs.values == pytest.approx(masked_kl, rel=1e-4) and km.value == pytest.approx(sum(masked_kl) / 48, rel=1e-4)


def test_document_mode_at_another_seq_len_matches_naive(tiny, tmp_path):
    """Without --score-last, --seq-len truncates each document (the scored tokens are all of them)."""
    model, tok = tiny
    data = write_text(tmp_path / "t.txt", n=6)
    ev = make_evaluator(model, tok, f"ppl:{data}", seq_len=40, batch_size=4)
    docs = open(data).read().strip().split("\n\n")
    windows = [tok(d, add_special_tokens=False).input_ids[:40] for d in docs]
    nll, _ = naive_windows(model, model, windows, 39)
    r = ev()
    assert ev.backend.seqs == windows and r.docs.values == pytest.approx(nll, rel=1e-5) and r.n == 6 * 39


def test_bad_lengths_are_one_line(tiny, tmp_path):
    model, tok = tiny
    data = write_text(tmp_path / "t.txt")
    with pytest.raises(PruneHeadsError, match=r"--seq-len 300 is beyond the model's context of 256 tokens") as e:
        make_evaluator(model, tok, f"ppl:{data}", seq_len=300)
    assert "\n" not in str(e.value)
    with pytest.raises(PruneHeadsError, match="--score-last must be between 1 and"):
        make_evaluator(model, tok, f"ppl:{data}", seq_len=32, score_last=32)
    with pytest.raises(PruneHeadsError, match="apply to ppl:/kl: tasks"):
        make_evaluator(model, tok, "arc_easy", seq_len=32)
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat and ran far away, the cat sat on the mat\n")
    with pytest.raises(PruneHeadsError, match="too few for"):
        make_evaluator(model, tok, f"ppl:{short}", limit=4, seq_len=64, score_last=8)
