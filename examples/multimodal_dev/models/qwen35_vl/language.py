"""Qwen3.5-MoE language decoder on megatron-core 0.19.2: config, model builder, HF conversion.

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
experts SwiGLU [gate; up]        ``gated_linear_unit=True`` + silu, SequentialMLP (local spec)
shared expert + sigmoid gate     ``moe_shared_expert_intermediate_size``, ``moe_shared_expert_gate``
lm_head (untied)                 ``output_layer``, ``share_embeddings_and_output_weights=False``
=============================== ==================================================================

Gated DeltaNet (``layer_types == "linear_attention"``) is not implemented yet: the config raises.

Conversion (TP = PP = EP = 1 state dicts; shard with ``megatron.mcore_ext.testing.load_global_tensors``):
``language_state_from_hf`` / ``language_state_to_hf`` are exact inverses (pure re-layout).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Optional

import torch

from megatron.core.models.gpt.gpt_model import GPTModel

from multimodal_dev.models.qwen35_vl.rope import InterleavedMRoPE, packed_freqs_for_cp

__all__ = [
    "Qwen35TextConfig",
    "Qwen35GPTModel",
    "build_qwen35_language_model",
    "language_state_from_hf",
    "language_state_to_hf",
    "HF_LM_PREFIX",
]

HF_LM_PREFIX = "model.language_model."


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
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.attention_bias:
            raise NotImplementedError("attention_bias=True is not supported (Qwen3.5 has none)")

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

        if self.linear_attention_layers:
            raise NotImplementedError(
                f"layers {self.linear_attention_layers} are 'linear_attention' (Gated DeltaNet), which "
                "is not implemented yet; only 'full_attention' layers are supported"
            )
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


class Qwen35GPTModel(GPTModel):
    """``GPTModel`` with HF's interleaved MRoPE (``InterleavedMRoPE``) as ``rotary_pos_emb``.

    Built as ``position_embedding_type="mrope"`` so that ``GPTModel._preprocess`` hands the
    ``[3, b, s]`` position ids to ``self.rotary_pos_emb`` (and everything else in GPTModel sees an
    MRoPE model); megatron's own ``MultimodalRotaryEmbedding`` (contiguous sections, CP re-split)
    is then replaced by ours. The only other change: for packed (THD) input under context
    parallelism the angles are laid out the way megatron's THD RoPE slices them
    (``rope.packed_freqs_for_cp``), because only here ``packed_seq_params`` is known -- unless every
    attention layer is ``packed_rope.PackedRopeSelfAttention`` (the local spec), which applies
    this rank's angles as they are, in one pass.

    With labels and ``chunked_lm_loss``, the LM head and its cross entropy run in token chunks
    (``megatron.mcore_ext.lm_loss``: the same [b, s] loss without [tokens, vocab] logits in
    memory); without labels the logits come back as ever.
    """

    def __init__(self, config, transformer_layer_spec, *, mrope_section, chunked_lm_loss: bool = False, **kwargs):
        kwargs.setdefault("position_embedding_type", "mrope")
        if kwargs["position_embedding_type"] != "mrope":
            raise ValueError("Qwen35GPTModel needs position_embedding_type='mrope'")
        if config.apply_rope_fusion:
            # TE's fused RoPE indexes the angles by position *within* each packed sample (THD) and
            # rejects per-sample angles in BSHD with batch > 1: neither holds MRoPE's per-token ids.
            raise ValueError("Qwen35GPTModel: apply_rope_fusion must be False (MRoPE angles are per token)")
        super().__init__(config, transformer_layer_spec, **kwargs)
        self.rotary_pos_emb = InterleavedMRoPE(
            kv_channels=config.kv_channels,
            rotary_percent=kwargs.get("rotary_percent", 1.0),
            rotary_base=kwargs.get("rotary_base", 10000),
            mrope_section=mrope_section,
        )
        # our THD RoPE (packed_rope) takes this rank's angles in local order; megatron's (TE or
        # another spec) takes them at global positions under context parallelism
        from megatron.mcore_ext.packed_rope import takes_local_thd_angles

        self._local_thd_angles = takes_local_thd_angles(self)
        self.chunked_lm_loss = bool(chunked_lm_loss)

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels", args[4] if len(args) > 4 else None)  # GPTModel.forward's 5th
        if (labels is not None and kwargs.get("output_processor") is None and self.chunked_lm_loss
                and not self.config.use_mup):  # MuP scales the logits: megatron's path
            kwargs["output_processor"] = self._chunked_loss
        return super().forward(*args, **kwargs)

    def _chunked_loss(self, *, hidden_states, output_layer, output_weight, labels, **unused):
        from megatron.mcore_ext.lm_loss import chunked_lm_loss

        weight = output_weight if output_weight is not None else output_layer.weight
        return chunked_lm_loss(hidden_states, weight, labels, tp_group=output_layer.tp_group,
                               sequence_parallel=output_layer.sequence_parallel)

    def _preprocess(
        self,
        input_ids,
        position_ids,
        decoder_input=None,
        inference_context=None,
        packed_seq_params=None,
        padding_mask=None,
    ):
        out = super()._preprocess(
            input_ids=input_ids,
            position_ids=position_ids,
            decoder_input=decoder_input,
            inference_context=inference_context,
            packed_seq_params=packed_seq_params,
            padding_mask=padding_mask,
        )
        rot = out[1]
        if rot is not None and packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cp_group = self.pg_collection.cp  # the group the attention layers' RoPE uses
            cp_size = cp_group.size() if cp_group is not None else 1
            if cp_size > 1 and not self._local_thd_angles:
                cu = packed_seq_params.cu_seqlens_q_padded
                if cu is None:
                    cu = packed_seq_params.cu_seqlens_q
                rot = packed_freqs_for_cp(rot, cu, cp_size, cp_group.rank())
                out = (out[0], rot, *out[2:])
        return out


def resolve_transformer_impl(transformer_impl: str) -> str:
    """``--transformer-impl``: "local" (pure PyTorch), "transformer_engine", or "auto" (TE when
    importable, else local)."""
    if transformer_impl not in ("auto", "local", "transformer_engine"):
        raise ValueError(
            f"--transformer-impl must be auto, local or transformer_engine, got {transformer_impl!r}"
        )
    try:
        import transformer_engine  # noqa: F401

        have_te = True
    except Exception:
        have_te = False
    if transformer_impl == "transformer_engine" and not have_te:
        raise ValueError("--transformer-impl transformer_engine: Transformer Engine is not importable here")
    if transformer_impl == "auto":
        return "transformer_engine" if have_te else "local"
    return transformer_impl


def build_qwen35_language_model(
    text_cfg: Qwen35TextConfig,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    *,
    parallel_output: bool = True,
    padding_aware_router: bool = True,
    vp_stage: Optional[int] = None,
    transformer_impl: str = "auto",
    grouped_experts: bool = True,
    sync_free_dispatch: bool = True,
    chunked_lm_loss: bool = False,
    **overrides,
) -> Qwen35GPTModel:
    """The Qwen3.5 text decoder as a megatron-core GPTModel (local spec, pure-PyTorch pieces).

    Must run under an initialised ``parallel_state``. ``pre_process`` / ``post_process`` default
    to this rank's pipeline stage. ``overrides`` go into the ``TransformerConfig`` (e.g.
    ``params_dtype``, ``sequence_parallel``, ``moe_z_loss_coeff``). The embedding does not scatter
    to sequence parallelism (``MultimodalModel`` does it after merging the image embeddings);
    the output layer is untied unless the config ties it. ``grouped_experts`` (local spec): the
    routed experts run as two ``torch._grouped_mm`` calls instead of a loop over experts (the same
    parameters and checkpoints; ``megatron.mcore_ext.experts``); with the allgather dispatcher
    they get their tokens from a fixed-shape device-side sort, with no host reads
    (``sync_free_dispatch``, ``megatron.mcore_ext.sorted_dispatch``). ``chunked_lm_loss``: the
    training loss from the LM head in token chunks, no [tokens, vocab] logits
    (``megatron.mcore_ext.lm_loss``; off by default: it trades memory for an extra LM-head GEMM).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron.mcore_ext.router import use_padding_aware_router
    from megatron.mcore_ext.spec import local_spec

    use_te = resolve_transformer_impl(transformer_impl) == "transformer_engine"
    config = text_cfg.to_transformer_config(**overrides)
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage
    )
    if not use_te:
        spec = local_spec(spec)  # TorchNorm (zero-centred RMSNorm, SP) + TorchDotProductAttention (THD, CP)
        if grouped_experts:
            from megatron.mcore_ext.experts import use_grouped_experts

            spec = use_grouped_experts(spec, sync_free_dispatch=sync_free_dispatch)
    if padding_aware_router:
        spec = use_padding_aware_router(spec)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    return Qwen35GPTModel(
        config,
        spec,
        mrope_section=text_cfg.mrope_section,
        chunked_lm_loss=chunked_lm_loss,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        scatter_embedding_sequence_parallel=False,
        vp_stage=vp_stage,
        **text_cfg.gpt_model_kwargs(),
    )


