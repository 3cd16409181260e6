"""GPU + Transformer Engine: training steps stay finite and input-independent when the CUDA caching
allocator's free memory holds NaN (issue 17's "found Inf in local grad norm at iteration 0").

``poison_cuda_cache`` fills free blocks of the allocator with 0xFF bytes (NaN in bf16 and fp32)
after the model, its gradient buffers and the optimizer are built, so any tensor that a kernel
allocates and does not fully write carries NaN into the step. Then two trainer steps
(``trainer_steps.record_steps``: the trainer's own ``train_step``) on the tiny variants, bf16:

* TE, THD rows with padding between packed samples (``--thd-row-multiple 64``: the row's padding
  is a segment of its own with no real token) and BSHD: every loss, grad norm and finalized
  gradient is finite, and the losses equal the local backend's on the same batches (bf16);
* the local backend under the same poison: finite (the poison itself breaks nothing correct).

And the core attention alone (THD, bf16, proxy-like sizes, head dims 64/128/256): ours for TE
equals the pure-PyTorch attention in output and dq/dk/dv, and TE's own fused kernel is still
wrong in the backward at head_dim 256 (the reason ``mcore_ext.te_attention`` routes around it:
measured 29-31% relative error in dq/dk/dv on an H200 with TE 2.20.2).
"""
import importlib.util

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed
from trainer_steps import COMMON, record_steps

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine's kernels need a GPU"),
    pytest.mark.skipif(not HAVE_TE, reason="Transformer Engine is not installed (an optional accelerator)"),
]

GPU = ["--bf16"]
THD = ["--use-packed-sequence", "--thd-row-multiple", "64"]


def poison_cuda_cache(small_bytes: int = 64 << 20, large_bytes: int = 2 << 30) -> None:
    """Leave the caching allocator's free blocks (small pool and large pool) full of 0xFF bytes."""
    torch.cuda.synchronize()
    held = []
    for size, total in ((4 << 10, small_bytes), (64 << 10, small_bytes), (2 << 20, large_bytes // 4),
                        (8 << 20, large_bytes // 4), (32 << 20, large_bytes // 2)):
        for _ in range(max(1, total // size)):
            held.append(torch.full((size,), 255, dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    del held  # back to the cache, not to the driver: the next allocations reuse these bytes


def _steps(argv, poison: bool):
    try:
        r = record_steps(argv, 2, patch=(lambda model: poison_cuda_cache()) if poison else None)
    except Exception as exc:  # e.g. NonFiniteGradError (grad_norm_check.py)
        return dict(error=f"{type(exc).__name__}: {exc}"[:500])
    losses = [s["loss"][0] / s["loss"][1] for s in r["steps"]]
    bad = sorted({n for s in r["steps"] for n, g in s.get("grads", {}).items() if not torch.isfinite(g).all()})
    return dict(losses=[float(x) for x in losses], grad_norm=[s["grad_norm"] for s in r["steps"]], bad_grads=bad)


def _finite(s) -> bool:
    return "error" not in s and not s["bad_grads"] and all(
        torch.isfinite(torch.tensor(s["losses"] + s["grad_norm"])).tolist())


@pytest.mark.parametrize("variant, layout", [("tiny", THD), ("tiny", []), ("tiny-hybrid", THD)],
                         ids=["tiny-thd", "tiny-bshd", "tiny-hybrid-thd"])
def test_te_steps_are_finite_under_poisoned_memory_and_match_local(variant, layout):
    argv = [a if a != "tiny" else variant for a in COMMON] + GPU + layout
    te = run_distributed(_steps, 1, gpu=True, args=(argv + ["--transformer-impl", "transformer_engine"], True))[0]
    local = run_distributed(_steps, 1, gpu=True, args=(argv + ["--transformer-impl", "local"], True))[0]
    print("te", te, "\nlocal", local)
    assert _finite(local), local
    assert _finite(te), te
    for a, b in zip(te["losses"], local["losses"]):  # bf16 on both sides, different kernels
        assert a == pytest.approx(b, rel=2e-2), (te["losses"], local["losses"])


def _core_attention_errors(head_dim: int, lens: list[int], padded_lens: list[int], raw_te: bool = False):
    """TE's THD core attention (``WholeRowTEDotProductAttention``, or with ``raw_te`` megatron's
    plain ``TEDotProductAttention``) against our pure-PyTorch one
    (torch's flash varlen kernel), same bf16 q/k/v, causal, GQA 8/2 heads: relative errors of the
    output and of dq/dk/dv at the real tokens (padding is the same on both sides by construction)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.mcore_ext.attention import TorchDotProductAttention
    from megatron.mcore_ext.te_attention import WholeRowTEDotProductAttention

    config = TransformerConfig(num_layers=1, hidden_size=8 * head_dim, num_attention_heads=8, num_query_groups=2,
                               kv_channels=head_dim, bf16=True, params_dtype=torch.bfloat16, attention_dropout=0.0)
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    te = (TEDotProductAttention if raw_te else WholeRowTEDotProductAttention)(config, 1, AttnMaskType.causal, "self")
    ours = TorchDotProductAttention(config, 1, AttnMaskType.causal, "self")
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cu_p = torch.tensor([0] + torch.tensor(padded_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_p,
                          cu_seqlens_kv_padded=cu_p, max_seqlen_q=max(padded_lens), max_seqlen_kv=max(padded_lens))
    T = int(cu_p[-1])
    g = torch.Generator(device="cuda").manual_seed(0)
    q0 = torch.randn(T, 8, head_dim, device="cuda", generator=g).bfloat16()
    k0 = torch.randn(T, 2, head_dim, device="cuda", generator=g).bfloat16()
    v0 = torch.randn(T, 2, head_dim, device="cuda", generator=g).bfloat16()
    up = torch.randn(T, 8 * head_dim, device="cuda", generator=g)
    real = torch.zeros(T, dtype=torch.bool, device="cuda")
    for s, n in zip(cu_p[:-1].tolist(), lens):
        real[s:s + n] = True
    results = []
    for attn in (te, ours):
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        out = attn(q, k, v, None, AttnMaskType.causal, packed_seq_params=psp).reshape(T, -1)
        (out.float() * up * real[:, None]).sum().backward()
        results.append([out.detach().float()[real], q.grad.float()[real], k.grad.float()[real], v.grad.float()[real]])

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    return {name: rel(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), *results)}


LENS = [3900, 1, 2047, 777, 64]


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_te_thd_core_attention_matches_ours(head_dim):
    errs = run_distributed(_core_attention_errors, 1, gpu=True, args=(head_dim, LENS, [n + 3 for n in LENS]))[0]
    print(head_dim, {k: f"{v:.2e}" for k, v in errs.items()})
    assert all(v < 2e-2 for v in errs.values()), errs  # bf16 inputs, fp32 accumulation on both sides


def test_the_upstream_te_defect_at_head_dim_256_still_exists():
    """Why head dims above 128 take our attention (mcore_ext.te_attention): TE's own fused THD
    backward there. When a TE release fixes it this fails: then raise TE_THD_MAX_HEAD_DIM."""
    errs = run_distributed(_core_attention_errors, 1, gpu=True, args=(256, LENS, LENS, True))[0]
    print("raw TE, head_dim 256", {k: f"{v:.2e}" for k, v in errs.items()})
    assert errs["out"] < 2e-2, errs
    assert max(errs["dq"], errs["dk"], errs["dv"]) > 5e-2, f"TE's THD backward at head_dim 256 is right now: {errs}"
