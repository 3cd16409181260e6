"""Transformer Engine's core attention, correct for packed (THD) rows: ``WholeRowTEDotProductAttention``.

Two things about TE 2.20.2's ``DotProductAttention`` on packed rows, and what this subclass does:

1. **The backward of TE's fused (cuDNN) THD attention is wrong at head_dim 256** -- the head size
   of every Qwen3.5 model. Measured on one H200 (torch 2.11, cuDNN through TE's "FusedAttention
   backend (sub-backend 1)", bf16, causal, GQA 8/2 heads, packed samples of 3900, 1, 2047, 777 and
   64 tokens; tests/unit/test_te_gpu.py against our attention): the output agrees (rel. error
   1.6e-3) but dq, dk and dv are off by 29-31%; at head_dim 64 and 128 everything agrees within
   4e-3, and TE's unfused backend agrees at 256 (5e-3). Training ``proxy`` with TE and THD then
   stopped at iteration 0 ("found NaN in local grad norm") or ran with a grad norm of 9e6 (issue
   17). So for THD rows with a head dim above 128 this class runs our core attention
   (``mcore_ext.attention.TorchDotProductAttention``: torch's flash varlen kernel on GPU, correct
   and as fast as the local backend; context parallelism through its all-gather path) and logs
   that once. BSHD rows (``sbhd``) and THD at head dims up to 128 keep TE's kernels.
2. **The padding between packed samples.** megatron-core hands TE the real-token boundaries
   ``cu_seqlens`` and the padded ones ``cu_seqlens_padded``; TE then attends over each sample's
   real tokens only and leaves the positions between a sample's last real token and its padded end
   to whatever its kernels do there. This class gives TE the *padded* boundaries as the sample
   boundaries, so each sample's padding sits inside its sample after its real tokens -- exactly as
   our pure-PyTorch attention treats it: causal attention means no real token sees the padding,
   every padded position gets a finite value computed from its own sample, and both backends give
   the same values there. (Under poisoned memory, TE's own handling stayed finite too in the tiny
   model, so this is consistency, not the cause of the NaN above.)
"""
from __future__ import annotations

import dataclasses
import logging

from megatron.core.extensions.transformer_engine import TEDotProductAttention

__all__ = ["WholeRowTEDotProductAttention", "padded_as_sample_boundaries", "TE_THD_MAX_HEAD_DIM"]

log = logging.getLogger(__name__)

#: the largest head dim at which TE 2.20.2's fused THD attention backward was measured correct
TE_THD_MAX_HEAD_DIM = 128


def padded_as_sample_boundaries(packed_seq_params):
    """``packed_seq_params`` with the padded boundaries as the sample boundaries (THD), else as is."""
    psp = packed_seq_params
    if psp is None or psp.qkv_format != "thd" or psp.cu_seqlens_q_padded is None:
        return psp
    kv_padded = psp.cu_seqlens_kv_padded if psp.cu_seqlens_kv_padded is not None else psp.cu_seqlens_q_padded
    return dataclasses.replace(psp, cu_seqlens_q=psp.cu_seqlens_q_padded, cu_seqlens_kv=kv_padded,
                               cu_seqlens_kv_padded=kv_padded)


class WholeRowTEDotProductAttention(TEDotProductAttention):
    """``TEDotProductAttention`` for packed rows (see the module docstring): THD with a head dim
    above ``TE_THD_MAX_HEAD_DIM`` through our core attention, else TE's with padded boundaries.
    Inputs as megatron passes them: THD ``[t, heads, head_dim]``, BSHD ``[s, b, heads, head_dim]``;
    output ``[t, heads * head_dim]`` / ``[s, b, heads * head_dim]``."""

    _logged = False

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, num_splits=None, cp_comm_type="p2p",
                 pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, k_channels=k_channels, v_channels=v_channels,
                         num_splits=num_splits, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self._thd_attention = None
        head_dim = max(k_channels or config.kv_channels, v_channels or config.kv_channels)
        if head_dim > TE_THD_MAX_HEAD_DIM:
            from megatron.mcore_ext.attention import TorchDotProductAttention

            self._thd_attention = TorchDotProductAttention(
                config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                softmax_scale=softmax_scale, pg_collection=pg_collection)

    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                packed_seq_params=None, num_splits=None):
        if self._thd_attention is not None and packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if not WholeRowTEDotProductAttention._logged:
                WholeRowTEDotProductAttention._logged = True
                log.info("THD attention with head_dim > %d: our core attention (torch flash varlen) instead of "
                         "TE's fused kernel, whose backward is wrong there (megatron/mcore_ext/te_attention.py)",
                         TE_THD_MAX_HEAD_DIM)
            return self._thd_attention(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias=attention_bias,
                               packed_seq_params=padded_as_sample_boundaries(packed_seq_params),
                               num_splits=num_splits)
