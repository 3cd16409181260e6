#!/usr/bin/env python
"""Core-attention throughput on one GPU: packed THD (flash varlen) vs padded BSHD (SDPA flash).

The same documents (lengths uniform in [--min-len, --max-len]) are attended causally either packed
into one THD sequence (``varlen_thd_attention``, our TorchDotProductAttention's GPU path) or padded
into a BSHD batch (SDPA ``is_causal``); fwd+bwd, bf16, GQA heads expanded the same way for both.
Prints milliseconds per step and real tokens/s; the mask-based THD path (CPU / CP fallback) is
timed too when the packed length is small enough for a [T, T] mask.

    python scripts/bench/attention.py --docs 16 --heads 16 --kv-heads 2 --head-dim 256
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from megatron.mcore_ext.attention import varlen_available, varlen_thd_attention


def _time(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=200)
    ap.add_argument("--max-len", type=int, default=4000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention benchmark: needs a CUDA GPU")
    if not varlen_available():
        raise SystemExit("attention benchmark: this torch has no usable torch.nn.attention.varlen")
    g = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.docs,), generator=g)
    T, S = int(lens.sum()), int(lens.max())
    cu = torch.zeros(args.docs + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    cu = cu.cuda()
    H, G, D = args.heads, args.kv_heads, args.head_dim
    scale = 1 / math.sqrt(D)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(T, H, D, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(T, G, D, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(T, G, D, device=dev, dtype=dt, requires_grad=True)

    def thd():
        out = varlen_thd_attention(q, k, v, cu, cu, S, S, True, scale)
        out.backward(torch.ones_like(out))

    qb = torch.randn(args.docs, H, S, D, device=dev, dtype=dt, requires_grad=True)
    kb = torch.randn(args.docs, H, S, D, device=dev, dtype=dt, requires_grad=True)
    vb = torch.randn(args.docs, H, S, D, device=dev, dtype=dt, requires_grad=True)

    def bshd():
        out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        out.backward(torch.ones_like(out))

    t_thd, t_bshd = _time(thd), _time(bshd)
    print(f"attention benchmark: {args.docs} docs, {T} real tokens (BSHD pads to {args.docs}x{S} = "
          f"{args.docs * S}), heads {H}/{G} x {D}, bf16, fwd+bwd, {torch.cuda.get_device_name()}")
    print(f"  THD flash varlen : {t_thd:8.2f} ms   {T / t_thd * 1e3:12,.0f} real tokens/s")
    print(f"  BSHD SDPA causal : {t_bshd:8.2f} ms   {T / t_bshd * 1e3:12,.0f} real tokens/s")
    print(f"  THD / BSHD real-token throughput: {t_bshd / t_thd:.2f}x")


if __name__ == "__main__":
    main()
