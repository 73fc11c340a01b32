"""Speed of a pruned model against its original, measured so that one noisy run cannot decide it.

Timing two models one after the other on a shared machine compares the machine's load at two moments
as much as the models. ``compare_speed`` therefore interleaves the runs (original, pruned, pruned,
original, ... so a linear drift cancels), takes the median of each side, and reports the ratio of the
medians beside the spread of the per-pair ratios and the ratio its FLOPs predict
(``flops_per_token``). ``kv_cache_bytes`` measures the KV cache a prompt leaves behind.

Interleaving cannot average out what stays fixed for a model's whole life: where its weights sit in
memory. On the CPU a batch-1 decode step streams every weight once, so its speed follows the memory
behind the weights (the page cache's folios of a memory-mapped safetensors file, or fresh anonymous
pages). Measured on a 1B-shaped Llama at 2 threads, the same two models differed by 0.96 to 1.03 in
decode from one load to the next. ``placements=P`` therefore copies both models' CPU weights into
fresh memory ``P`` times and interleaves ``repeats`` pairs in each placement: the median and the
quartiles then cover placement as well as load.

``clock="cpu"`` times the process's CPU time instead of the wall clock: on a machine shared with other
work, time spent waiting for a core then does not count (with one thread it is the work done; with
several it also counts their spinning). Wall time is what a user waits, and the default.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

Mode = Literal["prefill", "decode"]
Clock = Literal["wall", "cpu"]
_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class SpeedComparison:
    """Interleaved timings of one workload on two models; ``ratio`` < 1 means the pruned one is faster."""

    mode: Mode
    tokens: int            # prefill: prompt length; decode: tokens generated one at a time
    context: int           # decode: prompt length before the timed steps (0 for prefill)
    threads: int
    device: str
    original_s: list[float] = field(default_factory=list)
    pruned_s: list[float] = field(default_factory=list)
    flops_ratio: float | None = None
    clock: Clock = "wall"
    placements: int = 1

    @property
    def original_median(self) -> float:
        return statistics.median(self.original_s)

    @property
    def pruned_median(self) -> float:
        return statistics.median(self.pruned_s)

    @property
    def ratio(self) -> float:
        """Pruned time over original time, as the ratio of the two medians."""
        return self.pruned_median / self.original_median

    @property
    def spread(self) -> tuple[float, float]:
        """First and third quartile of the per-pair ratios: how far one pair can be from the median."""
        pairs = sorted(p / o for o, p in zip(self.original_s, self.pruned_s))
        if len(pairs) < 2:
            return pairs[0], pairs[0]
        q = statistics.quantiles(pairs, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def tokens_per_s(self) -> tuple[float, float]:
        """(original, pruned) tokens per second at the medians."""
        return self.tokens / self.original_median, self.tokens / self.pruned_median

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(original_median_s=self.original_median, pruned_median_s=self.pruned_median, ratio=self.ratio,
                 ratio_quartiles=list(self.spread), tokens_per_s=list(self.tokens_per_s),
                 repeats=len(self.original_s))
        return d


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _text_config(model: nn.Module) -> Any:
    from prune_heads.model.adapters import get_adapter

    return get_adapter(model).text_config(model.config)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _prefill(model: nn.Module, ids: torch.Tensor, clock: Clock = "wall") -> float:
    device = _device(model)
    x = ids.to(device)
    now = _CLOCKS[clock]
    _sync(device)
    t = now()
    model(input_ids=x, use_cache=False, logits_to_keep=1)
    _sync(device)
    return now() - t


@torch.no_grad()
def _decode(model: nn.Module, prompt: torch.Tensor, steps: torch.Tensor, clock: Clock = "wall") -> float:
    """Time ``steps`` one-token forward passes on the cache a (untimed) prompt left; the tokens are fixed, so
    both models do the same work whatever they would generate."""
    device = _device(model)
    name, cache = _cache_of(model(input_ids=prompt.to(device), use_cache=True, logits_to_keep=1))
    steps = steps.to(device)
    now = _CLOCKS[clock]
    _sync(device)
    t = now()
    for i in range(steps.shape[1]):
        cache = model(input_ids=steps[:, i:i + 1], use_cache=True, **{name: cache})[name]
    _sync(device)
    return now() - t


def _cache_of(output: Any) -> tuple[str, Any]:
    """The cache a forward pass returned, and the keyword that passes it back (``cache`` from
    transformers 5.2x, ``past_key_values`` before)."""
    name = "cache" if "cache" in output else "past_key_values"
    return name, output[name]


@torch.no_grad()
def replace_weights(model: nn.Module) -> None:
    """Copy every CPU parameter and buffer of ``model`` into freshly allocated memory (same values; tied
    weights stay tied, as a shared parameter is one object). See the module docstring for why."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu":
            t.data = t.data.clone()


