"""Long-context evaluation: ``ppl:``/``kl:`` windows at any length scored on the same tokens, against a naive
per-window reference computed with plain forwards of a zeroed copy (no masking code, no batching)."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from test_evaluation import REMOVED, char_tokenizer, zeroed_copy
from tiny_models import tiny_model
from transformers import LlamaForCausalLM

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


@pytest.mark.parametrize("seq_len, score_last, batch", [(None, None, 3), (64, None, 4), (96, 20, 2), (40, 39, 5)])
def test_perplexity_per_sequence_equals_the_whole_batch_log_softmax(tiny, tmp_path, seq_len, score_last, batch):
    """``ppl:`` scores each sequence's rows alone (``_nll``: no batch x vocab float32 copies); the per-position
    NLL and rows are bit for bit those of the whole batch's ``log_softmax`` (``_logprobs``, which ``kl:`` keeps),
    with padding (documents of different lengths) and with windows scored on their last tokens."""
    model, tok = tiny
    data = write_text(tmp_path / "t.txt", n=30)
    window = {k: v for k, v in (("seq_len", seq_len), ("score_last", score_last)) if v is not None}
    ev = make_evaluator(model, tok, f"ppl:{data}", limit=7, batch_size=batch, **window)
    backend, n = ev.backend, 0
    for idx, ids, mask, logits in backend._logit_batches():
        logp, rows, targets = backend._logprobs(idx, ids, mask, logits)
        nll, rows2 = backend._nll(idx, ids, mask, logits)
        assert torch.equal(nll, -logp.gather(1, targets[:, None]).squeeze(1)) and torch.equal(rows, rows2)
        n += len(nll)
    assert n == ev(None).n > 0


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


# ---- passkey: retrieval against hand-built models ------------------------------------------------------
def retrieve(tok, ids, window=None, wrong=False):
    """``{position: token}``: what a causal retrieval rule predicts in one sequence. Once the question
    ("What is the LABEL pass key? The LABEL pass key is") has been read, it looks back (within ``window``
    tokens, or anywhere) for the needle "The LABEL pass key is DIGITS" and predicts the key's next character.
    ``wrong`` shifts every digit by one (a model that retrieves the wrong key). One token per character."""
    text = tok.decode(list(ids))
    out = {}
    q = text.find("What is the ")
    if q < 0:
        return out
    label = text[q + len("What is the "): text.find("pass key?", q)]
    ask = f" The {label}pass key is "
    after = text.find("pass key is", q + len("What is the ")) + len("pass key is")
    for t in range(after - 1, min(len(text), after + 5)):
        lo = 0 if window is None else max(0, t + 1 - window)
        n = text.find(ask, lo, q)
        if n < 0:
            continue
        j = t + 1 - after  # answer characters written so far, the space included
        ch = " " if j == 0 else text[n + len(ask) + j - 1]
        if wrong and ch != " ":
            ch = str((int(ch) + 1) % 10)
        out[t] = tok(ch, add_special_tokens=False).input_ids[0]
    return out


class Oracle(torch.nn.Module):
    """A model that only applies ``retrieve`` (no weights used)."""

    def __init__(self, config, tok, window=None, wrong=False):
        super().__init__()
        self.config, self.tok, self.window, self.wrong = config, tok, window, wrong
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **kw):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            for t, tok_id in retrieve(self.tok, input_ids[b].tolist(), self.window, self.wrong).items():
                logits[b, t, tok_id] = 1.0
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()


@pytest.fixture(scope="module")
def long_tiny():
    return tiny_model("llama", layers=1, heads=2, kv_heads=1, head_dim=8, max_position_embeddings=1024), char_tokenizer()


@pytest.mark.parametrize("spec", ["400", "600:3"])
def test_passkey_prompt_has_the_length_and_needle_depth_asked(long_tiny, spec):
    """Exact length; each needle after ``round(depth * filler)`` filler tokens (counted independently from the
    texts of the pieces: one token per character here, and no document-start token)."""
    from prune_heads.evaluation.passkey import DEPTHS, INTRO, PasskeyBackend

    model, tok = long_tiny
    pk = PasskeyBackend(model, tok, spec, limit=10, split="search", seed=3, batch_size=4)
    length, needles = (int(x) for x in (spec + ":1").split(":")[:2])
    assert {len(d.prompt) for d in pk.docs} == {length}
    assert len({d.depth for d in pk.docs}) >= 3 and {d.depth for d in pk.docs} <= set(DEPTHS)
    for d in pk.docs:
        text = tok.decode(d.prompt)
        assert text.startswith(INTRO) and text.endswith("pass key is")
        needle_texts, keys = [], []
        for s in d.needle_starts:
            rest = text[s:]
            needle_texts.append(rest[: rest.index("pass key.") + len("pass key.")])
            keys.append(rest.split("pass key is ")[1][:5])
        assert needle_texts[0].startswith(" The ") and len(set(keys)) == needles
        assert d.key == keys[d.asked] and tok.decode(d.answer) == " " + d.key
        question = text[text.rindex(" What is the"):]
        assert (needles == 1) == (question == " What is the pass key? The pass key is")
        room = length - len(INTRO) - sum(len(t) for t in needle_texts) - len(question)
        for m, s in enumerate(d.needle_starts):
            depth = (d.depth + m / needles) % 1.0
            earlier = sum(len(needle_texts[j]) for j, s2 in enumerate(d.needle_starts) if s2 < s)
            assert s - len(INTRO) - earlier == round(depth * room)


def test_passkey_oracle_scores_100_wrong_key_0_and_window_by_depth(long_tiny):
    from prune_heads.evaluation.evaluator import Evaluator
    from prune_heads.evaluation.passkey import PasskeyBackend

    model, tok = long_tiny
    for spec in ("300", "500:4"):
        def run(m, spec=spec):
            b = PasskeyBackend(m, tok, spec, limit=10, split="verify", seed=1, batch_size=3)
            return Evaluator(m, b, b.task_config)(), b

        good, b = run(Oracle(model.config, tok))
        assert good.value == 1.0 and good.metric == "exact_match" and good.higher_is_better and good.n == 10
        assert list(good.docs.values) == [1.0] * 10 and good.docs.ids == tuple(b.doc_ids)
        bad, _ = run(Oracle(model.config, tok, wrong=True))
        assert bad.value == 0.0
        # a model that sees only its last 200 tokens finds exactly the needles within them
        near, b = run(Oracle(model.config, tok, window=200))
        want = [float(d.needle_starts[d.asked] >= len(d.prompt) + 5 - 200) for d in b.docs]
        assert list(near.docs.values) == want and 0 < sum(want) < 10
        from prune_heads.evaluation.paired import paired_drop

        drop = paired_drop(good, near)
        assert drop.estimate == pytest.approx(1 - sum(want) / 10) and drop.method == "paired"


def test_passkey_splits_disjoint_seeded_and_deterministic(long_tiny):
    from prune_heads.evaluation.passkey import PasskeyBackend

    model, tok = long_tiny
    mk = lambda split, seed: PasskeyBackend(model, tok, "200", limit=40, split=split, seed=seed, batch_size=8)  # noqa: E731
    s, v = mk("search", 0), mk("verify", 0)
    assert not set(s.doc_ids) & set(v.doc_ids)
    assert not {d.key for d in s.docs} & {d.key for d in v.docs} or len({d.key for d in s.docs}) == 40
    again = mk("search", 0)
    assert [d.prompt + d.answer for d in again.docs] == [d.prompt + d.answer for d in s.docs]
    other = mk("search", 1)
    assert other.doc_ids != s.doc_ids and [d.key for d in other.docs] != [d.key for d in s.docs]


def test_passkey_through_make_evaluator_with_a_real_model_and_mask(long_tiny):
    """The real tiny model (random weights) under the task: its verdicts equal naive greedy generation with
    ``generate``. Its own greedy continuation, swapped in as the key of half the documents, scores 1 there
    (teacher forcing decides exactly as greedy decoding), masked as unmasked."""
    from prune_heads.evaluation.evaluator import Evaluator
    from prune_heads.model.masking import static_mask

    model, tok = long_tiny
    ev = make_evaluator(model, tok, "passkey:200", limit=4, split="search", batch_size=3)
    for removed in (None, [(0, 1)]):
        docs = ev.backend.docs
        with static_mask(model, removed or []):
            gen = [model.generate(torch.tensor([d.prompt]), max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)[0, len(d.prompt):].tolist() for d in docs]
        r = ev(removed)
        assert list(r.docs.values) == [float(g[:len(d.answer)] == d.answer) for g, d in zip(gen, docs)]
        swapped = copy.copy(ev.backend)  # the same model, so the mask reaches it (answers of 6 tokens: no padding)
        swapped.docs = copy.deepcopy(docs)
        for d, g in zip(swapped.docs[::2], gen[::2]):
            d.answer = g
        r2 = Evaluator(model, swapped, swapped.task_config)(removed)
        assert list(r2.docs.values[::2]) == [1.0, 1.0]


def test_passkey_bad_input_is_one_line(long_tiny, tiny):
    from tiny_tokenizer import tiny_tokenizer

    model, tok = long_tiny
    for spec, msg in [("x", "expected passkey:LENGTH"), ("100:9", "between 1 and 8 needles"),
                      ("60", "cannot hold the prompt's fixed parts"), ("1020", "beyond the model's context of 1024")]:
        with pytest.raises(PruneHeadsError, match=msg) as e:
            make_evaluator(model, tok, f"passkey:{spec}", limit=2)
        assert "\n" not in str(e.value)
    with pytest.raises(PruneHeadsError, match="cannot write the key's digits"):
        make_evaluator(model, tiny_tokenizer(), "passkey:200", limit=2)


def test_eval_cli_takes_passkey_and_long_windows(tmp_path):
    """``prune-heads eval`` passes --seq-len/--score-last and passkey: through the one stage function; the
    windows it scores are those ``make_evaluator`` builds, and a length beyond the context exits 2 in one line."""

    from click.testing import CliRunner

    from prune_heads.cli.main import cli

    model, tok = tiny_model("llama", layers=1, heads=2, kv_heads=1, head_dim=8), char_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = write_text(tmp_path / "t.txt")

    def run(*args):
        return CliRunner().invoke(cli, ["eval", str(tmp_path / "m"), *map(str, args)])

    r = run("--task", f"ppl:{data}", "--seq-len", 128, "--score-last", 16, "--limit", 3, "-o", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    t = json.loads((tmp_path / "p.json").read_text())["tasks"][0]
    want = make_evaluator(model, tok, f"ppl:{data}", seq_len=128, score_last=16, limit=3)()
    assert t["task"]["seq_len"] == 128 and t["task"]["score_last"] == 16
    assert t["baseline"]["value"] == pytest.approx(want.value, rel=1e-6) and t["baseline"]["n"] == 48
    r = run("--task", "passkey:200", "--limit", 4, "-o", tmp_path / "k.json")
    assert r.exit_code == 0, r.output
    t = json.loads((tmp_path / "k.json").read_text())["tasks"][0]
    assert t["baseline"]["metric"] == "exact_match" and t["baseline"]["n"] == 4 and t["task"]["seq_len"] == 200
    r = run("--task", f"ppl:{data}", "--seq-len", 4096, "-o", tmp_path / "x.json")
    # refused from the checkpoint's config before the weights are loaded (no progress bar, one line)
    assert r.exit_code == 2 and r.output.strip() == ("error: --seq-len: 4096 tokens is beyond the model's context "
                                                     "of 256; lower it")


# ---- the guard: a plan checked at the serving length ----------------------------------------------------
#: the head the built model needs for retrieval (layer 1, head 2)
HEAD = (1, 2)


def built_retrieval_model(tok, context: int = 256):
    """A 2-layer Llama whose weights are written by hand so that pass-key retrieval needs exactly one head, HEAD.

    No oracle: the real forward (RoPE, GQA, RMSNorm, causal attention) and the real static mask act on it.
    Residual dimensions: 0 a constant; 1..11 the current token's slot (" " and the ten digits; 12 any other
    token); 13..24 the previous token's slot; 25..35 the retrieved slot.

    - Layer 0: all four heads are previous-token heads: the query is constant and the key is the same vector
      rotated by one position's RoPE angle on the six fastest frequencies, so the score peaks at distance 1;
      each writes a quarter of the previous token's slot (any three can go and retrieval still works).
    - Layer 1: head 2 is an induction head restricted to digits: the query is the current slot plus a constant,
      the key the position's previous slot plus a "this is a digit" flag (on slow RoPE frequencies, which barely
      rotate within the context), so it attends to the digit that followed the current token in the needle and
      copies it; heads 0, 1 and 3 are zero.
    - The unembedding reads the retrieved slot (and writes " " after any token that is not " " or a digit).

    So the key " 71432" is written one token at a time after "... pass key is"; keys in which a digit is
    followed by two different digits (78745) are ambiguous to this one-token induction (``followable``).
    """
    from tiny_models import tiny_config

    cfg = tiny_config("llama", layers=2, heads=4, kv_heads=2, head_dim=64, hidden=64, vocab=len(tok),
                      max_position_embeddings=context, rope_theta=1e6, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(cfg).eval()
    d, heads, slots = 64, 4, [" "] + [str(i) for i in range(10)]
    ids = [tok.convert_tokens_to_ids(c) for c in slots]
    inv_freq = 1e6 ** (-torch.arange(0, d, 2).double() / d)
    const, cur, other, prev, out = 0, 1, 12, 13, 25
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1)
            layer.post_attention_layernorm.weight.fill_(1)
        model.model.norm.weight.fill_(1)
        emb = model.model.embed_tokens.weight
        emb[:, const] = emb[:, other] = 1
        for j, t in enumerate(ids):
            emb[t, other], emb[t, cur + j] = 0, 1
        a0, norm0, amp = model.model.layers[0].self_attn, math.sqrt(64 / 2), math.sqrt(300.0)
        for h in range(heads):
            a0.q_proj.weight[h * d:h * d + 6, const] = amp / norm0
            a0.o_proj.weight[prev:prev + 12, h * d:h * d + 12] = torch.eye(12) / heads
        for g in range(2):
            for i in range(6):
                a0.k_proj.weight[g * d + i, const] = amp * math.cos(inv_freq[i]) / norm0
                a0.k_proj.weight[g * d + i + d // 2, const] = amp * math.sin(inv_freq[i]) / norm0
            a0.v_proj.weight[g * d:g * d + 12, cur:cur + 12] = torch.eye(12) / norm0
        a1, norm1, (layer, r), g, lo = model.model.layers[1].self_attn, math.sqrt(64 / 3), HEAD, 1, 18
        assert layer == 1 and r // 2 == g
        a1.q_proj.weight[r * d + lo:r * d + lo + 11, cur:cur + 11] = torch.eye(11) * 1000 / norm1
        a1.q_proj.weight[r * d + lo + 11, const] = 300 / norm1
        a1.k_proj.weight[g * d + lo:g * d + lo + 11, prev:prev + 11] = torch.eye(11) / norm1
        a1.k_proj.weight[g * d + lo + 11, cur + 1:cur + 11] = 1 / norm1
        a1.v_proj.weight[g * d:g * d + 11, cur:cur + 11] = torch.eye(11) / norm1
        a1.o_proj.weight[out:out + 11, r * d:r * d + 11] = torch.eye(11)
        for j, t in enumerate(ids):
            model.lm_head.weight[t, out + j] = 4.0  # mild: perplexity on text stays finite
        model.lm_head.weight[ids[0], other] = 2.4
    return model


def followable(key: str) -> bool:
    """The independent reference for the built model: it writes ``key`` iff no digit of it is followed by two
    different digits (its induction head matches one previous token)."""
    succ: dict[str, set] = {}
    for a, b in zip(key, key[1:]):
        succ.setdefault(a, set()).add(b)
    return all(len(v) == 1 for v in succ.values())


def followable_passkey(model, tok, split: str, n: int = 6):
    """``passkey:200`` on the first ``n`` documents of ``split`` whose keys the built model can write."""
    from prune_heads.evaluation.evaluator import Evaluator

    ev = make_evaluator(model, tok, "passkey:200", split=split, limit=60, batch_size=8)
    backend = copy.copy(ev.backend)
    backend.docs = [doc for doc in ev.backend.docs if followable(doc.key)][:n]
    backend.doc_ids = [doc.id for doc in backend.docs]
    assert len(backend.docs) == n
    return Evaluator(model, backend, {**ev.task_config, "limit": n, "num_docs": n})


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    tok = char_tokenizer()
    data = write_text(tmp_path_factory.mktemp("guard") / "t.txt")
    return built_retrieval_model(tok), tok, data


def _mask(removed):
    m = torch.zeros(2, 4, dtype=torch.bool)
    for layer, head in removed:
        m[layer, head] = True
    return m


def test_built_model_needs_exactly_one_head_for_retrieval(retrieval):
    """The built model writes exactly the keys ``followable`` says (an independent reference, from the key's
    digits alone), with every head or with any three of layer 0 and the other three of layer 1 removed (the
    real static mask); without HEAD it writes none."""
    model, tok, _ = retrieval
    ev = make_evaluator(model, tok, "passkey:200", split="search", limit=10, batch_size=5)
    want = [float(followable(doc.key)) for doc in ev.backend.docs]
    assert 0 < sum(want) < 10  # both kinds of key are present, so the reference is not trivially met
    others = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 3)]
    for removed in ([], [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 3)], others[3:]):
        assert list(ev(_mask(removed) if removed else None).docs.values) == want, removed
    assert list(ev(_mask([HEAD])).docs.values) == [0.0] * 10


def _select(model, tok, data, guard, seed):
    from prune_heads.selection.static import select_static

    def ppl(split):
        return make_evaluator(model, tok, f"ppl:{data}", split=split, limit=4, seq_len=64)

    return select_static(model, None, ppl("search"), score_id="random", seed=seed, max_drop=10.0, relative=True,
                         confidence=0.9, verify_evaluator=ppl("verify"), guard=guard, progress=False)


def test_guard_refuses_a_plan_that_breaks_retrieval(retrieval):
    """Unguarded, the perplexity budget (lax on purpose) removes the built model's retrieval head; with
    ``passkey:200`` (keys it can write) as the guard the search stops before it: every probe that removed it was refused by the guard's paired bound, the
    plan keeps it, and the plan records the guard's length, verdict and held-out check."""
    from prune_heads.model.adapters import get_adapter
    from prune_heads.selection.budget import make_budget
    from prune_heads.selection.guard import GuardCheck
    from prune_heads.selection.policies import candidate_units
    from prune_heads.selection.static import ranking

    model, tok, data = retrieval
    layout = get_adapter(model).layout(model.config)
    seed = next(s for s in range(50) if 2 <= [u[0] for u in candidate_units(
        ranking(None, "random", layout, s), layout, "free", 1, False)].index(HEAD) < 5)
    units = candidate_units(ranking(None, "random", layout, seed), layout, "free", 1, False)
    pos = [u[0] for u in units].index(HEAD)  # the retrieval head is the (pos + 1)-th unit removed

    free = _select(model, tok, data, None, seed)
    assert HEAD in free.removed_heads and free.selection.guards == []

    guard = GuardCheck(followable_passkey(model, tok, "search"), make_budget(0.1, False, 0.9),
                       verify_evaluator=followable_passkey(model, tok, "verify"))
    plan = _select(model, tok, data, guard, seed)
    [g] = plan.selection.guards
    assert HEAD not in plan.removed_heads and 0 < len(plan.removed_heads) <= pos
    assert g.seq_len == 200 and g.task["task"] == "passkey:200" and g.baseline["value"] == 1.0
    assert g.within_budget and g.result["value"] == 1.0 and g.verification.verdict == "within"
    assert g.refused and min(g.refused) > pos and g.budget.max_drop == 0.1 and g.budget.confidence == 0.9
    for p in g.trace[1:]:  # k = 0 is the baseline; each guard probe: retrieval lost exactly when the head went
        assert (p.value == 0.0) == (p.k > pos) and p.within_budget == (p.k <= pos)
    # the record survives the plan file
    from prune_heads.plan import Plan

    [again] = Plan.from_dict(json.loads(json.dumps(plan.to_dict()))).selection.guards
    assert again.seq_len == 200 and again.refused == g.refused and again.verification.verdict == "within"
    assert again.trace[-1].drop.bound == pytest.approx(g.trace[-1].drop.bound)
    # the card and select's line say at which lengths the budget was shown to hold, and the guard's verdict
    from prune_heads.export.model_card import budget_section
    from prune_heads.selection.stage import plan_line

    card = budget_section(plan.selection.to_dict())
    assert "shown to hold at 64 tokens of context" in card and "Guard at 200 tokens (`passkey:200`)" in card
    assert "1 -> 1 for this plan (within budget)" in card and f"refused {len(g.refused)} probe" in card
    assert "Guard on held-out documents (6 " in card and "verdict **within**" in card
    assert "guard passkey:200 at 200 tokens 1.0000 -> 1.0000 (within budget" in plan_line(plan, "p.json")
    assert "longer contexts were not checked" in budget_section(free.selection.to_dict())