# ------------------------------------------------------------------------------------------------
# State-dict conversion (TP = 1). Megatron keys are those of the local-spec GPTModel above:
#   embedding.word_embeddings.weight
#   decoder.layers.{L}.input_layernorm.weight
#   decoder.layers.{L}.self_attention.linear_qkv.weight        rows per query group g:
#                                                              [q heads of g | gate heads of g | k_g | v_g]
#   decoder.layers.{L}.self_attention.q_layernorm.weight / k_layernorm.weight
#   decoder.layers.{L}.self_attention.linear_proj.weight
#   decoder.layers.{L}.pre_mlp_layernorm.weight
#   decoder.layers.{L}.mlp.router.weight
#   decoder.layers.{L}.mlp.experts.local_experts.{e}.linear_fc1.weight  [gate; up]
#   decoder.layers.{L}.mlp.experts.local_experts.{e}.linear_fc2.weight
#   decoder.layers.{L}.mlp.shared_experts.linear_fc1.weight / linear_fc2.weight / gate_weight
#   decoder.layers.{L}.mlp.linear_fc1.weight / linear_fc2.weight     (dense layers)
#   decoder.final_layernorm.weight
#   output_layer.weight
# ------------------------------------------------------------------------------------------------



def _qkv_from_hf(q_proj: torch.Tensor, k_proj: torch.Tensor, v_proj: torch.Tensor, cfg: Qwen35TextConfig):
    nh, ng, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hidden = q_proj.shape[-1]
    qg = q_proj.view(nh, 2, hd, hidden)  # per head [q_h ; gate_h]
    r = nh // ng
    q = qg[:, 0].reshape(ng, r * hd, hidden)
    gate = qg[:, 1].reshape(ng, r * hd, hidden)
    k = k_proj.view(ng, hd, hidden)
    v = v_proj.view(ng, hd, hidden)
    return torch.cat([q, gate, k, v], dim=1).reshape(ng * (2 * r + 2) * hd, hidden)


