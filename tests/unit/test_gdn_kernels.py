"""megatron.mcore_ext.gdn_kernels: the torch Gated DeltaNet kernels (fla signatures, packed input).

References are independent of the code under test: a naive fp64 token-by-token recurrence written
here (the definition), ``F.conv1d`` on each packed sample alone, and HF transformers' / megatron-core's
own torch implementations (unpacked only; they have no cu_seqlens).
"""
import math
import time

import pytest
import torch
import torch.nn.functional as F

from megatron.mcore_ext.gdn_kernels import causal_conv1d, chunk_gated_delta_rule, l2norm

# fp32 kernel vs fp64 reference: errors are measured against the tensor's scale,
# max|ours - ref| <= tol * max(1, max|ref|). The chunked form reorders the sums (C-long matmuls and a
# C x C triangular solve) so it rounds differently from the recurrence; the error grows with the
# chunk size. Observed worst cases (unit-norm keys, beta < 1, all cases below): 8e-6 forward/state,
# 2.5e-5 gradients (g down to -1000, chunk 64); HF's torch_chunk_gated_delta_rule (same algorithm)
# has the same errors against this reference. FWD_TOL / GRAD_TOL keep ~4x margin, and any real
# mistake (a wrong decay, a leaked token, a missed chunk boundary) gives errors >= 1e-2.
FWD_TOL, GRAD_TOL = 3e-5, 1e-4
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 vs fp32 (HF / megatron torch versions): same order of sums


def assert_scaled_close(ours, ref, tol, what):
    assert ours.shape == ref.shape, what
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.0e} * {scale:.3g}"


LENS = [1, 63, 64, 65, 130, 0, 7]  # below, at, above a chunk; several chunks; zero-length; short tail


# ----------------------------------------------------------------------------- references
def ref_rule(q, k, v, g, beta, scale, h0=None, l2=False):
    """The recurrence, one sequence, fp64: q, k [T, Hk, K], v [T, H, V], g, beta [T, H]."""
    T, Hk, K = k.shape
    H, V = v.shape[1:]
    if l2:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    head = torch.arange(H) // (H // Hk)  # q/k head serving each value head
    q, k = q[:, head], k[:, head]
    S = torch.zeros(H, K, V, dtype=torch.float64) if h0 is None else h0
    out = []
    for t in range(T):
        S = S * torch.exp(g[t])[:, None, None]
        err = v[t] - torch.einsum("hkv,hk->hv", S, k[t])
        S = S + torch.einsum("hk,hv->hkv", k[t], beta[t][:, None] * err)
        out.append(torch.einsum("hkv,hk->hv", S, scale * q[t]))
    o = torch.stack(out) if out else torch.zeros(0, H, V, dtype=torch.float64)
    return o, S


def ref_packed(q, k, v, g, beta, cu, h0=None, l2=False):
    """The reference on each packed sample alone (row 0 of [1, T, ...]); fresh state per sample."""
    scale = q.shape[-1] ** -0.5
    outs, states = [], []
    for i in range(len(cu) - 1):
        a, b = cu[i], cu[i + 1]
        o, S = ref_rule(q[0, a:b], k[0, a:b], v[0, a:b], g[0, a:b], beta[0, a:b], scale,
                        None if h0 is None else h0[i], l2)
        outs.append(o)
        states.append(S)
    return torch.cat(outs)[None], torch.stack(states)


def make_inputs(B, T, Hk, H, K, V, unit_keys, seed, g_max=20.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hk, K, generator=gen)
    k = torch.randn(B, T, Hk, K, generator=gen)
    if unit_keys:  # what the layer feeds when the l2norm is done outside the kernel
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    # log decay, log-uniform magnitudes from 1e-3 (almost no decay) to g_max (state wiped at once)
    g = -torch.exp(torch.empty(B, T, H).uniform_(math.log(1e-3), math.log(g_max), generator=gen))
    beta = torch.empty(B, T, H).uniform_(0.02, 0.98, generator=gen)
    return q, k, v, g, beta


def leaves(*xs, dtype=None):
    return [x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]


def cu_of(lens):
    return [0] + torch.tensor(lens).cumsum(0).tolist()