def test_a_perplexity_guard_at_the_serving_length_stops_the_search_too(tiny, tmp_path):
    """``--guard-ppl-max-drop`` beside a ``passkey:`` guard: perplexity in windows of the pass key's length, cut
    from the search task's data and scored on their last quarter, must hold too. On a random tiny model the
    pass key never binds (its baseline is 0), so the perplexity guard alone stops the search: the plan keeps
    fewer heads than without it, every probe it refused has a bound over its budget, and its values are those
    of an independent evaluator of the same windows under the same masks."""
    from prune_heads.model.adapters import get_adapter
    from prune_heads.plan import Plan
    from prune_heads.selection.policies import removal_mask
    from prune_heads.selection.stage import SelectConfig, StaticMethod, guard_check, plan_line
    from prune_heads.selection.static import select_static

    model, tok = tiny
    data = write_text(tmp_path / "t.txt", n=60)
    layout = get_adapter(model).layout(model.config)

    def plan_with(ppl_budget):
        cfg = SelectConfig(method=StaticMethod(score="random"), task=f"ppl:{data}", max_drop=10.0, relative=True,
                           confidence=0.9, guard_task="passkey:200", guard_max_drop=0.1, guard_limit=4,
                           guard_ppl_max_drop=ppl_budget)
        cfg.check()
        assert cfg.guard_tasks() == ["passkey:200"] + ([f"ppl:{data}"] if ppl_budget else [])

        def ppl(split):
            return make_evaluator(model, tok, f"ppl:{data}", split=split, limit=4, seq_len=64)

        return select_static(model, None, ppl("search"), score_id="random", seed=1, max_drop=10.0, relative=True,
                             confidence=0.9, verify_evaluator=ppl("verify"), guard=guard_check(cfg, model, tok),
                             progress=False)

    loose, tight = plan_with(None), plan_with(0.002)
    assert [g.task["task"] for g in loose.selection.guards] == ["passkey:200"]
    key, ppl_guard = tight.selection.guards
    assert key.task["task"] == "passkey:200" and not key.refused
    assert ppl_guard.task["task"] == f"ppl:{data}" and ppl_guard.seq_len == 200
    assert ppl_guard.task["score_last"] == 50 and ppl_guard.task["split"] == "search"
    assert ppl_guard.budget.relative and ppl_guard.budget.max_drop == 0.002 and ppl_guard.budget.confidence == 0.9
    assert ppl_guard.refused and len(tight.removed_heads) < min(ppl_guard.refused) <= len(loose.removed_heads)
    assert ppl_guard.within_budget and ppl_guard.verification is not None
    assert ppl_guard.verification.drop.n == 4  # --guard-limit windows of the verify split
    reference = make_evaluator(model, tok, f"ppl:{data}", split="search", limit=4, seq_len=200, score_last=50)
    base = reference(None).value
    assert ppl_guard.trace[0].value == pytest.approx(base, rel=1e-9)
    for p in ppl_guard.trace[1:]:
        mask = removal_mask(_units_of(tight, layout), p.k, layout)
        assert p.value == pytest.approx(reference(mask).value, rel=1e-9)
        assert p.drop.estimate == pytest.approx(p.value / base - 1, abs=1e-9)
        assert p.within_budget == (p.drop.bound <= 0.002) == (p.k not in ppl_guard.refused)
    # both guards survive the plan file, and the card and select's line name both
    again = Plan.from_dict(json.loads(json.dumps(tight.to_dict()))).selection.guards
    assert [g.task["task"] for g in again] == ["passkey:200", f"ppl:{data}"] and again[1].refused == ppl_guard.refused
    from prune_heads.export.model_card import budget_section

    card = budget_section(tight.selection.to_dict())
    assert "Guard at 200 tokens (`passkey:200`)" in card and f"Guard at 200 tokens (`ppl:{data}`)" in card
    assert f"guard ppl:{data} at 200 tokens" in plan_line(tight, "p.json")


