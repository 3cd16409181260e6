"""The LM head and its vocabulary-parallel cross entropy in token chunks: no [tokens, vocab] logits.

megatron-core 0.19.2 without TE computes the output layer's logits for every token ([s, b, V/TP]
in bf16), then ``vocab_parallel_cross_entropy`` casts them to fp32 and keeps the fp32 softmax for
the backward. For ``proxy`` (152k vocabulary) and 8.8k tokens that is ~2.7 GB of bf16 logits plus
~5.3 GB of fp32 softmax alive from the forward to the backward, and more while the gradient is
formed; the memory is what makes 8 samples per step fail on an 80 GB GPU. Its boolean-mask
indexing (``masked_target[target_mask] = 0``) also makes the host wait for the device.

``chunked_lm_loss`` computes the same per-token loss (``GPTModel``'s ``[b, s]`` fp32 loss) chunk
by chunk of tokens and keeps only the per-token log-sum-exp (4 bytes a token) for the backward,
which recomputes each chunk's logits (one extra LM-head GEMM, ~1/3 more LM-head FLOPs) and forms
the input and weight gradients from them. Tensor parallelism follows ``ColumnParallelLinear``: the
input is all-gathered under sequence parallelism (reduce-scattered gradient) or copied (all-reduced
gradient) otherwise; each rank holds V/TP rows of the weight and the row max, the sum of
exponentials and the target logit are all-reduced over the TP group, as megatron does.

Use it through ``GPTModel.forward(output_processor=...)`` (``Qwen35GPTModel`` does, with
``chunked_lm_loss=True``, ``--chunked-lm-loss``); the logits-returning path (no labels, e.g.
distillation) is unchanged. Measured on one H100 for ``proxy`` (4 samples, 8.8k tokens, one
lease): peak memory 54.6 -> 52.4 GiB (THD) and 61.3 -> 57.0 GiB (BSHD); the THD step was
307 -> 331 ms (the recomputed GEMM, and more launches in a host-bound step), so it is off by
default: it is for memory, at larger vocabularies and token counts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["chunked_lm_loss", "default_chunk_tokens"]


def default_chunk_tokens(vocab_local: int, budget_elements: int = 1 << 29) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay near ``budget_elements`` (2 GiB)."""
    return max(128, budget_elements // max(1, vocab_local))


def _tp(group):
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _ChunkedVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, tp_group, chunk: int):
        tp, rank = _tp(tp_group)
        n, v = h.shape[0], weight.shape[0]
        start = rank * v
        loss = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            z = torch.mm(h[a:b], weight.t()).float()  # [c, V/TP], as megatron: bf16 GEMM, fp32 CE
            m = z.amax(dim=-1)
            if tp > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
            s = torch.exp(z - m[:, None]).sum(dim=-1)
            local = labels[a:b] - start
            inside = (local >= 0) & (local < v)
            t = z.gather(1, local.clamp(0, v - 1)[:, None]).squeeze(1)
            t = torch.where(inside, t, 0.0)
            if tp > 1:
                both = torch.stack([s, t])
                dist.all_reduce(both, group=tp_group)
                s, t = both[0], both[1]
            lse[a:b] = m + torch.log(s)
            loss[a:b] = lse[a:b] - t
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.tp_group, ctx.chunk = tp_group, chunk
        return loss

    @staticmethod
    def backward(ctx, dloss):
        h, weight, labels, lse = ctx.saved_tensors
        tp, rank = _tp(ctx.tp_group)
        n, v = h.shape[0], weight.shape[0]
        start = rank * v
        dh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        dloss = dloss.float()
        for a in range(0, n, ctx.chunk):
            b = min(n, a + ctx.chunk)
            z = torch.mm(h[a:b], weight.t()).float()
            p = torch.exp(z - lse[a:b, None])  # softmax over the whole (TP-split) vocabulary
            local = labels[a:b] - start
            inside = (local >= 0) & (local < v)
            p.scatter_add_(1, local.clamp(0, v - 1)[:, None], -inside.to(p.dtype)[:, None])
            g = (p * dloss[a:b, None]).to(h.dtype)
            if dh is not None:
                torch.mm(g, weight, out=dh[a:b])
            if dw is not None:
                dw += torch.mm(g.t(), h[a:b])
        return dh, (dw.to(weight.dtype) if dw is not None else None), None, None, None


def chunked_lm_loss(hidden, weight, labels, *, tp_group=None, sequence_parallel: bool = False,
                    chunk_tokens: int | None = None):
    """Per-token cross entropy of ``hidden @ weight.T`` against ``labels`` without materialising
    the logits.

    hidden: ``[s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism), weight: ``[V/TP, h]`` (this
    rank's vocabulary rows), labels: ``[b, s]`` token ids. Returns the ``[b, s]`` fp32 loss, as
    ``GPTModel.compute_language_model_loss`` does.
    """
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    tp, _ = _tp(tp_group)
    if tp > 1:
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=tp_group)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b = hidden.shape[0], hidden.shape[1]
    if tuple(labels.shape) != (b, s):
        raise ValueError(f"chunked_lm_loss: labels have shape {tuple(labels.shape)}, expected [b, s] = {(b, s)}")
    h = hidden.reshape(s * b, hidden.shape[-1])
    if h.dtype != weight.dtype:
        raise ValueError(f"chunked_lm_loss: hidden states are {h.dtype} but the output weight is {weight.dtype}")
    lab = labels.transpose(0, 1).reshape(-1).long()  # row r = (s_idx, b_idx), as h
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    loss = _ChunkedVocabParallelCE.apply(h, weight, lab, tp_group, int(chunk))
    return loss.view(s, b).transpose(0, 1).contiguous()