def _qkv_to_hf(qkv: torch.Tensor, cfg: Qwen35TextConfig):
    nh, ng, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hidden = qkv.shape[-1]
    r = nh // ng
    grouped = qkv.view(ng, (2 * r + 2) * hd, hidden)
    q, gate, k, v = torch.split(grouped, [r * hd, r * hd, hd, hd], dim=1)
    q_proj = torch.stack([q.reshape(nh, hd, hidden), gate.reshape(nh, hd, hidden)], dim=1)
    return q_proj.reshape(2 * nh * hd, hidden), k.reshape(ng * hd, hidden), v.reshape(ng * hd, hidden)


def _strip_hf_prefix(hf_sd: Mapping[str, torch.Tensor]) -> tuple[dict, Optional[torch.Tensor]]:
    lm, head = {}, None
    for k, v in hf_sd.items():
        if k.startswith(HF_LM_PREFIX):
            lm[k[len(HF_LM_PREFIX) :]] = v
        elif k == "lm_head.weight":
            head = v
    return lm, head


@dataclasses.dataclass
class _Dims:
    """What the conversion needs; from a ``Qwen35TextConfig`` or read off the tensors."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    num_experts: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    moe_layer_pattern: list
    tie_word_embeddings: bool
    linear_attention_layers: list


def _layer_ids(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _dims_from_hf(lm: Mapping[str, torch.Tensor], head) -> _Dims:
    layers = _layer_ids(lm, r"^layers\.(\d+)\.")
    lin = _layer_ids(lm, r"^layers\.(\d+)\.linear_attn\.")
    full = [L for L in layers if L not in lin]
    if not full:
        raise ValueError("HF state dict: no full-attention layer to read the attention shapes from")
    a = f"layers.{full[0]}.self_attn."
    hd = lm[a + "q_norm.weight"].shape[0]
    moe = [1 if f"layers.{L}.mlp.gate.weight" in lm else 0 for L in layers]
    E = I = Is = 0
    if any(moe):
        p = f"layers.{layers[moe.index(1)]}.mlp."
        E = lm[p + "gate.weight"].shape[0]
        I = (lm[p + "experts.down_proj"].shape[-1] if p + "experts.down_proj" in lm
             else lm[p + "experts.0.down_proj.weight"].shape[-1])
        Is = lm[p + "shared_expert.down_proj.weight"].shape[-1]
    return _Dims(
        num_attention_heads=lm[a + "q_proj.weight"].shape[0] // (2 * hd),
        num_key_value_heads=lm[a + "k_proj.weight"].shape[0] // hd,
        head_dim=hd,
        num_hidden_layers=len(layers),
        num_experts=E,
        moe_intermediate_size=I,
        shared_expert_intermediate_size=Is,
        moe_layer_pattern=moe,
        tie_word_embeddings=head is None,
        linear_attention_layers=lin,
    )


def _dims_from_megatron(sd: Mapping[str, torch.Tensor]) -> _Dims:
    layers = _layer_ids(sd, r"^decoder\.layers\.(\d+)\.")
    if not layers:
        raise ValueError("megatron state dict: no decoder layers")
    a = f"decoder.layers.{layers[0]}.self_attention."
    hd = sd[a + "q_layernorm.weight"].shape[0]
    nh = sd[a + "linear_proj.weight"].shape[1] // hd
    ng = (sd[a + "linear_qkv.weight"].shape[0] // hd - 2 * nh) // 2
    moe = [1 if f"decoder.layers.{L}.mlp.router.weight" in sd else 0 for L in layers]
    E = I = Is = 0
    if any(moe):
        p = f"decoder.layers.{layers[moe.index(1)]}.mlp."
        E = sd[p + "router.weight"].shape[0]
        I = sd[p + "experts.local_experts.0.linear_fc2.weight"].shape[-1]
        Is = sd[p + "shared_experts.linear_fc2.weight"].shape[-1]
    return _Dims(nh, ng, hd, len(layers), E, I, Is, moe, "output_layer.weight" not in sd, [])


def _refuse_linear_attention(cfg) -> None:
    if cfg.linear_attention_layers:
        raise NotImplementedError(
            f"layers {cfg.linear_attention_layers} are linear_attention (Gated DeltaNet): not supported yet"
        )


class _KeyTaker:
    """``take(k)`` reads key ``k`` of a state dict being converted and remembers it;
    ``check_all_used()`` then fails on every key no conversion rule consumed. ``prefix`` is
    prepended to the keys named in errors (the part of the HF key already stripped)."""

    def __init__(self, sd: Mapping[str, torch.Tensor], what: str, keys_name: str, prefix: str = ""):
        self.sd, self.what, self.keys_name, self.prefix = sd, what, keys_name, prefix
        self.used: set[str] = set()

    def __call__(self, k: str) -> torch.Tensor:
        if k not in self.sd:
            raise KeyError(f"{self.what} has no '{self.prefix}{k}'")
        self.used.add(k)
        return self.sd[k]

    def check_all_used(self) -> None:
        left = sorted(set(self.sd) - self.used)
        if left:
            raise KeyError(f"{self.keys_name} not converted: {[self.prefix + k for k in left[:10]]} "
                           f"({len(left)} in all)")


def _as_dims(cfg: Optional[Qwen35TextConfig]) -> Optional[_Dims]:
    if cfg is None:
        return None
    return _Dims(
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers,
        cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size,
        list(cfg.moe_layer_pattern), bool(cfg.tie_word_embeddings), cfg.linear_attention_layers,
    )


def language_state_from_hf(
    hf_sd: Mapping[str, torch.Tensor], cfg: Optional[Qwen35TextConfig] = None
) -> dict[str, torch.Tensor]:
    """HF ``Qwen3_5MoeForConditionalGeneration`` state dict -> our GPTModel's (TP = 1).

    Without ``cfg`` the sizes are read off the tensors (and tying from the absence of
    ``lm_head.weight``).

    Keys outside ``model.language_model.*`` and ``lm_head.weight`` (vision, ``mtp.*``) are ignored.
    Experts may be fused (``experts.gate_up_proj`` / ``experts.down_proj``) or per expert
    (``experts.{e}.{gate,up,down}_proj.weight``). Every HF language key must be consumed.
    """
    lm, head = _strip_hf_prefix(hf_sd)
    cfg = _as_dims(cfg) or _dims_from_hf(lm, head)
    _refuse_linear_attention(cfg)
    take = _KeyTaker(lm, "HF state dict", "HF language keys", prefix=HF_LM_PREFIX)

    out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": take("embed_tokens.weight")}
    E = cfg.num_experts
    for L in range(cfg.num_hidden_layers):
        h, m = f"layers.{L}.", f"decoder.layers.{L}."
        out[m + "input_layernorm.weight"] = take(h + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = take(h + "post_attention_layernorm.weight")
        a = h + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = _qkv_from_hf(
            take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight"), cfg
        )
        out[m + "self_attention.q_layernorm.weight"] = take(a + "q_norm.weight")
        out[m + "self_attention.k_layernorm.weight"] = take(a + "k_norm.weight")
        out[m + "self_attention.linear_proj.weight"] = take(a + "o_proj.weight")
        if cfg.moe_layer_pattern[L]:
            p = h + "mlp."
            out[m + "mlp.router.weight"] = take(p + "gate.weight")
            if p + "experts.gate_up_proj" in lm:
                gate_up, down = take(p + "experts.gate_up_proj"), take(p + "experts.down_proj")
                fc1 = [gate_up[e] for e in range(E)]
                fc2 = [down[e] for e in range(E)]
            else:
                fc1 = [
                    torch.cat([take(f"{p}experts.{e}.gate_proj.weight"), take(f"{p}experts.{e}.up_proj.weight")])
                    for e in range(E)
                ]
                fc2 = [take(f"{p}experts.{e}.down_proj.weight") for e in range(E)]
            for e in range(E):
                out[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1[e]
                out[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2[e]
            s = p + "shared_expert."
            out[m + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
                [take(s + "gate_proj.weight"), take(s + "up_proj.weight")]
            )
            out[m + "mlp.shared_experts.linear_fc2.weight"] = take(s + "down_proj.weight")
            out[m + "mlp.shared_experts.gate_weight"] = take(p + "shared_expert_gate.weight")
        else:
            p = h + "mlp."
            out[m + "mlp.linear_fc1.weight"] = torch.cat([take(p + "gate_proj.weight"), take(p + "up_proj.weight")])
            out[m + "mlp.linear_fc2.weight"] = take(p + "down_proj.weight")
    out["decoder.final_layernorm.weight"] = take("norm.weight")
    if not cfg.tie_word_embeddings:
        if head is None:
            raise KeyError("HF state dict has no 'lm_head.weight' (tie_word_embeddings=False)")
        out["output_layer.weight"] = head
    take.check_all_used()
    return out


def language_state_to_hf(
    sd: Mapping[str, torch.Tensor], cfg: Optional[Qwen35TextConfig] = None, fused_experts: bool = True
) -> dict[str, torch.Tensor]:
    """Our GPTModel's state dict (TP = 1) -> HF keys (inverse of ``language_state_from_hf``).

    Without ``cfg`` the sizes are read off the tensors.

    Megatron's non-parameter entries (``_extra_state``) are ignored. ``fused_experts``: write
    ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]`` (HF 5.23's module layout),
    else per-expert ``experts.{e}.{gate,up,down}_proj.weight``.
    """
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    cfg = _as_dims(cfg) or _dims_from_megatron(sd)
    _refuse_linear_attention(cfg)
    P = HF_LM_PREFIX
    take = _KeyTaker(sd, "megatron state dict", "megatron keys")

    out: dict[str, torch.Tensor] = {P + "embed_tokens.weight": take("embedding.word_embeddings.weight")}
    E, I, Is = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    for L in range(cfg.num_hidden_layers):
        h, m = f"{P}layers.{L}.", f"decoder.layers.{L}."
        out[h + "input_layernorm.weight"] = take(m + "input_layernorm.weight")
        out[h + "post_attention_layernorm.weight"] = take(m + "pre_mlp_layernorm.weight")
        a = h + "self_attn."
        q, k, v = _qkv_to_hf(take(m + "self_attention.linear_qkv.weight"), cfg)
        out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = q, k, v
        out[a + "q_norm.weight"] = take(m + "self_attention.q_layernorm.weight")
        out[a + "k_norm.weight"] = take(m + "self_attention.k_layernorm.weight")
        out[a + "o_proj.weight"] = take(m + "self_attention.linear_proj.weight")
        p = h + "mlp."
        if cfg.moe_layer_pattern[L]:
            out[p + "gate.weight"] = take(m + "mlp.router.weight")
            fc1 = [take(f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight") for e in range(E)]
            fc2 = [take(f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight") for e in range(E)]
            if fused_experts:
                out[p + "experts.gate_up_proj"] = torch.stack(fc1)
                out[p + "experts.down_proj"] = torch.stack(fc2)
            else:
                for e in range(E):
                    out[f"{p}experts.{e}.gate_proj.weight"] = fc1[e][:I]
                    out[f"{p}experts.{e}.up_proj.weight"] = fc1[e][I:]
                    out[f"{p}experts.{e}.down_proj.weight"] = fc2[e]
            sfc1 = take(m + "mlp.shared_experts.linear_fc1.weight")
            out[p + "shared_expert.gate_proj.weight"] = sfc1[:Is]
            out[p + "shared_expert.up_proj.weight"] = sfc1[Is:]
            out[p + "shared_expert.down_proj.weight"] = take(m + "mlp.shared_experts.linear_fc2.weight")
            out[p + "shared_expert_gate.weight"] = take(m + "mlp.shared_experts.gate_weight")
        else:
            fc1 = take(m + "mlp.linear_fc1.weight")
            n = fc1.shape[0] // 2
            out[p + "gate_proj.weight"], out[p + "up_proj.weight"] = fc1[:n], fc1[n:]
            out[p + "down_proj.weight"] = take(m + "mlp.linear_fc2.weight")
    out[P + "norm.weight"] = take("decoder.final_layernorm.weight")
    if "output_layer.weight" in sd:
        out["lm_head.weight"] = take("output_layer.weight")
    elif not cfg.tie_word_embeddings:
        raise KeyError("megatron state dict has no 'output_layer.weight' (tie_word_embeddings=False)")
    take.check_all_used()
    return out