@pytest.mark.parametrize("guard_bound, step", [(None, 16), (0.0, 16), (0.024, 16), (0.026, 10), (0.09, 10)])
def test_a_guard_near_its_bound_stops_the_doubling(guard_bound, step):
    """The ascending search doubles after a pass whose bound is under a quarter of the budget; a guard whose own
    bound at that k is not (budget 0.1: over 0.025) makes it grow by GROWTH instead (8 -> 10, not 16), since
    the search stops at the first refusal and a jump past the guard's limit loses every k in between."""
    from types import SimpleNamespace

    from prune_heads.plan.record import DropStats, Probe
    from prune_heads.selection.budget import make_budget
    from prune_heads.selection.guard import GuardCheck, Guards
    from prune_heads.selection.search import geometric_step
    from prune_heads.selection.static import _ascending_step

    def probe(k, bound):
        return Probe(k=k, heads_removed=k, metric="m", value=0.0, within_budget=True,
                     drop=DropStats(estimate=bound, stderr=0.0, bound=bound, lower=bound, confidence=0.9,
                                    allowed=0.1, within_budget=True))

    budget = make_budget(0.1, True, 0.9)
    search = SimpleNamespace(trace=[probe(4, 0.001), probe(8, 0.001)])  # the budget's own: far from 0.1
    guard = GuardCheck(None, budget)
    guard.judge = SimpleNamespace(trace=[probe(4, 0.0)] + ([probe(8, guard_bound)] if guard_bound is not None else []))
    assert geometric_step(8) == 10
    assert _ascending_step(search, budget, 100, guided=False, guard=Guards([guard]))(8) == step
    assert _ascending_step(search, budget, 100, guided=False)(8) == 16