def compare_speed(original: nn.Module, pruned: nn.Module, *, mode: Mode = "prefill", tokens: int = 512,
                  context: int = 64, repeats: int = 7, warmup: int = 1, threads: int | None = None,
                  seed: int = 0, clock: Clock = "wall", placements: int = 1) -> SpeedComparison:
    """Time ``mode`` on both models, interleaved, ``repeats`` times each after ``warmup`` untimed runs.

    ``prefill``: one forward pass over ``tokens`` tokens (batch 1, no cache, logits of the last token
    only). ``decode``: ``tokens`` one-token steps after a ``context``-token prompt. ``threads`` sets
    torch's CPU threads for the measurement (restored afterwards). ``clock``: ``wall`` or ``cpu`` (see
    the module docstring). The token ids are random but the same for both models. ``placements`` > 1
    moves both models' CPU weights into fresh memory before each of that many rounds of ``repeats``
    pairs (``replace_weights``; the models keep their values, not their old storage).
    """
    if mode not in ("prefill", "decode"):
        raise ValueError(f"mode must be 'prefill' or 'decode', not {mode!r}")
    if clock not in _CLOCKS or (clock == "cpu" and _device(original).type != "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu' (the cpu clock only on the CPU), not {clock!r}")
    if repeats < 1 or tokens < 1 or placements < 1:
        raise ValueError("repeats, tokens and placements must be >= 1")
    cfg = _text_config(original)
    limit = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    if limit and (tokens + (context if mode == "decode" else 0)) > limit:
        raise ValueError(f"{tokens} tokens (+{context} of context) exceed the model's context of {limit}")
    gen = torch.Generator().manual_seed(seed)
    vocab = int(cfg.vocab_size)
    if mode == "prefill":
        ids = torch.randint(0, vocab, (1, tokens), generator=gen)
        run = lambda m: _prefill(m, ids, clock)  # noqa: E731
    else:
        prompt = torch.randint(0, vocab, (1, max(1, context)), generator=gen)
        steps = torch.randint(0, vocab, (1, tokens), generator=gen)
        run = lambda m: _decode(m, prompt, steps, clock)  # noqa: E731
    with _threads(threads) as n:
        result = SpeedComparison(mode, tokens, context if mode == "decode" else 0, n, str(_device(original)),
                                 clock=clock, placements=placements)
        order = ((original, result.original_s), (pruned, result.pruned_s))
        for p in range(placements):
            if placements > 1:
                replace_weights(original)
                replace_weights(pruned)
            for _ in range(warmup):  # after each move: the first pass over new memory pays its page faults
                run(original)
                run(pruned)
            for i in range(p * repeats, (p + 1) * repeats):  # ABBA across placements, too
                for model, times in (order if i % 2 == 0 else order[::-1]):
                    times.append(run(model))
    avg_context = (tokens + 1) / 2 if mode == "prefill" else context + (tokens + 1) / 2
    lm_head = mode == "decode"
    result.flops_ratio = (flops_per_token(pruned, avg_context, lm_head=lm_head)
                          / flops_per_token(original, avg_context, lm_head=lm_head))
    return result


def _heads_of(attn: nn.Module, o_name: str, head_dim: int) -> int:
    """Query heads an attention block computes: the width of its ``o_proj`` input (0 for an emptied layer)."""
    o = getattr(attn, o_name, None)
    weight = getattr(o, "weight", None)
    return 0 if weight is None else weight.shape[1] // head_dim


def flops_per_token(model: nn.Module, context: float, *, lm_head: bool = True) -> float:
    """Multiply-adds one token costs at ``context`` earlier tokens: every linear layer of the decoder (the
    real, possibly sliced, weights), ``2 x heads x head_dim x context`` for attention, and the LM head
    when ``lm_head`` (a prefill that keeps one token's logits pays it once, not per token)."""
    from prune_heads.model.adapters import get_adapter

    adapter = get_adapter(model)
    cfg = _text_config(model)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    total = 0.0
    for layer in adapter.layers(model):
        total += sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
        total += 2 * _heads_of(adapter.attention(layer), adapter.o_name, head_dim) * head_dim * context
    if lm_head:
        total += model.get_output_embeddings().weight.numel()
    return total


@torch.no_grad()
def kv_cache_bytes(model: nn.Module, tokens: int = 2048, *, seed: int = 0) -> int:
    """Bytes the KV cache holds after a ``tokens``-token prompt (its peak: it only grows from there)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(_text_config(model).vocab_size), (1, tokens), generator=gen).to(_device(model))
    _, cache = _cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


__all__ = ["SpeedComparison", "compare_speed", "flops_per_token", "kv_cache_bytes", "replace_weights"]
