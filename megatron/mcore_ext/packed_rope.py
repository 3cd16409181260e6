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
loop computes exactly ``_apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs)``. ``PackedRopeSelfAttention`` (a
``SelfAttention`` swapped in through the spec, see ``spec.local_spec``) therefore rotates the
query and the key of the whole packed row in one pass right after its QKV projection
(``get_query_key_value_tensors``) and hands megatron's forward no angles, whatever core attention
follows. This needs the angles of *this rank's* tokens in their local order (under context
parallelism too): a model produces them that way when ``takes_local_thd_angles`` says every
attention layer is ours. Anything else (BSHD, inference, fused RoPE, angles of another length)
takes megatron's own path unchanged.

The rotation itself (``apply_packed_rope``) runs as one small autograd function,
``out = t * C + t[..., P] * S``, with ``C``/``S`` the cosines / signed sines widened to the head
dim (1 / 0 on the pass-through dims) and ``P`` the rotate-half permutation (an involution, so the
backward is ``g * C + (g * S)[..., P]``). The tables are built once per step (every layer's query
and key share the angle tensor) instead of ``cos``/``sin``/casts per call, and the slicing and
concatenations of megatron's ``_apply_rotary_pos_emb_bshd`` go away: 4 kernels forward and 4
backward per call instead of ~11 and ~10, bit-equal results for finite inputs (the same products
and sums in the same dtype; a test checks equality with megatron's function, values and
gradients; an inf on a pass-through dim would become NaN through its ``* 0`` term).
"""
from __future__ import annotations

import weakref

import torch

from megatron.core.transformer.attention import SelfAttention

__all__ = ["PackedRopeSelfAttention", "apply_packed_rope", "rope_tables", "takes_local_thd_angles"]


_TABLES: dict = {}  # one entry: the tables of the angle tensor in use (see rope_tables)


def rope_tables(freqs: torch.Tensor, head_dim: int, dtype: torch.dtype, mscale: float = 1.0,
                interleaved: bool = False):
    """``(C, S, P)`` for ``_Rope``: ``freqs`` [..., rot_dim] -> C, S [..., head_dim] in ``dtype``
    (megatron's ``(cos(freqs) * mscale).to(dtype)`` and the sines with the rotate-half signs; 1 and
    0 past ``rot_dim``) and the permutation P [head_dim]. Cached for the last angle tensor, so the
    layers of one step build them once -- except while a CUDA graph is captured: a graph replays
    the kernels it recorded, so its tables must be computed inside it, from its own angle tensor
    (a cached result would be frozen at capture time)."""
    capturing = freqs.is_cuda and torch.cuda.is_current_stream_capturing()
    key = (freqs.data_ptr(), freqs.shape, freqs.stride(), freqs._version, freqs.device, head_dim, dtype,
           float(mscale), bool(interleaved))
    hit = None if capturing else _TABLES.get("entry")
    if hit is not None and hit[0] == key and hit[1]() is freqs:
        return hit[2]
    rot = freqs.shape[-1]
    if rot % 2 or rot > head_dim:
        raise ValueError(f"rope_tables: rotary dim {rot} must be even and <= head dim {head_dim}")
    with torch.no_grad():
        cos = (torch.cos(freqs) * mscale).to(dtype)
        sin = (torch.sin(freqs) * mscale).to(dtype)
        idx = torch.arange(head_dim, device=freqs.device)
        sign = torch.ones(rot, dtype=dtype, device=freqs.device)
        perm = idx.clone()
        if interleaved:  # rotate pairs (2i, 2i + 1): [-x1, x0, -x3, x2, ...]
            perm[:rot] = idx[:rot] ^ 1
            sign[0::2] = -1
        else:  # rotate halves: [-x2, x1]
            perm[:rot] = (idx[:rot] + rot // 2) % rot
            sign[: rot // 2] = -1
        C = torch.ones(*freqs.shape[:-1], head_dim, dtype=dtype, device=freqs.device)
        S = torch.zeros_like(C)
        C[..., :rot] = cos
        S[..., :rot] = sin * sign
    tables = (C, S, perm)
    if not capturing:
        _TABLES["entry"] = (key, weakref.ref(freqs), tables)
    return tables


class _Rope(torch.autograd.Function):
    """``t * C + t[..., P] * S`` in the tables' dtype; P is an involution, so the input gradient
    is ``g * C + (g * S)[..., P]``."""

    @staticmethod
    def forward(ctx, t, C, S, perm):
        ctx.save_for_backward(C, S, perm)
        return t * C + t.index_select(-1, perm) * S

    @staticmethod
    def backward(ctx, g):
        C, S, perm = ctx.saved_tensors
        return g * C + (g * S).index_select(-1, perm), None, None, None


def apply_packed_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool, mscale: float) -> torch.Tensor:
    """``t`` [tokens, heads, dim], ``freqs`` [tokens, 1, 1, rot_dim]: RoPE on every token at once
    (megatron's ``_apply_rotary_pos_emb_bshd`` on ``t.unsqueeze(1)``, fused as described above)."""
    if freqs.requires_grad or freqs.shape[-1] > t.shape[-1]:
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs, rotary_interleaved=interleaved,
                                          mscale=mscale).squeeze(1)
    C, S, perm = rope_tables(freqs, t.shape[-1], t.dtype, mscale, interleaved)
    return _Rope.apply(t, C.reshape(C.shape[0], 1, -1), S.reshape(S.shape[0], 1, -1), perm)


class PackedRopeSelfAttention(SelfAttention):
    """``SelfAttention`` that rotates packed (THD) queries and keys itself: one pass, no host syncs."""

    _pending_rope = None  # (q_freqs, k_freqs) for the projection of the current forward call

    def _packed_rope_applies(self, rotary_pos_emb, packed_seq_params, inference_context, hidden_states) -> bool:
        if rotary_pos_emb is None or packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return False
        if inference_context is not None or self.config.apply_rope_fusion or self.config.flash_decode:
            return False
        freqs = rotary_pos_emb if isinstance(rotary_pos_emb, torch.Tensor) else rotary_pos_emb[0]
        tokens = hidden_states.shape[0] * hidden_states.shape[1]
        if self.config.sequence_parallel:
            tokens *= self.pg_collection.tp.size()
        return freqs.dim() == 4 and freqs.shape[0] == tokens

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self._pending_rope is None:
            return out
        q_freqs, k_freqs = self._pending_rope
        query, key, *rest = out  # [t, 1, heads, dim] each
        mscale = self._yarn_concentration_factor
        interleaved = self.config.rotary_interleaved
        query = apply_packed_rope(query.squeeze(1), q_freqs, interleaved, mscale).unsqueeze(1)
        key = apply_packed_rope(key.squeeze(1), k_freqs, interleaved, mscale).unsqueeze(1)
        return (query, key, *rest)

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
            self._pending_rope = (
                (rotary_pos_emb, rotary_pos_emb) if isinstance(rotary_pos_emb, torch.Tensor) else rotary_pos_emb
            )
            rotary_pos_emb = None
        try:
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
        finally:
            self._pending_rope = None


def takes_local_thd_angles(module: torch.nn.Module) -> bool:
    """True when every self-attention in ``module`` is a ``PackedRopeSelfAttention`` (so THD
    angles should stay in this rank's local token order); False when there is none or any other
    kind."""
    found = False
    for m in module.modules():
        if isinstance(m, SelfAttention):
            if not isinstance(m, PackedRopeSelfAttention):
                return False
            found = True
    return found