def test_a_guards_errors_name_its_own_options():
    """A guard that cannot start says which option to change: ``--guard-max-drop`` for the task guard,
    ``--guard-ppl-max-drop`` for the perplexity guard (not the search's ``--max-drop``)."""
    from types import SimpleNamespace

    from prune_heads.errors import BudgetError
    from prune_heads.selection.budget import make_budget
    from prune_heads.selection.guard import GuardCheck

    def zero(_mask):  # a baseline of 0: a relative budget allows nothing
        return SimpleNamespace(metric="ppl", value=0.0, higher_is_better=False)

    zero.task_config = {"task": "ppl:wikitext2"}
    for flag in ("--guard-max-drop", "--guard-ppl-max-drop"):
        guard = GuardCheck(zero, make_budget(0.1, True, 0.9), budget_flag=flag)
        with pytest.raises(BudgetError) as e:
            guard.start()
        assert str(e.value).startswith("guard ppl:wikitext2: ") and f"absolute {flag}" in str(e.value)
        assert guard.with_compensation(None).budget_flag == flag


def _units_of(plan, layout):
    """The units the static search walked, in order (its ranking is seeded: rebuilt from the plan's seed)."""
    from prune_heads.selection.policies import candidate_units
    from prune_heads.selection.static import ranking

    d = plan.selection.details
    return candidate_units(ranking(None, "random", layout, d.seed), layout, plan.selection.policy, 1, False)


