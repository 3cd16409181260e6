"""Sizes of the qwen35_vl architecture, in HF ``Qwen3_5MoeConfig`` terms (text + vision).

* ``tiny``: CPU tests in seconds (all layers full attention).
* ``tiny-hybrid``: ``tiny`` with 4 layers in the published pattern (3 Gated DeltaNet, then full
  attention), small GDN heads (2 key / 4 value heads of 16): CPU tests of the hybrid model.
* ``proxy``: about 1-2 B total parameters, trains on one GPU (all layers full attention).
* ``proxy-hybrid``: ``proxy``'s sizes with the published layer pattern (9 Gated DeltaNet + 3 full
  attention) and the 35B-A3B GDN heads (16 key / 32 value heads of 128).
* ``35B-A3B``, ``122B-A10B``, ``397B-A17B``: the published Qwen3.5 configurations (values and
  sources in docs/qwen35_moe_facts.md section 9), hybrid: every fourth layer full attention.
"""
from __future__ import annotations

import copy

__all__ = ["VARIANTS", "get_variant", "full_attention_every"]


def full_attention_every(num_layers: int, interval: int = 4) -> list[str]:
    """HF's rule: layer i is full attention when (i + 1) % interval == 0, else linear attention."""
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]


_COMMON_TEXT = dict(
    vocab_size=248320,
    head_dim=256,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_theta=10_000_000.0,
    partial_rotary_factor=0.25,
    mrope_section=[11, 11, 10],
    router_aux_loss_coef=0.001,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_num_key_heads=16,
)
_COMMON_VISION = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    in_channels=3,
    num_position_embeddings=2304,
)
_TOKENS = dict(image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054)


def _published(hidden, layers, heads, lin_v_heads, experts, topk, moe_i, shared_i):
    text = dict(
        _COMMON_TEXT,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        linear_num_value_heads=lin_v_heads,
        num_experts=experts,
        num_experts_per_tok=topk,
        moe_intermediate_size=moe_i,
        shared_expert_intermediate_size=shared_i,
        layer_types=full_attention_every(layers),
    )
    return dict(text=text, vision=dict(_COMMON_VISION, out_hidden_size=hidden), **_TOKENS)


VARIANTS: dict[str, dict] = {
    "tiny": dict(
        text=dict(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_theta=10_000_000.0,
            partial_rotary_factor=0.25,
            mrope_section=[2, 1, 1],
            router_aux_loss_coef=0.001,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            layer_types=["full_attention"] * 2,
        ),
        vision=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, temporal_patch_size=2,
            spatial_merge_size=2, in_channels=3, num_position_embeddings=16, out_hidden_size=64,
        ),
        image_token_id=250, video_token_id=251, vision_start_token_id=248, vision_end_token_id=249,
    ),
    # ~1.5 B total, ~0.4 B active: the 35B-A3B shape scaled down (fewer layers and experts), all
    # layers full attention, so it runs on one GPU without Gated DeltaNet.
    "proxy": dict(
        text=dict(
            _COMMON_TEXT,
            vocab_size=151_936,
            hidden_size=1024,
            num_hidden_layers=12,
            num_attention_heads=8,
            num_experts=32,
            num_experts_per_tok=4,
            moe_intermediate_size=768,
            shared_expert_intermediate_size=768,
            layer_types=["full_attention"] * 12,
        ),
        vision=dict(_COMMON_VISION, depth=12, out_hidden_size=1024),
        image_token_id=151_655, video_token_id=151_656, vision_start_token_id=151_652, vision_end_token_id=151_653,
    ),
    "35B-A3B": _published(2048, 40, 16, 32, 256, 8, 512, 512),
    "122B-A10B": _published(3072, 48, 32, 64, 256, 8, 1024, 1024),
    "397B-A17B": _published(4096, 60, 32, 64, 512, 10, 1024, 1024),
}


def _hybrid(base: str, num_layers: int, **gdn) -> dict:
    """``base`` with ``num_layers`` layers in HF's default pattern (every fourth full attention)."""
    v = copy.deepcopy(VARIANTS[base])
    v["text"].update(num_hidden_layers=num_layers, layer_types=full_attention_every(num_layers), **gdn)
    return v


VARIANTS["tiny-hybrid"] = _hybrid("tiny", 4, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                                  linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
VARIANTS["proxy-hybrid"] = _hybrid("proxy", 12, linear_num_key_heads=16, linear_num_value_heads=32)


def get_variant(name: str) -> dict:
    if name not in VARIANTS:
        raise ValueError(f"--variant '{name}' is unknown for qwen35_vl; available: {sorted(VARIANTS)}")
    return copy.deepcopy(VARIANTS[name])
