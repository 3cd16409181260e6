"""TorchDotProductAttention against straightforward references: BSHD, THD, GQA, and CP=2."""
import math

import pytest
import torch

from megatron.mcore_ext.cp_split import thd_partition_index, zigzag_index
from megatron.mcore_ext.testing import run_distributed

H, G, D = 4, 2, 8  # query heads, KV groups (GQA), head dim


def _naive(q, k, v, causal=True):
    """q: [s, h, d], k/v: [s, g, d] -> [s, h*d], written from the formula."""
    s = q.shape[0]
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    v = v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(s, -1)


def _module(cp_group_needed=False, causal=True):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.mcore_ext.attention import TorchDotProductAttention

    cfg = TransformerConfig(
        num_layers=1, hidden_size=H * D, num_attention_heads=H, num_query_groups=G, attention_dropout=0.0,
        context_parallel_size=__import__("megatron.core.parallel_state", fromlist=["x"]).get_context_parallel_world_size(),
    )
    return TorchDotProductAttention(cfg, 1, AttnMaskType.causal if causal else AttnMaskType.no_mask)


def _qkv(total, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(total, H, D, generator=g), torch.randn(total, G, D, generator=g), torch.randn(total, G, D, generator=g))


def _packed(lens):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return cu, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                               cu_seqlens_kv_padded=cu, max_seqlen_q=max(lens), max_seqlen_kv=max(lens))


def _single(lens):
    attn = _module()
    total = sum(lens)
    q, k, v = _qkv(total)
    # BSHD: one sample of length lens[0], batch dim 1
    bshd = attn(q[: lens[0], None], k[: lens[0], None], v[: lens[0], None], None)
    full = _module(causal=False)(q[: lens[0], None], k[: lens[0], None], v[: lens[0], None], None)
    _, psp = _packed(lens)
    thd = attn(q, k, v, None, packed_seq_params=psp)
    return bshd, full, thd, (q, k, v)


def test_bshd_and_thd_match_naive():
    lens = [8, 4, 12]
    bshd, full, thd, (q, k, v) = run_distributed(_single, world_size=1, args=(lens,))[0]
    torch.testing.assert_close(bshd[:, 0], _naive(q[:8], k[:8], v[:8]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[:, 0], _naive(q[:8], k[:8], v[:8], causal=False), rtol=1e-5, atol=1e-5)
    # THD: every packed sample attends only within itself, causally
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        torch.testing.assert_close(thd[sl], _naive(q[sl], k[sl], v[sl]), rtol=1e-5, atol=1e-5)
        start += n


def _cp_rank(layout, lens):
    """Run attention on this CP rank's share; return output and input grads (local order)."""
    from megatron.core import parallel_state as ps

    cp, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    total = sum(lens)
    q, k, v = _qkv(total)
    if layout == "bshd":
        idx = zigzag_index(total, cp, r)
        psp = None
    else:
        cu, psp = _packed(lens)
        idx = thd_partition_index(cu, cp, r)
    ql, kl, vl = (t[idx].clone().requires_grad_() for t in (q, k, v))
    attn = _module()
    if layout == "bshd":
        out = attn(ql[:, None], kl[:, None], vl[:, None], None)[:, 0]
    else:
        out = attn(ql, kl, vl, None, packed_seq_params=psp)
    weights = torch.linspace(-1, 1, total * H * D).reshape(total, -1)[idx]  # fixed, non-uniform objective
    (out * weights).sum().backward()
    return idx, out.detach(), ql.grad, kl.grad, vl.grad


@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_context_parallel_equals_unsplit(layout):
    lens = [16] if layout == "bshd" else [8, 4, 12]
    total = sum(lens)
    q, k, v = (t.requires_grad_() for t in _qkv(total))
    if layout == "bshd":
        ref = _naive(q, k, v)
    else:
        parts, start = [], 0
        for n in lens:
            parts.append(_naive(q[start : start + n], k[start : start + n], v[start : start + n]))
            start += n
        ref = torch.cat(parts)
    weights = torch.linspace(-1, 1, ref.numel()).reshape(total, -1)
    (ref * weights).sum().backward()
    results = run_distributed(_cp_rank, world_size=2, cp=2, args=(layout, lens))
    seen = torch.cat([res[0] for res in results])
    assert sorted(seen.tolist()) == list(range(total))
    for idx, out, gq, gk, gv in results:
        torch.testing.assert_close(out, ref.detach()[idx], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gq, q.grad[idx], rtol=1e-5, atol=1e-5)
        # K/V grads: each rank's keys are attended by both ranks' queries; the reduce-scatter in
        # the all-gather's backward must bring those contributions home.
        torch.testing.assert_close(gk, k.grad[idx], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gv, v.grad[idx], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen THD path needs a CUDA GPU")
def test_varlen_thd_path_matches_reference_on_gpu():
    from megatron.mcore_ext.attention import varlen_available, varlen_thd_attention

    if not varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn with a causal option")
    lens = [64, 17, 128, 3]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _qkv(sum(lens))
    out = varlen_thd_attention(
        *(t.cuda().bfloat16() for t in (q, k, v)), cu.cuda(), cu.cuda(), max(lens), max(lens), True, 1 / math.sqrt(D)
    ).float().cpu()
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        torch.testing.assert_close(out[sl].reshape(n, -1), _naive(q[sl], k[sl], v[sl]), rtol=2e-2, atol=2e-2)
        start += n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen THD path needs a CUDA GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_thd_gradients_match_reference_on_gpu(causal, monkeypatch):
    """Forward and gradients of the flash varlen path (ATen's kernels under our autograd.Function
    where available) against the formula per sample, GQA included; and against torch's own
    ``varlen_attn`` wrapper of the same kernels."""
    from megatron.mcore_ext import attention as A

    if not A.varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn with a causal option")
    lens = [64, 17, 128, 3]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    q, k, v = _qkv(sum(lens), seed=3)
    w = torch.randn(sum(lens), H * D, generator=torch.Generator().manual_seed(4))

    def run(fn):
        xs = [t.cuda().bfloat16().requires_grad_(True) for t in (q, k, v)]
        out = fn(*xs, cu, cu, max(lens), max(lens), causal, 1 / math.sqrt(D)).reshape(sum(lens), -1)
        (out.float() * w.cuda()).sum().backward()
        return out.float().cpu(), [x.grad.float().cpu() for x in xs]

    got = run(A.varlen_thd_attention)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = []
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        ref.append(_naive(xs[0][sl], xs[1][sl], xs[2][sl], causal=causal))
        start += n
    ref = torch.cat(ref)
    (ref * w).sum().backward()
    torch.testing.assert_close(got[0], ref.detach(), rtol=2e-2, atol=2e-2)
    for g, x in zip(got[1], xs):
        torch.testing.assert_close(g, x.grad, rtol=3e-2, atol=3e-2)
    if A._aten_flash_varlen():  # ours and torch's wrapper run the same kernels: equal results
        monkeypatch.setattr(A, "_aten_flash_varlen", lambda: False)
        wrapped = run(A.varlen_thd_attention)
        torch.testing.assert_close(got[0], wrapped[0], rtol=0, atol=0)
        for a, b in zip(got[1], wrapped[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