def check_rule(xs, cu, h0, l2, chunk_size):
    """Forward, final state and all input gradients against the fp64 reference."""
    ours_in = leaves(*xs) + ([] if h0 is None else leaves(h0))
    ref_in = leaves(*xs, dtype=torch.float64) + ([] if h0 is None else leaves(h0, dtype=torch.float64))
    o, S = chunk_gated_delta_rule(*ours_in[:5], initial_state=None if h0 is None else ours_in[5],
                                  output_final_state=True, use_qk_l2norm_in_kernel=l2,
                                  cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32),
                                  chunk_size=chunk_size)
    if cu is None:  # batch: each row is its own sequence
        pairs = [ref_rule(*(x[b] for x in ref_in[:5]), xs[0].shape[-1] ** -0.5,
                          None if h0 is None else ref_in[5][b], l2) for b in range(xs[0].shape[0])]
        o_ref, S_ref = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    else:
        o_ref, S_ref = ref_packed(*ref_in[:5], cu, None if h0 is None else ref_in[5], l2)
    assert o.dtype == torch.float32 and S.shape == S_ref.shape
    assert_scaled_close(o, o_ref, FWD_TOL, "output")
    assert_scaled_close(S, S_ref, FWD_TOL, "final state")
    gen = torch.Generator().manual_seed(123)
    do, dS = torch.randn(o.shape, generator=gen), torch.randn(S.shape, generator=gen)
    ((o * do).sum() + (S * dS).sum()).backward()
    ((o_ref * do.double()).sum() + (S_ref * dS.double()).sum()).backward()
    for name, a, b in zip(["q", "k", "v", "g", "beta", "h0"], ours_in, ref_in):
        assert torch.isfinite(a.grad).all(), name
        assert_scaled_close(a.grad, b.grad, GRAD_TOL, f"grad {name}")


# ----------------------------------------------------------------------------- gated delta rule
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("l2,Hk,H,with_h0", [(True, 1, 2, False), (False, 2, 2, True), (True, 2, 4, True)])
def test_rule_packed_matches_recurrence(chunk_size, l2, Hk, H, with_h0):
    cu = cu_of(LENS)
    xs = make_inputs(1, cu[-1], Hk, H, 16, 8, unit_keys=not l2, seed=chunk_size + H)
    h0 = torch.randn(len(LENS), H, 16, 8) * 0.5 if with_h0 else None
    check_rule(xs, cu, h0, l2, chunk_size)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_rule_batched_matches_recurrence(chunk_size):
    xs = make_inputs(2, 100, 1, 3, 8, 12, unit_keys=False, seed=7)
    check_rule(xs, None, torch.randn(2, 3, 8, 12), True, chunk_size)


def test_rule_extreme_decay_is_finite_and_exact():
    """g down to -1000 per step (cumulative -6.4e4 in a chunk): no inf * 0 = NaN anywhere."""
    xs = make_inputs(1, 40, 2, 2, 8, 8, unit_keys=True, seed=3, g_max=1000.0)
    check_rule(xs, cu_of([3, 37]), None, False, 16)


def test_rule_matches_hf_torch_chunk_gated_delta_rule():
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import torch_chunk_gated_delta_rule as hf_rule

    xs = make_inputs(3, 70, 1, 2, 16, 8, unit_keys=False, seed=11)
    h0 = torch.randn(3, 2, 16, 8)
    a, b = leaves(*xs, h0), leaves(*xs, h0)
    o, S = chunk_gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_hf, S_hf = hf_rule(*b[:5], chunk_size=64, initial_state=b[5], output_final_state=True,
                         use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(o, o_hf, **TOL)
    torch.testing.assert_close(S, S_hf, **TOL)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(5))
    ((o * do).sum() + S.sum()).backward()
    ((o_hf * do).sum() + S_hf.sum()).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, **TOL)


def test_rule_matches_megatron_torch_fallback():
    from megatron.core.ssm.gated_delta_net.common import torch_chunk_gated_delta_rule as mc_rule

    xs = make_inputs(2, 50, 2, 2, 8, 8, unit_keys=True, seed=13, g_max=5.0)
    o, S = chunk_gated_delta_rule(*xs, output_final_state=True)
    o_mc, S_mc = mc_rule(*xs, output_final_state=True)
    torch.testing.assert_close(o, o_mc, **TOL)
    torch.testing.assert_close(S, S_mc, **TOL)


