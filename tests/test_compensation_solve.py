"""The closed-form compensation against ``torch.linalg.lstsq`` on stacked activations from a naive loop."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from compensation_reference import dims, lstsq_fit, stacked_inputs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from prune_heads.compensation import (
    Compensation,
    CompensationSpec,
    Compensator,
    Moments,
    collect_moments,
    compute_compensation,
    precision,
    residual_error,
)
from prune_heads.errors import PruneHeadsError


def seqs_for(n_seqs: int, seed: int = 0, vocab: int = 101) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 16, (n_seqs,), generator=g).tolist()
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@st.composite
def setups(draw):
    family = draw(st.sampled_from(["llama", "qwen2", "phi3", "gemma2"]))
    kv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    heads = kv * group
    head_dim = draw(st.sampled_from([2, 4]))
    layer = draw(st.integers(0, 1))
    removed = sorted(draw(st.sets(st.integers(0, heads - 1), min_size=1, max_size=max(1, heads - 1))))
    if len(removed) == heads:
        removed = removed[:-1]
    if not removed:
        removed = [0]
    return family, heads, kv, head_dim, layer, removed


def model_for(family, heads, kv, head_dim):
    hidden = heads * 8 if family in ("llama", "gemma2") else 32
    return tiny_model(family, layers=2, heads=heads, kv_heads=kv, head_dim=head_dim, hidden=hidden).double()


def _normal_equations_close(x_kept: torch.Tensor):
    """``assert_close`` with the error bound of a least-squares fit solved from accumulated moments (the normal
    equations) against ``lstsq`` (QR): about ``cond([X, 1])^2 * N * eps`` of the coefficients' scale, ``N`` the
    rows summed into the moments. A fixed 1e-6 held for well-conditioned draws only (a tiny gemma2 layer with
    cond 3.4e3 differed by 1.3e-7 where the bound is 3.7e-7; another draw reached 1.6 times the bare bound, hence 10x)."""
    ones = torch.ones(x_kept.shape[0], 1, dtype=x_kept.dtype)
    kappa = torch.linalg.cond(torch.cat([x_kept, ones], 1)).item()
    bound = 10 * kappa**2 * x_kept.shape[0] * torch.finfo(x_kept.dtype).eps  # the bound's constant is not sharp

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        scale = float(expected.abs().max()) or 1.0
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=max(1e-7, bound * scale))
    return close


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(setup=setups())
@example(setup=("gemma2", 3, 1, 2, 0, [1]))  # cond 3.4e3: over a fixed 1e-7, within the normal equations' bound
@example(setup=("gemma2", 4, 2, 2, 0, [0]))  # 1.6x the bare bound cond^2 N eps
def test_lsq_equals_lstsq_on_stacked_activations(setup):
    family, heads, kv, head_dim, layer, removed = setup
    if len(removed) == heads:
        return
    model = model_for(family, heads, kv, head_dim)
    seqs = seqs_for(14)
    moments = collect_moments(model, seqs, batch_size=4, progress=False)  # padded batches
    mask = torch.zeros(2, heads, dtype=torch.bool)
    mask[layer, removed] = True
    comp = compute_compensation(mask, CompensationSpec("lsq", ridge=0.0), moments=moments)
    lc = comp.layers[layer]
    assert set(comp.layers) == {layer} and lc.removed == tuple(removed)

    xs, _ = stacked_inputs(model, seqs)  # one unpadded sequence at a time
    x = xs[layer]
    r, k = dims(removed, head_dim), dims(lc.kept, head_dim)
    coef, bias, _ = lstsq_fit(x[:, k], x[:, r])
    close = _normal_equations_close(x[:, k])
    close(lc.weight, coef)
    close(lc.offset, bias)

    # folded into o_proj: the best kept-column weights and bias for the layer's full attention output
    o = model.model.layers[layer].self_attn.o_proj
    w, b = o.weight.detach().double(), (o.bias.detach().double() if o.bias is not None else None)
    y = x @ w.T + (b if b is not None else 0)
    w_k, b_fit, mse = lstsq_fit(x[:, k], y)
    new_w, new_b = lc.fold(w, b)
    close(new_w[:, k], w_k)
    torch.testing.assert_close(new_w[:, r], torch.zeros_like(new_w[:, r]))
    close(new_b, b_fit)
    # the error formula tr(W_R (P_RR)^-1 W_R^T) is the mean squared residual of that fit
    prec = precision(moments.covariance(layer), 0.0)
    assert residual_error(prec, w, torch.tensor(r)) == pytest.approx(mse, rel=1e-5, abs=1e-10)


def test_mean_mode_is_the_removed_heads_mean_output_as_a_bias():
    model = model_for("llama", 4, 2, 4)
    seqs = seqs_for(8)
    moments = collect_moments(model, seqs, batch_size=3, progress=False)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, [0, 3]] = True
    lc = compute_compensation(mask, "mean", moments=moments).layers[1]
    x = stacked_inputs(model, seqs)[0][1]
    r = dims([0, 3], 4)
    assert lc.weight is None
    torch.testing.assert_close(lc.offset, x[:, r].mean(0))
    w = model.model.layers[1].self_attn.o_proj.weight.detach().double()
    new_w, new_b = lc.fold(w, None)
    torch.testing.assert_close(new_b, w[:, r] @ x[:, r].mean(0))
    keep = dims([1, 2], 4)
    torch.testing.assert_close(new_w[:, keep], w[:, keep])  # kept columns untouched


def test_ridge_is_ridge_regression_on_centred_activations():
    model = model_for("qwen2", 4, 2, 4)
    seqs = seqs_for(10)
    moments = collect_moments(model, seqs, progress=False)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, [1]] = True
    ridge = 0.05
    lc = compute_compensation(mask, CompensationSpec("lsq", ridge=ridge), moments=moments).layers[0]
    x = stacked_inputs(model, seqs)[0][0]
    xc = x - x.mean(0)
    cov = xc.T @ xc / x.shape[0]
    lam = ridge * cov.diagonal().mean()
    r, k = dims([1], 4), dims([0, 2, 3], 4)
    a = torch.linalg.solve(cov[k][:, k] + lam * torch.eye(len(k), dtype=x.dtype), cov[k][:, r]).T
    torch.testing.assert_close(lc.weight, a, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lc.offset, x[:, r].mean(0) - a @ x[:, k].mean(0), rtol=1e-6, atol=1e-9)


def test_apply_transform_and_fold_agree():
    g = torch.Generator().manual_seed(0)
    model = model_for("llama", 4, 2, 4)
    moments = collect_moments(model, seqs_for(8), progress=False)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, [0, 2]] = True
    lc = compute_compensation(mask, "lsq", moments=moments).layers[0]
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    T, t = lc.transform(16)
    torch.testing.assert_close(lc.apply(x), x @ T.T + t)
    w, b = torch.randn(32, 16, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    new_w, new_b = lc.fold(w, b)
    torch.testing.assert_close(x @ new_w.T + new_b, lc.apply(x) @ w.T + b)
    torch.testing.assert_close(lc.bias_delta(w), w @ t)


def _synthetic(cov: torch.Tensor) -> Moments:
    n = cov.shape[0]
    return Moments(torch.tensor([100.0], dtype=torch.float64), [torch.zeros(n, dtype=torch.float64)], [cov * 100],
                   torch.tensor([100.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                   {"num_heads": 2, "head_dim": n // 2})


def test_singular_covariance_needs_ridge_and_ill_conditioned_warns():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = torch.cat([base, base[:, :1]], 1)  # head 1's second dim copies head 0's first: singular
    cov = x.T @ x
    mask = torch.tensor([[False, True]])
    with pytest.raises(PruneHeadsError, match="singular.*ridge"):
        Compensator(CompensationSpec("lsq", ridge=0.0), moments=_synthetic(cov))(mask)
    with pytest.warns(UserWarning, match="singular \\(not positive definite\\); ridge 0.001 brings its condition"):
        comp = Compensator(CompensationSpec("lsq", ridge=1e-3), moments=_synthetic(cov))(mask)
    assert torch.isfinite(comp.layers[0].weight).all()
    nearly = torch.diag(torch.tensor([1.0, 1.0, 1.0, 1e-12], dtype=torch.float64))  # positive definite, barely
    with pytest.warns(UserWarning, match="ill-conditioned \\(condition number 1.0e\\+12\\)"):
        Compensator(CompensationSpec("lsq", ridge=1e-3), moments=_synthetic(nearly))(mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-conditioned covariance is quiet
        Compensator("lsq", moments=_synthetic(torch.eye(4, dtype=torch.float64)))(mask)


def test_compensation_file_roundtrip(tmp_path):
    model = model_for("llama", 4, 2, 4)
    moments = collect_moments(model, seqs_for(8), progress=False)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, [3]] = True
    mask[1, [0, 1, 2, 3]] = True  # a whole layer: lsq falls back to the mean
    comp = compute_compensation(mask, "lsq", moments=moments)
    assert comp.layers[1].weight is None and comp.layers[1].kept == ()
    comp.save(tmp_path / "c.safetensors")
    back = Compensation.load(tmp_path / "c.safetensors")
    assert back.fingerprint() == comp.fingerprint() and back.spec == comp.spec
    assert torch.equal(back.layers[0].weight, comp.layers[0].weight)
    assert torch.equal(back.removed_mask(), mask)
    with pytest.raises(PruneHeadsError, match="other removed heads"):
        back.check_matches(torch.zeros(2, 4, dtype=torch.bool))
    # written like every other output: the umask's mode, no temporary left beside it
    old = os.umask(0o027)
    try:
        comp.save(tmp_path / "shared.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.safetensors").stat().st_mode & 0o777 == 0o640
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c.safetensors", "shared.safetensors"]


def test_spec_validation():
    assert CompensationSpec.from_dict(None).mode == "none"
    assert CompensationSpec.from_dict({"mode": "mean"}).to_dict() == {"mode": "mean", "sequential": False,
                                                                     "ridge": CompensationSpec().ridge}
    with pytest.raises(PruneHeadsError, match="unknown compensation 'ols'"):
        CompensationSpec("ols")
    with pytest.raises(PruneHeadsError, match="ridge"):
        CompensationSpec("lsq", ridge=-1)
    with pytest.raises(PruneHeadsError, match="unknown compensation key"):
        CompensationSpec.from_dict({"mode": "lsq", "ridgee": 1})
    with pytest.raises(PruneHeadsError, match="sequential"):
        CompensationSpec("none", sequential=True)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(masks=st.lists(st.lists(st.sets(st.integers(0, 3), max_size=3), min_size=3, max_size=3), min_size=1,
                      max_size=5),
       budget=st.integers(0, 3))
def test_a_compensator_with_bounded_caches_solves_what_an_unbounded_one_does(masks, budget):
    """The caches only save time: with room for ``budget`` precisions and solved layers (0: none), a run of
    probes gets exactly the compensations a compensator that keeps everything gives, and keeps no more."""
    from unittest import mock

    import prune_heads.compensation.compensator as comp_mod

    model = tiny_model("llama", layers=3)
    moments = collect_moments(model, seqs_for(6), progress=False)
    n = moments.width
    free = Compensator("lsq", moments=moments)
    with (mock.patch.object(comp_mod, "PRECISION_CACHE_BYTES", budget * n * n * 8),
          mock.patch.object(comp_mod, "LAYER_CACHE_BYTES", budget * n * n * 8 // 4)):
        bounded = Compensator("lsq", moments=moments)
        probes = [free_and(bounded, free, layers) for layers in masks]
    for a, b in probes:
        assert a.layers.keys() == b.layers.keys()
        for i in a.layers:
            assert torch.equal(a.layers[i].offset, b.layers[i].offset)
            assert torch.equal(a.layers[i].weight, b.layers[i].weight)
    assert len(bounded._prec) <= budget and bounded._cached_bytes["precision"] <= budget * n * n * 8
    assert bounded._cached_bytes["layer"] <= budget * n * n * 8 // 4
    assert sum(t.numel() * 8 for t in bounded._prec.values()) == bounded._cached_bytes["precision"]
    assert len(free._prec) == len({i for layers in masks for i, h in enumerate(layers) if h})


def free_and(bounded, free, layers):
    """One probe: the mask of ``layers`` (removed heads per layer) through both compensators."""
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for i, heads in enumerate(layers):
        mask[i, sorted(heads)] = True
    return free(mask), bounded(mask)
