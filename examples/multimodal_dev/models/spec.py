"""The decoder block spec of a GPT-style language model, from a megatron ``TransformerConfig`` and
``BuildOptions`` -- architecture-agnostic: an architecture says *what* its layers are through
megatron's own config fields, this module picks *which implementation* builds them.

What the config decides, per layer: full attention, or Gated DeltaNet where
``experimental_attention_variant == "gated_delta_net"`` and megatron's ``linear_attention_freq``
pattern has a 1 (any pattern, a list or megatron's "every N-th is full attention" int); a MoE or a
dense MLP from ``moe_layer_freq``.

What the options decide (``BuildOptions``), in this order:

1. the backend: megatron's Transformer Engine spec with our packed-row pieces
   (``mcore_ext.spec.te_spec``: TE's core attention writing every packed position, one-pass packed
   RoPE), or its local spec with our pure-PyTorch pieces (``mcore_ext.spec.local_spec``:
   SP-capable zero-centred norms, THD/CP core attention, one-pass packed RoPE);
2. Gated DeltaNet layers: megatron-core's ``GatedDeltaNet`` with kernels chosen where it is built
   (``mcore_ext.gdn``: flash-linear-attention when importable, else our pure-PyTorch kernels),
   with the backend's linear layers and norms;
3. either backend: grouped-GEMM experts and the sync-free allgather dispatcher
   (``mcore_ext.experts`` / ``sorted_dispatch``; megatron's TE spec otherwise builds
   ``SequentialMLP``, a Python loop over the experts, because our configs keep
   ``moe_grouped_gemm=False`` for identical checkpoints on both backends);
4. the padding-aware router in every MoE layer (``mcore_ext.router``).

Only this pipeline stage's layers are in the returned block.
"""
from __future__ import annotations

import copy
import dataclasses

from multimodal_dev.models.contract import BuildOptions, SetupError

__all__ = ["decoder_block_spec", "linear_attention_layers", "check_parallel_sizes"]


def linear_attention_layers(config) -> list[int]:
    """Global indices of the Gated DeltaNet layers of ``config`` (empty when it has none)."""
    if config.experimental_attention_variant != "gated_delta_net":
        return []
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import get_linear_attention_pattern

    return [i for i, x in enumerate(get_linear_attention_pattern(config)) if x]


def _gdn_attention(config, options: BuildOptions):
    """(input layernorm, GDN token mixer) specs of one Gated DeltaNet layer for the backend."""
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron.mcore_ext.gdn import GatedRMSNorm, KernelGatedDeltaNet

    if options.use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
    else:
        from megatron.core.models.backends import LocalSpecProvider

        backend = LocalSpecProvider()
    rms = config.normalization == "RMSNorm"
    if backend.fuse_layernorm_and_linear():  # TE: the input norm lives inside in_proj
        input_layernorm, in_proj = IdentityOp, backend.column_parallel_layer_norm_linear()
    else:
        input_layernorm, in_proj = backend.layer_norm(rms_norm=rms, for_qk=False), backend.column_parallel_linear()
    mixer = ModuleSpec(
        module=KernelGatedDeltaNet,
        params={"kernels": options.gdn_kernels},
        submodules=GatedDeltaNetSubmodules(
            in_proj=in_proj,
            out_norm=(ModuleSpec(module=GatedRMSNorm, params={"kernels": options.gdn_kernels}) if rms
                      else backend.layer_norm(rms_norm=rms, for_qk=False)),
            out_proj=backend.row_parallel_linear(),
        ),
    )
    return input_layernorm, mixer


def check_parallel_sizes(config) -> None:
    """Raise ``SetupError`` naming the flag when the layout cannot split this model (megatron-core
    asserts these deep inside the layers' constructors, without a message)."""
    tp, cp, ep = config.tensor_model_parallel_size, config.context_parallel_size, config.expert_model_parallel_size
    pp = config.pipeline_model_parallel_size
    problems = []
    if config.num_moe_experts and config.num_moe_experts % ep:
        problems.append(f"--expert-model-parallel-size {ep} does not divide the model's {config.num_moe_experts} experts")
    for what, n in (("attention heads", config.num_attention_heads), ("key/value groups", config.num_query_groups)):
        if n and n % tp and tp % n:
            problems.append(f"--tensor-model-parallel-size {tp} does not divide the model's {n} {what}")
    if config.experimental_attention_variant == "gated_delta_net":
        for what, n in (("key", config.linear_num_key_heads), ("value", config.linear_num_value_heads)):
            if n % (tp * cp):
                problems.append(f"--tensor-model-parallel-size x --context-parallel-size = {tp}x{cp} does not divide "
                                f"the model's {n} Gated DeltaNet {what} heads")
    if pp > 1 and config.num_layers % pp and config.pipeline_model_parallel_layout is None:
        problems.append(f"--pipeline-model-parallel-size {pp} does not divide the model's {config.num_layers} layers")
    if problems:
        raise SetupError("; ".join(problems))


def decoder_block_spec(config, options: BuildOptions, vp_stage=None):
    """``TransformerBlockSubmodules`` of this pipeline stage (see the module docstring); the
    layout is checked against the model first (``check_parallel_sizes``)."""
    check_parallel_sizes(config)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron.mcore_ext.router import use_padding_aware_router
    from megatron.mcore_ext.spec import contains_module, local_spec, te_spec

    gdn_layers = set(linear_attention_layers(config))
    layer_config = config
    if config.experimental_attention_variant is not None:
        # megatron's GPT layer specs refuse the variant; they build the full-attention layers
        layer_config = copy.copy(config)
        layer_config.experimental_attention_variant = None
    block = get_gpt_decoder_block_spec(layer_config, use_transformer_engine=options.use_te,
                                       normalization=config.normalization, vp_stage=vp_stage)
    if gdn_layers:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        input_layernorm, mixer = _gdn_attention(config, options)
        # the list holds one shared spec object per layer kind: replace entries, never mutate them
        block.layer_specs = [
            dataclasses.replace(layer, submodules=dataclasses.replace(
                layer.submodules, input_layernorm=input_layernorm, self_attention=mixer))
            if offset + i in gdn_layers else layer
            for i, layer in enumerate(block.layer_specs)
        ]
    block = te_spec(block) if options.use_te else local_spec(block)
    has_moe = contains_module(block, MoELayer)
    if has_moe and options.grouped_experts:
        from megatron.mcore_ext.experts import use_grouped_experts

        block = use_grouped_experts(block, sync_free_dispatch=options.sync_free_dispatch)
    if has_moe and options.padding_aware_router:
        block = use_padding_aware_router(block)
    return block