def test_rule_no_leakage_between_packed_samples():
    lens = [5, 0, 40, 17]
    cu, cu_t = cu_of(lens), torch.tensor(cu_of(lens))
    xs = make_inputs(1, cu[-1], 1, 2, 8, 8, unit_keys=True, seed=17)
    o, S = chunk_gated_delta_rule(*xs, output_final_state=True, cu_seqlens=cu_t, chunk_size=16)
    other = make_inputs(1, cu[-1], 1, 2, 8, 8, unit_keys=True, seed=99)
    seg = slice(cu[2], cu[3])  # change every input of sample 2 only
    mixed = [x.clone() for x in xs]
    for x, y in zip(mixed, other):
        x[:, seg] = y[:, seg]
    o2, S2 = chunk_gated_delta_rule(*mixed, output_final_state=True, cu_seqlens=cu_t, chunk_size=16)
    keep = torch.ones(cu[-1], dtype=torch.bool)
    keep[seg] = False
    assert not torch.equal(o[:, seg], o2[:, seg])
    assert torch.equal(o[:, keep], o2[:, keep])
    assert torch.equal(S[[0, 1, 3]], S2[[0, 1, 3]]) and not torch.equal(S[2], S2[2])
    # gradient of the other samples' outputs and states w.r.t. sample 2's inputs: exactly zero
    a = leaves(*xs)
    o, S = chunk_gated_delta_rule(*a, output_final_state=True, cu_seqlens=cu_t, chunk_size=16)
    (o[:, keep].sum() + S[[0, 1, 3]].sum()).backward()
    for x in a:
        assert (x.grad[:, seg] == 0).all() and (x.grad[:, keep] != 0).any()


def test_rule_empty_and_edge_segments():
    xs = make_inputs(1, 0, 2, 2, 8, 4, unit_keys=True, seed=1)
    h0 = torch.randn(2, 2, 8, 4)
    o, S = chunk_gated_delta_rule(*xs, initial_state=h0, output_final_state=True, cu_seqlens=torch.tensor([0, 0, 0]))
    assert o.shape == (1, 0, 2, 4) and torch.equal(S, h0)
    xs = make_inputs(1, 9, 2, 2, 8, 4, unit_keys=True, seed=2)  # zero-length first and last samples
    check_rule(xs, [0, 0, 9, 9], torch.randn(3, 2, 8, 4), False, 16)


def test_rule_dtype_options_and_errors():
    xs = make_inputs(1, 20, 2, 2, 8, 8, unit_keys=True, seed=4)
    o, S = chunk_gated_delta_rule(*(x.bfloat16() for x in xs), output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    logits = torch.randn(xs[4].shape)
    o1, _ = chunk_gated_delta_rule(*xs[:4], logits, use_beta_sigmoid_in_kernel=True)
    o2, _ = chunk_gated_delta_rule(*xs[:4], logits.sigmoid())
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    two = [torch.cat([x, x]) for x in xs]
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_gated_delta_rule(*two, cu_seqlens=torch.tensor([0, 20]))
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        chunk_gated_delta_rule(*xs, cu_seqlens=torch.tensor([0, 19]))
    with pytest.raises(NotImplementedError, match="state_v_first"):
        chunk_gated_delta_rule(*xs, state_v_first=True)


# ----------------------------------------------------------------------------- causal conv1d
def conv_ref(x, w, b, act):
    """HF's causal_conv1d_fn formula on one sequence x [T, D] (F.conv1d, trimmed to T)."""
    if x.shape[0] == 0:  # F.conv1d refuses an empty sequence
        return x * 0
    y = F.conv1d(x.T[None], w[:, None], b, padding=w.shape[1] - 1, groups=x.shape[1])[0, :, : x.shape[0]].T
    return F.silu(y) if act else y


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("act", [None, "silu", "swish"])
def test_conv_packed_equals_conv1d_per_sample(with_bias, act):
    lens = [1, 3, 0, 10, 2, 6]  # shorter than, equal to and longer than the window W=4
    cu = cu_of(lens)
    gen = torch.Generator().manual_seed(21)
    x, w, b = torch.randn(1, cu[-1], 6, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    x, w, b = leaves(x, w, b)
    y, state = causal_conv1d(x=x, weight=w, bias=b if with_bias else None, activation=act,
                             initial_state=None, output_final_state=False, cu_seqlens=torch.tensor(cu))
    assert state is None
    xr, wr, br = leaves(x, w, b, dtype=torch.float64)
    y_ref = torch.cat([conv_ref(xr[0, cu[i]:cu[i + 1]], wr, br if with_bias else None, act)
                       for i in range(len(lens))])[None]
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-6)
    dy = torch.randn(y.shape, generator=gen)
    (y * dy).sum().backward()
    (y_ref * dy.double()).sum().backward()
    for a, r in [(x, xr), (w, wr)] + ([(b, br)] if with_bias else []):
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=1e-6, atol=1e-6)


