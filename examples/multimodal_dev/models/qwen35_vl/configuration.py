"""Qwen3.5-MoE configuration: HF ``Qwen3_5MoeConfig`` fields -> a megatron ``TransformerConfig``.

What HF ``Qwen3_5MoeForConditionalGeneration``'s text decoder is (docs/qwen35_moe_facts.md, sections
3, 4 and 7) and how it maps onto a megatron-core ``GPTModel``:

=============================== ==================================================================
HF                               megatron-core (``Qwen35TextConfig.to_transformer_config``)
=============================== ==================================================================
RMSNorm ``x * (1 + w)``          ``normalization="RMSNorm"``, ``layernorm_zero_centered_gamma``
                                 (our ``TorchNorm``; the stored weight is the same tensor)
q_proj = per head [q | gate]     ``attention_output_gate=True`` (sigmoid gate before ``linear_proj``)
q_norm / k_norm                  ``qk_layernorm=True``
head_dim, GQA                    ``kv_channels=head_dim``, ``num_query_groups=num_key_value_heads``
partial interleaved MRoPE        ``InterleavedMRoPE`` (rope.py) in place of megatron's MRoPE module
MoE: softmax -> top-k -> renorm  ``moe_router_score_function="softmax"``, ``pre_softmax=False``
experts SwiGLU [gate; up]        ``gated_linear_unit=True`` + silu
shared expert + sigmoid gate     ``moe_shared_expert_intermediate_size``, ``moe_shared_expert_gate``
lm_head (untied)                 ``output_layer``, ``share_embeddings_and_output_weights=False``
layer_types linear_attention     ``experimental_attention_variant="gated_delta_net"`` with the
(Gated DeltaNet)                 per-layer ``linear_attention_freq`` list and the ``linear_*`` sizes;
                                 built as ``mcore_ext.gdn.KernelGatedDeltaNet`` (models/spec.py)
=============================== ==================================================================

``configs_for_variant(name)`` gives the (text, vision) configs and the token ids of a named
variant (``variants.py``); ``configs_from_hf(config_json)`` those of any HF config;
``data_spec(...)`` what the data pipeline needs of them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import torch

from multimodal_dev.models.contract import DataSpec
from multimodal_dev.models.qwen35_vl.variants import get_variant
from multimodal_dev.models.qwen35_vl.vision import Qwen35VisionConfig

__all__ = ["Qwen35TextConfig", "configs_for_variant", "configs_from_hf", "data_spec", "TOKEN_FIELDS"]

#: the special token ids of a Qwen3.5-VL config (top level of HF's ``Qwen3_5MoeConfig``)
TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclasses.dataclass
class Qwen35TextConfig:
    """The text half of HF ``Qwen3_5MoeConfig`` (HF field names; defaults = HF's class defaults).

    ``moe_layer_pattern``: one entry per layer, 1 = MoE MLP, 0 = dense MLP of ``intermediate_size``
    (HF 5.23 has MoE in every layer; ``None`` means that). ``mrope_section`` defaults to HF's
    ``[11, 11, 10]``.
    """

    vocab_size: int = 248320
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts: int = 256
    num_experts_per_tok: int = 8
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    mrope_section: list = dataclasses.field(default_factory=lambda: [11, 11, 10])
    layer_types: Optional[list] = None
    moe_layer_pattern: Optional[list] = None
    intermediate_size: Optional[int] = None
    router_aux_loss_coef: float = 0.001
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    attention_bias: bool = False
    # Gated DeltaNet (layer_types "linear_attention")
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32

    def __post_init__(self):
        n = self.num_hidden_layers
        if self.layer_types is None:  # HF's derivation with full_attention_interval = 4
            self.layer_types = ["linear_attention" if (i + 1) % 4 else "full_attention" for i in range(n)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != n:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, num_hidden_layers={n}")
        bad = sorted(set(self.layer_types) - {"full_attention", "linear_attention"})
        if bad:
            raise ValueError(f"layer_types: unknown entries {bad} (full_attention or linear_attention)")
        if self.moe_layer_pattern is None:
            self.moe_layer_pattern = [1] * n
        self.moe_layer_pattern = [int(x) for x in self.moe_layer_pattern]
        if len(self.moe_layer_pattern) != n or set(self.moe_layer_pattern) - {0, 1}:
            raise ValueError(
                f"moe_layer_pattern must be {n} entries of 0 (dense) / 1 (MoE), got {self.moe_layer_pattern}"
            )
        if 0 in self.moe_layer_pattern and not self.intermediate_size:
            dense = [i for i, m in enumerate(self.moe_layer_pattern) if not m]
            raise ValueError(f"layers {dense} are dense: intermediate_size (their FFN width) is required")
        self.mrope_section = [int(x) for x in self.mrope_section]
        if sum(self.mrope_section) * 2 != self.rotary_dim:
            raise ValueError(
                f"sum(mrope_section)={sum(self.mrope_section)} must be rotary_dim/2 = "
                f"int(head_dim={self.head_dim} * partial_rotary_factor={self.partial_rotary_factor})/2 "
                f"= {self.rotary_dim // 2}"
            )
        if self.num_experts and self.num_experts_per_tok == 1:
            raise ValueError(
                "num_experts_per_tok=1 is not supported: HF Qwen3.5 gives the chosen expert weight 1 (the "
                "top-k weights are renormalised over k = 1), while megatron-core 0.19.2 requires "
                "moe_router_pre_softmax for top-1 routing, which weighs the expert by its probability p; the "
                "models would differ. Use num_experts_per_tok >= 2"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.attention_bias:
            raise NotImplementedError("attention_bias=True is not supported (Qwen3.5 has none)")
        if self.linear_attention_layers and self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads={self.linear_num_value_heads} must be a multiple of "
                             f"linear_num_key_heads={self.linear_num_key_heads}")

    # ------------------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @classmethod
    def from_hf(cls, hf_text_config: Any) -> "Qwen35TextConfig":
        """From an HF ``Qwen3_5MoeTextConfig`` (or its dict), e.g. ``hf_config.text_config``."""
        get = (lambda k, d=None: hf_text_config.get(k, d)) if isinstance(hf_text_config, Mapping) else (
            lambda k, d=None: getattr(hf_text_config, k, d)
        )
        rope = dict(get("rope_parameters") or {})
        kw = {}
        for f in dataclasses.fields(cls):
            v = get(f.name)
            if v is not None and not isinstance(v, BaseException):  # HF marks removed fields AttributeError()
                kw[f.name] = v
        kw["rope_theta"] = rope.get("rope_theta", get("rope_theta", 10000.0))
        kw["partial_rotary_factor"] = rope.get("partial_rotary_factor", get("partial_rotary_factor", 0.25))
        kw["mrope_section"] = rope.get("mrope_section", [11, 11, 10])
        return cls(**kw)

    def to_transformer_config(
        self,
        tensor_model_parallel_size: Optional[int] = None,
        pipeline_model_parallel_size: Optional[int] = None,
        context_parallel_size: Optional[int] = None,
        expert_model_parallel_size: Optional[int] = None,
        expert_tensor_parallel_size: Optional[int] = None,
        **overrides,
    ):
        """A megatron ``TransformerConfig``. Parallel sizes left ``None`` come from the initialised
        ``parallel_state`` (1 if it is not initialised); ``overrides`` win over everything.

        The rotary settings (``rotary_percent``, ``rotary_base``, ``position_embedding_type``) are
        ``GPTModel`` arguments in megatron-core 0.19.2, not config fields: see ``gpt_model_kwargs``.
        ``mrope_section`` is a config field (GPTModel asserts it for ``"mrope"``).
        """
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_config import TransformerConfig

        from megatron.mcore_ext.spec import LOCAL_SPEC_CONFIG

        init = ps.model_parallel_is_initialized()

        def size(v, getter):
            return v if v is not None else (getter() if init else 1)

        kw: dict[str, Any] = dict(
            num_layers=self.num_hidden_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            kv_channels=self.head_dim,
            ffn_hidden_size=self.intermediate_size or self.moe_intermediate_size,
            tensor_model_parallel_size=size(tensor_model_parallel_size, ps.get_tensor_model_parallel_world_size),
            pipeline_model_parallel_size=size(pipeline_model_parallel_size, ps.get_pipeline_model_parallel_world_size),
            context_parallel_size=size(context_parallel_size, ps.get_context_parallel_world_size),
            expert_model_parallel_size=size(expert_model_parallel_size, ps.get_expert_model_parallel_world_size),
            expert_tensor_parallel_size=size(
                expert_tensor_parallel_size, ps.get_expert_tensor_parallel_world_size
            ),
            # norms
            normalization="RMSNorm",
            layernorm_zero_centered_gamma=True,
            layernorm_epsilon=self.rms_norm_eps,
            qk_layernorm=True,
            # attention
            attention_output_gate=True,
            add_bias_linear=False,
            add_qkv_bias=False,
            rotary_interleaved=False,  # rotate_half pairs (i, i + rd/2), like HF
            mrope_section=list(self.mrope_section),
            apply_rope_fusion=False,
            # MLPs
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            bias_activation_fusion=False,
            num_moe_experts=self.num_experts,
            moe_ffn_hidden_size=self.moe_intermediate_size,
            moe_router_topk=self.num_experts_per_tok,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=False,  # softmax over the top-k logits = HF's renormalised top-k
            moe_shared_expert_intermediate_size=self.shared_expert_intermediate_size,
            moe_shared_expert_gate=True,
            moe_layer_freq=list(self.moe_layer_pattern),
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=self.router_aux_loss_coef,
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            # numerics / plumbing that works everywhere (pure-PyTorch local spec)
            params_dtype=torch.float32,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            **LOCAL_SPEC_CONFIG,
        )
        linear = self.linear_attention_layers
        if linear:  # Gated DeltaNet at these layers (megatron's per-layer pattern: 1 = linear)
            kw.update(
                experimental_attention_variant="gated_delta_net",
                linear_attention_freq=[1 if i in linear else 0 for i in range(self.num_hidden_layers)],
                linear_conv_kernel_dim=self.linear_conv_kernel_dim,
                linear_key_head_dim=self.linear_key_head_dim,
                linear_value_head_dim=self.linear_value_head_dim,
                linear_num_key_heads=self.linear_num_key_heads,
                linear_num_value_heads=self.linear_num_value_heads,
            )
        kw.update(overrides)
        return TransformerConfig(**kw)

    def gpt_model_kwargs(self) -> dict[str, Any]:
        """The ``GPTModel`` constructor arguments that come from this config."""
        return dict(
            vocab_size=self.vocab_size,
            max_sequence_length=self.max_position_embeddings,
            share_embeddings_and_output_weights=bool(self.tie_word_embeddings),
            position_embedding_type="mrope",
            rotary_percent=self.partial_rotary_factor,
            rotary_base=self.rope_theta,
        )


def configs_for_variant(variant: str) -> tuple[Qwen35TextConfig, Qwen35VisionConfig, dict]:
    """(text config, vision config, token ids) of a named variant."""
    v = get_variant(variant)
    return Qwen35TextConfig(**v["text"]), Qwen35VisionConfig(**v["vision"]), {k: v[k] for k in TOKEN_FIELDS}


def configs_from_hf(hf_config: Any) -> tuple[Qwen35TextConfig, Qwen35VisionConfig]:
    """(text, vision) configs from an HF ``Qwen3_5MoeConfig`` (object or ``config.json`` dict)."""
    get = hf_config.get if isinstance(hf_config, Mapping) else (lambda k: getattr(hf_config, k))
    return Qwen35TextConfig.from_hf(get("text_config")), Qwen35VisionConfig.from_hf(get("vision_config"))


def data_spec(text: Qwen35TextConfig, vision: Qwen35VisionConfig, tokens: Mapping[str, int]) -> DataSpec:
    return DataSpec(
        vocab_size=text.vocab_size,
        image_token_id=tokens["image_token_id"],
        video_token_id=tokens["video_token_id"],
        vision_start_token_id=tokens["vision_start_token_id"],
        vision_end_token_id=tokens["vision_end_token_id"],
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        spatial_merge_size=vision.spatial_merge_size,
    )