def test_plans_written_with_one_guard_still_load():
    """Plans of 0.x wrote ``selection.guard`` (one record or null); they load as ``guards``."""
    from prune_heads.plan.record import SelectionResult

    g = {"task": {"task": "passkey:2048"}, "budget": {"max_drop": 0.1, "relative": False, "confidence": 0.9},
         "seq_len": 2048, "refused": [4]}
    base = {"heads_total": 8, "heads_removed": 0, "per_layer_counts": [0, 0]}
    assert SelectionResult.from_dict({**base, "guard": None}).guards == []
    [old] = SelectionResult.from_dict({**base, "guard": g}).guards
    assert old.seq_len == 2048 and old.refused == [4] and old.budget.max_drop == 0.1


def test_guard_options_are_checked():
    from prune_heads.schema import ConfigError
    from prune_heads.selection.stage import SelectConfig

    base = dict(task="ppl:wikitext2", max_drop=0.1, relative=True)
    with pytest.raises(ConfigError, match="needs --guard-max-drop"):
        SelectConfig(**base, guard_task="passkey:2048").check()
    with pytest.raises(ConfigError, match="needs --guard-task"):
        SelectConfig(**base, guard_max_drop=0.1).check()
    with pytest.raises(ConfigError, match="below 1 for an accuracy task"):
        SelectConfig(**base, guard_task="passkey:2048", guard_max_drop=5).check()
    SelectConfig(**base, guard_task="passkey:2048", guard_max_drop=0.1).check()
    with pytest.raises(ConfigError, match="--guard-ppl-max-drop needs --guard-task"):
        SelectConfig(**base, guard_ppl_max_drop=0.1).check()
    with pytest.raises(ConfigError, match="already guards perplexity"):
        SelectConfig(**base, guard_task="ppl:wikitext2", guard_seq_len=2048, guard_max_drop=0.1,
                     guard_ppl_max_drop=0.1).check()
    with pytest.raises(ConfigError, match="give --guard-seq-len"):
        SelectConfig(**base, guard_task="arc_easy", guard_max_drop=0.1, guard_ppl_max_drop=0.1).check()
    SelectConfig(**base, guard_task="arc_easy", guard_max_drop=0.1, guard_seq_len=1024, guard_ppl_max_drop=0.1).check()


