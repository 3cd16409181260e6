"""Useful model FLOPs of one training step of a qwen35_vl model on a collated batch (for MFU).

``model_flops_per_step(text_cfg, vision_cfg, batch)`` (``MultimodalModel.flops_per_batch``) counts
what the *real* (non-padding) tokens and image patches of ``batch`` need, forward + backward, so
that the same samples give the same number in BSHD (padded rows) and THD (packed) layout: padding work is not
useful work, and shows up as a lower MFU.

Conventions (the usual ones, e.g. Megatron-LM / PaLM MFU):

* a matmul ``[m, k] x [k, n]`` is ``2*m*n*k`` FLOPs forward; backward is twice the forward (the
  input gradient and the weight gradient), so every matmul counts ``3x`` its forward FLOPs;
* only matmuls (and the two attention batched matmuls) count; norms, activations, softmax, RoPE,
  the embedding lookup, the MoE permutation and the loss are not counted (they are a few per cent
  at most and run in memory-bound kernels);
* MoE: only the *active* experts count (``top_k`` experts per token), plus the router and the
  shared expert with its sigmoid gate.

Per real text token, per decoder layer (``H`` hidden, ``nh`` query heads, ``ng`` KV groups,
``d`` head dim, ``E`` experts, ``k`` top-k, ``I`` expert width, ``Is`` shared-expert width)::

    attention projections  2*H*(2*nh*d)   q_proj with the output gate (Qwen3.5's q_proj is 2x wide)
                         + 2*H*(2*ng*d)   k_proj, v_proj
                         + 2*(nh*d)*H     o_proj
    router                 2*H*E
    routed experts         k * 2*(3*H*I)  SwiGLU: gate and up (H -> 2I), down (I -> H)
    shared expert          2*(3*H*Is) + 2*H   (+ its sigmoid gate H -> 1)
    (dense-MLP layers: 2*(3*H*intermediate_size) instead of router + experts + shared expert)

Causal attention (scores ``QK^T`` and ``PV``), per packed sample of ``n`` real tokens, per layer:
only the ``n*(n+1)/2`` (query, key) pairs the causal mask allows, ``2*d`` FLOPs each for the
scores and ``2*d`` for ``PV``, per query head::

    core attention         2 * 2*d*nh * n*(n+1)/2  =  2*nh*d*n*(n+1)

Gated DeltaNet layers replace the attention terms, per real token (``nk``/``nv`` key/value
heads of ``dk``/``dv``, ``kd = nk*dk``, ``vd = nv*dv``, conv kernel ``K``)::

    projections            2*H*(2*kd + 2*vd + 2*nv) + 2*vd*H   in_proj (q, k, v, z, beta, alpha), out_proj
    causal conv1d          2*K*(2*kd + vd)
    gated delta rule       nv * 6*dk*dv        the recurrence: the state's read (S^T k), its rank-1
                                               update and the output (S^T q), 2*dk*dv each

LM head: ``2*H*V`` per real token (the trainer computes logits at every position, not only at
the loss positions).

Vision tower, per image of grid ``(t, h, w)`` (``P = t*h*w`` patches, ``t`` frames of ``L = h*w``
patches each, ``D`` width, ``Iv`` MLP width, ``m`` spatial merge, ``pd = C*T*p*p`` patch size)::

    patch embedding        P * 2*pd*D
    per block              P * 2*(3*D*D + D*D + 2*D*Iv)     qkv, proj, fc1, fc2
                         + t * 2 * 2*D*L*L                  full (bidirectional) attention per frame
    merger                 (P/m^2) * 2*((m^2*D)^2 + m^2*D*out)

Step FLOPs = 3 x (sum of the above forward FLOPs).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["sample_lengths", "model_flops_per_step", "FWD_BWD_FACTOR"]

FWD_BWD_FACTOR = 3  # forward + backward (input gradients + weight gradients) = 3 x forward


def sample_lengths(batch: Mapping[str, Any]) -> list[int]:
    """Real-token lengths of the samples of a collated batch: THD from ``cu_seqlens``, BSHD from
    the rows of ``padding_mask`` (a row is one sample)."""
    cu = batch.get("cu_seqlens")
    if cu is not None:
        cu = torch.as_tensor(cu).long().cpu()
        # a zero-length entry is the padding segment of a bucketed row (CollateConfig.row_multiple)
        return [int(x) for x in (cu[1:] - cu[:-1]) if x > 0]
    pm = batch.get("padding_mask")
    if pm is None:  # no padding: every row is one full sample
        b, s = torch.as_tensor(batch["tokens"]).shape[-2:]
        return [int(s)] * int(b)
    pm = torch.as_tensor(pm).cpu()
    return [int(n) for n in (~pm.bool()).sum(dim=-1)]


def _text_forward_flops(text: Mapping[str, Any], lengths: Sequence[int]) -> dict[str, int]:
    H, V = int(text["hidden_size"]), int(text["vocab_size"])
    nh, ng, d = int(text["num_attention_heads"]), int(text["num_key_value_heads"]), int(text["head_dim"])
    L = int(text["num_hidden_layers"])
    layer_types = text.get("layer_types") or ["full_attention"] * L
    n_lin = sum(t == "linear_attention" for t in layer_types)
    n_full = L - n_lin
    moe_pattern = text.get("moe_layer_pattern") or [1] * L
    n_moe = sum(1 for m in moe_pattern if m)
    n_dense = L - n_moe
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)  # causal (query, key) pairs, per packed sample

    proj = tokens * (2 * H * (2 * nh * d) + 2 * H * (2 * ng * d) + 2 * (nh * d) * H) * n_full
    core = 2 * 2 * d * nh * pairs * n_full
    out = dict(attention_projections=proj, attention_core=core)
    if n_lin:
        dk, dv = int(text["linear_key_head_dim"]), int(text["linear_value_head_dim"])
        nk, nv, K = int(text["linear_num_key_heads"]), int(text["linear_num_value_heads"]), int(text["linear_conv_kernel_dim"])
        kd, vd = nk * dk, nv * dv
        out["gdn_projections"] = tokens * (2 * H * (2 * kd + 2 * vd + 2 * nv) + 2 * vd * H) * n_lin
        out["gdn_conv"] = tokens * 2 * K * (2 * kd + vd) * n_lin
        out["gdn_recurrence"] = tokens * nv * 6 * dk * dv * n_lin
    if n_moe:
        E, k = int(text["num_experts"]), int(text["num_experts_per_tok"])
        I, Is = int(text["moe_intermediate_size"]), int(text["shared_expert_intermediate_size"])
        out["router"] = tokens * 2 * H * E * n_moe
        out["routed_experts"] = tokens * k * 2 * 3 * H * I * n_moe
        out["shared_expert"] = tokens * (2 * 3 * H * Is + 2 * H) * n_moe
    if n_dense:
        out["dense_mlp"] = tokens * 2 * 3 * H * int(text["intermediate_size"]) * n_dense
    out["lm_head"] = tokens * 2 * H * V
    return out


def _vision_forward_flops(vision: Mapping[str, Any], grids) -> int:
    if grids is None or len(grids) == 0:
        return 0
    D, Iv, depth = int(vision["hidden_size"]), int(vision["intermediate_size"]), int(vision["depth"])
    out_h, m = int(vision["out_hidden_size"]), int(vision["spatial_merge_size"])
    pd = int(vision.get("in_channels", 3)) * int(vision["temporal_patch_size"]) * int(vision["patch_size"]) ** 2
    total = 0
    for t, h, w in torch.as_tensor(grids).long().tolist():
        P, Lf = t * h * w, h * w
        total += P * 2 * pd * D
        total += depth * (P * 2 * (3 * D * D + D * D + 2 * D * Iv) + t * 2 * 2 * D * Lf * Lf)
        total += (P // (m * m)) * 2 * ((m * m * D) ** 2 + m * m * D * out_h)
    return total


def _fields(cfg) -> Mapping[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def model_flops_per_step(text: Any, vision: Any, batch: Mapping[str, Any]) -> dict[str, int]:
    """Useful forward+backward FLOPs of one step on ``batch`` (see the module docstring).

    ``text`` / ``vision``: ``Qwen35TextConfig`` / ``Qwen35VisionConfig`` or dicts in HF field names
    (a variant's ``text`` and ``vision``). ``batch``: a ``pack_or_pad_batch`` result, BSHD or THD
    (only ``cu_seqlens`` / ``padding_mask`` and ``image_grid_thw`` are read).

    Returns forward+backward FLOPs per part (``attention_projections``, ``attention_core``,
    ``router``, ``routed_experts``, ``shared_expert``, ``dense_mlp`` if any, ``lm_head``,
    ``vision``), their sum ``total``, and ``forward`` (the forward-only sum), as ints.
    """
    lengths = sample_lengths(batch)
    parts = _text_forward_flops(_fields(text), lengths)
    parts["vision"] = _vision_forward_flops(_fields(vision), batch.get("image_grid_thw"))
    fwd = sum(parts.values())
    out = {k: FWD_BWD_FACTOR * v for k, v in parts.items()}
    out["total"] = FWD_BWD_FACTOR * fwd
    out["forward"] = fwd
    return out
