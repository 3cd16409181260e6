"""RoPE for packed (THD) sequences in one pass, without a host sync per packed sample.

megatron-core 0.19.2 without Transformer Engine applies RoPE to THD input in
``rope_utils._apply_rotary_pos_emb_thd``: it reads ``cu_seqlens`` to the host (``tolist()`` and
one ``item()`` per packed sample) and slices and concatenates the angles sample by sample -- for
query and key, in every layer. On a GPU each of those reads waits for all queued work, so the host
cannot run ahead of the GPU through the forward pass (measured for ``proxy`` on an H100, 4 packed
samples per step: host syncs per training step fell from ~200 to ~58 with this module;
docs/performance.md).

Our models compute the angles per token (MRoPE position ids are per token already), so for a
packed row the angle of token ``i`` is row ``i`` of the angle tensor, and megatron's per-sample
loop computes exactly ``_apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs)``. ``PackedRopeSelfAttention``
(a ``SelfAttention`` swapped in through the spec, see ``spec.local_spec``) hands the angles to our
core attention (``TorchDotProductAttention``) instead, which applies them to the whole packed row
in one pass with the same megatron function. This needs the angles of *this rank's* tokens in
their local order (under context parallelism too): ``Qwen35GPTModel`` produces them that way when
``takes_local_thd_angles`` says every attention layer is ours. Anything else (BSHD, inference,
fused RoPE, angles of another length, another core attention) takes megatron's own path unchanged.
"""
from __future__ import annotations

import copy

import torch

from megatron.core.transformer.attention import SelfAttention

__all__ = ["PackedRopeSelfAttention", "ROTARY_ATTR", "apply_packed_rope", "takes_local_thd_angles"]

#: attribute of the (copied) ``PackedSeqParams`` that carries ``(q_freqs, k_freqs, interleaved, mscale)``
ROTARY_ATTR = "mmdev_packed_rotary"


def apply_packed_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool, mscale: float) -> torch.Tensor:
    """``t`` [tokens, heads, dim], ``freqs`` [tokens, 1, 1, rot_dim]: RoPE on every token at once."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return _apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs, rotary_interleaved=interleaved, mscale=mscale).squeeze(1)


class PackedRopeSelfAttention(SelfAttention):
    """``SelfAttention`` that leaves THD RoPE to our core attention (one pass, no host syncs)."""

    def _packed_rope_applies(self, rotary_pos_emb, packed_seq_params, inference_context, hidden_states) -> bool:
        from megatron.mcore_ext.attention import TorchDotProductAttention

        if rotary_pos_emb is None or packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return False
        if inference_context is not None or self.config.apply_rope_fusion or self.config.flash_decode:
            return False
        if not isinstance(self.core_attention, TorchDotProductAttention):
            return False
        freqs = rotary_pos_emb if isinstance(rotary_pos_emb, torch.Tensor) else rotary_pos_emb[0]
        tokens = hidden_states.shape[0] * hidden_states.shape[1]
        if self.config.sequence_parallel:
            tokens *= self.pg_collection.tp.size()
        return freqs.dim() == 4 and freqs.shape[0] == tokens

    def forward(
        self,
        hidden_states,
        attention_mask,
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        *,
        inference_params=None,
    ):
        if inference_params is None and self._packed_rope_applies(
            rotary_pos_emb, packed_seq_params, inference_context, hidden_states
        ):
            q_freqs, k_freqs = (
                (rotary_pos_emb, rotary_pos_emb) if isinstance(rotary_pos_emb, torch.Tensor) else rotary_pos_emb
            )
            packed_seq_params = copy.copy(packed_seq_params)  # shallow: no __post_init__ rerun
            setattr(packed_seq_params, ROTARY_ATTR,
                    (q_freqs, k_freqs, self.config.rotary_interleaved, self._yarn_concentration_factor))
            rotary_pos_emb = None
        return super().forward(
            hidden_states,
            attention_mask,
            key_value_states=key_value_states,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            rotary_pos_cos_sin=rotary_pos_cos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
            inference_params=inference_params,
        )


def takes_local_thd_angles(module: torch.nn.Module) -> bool:
    """True when every self-attention in ``module`` is a ``PackedRopeSelfAttention`` with our core
    attention (so THD angles should stay in this rank's local token order); False when there is
    none or any other kind."""
    from megatron.mcore_ext.attention import TorchDotProductAttention

    found = False
    for m in module.modules():
        if isinstance(m, SelfAttention):
            if not (isinstance(m, PackedRopeSelfAttention) and isinstance(m.core_attention, TorchDotProductAttention)):
                return False
            found = True
    return found