@pytest.mark.slow  # a whole tiny pipeline run (~20 s on the shared CPU)
def test_recipe_guard_reaches_plan_and_summary(tmp_path):
    """A recipe's ``select.guard_*`` keys are the CLI's options (one ``SelectConfig``); the run's plan records the
    guard and the summary shows the guard and the long-context row beside the short one."""
    from test_pipeline import SHORT_TEXT, _copy_tokenizer, quiet_run, tiny_recipe

    from prune_heads.plan import Plan

    d = tmp_path / "m"
    tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=8, vocab=49152).save_pretrained(d)
    _copy_tokenizer(d)
    text = tmp_path / "short.txt"
    text.write_text(SHORT_TEXT)
    recipe = tiny_recipe(d, text, guard_task="passkey:128", guard_max_drop=0.5, guard_limit=3)
    recipe["evaluate"]["tasks"].append({"task": "passkey:128", "split": "verify", "limit": 3})
    s = quiet_run(recipe, tmp_path / "run")
    [g] = Plan.load(tmp_path / "run" / "select" / "plan.json").selection.guards
    assert g.seq_len == 128 and g.task["task"] == "passkey:128" and g.budget.max_drop == 0.5 and len(g.trace) >= 1
    md = (tmp_path / "run" / "summary.md").read_text()
    assert "Guard at 128 tokens: `passkey:128`" in md
    assert "| passkey:128 at 128 tokens exact_match (verify, 3 documents) |" in md
    assert f"| ppl:{text} at 256 tokens perplexity" in md and s.selection["guards"][0]["seq_len"] == 128


@pytest.mark.parametrize("key, value, field", [
    ("guard_task", "passkey:4096", "select.guard_task"), ("guard_seq_len", 1024, "select.guard_seq_len"),
    ("seq_len", 512, "select.seq_len")])
def test_recipe_lengths_beyond_the_context_are_refused_before_loading(tmp_path, key, value, field):
    from test_pipeline import tiny_recipe
    from tiny_models import tiny_config

    from prune_heads.pipeline.preflight import _lengths, check_lengths
    from prune_heads.pipeline.recipe import validate

    tiny_config("llama").save_pretrained(tmp_path)  # config only: nothing is loaded
    extra = {"guard_task": "ppl:wikitext2", "guard_max_drop": 0.1} if key == "guard_seq_len" else {}
    if key == "guard_task":
        extra["guard_max_drop"] = 0.1
    recipe = validate(tiny_recipe(tmp_path, **{key: value, **extra}))
    with pytest.raises(PruneHeadsError, match=f"{field}: {str(value).split(':')[-1]} tokens is beyond the model's context of 256"):
        check_lengths(recipe.model, _lengths(recipe))
