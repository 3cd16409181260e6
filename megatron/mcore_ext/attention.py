"""A pure-PyTorch core attention for megatron-core: BSHD and packed THD, with context parallelism.

megatron-core's local ``DotProductAttention`` supports neither packed sequences (THD) nor context
parallelism; Transformer Engine does both but is an optional accelerator here. This module is a
drop-in ``core_attention`` for a layer spec (see ``megatron.mcore_ext.spec.local_spec``):

* BSHD ``[s, b, heads, dim]``: causal (or full, for ``AttnMaskType.no_mask``/``padding``) SDPA.
* THD ``[t, heads, dim]`` with ``packed_seq_params``: attention stays inside each packed sample
  (``cu_seqlens_*_padded`` boundaries, which is where the collate put them), causal within it.
* Context parallelism: every CP rank holds its zigzag share of the queries/keys/values (BSHD: the
  whole sequence's chunks ``r`` and ``2cp-1-r``; THD: the same per sample, as
  ``megatron.mcore_ext.cp_split`` cuts them). K and V are all-gathered over the CP group with a
  differentiable all-gather (backward: reduce-scatter of the K/V gradients), and the causal mask is
  built from the tokens' *global* positions, so the result equals unsplit attention exactly.
* GQA: K/V heads are repeated to the query heads.

The mask-based path materialises a [q, k] boolean mask: right for tests and small runs on CPU. On
GPU, BSHD without CP takes SDPA's ``is_causal`` (flash) path and THD without CP (fp16/bf16) takes
torch's flash varlen kernel (``torch.nn.attention.varlen.varlen_attn``), which needs no mask.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.distributed as dist

from megatron.mcore_ext.cp_split import thd_partition_index, zigzag_index

__all__ = ["TorchDotProductAttention", "all_gather_along_dim0", "varlen_thd_attention", "varlen_available"]


class _AllGatherDim0(torch.autograd.Function):
    """All-gather along dim 0 over ``group``; backward sums the gradients back (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def all_gather_along_dim0(x: torch.Tensor, group) -> torch.Tensor:
    return _AllGatherDim0.apply(x, group)


def _segment_ids(cu_seqlens: torch.Tensor, total: int, device) -> torch.Tensor:
    """[total] sample index of each packed position."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    return torch.bucketize(torch.arange(total, device=device), cu[1:], right=True)


@functools.lru_cache(maxsize=1)
def _varlen_params() -> frozenset:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_available() -> bool:
    """torch's flash-attention varlen kernel exists and can express causal attention."""
    p = _varlen_params()
    return bool(p) and ("window_size" in p or "is_causal" in p)


@functools.lru_cache(maxsize=1)
def _aten_flash_varlen() -> bool:
    """ATen's flash-attention ops take cumulative sequence lengths and a ``scale`` (torch 2.x)."""
    try:
        fwd = torch.ops.aten._flash_attention_forward.default._schema
        bwd = torch.ops.aten._flash_attention_backward.default._schema
    except (AttributeError, RuntimeError):
        return False
    names = {a.name for a in fwd.arguments}
    return {"cum_seq_q", "cum_seq_k", "scale"} <= names and "scale" in {a.name for a in bwd.arguments}


class _FlashVarlen(torch.autograd.Function):
    """ATen's flash varlen kernels under a plain ``autograd.Function``.

    ``torch.nn.attention.varlen.varlen_attn`` calls the same two kernels, but through
    ``torch.library.custom_op`` dispatch and Python autograd registration (H100 profile of
    ``proxy``: ~0.3 ms of host time per backward call, ~11 ms per step for 12 layers). Measured
    against it (A/B on one H100, ``docs/performance.md``): 1.0 GiB less peak memory, step time
    within the noise. Dropout is 0 (the callers check).
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed, offset)
        ctx.args = (max_q, max_k, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k, seed, offset = ctx.saved_tensors
        max_q, max_k, causal, scale = ctx.args
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale
        )
        return dq, dk, dv, None, None, None, None, None, None


def varlen_thd_attention(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """Packed attention with torch's flash varlen kernel (CUDA, fp16/bf16, no dropout).

    q [t, hq, d], k/v [t, hkv, d] -> [t, hq, d]. ATen's flash ops directly where they take
    cumulative lengths (``_FlashVarlen``; GQA natively), else ``torch.nn.attention.varlen.varlen_attn``:
    causal as ``window_size=(-1, 0)`` (torch 2.11+) or ``is_causal`` (older), K/V heads expanded
    where it does not take GQA.
    """
    if _aten_flash_varlen():
        return _FlashVarlen.apply(
            q.contiguous(), k.contiguous(), v.contiguous(), cu_q.to(torch.int32), cu_k.to(torch.int32),
            int(max_q), int(max_k), bool(causal), scale,
        )
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kw = {"scale": scale}
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k), **kw)


class TorchDotProductAttention(torch.nn.Module):
    """Megatron ``core_attention`` interface; see the module docstring."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **unused,
    ):
        super().__init__()
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.enums import AttnMaskType

        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self._causal_types = {AttnMaskType.causal, AttnMaskType.padding_causal}
        tp = ps.get_tensor_model_parallel_world_size() if pg_collection is None else pg_collection.tp.size()
        if config.num_attention_heads % tp or config.num_query_groups % tp:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} and num_query_groups="
                f"{config.num_query_groups} must divide by tensor_model_parallel_size={tp}"
            )
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            self.cp_group = pg_collection.cp
        else:
            self.cp_group = ps.get_context_parallel_group(check_initialized=False)
        self.cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        self.cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else 0

    # --------------------------------------------------------------------------------------
    def _causal(self, attn_mask_type) -> bool:
        return (attn_mask_type or self.attn_mask_type) in self._causal_types

    def _expand_kv(self, k: torch.Tensor, v: torch.Tensor, head_dim_axis: int):
        rep = self.heads // self.groups
        if rep == 1:
            return k, v
        return k.repeat_interleave(rep, dim=head_dim_axis), v.repeat_interleave(rep, dim=head_dim_axis)

    def _sdpa(self, q, k, v, mask=None, is_causal=False):
        """q, k, v: [b, h, s, d]."""
        return torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
        **unused,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("TorchDotProductAttention: attention_bias is not supported")
        causal = self._causal(attn_mask_type)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, packed_seq_params, causal)
        return self._forward_bshd(query, key, value, attention_mask, causal)

    def _forward_bshd(self, q, k, v, attention_mask, causal):
        # [s, b, h, d] -> [b, h, s, d]
        sq, b = q.shape[0], q.shape[1]
        k, v = self._expand_kv(k, v, head_dim_axis=2)
        if self.cp_size > 1:
            k = all_gather_along_dim0(k, self.cp_group)
            v = all_gather_along_dim0(v, self.cp_group)
        q_, k_, v_ = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        mask = None
        if self.cp_size > 1:
            s_full = sq * self.cp_size
            q_pos = zigzag_index(s_full, self.cp_size, self.cp_rank, device=q.device)
            k_pos = torch.cat([zigzag_index(s_full, self.cp_size, r, device=q.device) for r in range(self.cp_size)])
            if causal:
                mask = k_pos[None, :] <= q_pos[:, None]
        elif causal:
            out = self._sdpa(q_, k_, v_, is_causal=True)
            return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
        if attention_mask is not None:
            # megatron's convention: True = masked out. [b, 1, sq, sk] (sk = full length under CP)
            keep = ~attention_mask.to(torch.bool)
            mask = keep if mask is None else (mask & keep)
        out = self._sdpa(q_, k_, v_, mask=mask)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _forward_thd(self, q, k, v, psp, causal):
        # [t, h, d]; boundaries of the padded samples are global (unsplit) positions
        cu_q = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
        cu_k = psp.cu_seqlens_kv_padded if psp.cu_seqlens_kv_padded is not None else psp.cu_seqlens_kv
        if cu_q is None or cu_k is None:
            raise ValueError("THD attention needs packed_seq_params.cu_seqlens_q(_padded) and _kv(_padded)")
        t_local = q.shape[0]
        if (
            self.cp_size == 1
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
            and (self.dropout_p == 0 or not self.training)
            and varlen_available()
        ):
            # fast path: flash varlen kernel, no [t, t] mask
            max_q = psp.max_seqlen_q or int((cu_q[1:] - cu_q[:-1]).max())
            max_k = psp.max_seqlen_kv or int((cu_k[1:] - cu_k[:-1]).max())
            out = varlen_thd_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal, self.softmax_scale)
            return out.reshape(t_local, -1)
        k, v = self._expand_kv(k, v, head_dim_axis=1)
        device = q.device
        if self.cp_size > 1:
            k = all_gather_along_dim0(k, self.cp_group)
            v = all_gather_along_dim0(v, self.cp_group)
            q_pos = thd_partition_index(cu_q, self.cp_size, self.cp_rank, device=device)
            k_pos = torch.cat(
                [thd_partition_index(cu_k, self.cp_size, r, device=device) for r in range(self.cp_size)]
            )
            total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
        else:
            q_pos = torch.arange(t_local, device=device)
            k_pos = torch.arange(k.shape[0], device=device)
            total_q, total_k = t_local, k.shape[0]
        if int(cu_q[-1]) != total_q or int(cu_k[-1]) != total_k:
            raise ValueError(
                f"THD attention: the packed sequence has {total_q} query / {total_k} key positions "
                f"but cu_seqlens_padded end at {int(cu_q[-1])} / {int(cu_k[-1])}; every position "
                "must belong to a sample (pack_or_pad_batch guarantees this)"
            )
        seg_q = _segment_ids(cu_q, total_q, device)[q_pos]
        seg_k = _segment_ids(cu_k, total_k, device)[k_pos]
        mask = seg_q[:, None] == seg_k[None, :]
        if causal:
            mask &= k_pos[None, :] <= q_pos[:, None]
        out = self._sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask=mask)
        return out[0].transpose(0, 1).reshape(t_local, -1)