def test_conv_matches_hf_causal_conv1d_fn_batched():
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import causal_conv1d_fn as hf_conv

    gen = torch.Generator().manual_seed(22)
    x, w, b = torch.randn(3, 25, 8, generator=gen), torch.randn(8, 4, generator=gen), torch.randn(8, generator=gen)
    y, _ = causal_conv1d(x, w, b, activation="silu")
    torch.testing.assert_close(y, hf_conv(x.transpose(1, 2), w, b, activation="silu").transpose(1, 2),
                               rtol=1e-6, atol=1e-6)


def test_conv_no_leakage_residual_dtype_and_errors():
    lens = [4, 9, 3]
    cu, cu_t = cu_of(lens), torch.tensor(cu_of(lens))
    gen = torch.Generator().manual_seed(23)
    x, w = torch.randn(1, cu[-1], 5, generator=gen), torch.randn(5, 4, generator=gen)
    x2 = x.clone()
    x2[:, cu[1]:cu[2]] = float("inf")  # even an inf in sample 1 must not reach samples 0 and 2
    y, _ = causal_conv1d(x, w, activation="silu", cu_seqlens=cu_t)
    y2, _ = causal_conv1d(x2, w, activation="silu", cu_seqlens=cu_t)
    keep = torch.ones(cu[-1], dtype=torch.bool)
    keep[cu[1]:cu[2]] = False
    assert torch.equal(y[:, keep], y2[:, keep])
    xl = leaves(x)[0]
    causal_conv1d(xl, w, cu_seqlens=cu_t)[0][:, keep].sum().backward()
    assert (xl.grad[:, cu[1]:cu[2]] == 0).all()
    r = torch.randn(x.shape, generator=gen)
    torch.testing.assert_close(causal_conv1d(x, w, residual=r, cu_seqlens=cu_t)[0],
                               causal_conv1d(x, w, cu_seqlens=cu_t)[0] + r)
    yb, _ = causal_conv1d(x.bfloat16(), w.bfloat16(), activation="silu", cu_seqlens=cu_t)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="batch size must be 1"):
        causal_conv1d(torch.cat([x, x]), w, cu_seqlens=cu_t)
    with pytest.raises(NotImplementedError, match="training does not need"):
        causal_conv1d(x, w, output_final_state=True)
    with pytest.raises(NotImplementedError, match="training does not need"):
        causal_conv1d(x, w, initial_state=torch.zeros(1, 5, 4))


# ----------------------------------------------------------------------------- l2norm
def test_l2norm_formula_grad_and_dtype():
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(24))
    for dim in (-1, 1):
        a, r = leaves(x), leaves(x, dtype=torch.float64)
        y = l2norm(a[0], dim=dim)
        y_ref = r[0] / torch.sqrt((r[0] ** 2).sum(dim, keepdim=True) + 1e-6)
        torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-6)
        y.pow(3).sum().backward()
        y_ref.pow(3).sum().backward()
        torch.testing.assert_close(a[0].grad.double(), r[0].grad, rtol=1e-5, atol=1e-6)
    assert l2norm(x.bfloat16()).dtype == torch.bfloat16


def test_timing_print():
    """Not an assertion: a forward+backward of a packed row, for the log (pytest -s)."""
    cu = cu_of([300, 700, 24, 1000])
    xs = leaves(*make_inputs(1, cu[-1], 2, 4, 32, 32, unit_keys=True, seed=0))
    t0 = time.perf_counter()
    o, _ = chunk_gated_delta_rule(*xs, cu_seqlens=torch.tensor(cu))
    o.sum().backward()
    print(f"\ngdn rule fwd+bwd, T={cu[-1]} packed in {len(cu) - 1}, H=4, K=V=32: {time.perf_counter() - t0:.3f} s")
