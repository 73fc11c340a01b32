"""Interleaved speed comparison, FLOPs and KV-cache accounting."""

from __future__ import annotations

import statistics

import pytest
import torch
from export_helpers import make_source
from tiny_models import tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

from prune_heads.evaluation.speed import SpeedComparison, compare_speed, flops_per_token, kv_cache_bytes
from prune_heads.export import export_checkpoint, register_auto_classes
from prune_heads.plan import Plan

pytestmark = pytest.mark.filterwarnings("ignore:plan has no model fingerprint")


class Clock:
    """A fake ``perf_counter``: only the models' declared delays pass on it, so timings are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Slowed(nn.Module):
    """A model that records when it ran and takes ``delay`` seconds of ``clock`` per forward pass."""

    def __init__(self, model, delay: float, log: list, name: str, clock: Clock | None = None):
        super().__init__()
        self.inner, self.delay, self.log, self.name, self.clock = model, delay, log, name, clock
        self.config = model.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    @property
    def model(self):
        return self.inner.model

    def forward(self, **kw):
        self.log.append(self.name)
        if self.clock is not None:
            self.clock.now += self.delay
        return self.inner(**kw)


def test_runs_are_interleaved_and_the_ratio_is_of_medians(monkeypatch):
    import prune_heads.evaluation.speed as speed

    clock = Clock()
    monkeypatch.setitem(speed._CLOCKS, "wall", clock)
    base = tiny_model("llama", layers=2, heads=4, kv_heads=2, hidden=32)
    log: list[str] = []
    a, b = Slowed(base, 0.004, log, "a", clock), Slowed(base, 0.012, log, "b", clock)
    res = compare_speed(a, b, mode="prefill", tokens=8, repeats=4, warmup=1)
    assert log == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then ABBA
    assert res.original_s == pytest.approx([0.004] * 4) and res.pruned_s == pytest.approx([0.012] * 4)
    assert res.ratio == pytest.approx(3.0) == statistics.median(res.pruned_s) / statistics.median(res.original_s)
    assert res.spread == pytest.approx((3.0, 3.0))
    d = res.to_dict()
    assert d["repeats"] == 4 and d["ratio"] == res.ratio and d["mode"] == "prefill"


def test_placements_move_both_models_weights_and_keep_their_values(monkeypatch):
    """``placements=3``: before each round the weights of both models move to new memory (new addresses,
    same values, tied weights still one tensor), each round has its warm-up and its ABBA pairs."""
    import prune_heads.evaluation.speed as speed

    clock = Clock()
    monkeypatch.setitem(speed._CLOCKS, "wall", clock)
    base = tiny_model("llama", layers=2, heads=4, kv_heads=2, hidden=32)
    other = tiny_model("llama", layers=2, heads=4, kv_heads=2, hidden=32)
    base.lm_head.weight = base.model.embed_tokens.weight  # tied, as in SmolLM2
    before = {n: (t.data_ptr(), t.detach().clone()) for n, t in base.state_dict(keep_vars=True).items()}
    log: list[str] = []
    a, b = Slowed(base, 0.004, log, "a", clock), Slowed(other, 0.012, log, "b", clock)
    res = compare_speed(a, b, mode="prefill", tokens=8, repeats=2, warmup=1, placements=3)
    assert log == (["a", "b"] + ["a", "b", "b", "a"]) * 3
    assert len(res.original_s) == len(res.pruned_s) == 6 and res.ratio == pytest.approx(3.0)
    assert res.to_dict()["placements"] == 3 and res.to_dict()["repeats"] == 6
    for name, t in base.state_dict(keep_vars=True).items():
        assert t.data_ptr() != before[name][0] and torch.equal(t, before[name][1]), name
    assert base.lm_head.weight is base.model.embed_tokens.weight
    log.clear()
    compare_speed(a, b, mode="prefill", tokens=8, repeats=1, warmup=0, placements=2)
    assert log == ["a", "b", "b", "a"]  # the order alternates across placements, not only within one
    with pytest.raises(ValueError, match="placements"):
        compare_speed(base, other, placements=0)
    # one placement leaves the weights where they are
    ptrs = [t.data_ptr() for t in base.parameters()]
    compare_speed(base, other, tokens=4, repeats=1, warmup=0)
    assert [t.data_ptr() for t in base.parameters()] == ptrs


def test_decode_times_only_the_steps():
    base = tiny_model("llama", layers=2, heads=4, kv_heads=2, hidden=32)
    log: list[str] = []
    a, b = Slowed(base, 0.0, log, "a"), Slowed(base, 0.0, log, "b")
    res = compare_speed(a, b, mode="decode", tokens=3, context=5, repeats=2, warmup=0)
    # per run: one untimed prompt pass, then 3 one-token steps
    assert log == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4
    assert res.context == 5 and res.tokens == 3


def test_threads_are_set_for_the_measurement_and_restored():
    base = tiny_model("llama")
    before = torch.get_num_threads()
    res = compare_speed(base, base, tokens=4, repeats=1, warmup=0, threads=1)
    assert res.threads == 1 and torch.get_num_threads() == before


def test_bad_arguments():
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="mode"):
        compare_speed(base, base, mode="train")
    with pytest.raises(ValueError, match="exceed the model's context of 256"):
        compare_speed(base, base, tokens=300)


def by_formula(cfg, kept: list[int], kept_kv: list[int], context: float, lm_head: bool) -> float:
    """Multiply-adds per token written out from the config (gated MLP, q/k/v/o projections)."""
    d, h = cfg.head_dim, cfg.hidden_size
    total = 0.0
    for q, kv in zip(kept, kept_kv):
        total += h * d * (2 * q + 2 * kv) + 3 * h * cfg.intermediate_size + 2 * q * d * context
    return total + (cfg.vocab_size * h if lm_head else 0)


def test_flops_and_kv_cache_of_a_sliced_export_match_the_formula(tmp_path):
    model, src = make_source(tmp_path, "llama", layers=3, heads=6, kv_heads=3)
    plan = Plan([(0, 0), (0, 2), (0, 3), (1, 4), (1, 5), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4)])
    export_checkpoint(str(src), plan, tmp_path / "s", verify=False, progress=False)
    register_auto_classes()
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    cfg = model.config
    for ctx, lm in ((10.5, False), (40, True)):
        assert flops_per_token(model, ctx, lm_head=lm) == by_formula(cfg, [6, 6, 6], [3, 3, 3], ctx, lm)
        assert flops_per_token(out, ctx, lm_head=lm) == by_formula(cfg, [3, 4, 1], [2, 2, 1], ctx, lm)
    assert kv_cache_bytes(model, 20) == 2 * 3 * 3 * 20 * 8 * 4
    assert kv_cache_bytes(out, 20) == 2 * (2 + 2 + 1) * 20 * 8 * 4
    res = compare_speed(model, out, mode="decode", tokens=2, context=4, repeats=1, warmup=0)
    assert res.flops_ratio == pytest.approx(by_formula(cfg, [3, 4, 1], [2, 2, 1], 5.5, True)
                                            / by_formula(cfg, [6, 6, 6], [3, 3, 3], 5.5, True))


def test_spread_of_one_pair():
    r = SpeedComparison("prefill", 8, 0, 1, "cpu", [2.0], [1.0])
    assert r.ratio == 0.5 and r.spread == (0.5, 0.5) and r.tokens_per_s == (4.0, 8.0)


class Sleeping(nn.Module):
    """A model that waits ``delay`` seconds per forward pass without using the CPU."""

    def __init__(self, model, delay: float):
        super().__init__()
        self.inner, self.delay, self.config = model, delay, model.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    @property
    def model(self):
        return self.inner.model

    def forward(self, **kw):
        import time

        time.sleep(self.delay)
        return self.inner(**kw)


def test_cpu_clock_counts_the_process_cpu_time_not_waiting():
    """The OS is the reference: a forward pass that sleeps half a second costs that much wall time and no CPU
    time. The wall clock sees the sleep; the cpu clock sees only the tiny model's compute, and never more
    CPU time than the whole call used (``time.process_time`` around it)."""
    import time

    base = tiny_model("llama", layers=2, heads=4, kv_heads=2, hidden=32)
    slow = Sleeping(base, 0.5)
    wall = compare_speed(base, slow, tokens=4, repeats=1, warmup=0, clock="wall")
    t0 = time.process_time()
    cpu = compare_speed(base, slow, tokens=4, repeats=1, warmup=0, clock="cpu")
    spent = time.process_time() - t0
    assert wall.clock == "wall" and cpu.clock == "cpu"
    assert wall.pruned_s[0] >= 0.5
    assert 0 < cpu.pruned_s[0] < 0.5 and cpu.original_s[0] + cpu.pruned_s[0] <= spent
    with pytest.raises(ValueError, match="clock"):
        compare_speed(base, base, clock="sundial")


def test_summary_row_says_how_the_speed_was_measured():
    from prune_heads.pipeline.summary import _speed_row

    base = tiny_model("llama", layers=2, heads=4, kv_heads=2, hidden=32)
    one = compare_speed(base, base, tokens=4, repeats=2, warmup=0).to_dict()
    assert "median of 2 interleaved)" in _speed_row(one)
    three = compare_speed(base, base, tokens=4, repeats=1, warmup=0, placements=3).to_dict()
    assert "median of 3 interleaved over 3 weight placements)" in _speed_row(three)
