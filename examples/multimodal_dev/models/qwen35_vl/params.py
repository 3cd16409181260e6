"""Parameter counts of a qwen35_vl variant, from our model built on the meta device.

``count_parameters(variant)`` builds our ``MultimodalModel`` (the megatron-core Qwen3.5 decoder
with its local spec, Gated DeltaNet layers included, + our vision tower) under
``torch.device("meta")`` with ``perform_initialization=False``: no init kernel runs and the big
tensors take no memory (megatron-core 0.19.2's GDN puts its small ``conv1d``, ``dt_bias`` and
``A_log`` on the current device regardless; they are counted all the same). A 397B-A17B layer
takes ~0.35 s, a 35B-A3B layer ~0.18 s on one CPU core.

Every count comes from the built modules; ``gdn_layer_param_count`` (the formula of
docs/qwen35_moe_facts.md section 3.4, ``conv_dim*(H+K) + 2*value_dim*H + 2*nv*H + 2*nv + dv``)
cross-checks the built Gated DeltaNet mixers. ``total`` is HF's module count (MTP excluded: it is
not part of HF's ``Qwen3_5MoeForConditionalGeneration`` either).

``representative_layers=True`` builds one layer per distinct layer kind (token mixer x MLP kind)
instead of all of them, and counts every layer as its kind's built layer. This is exact because
layers of one kind are structurally identical; the tests check it against the full build.

Keys of the returned dict (ints):

========================== ==========================================================================
total                      language + vision (HF ``Qwen3_5MoeForConditionalGeneration``)
vision                     vision tower incl. merger (built; equals ``vision_param_count``)
language                   the text model incl. lm_head
linear_attention           Gated DeltaNet token mixers (built; equal to the formula)
full_attention             full-attention token mixers
all_full_attention_total   what the model would count with every layer full attention (the facts
                           sheet's comparison figure)
embedding, output_layer    word embedding, untied lm_head (0 when tied)
final_norm, layer_norms    final norm; the 2 norms per layer (both layer kinds have them)
routed_experts             all routed experts of all MoE layers
per_expert                 one routed expert (3*I*H for SwiGLU)
routers                    all router weights
shared_experts             shared experts + their sigmoid gates
dense_mlps                 MLPs of dense (non-MoE) layers
active_language            language minus, per MoE layer, (E - top_k) routed experts
active                     active_language + vision (every non-routed parameter + top-k experts)
num_layers, num_linear_attention_layers, num_full_attention_layers, layers_built
========================== ==========================================================================
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = ["count_parameters", "gdn_layer_param_count", "format_counts", "GDN_SIZES"]

#: the Qwen3.5 text-config fields that size a Gated DeltaNet mixer
GDN_SIZES = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
             "linear_num_value_heads")


def gdn_layer_param_count(hidden_size: int, gdn: dict) -> int:
    """Parameters of one Gated DeltaNet token mixer (HF ``linear_attn``), facts section 3.4."""
    k_conv = gdn["linear_conv_kernel_dim"]
    nk, dk = gdn["linear_num_key_heads"], gdn["linear_key_head_dim"]
    nv, dv = gdn["linear_num_value_heads"], gdn["linear_value_head_dim"]
    key_dim, value_dim = nk * dk, nv * dv
    conv_dim = 2 * key_dim + value_dim
    return (
        conv_dim * hidden_size  # in_proj_qkv
        + conv_dim * k_conv  # conv1d (depthwise, no bias)
        + value_dim * hidden_size  # in_proj_z
        + 2 * nv * hidden_size  # in_proj_b, in_proj_a
        + 2 * nv  # dt_bias, A_log
        + dv  # norm (RMSNormGated over one value head)
        + hidden_size * value_dim  # out_proj
    )


def _numel(module: Optional[torch.nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_parameters(variant: str, *, representative_layers: bool = False) -> dict[str, int]:
    """Parameter counts of ``variant`` (see the module docstring), from our model built on meta.

    Builds under the initialised megatron ``parallel_state`` when it has a model-parallel size of 1
    everywhere; without an initialised parallel state it runs in a fresh one-rank process (gloo,
    ``_count_in_fresh_process``), so the caller's process is left as it was. Sharded layouts are
    refused: local shards would be counted.
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        sizes = dict(
            tp=ps.get_tensor_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_world_size(),
            cp=ps.get_context_parallel_world_size(),
            ep=ps.get_expert_model_parallel_world_size(),
            etp=ps.get_expert_tensor_parallel_world_size(),
        )
        if any(v != 1 for v in sizes.values()):
            raise ValueError(f"count_parameters needs an unsharded layout (all sizes 1), got {sizes}")
        return _count_here(variant, representative_layers)
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_count_in_fresh_process, variant, representative_layers).result()


def _count_in_fresh_process(variant: str, representative_layers: bool) -> dict[str, int]:
    """One rank of a one-process gloo group with megatron's parallel state (CPU runtime on CPU)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron.mcore_ext import cpu_runtime
    from megatron.mcore_ext.netutil import free_port

    cpu_runtime.apply()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    try:
        return _count_here(variant, representative_layers)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _count_here(variant: str, representative_layers: bool) -> dict[str, int]:
    from multimodal_dev.models.base import MultimodalModel
    from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant
    from multimodal_dev.models.qwen35_vl.model import build_qwen35_language_model
    from multimodal_dev.models.qwen35_vl.vision import Qwen35VisionTower, vision_param_count

    text_cfg, vision_cfg, tokens = configs_for_variant(variant)
    L = text_cfg.num_hidden_layers
    kinds_of = list(zip(text_cfg.layer_types, text_cfg.moe_layer_pattern))  # (token mixer, MoE?) per layer
    if representative_layers:
        kinds = list(dict.fromkeys(kinds_of))  # distinct kinds in order of appearance
        rep = [kinds.index(k) for k in kinds_of]
    else:
        kinds, rep = kinds_of, list(range(L))
    n_built = len(kinds)
    build_cfg = dataclasses.replace(text_cfg, num_hidden_layers=n_built, layer_types=[k[0] for k in kinds],
                                    moe_layer_pattern=[k[1] for k in kinds])
    with torch.device("meta"):
        lm = build_qwen35_language_model(build_cfg, perform_initialization=False)
        vision = Qwen35VisionTower(vision_cfg) if lm.pre_process else None
    model = MultimodalModel(lm, vision, image_token_id=tokens["image_token_id"], mrope=True)
    gdn_own_device = (".self_attention.conv1d.weight", ".self_attention.dt_bias", ".self_attention.A_log")
    stray = sorted(n for n, p in model.named_parameters() if p.device.type != "meta" and not n.endswith(gdn_own_device))
    if stray:
        raise RuntimeError(f"count_parameters: parameters allocated off the meta device: {stray[:5]}")
    built_total = sum(p.numel() for p in model.parameters())

    layers = lm.decoder.layers
    if len(layers) != n_built:
        raise RuntimeError(f"built {len(layers)} layers, expected {n_built}")
    per_layer, mixer, norms, experts, one_expert, routers, shared, dense = ([] for _ in range(8))
    for layer in layers:
        per_layer.append(_numel(layer))
        mixer.append(_numel(layer.self_attention))
        norms.append(_numel(layer.input_layernorm) + _numel(layer.pre_mlp_layernorm))
        mlp = layer.mlp
        if hasattr(mlp, "router"):  # MoELayer
            experts.append(_numel(mlp.experts))
            one_expert.append(_numel(mlp.experts.local_experts[0]))
            routers.append(_numel(mlp.router))
            shared.append(_numel(getattr(mlp, "shared_experts", None)))
            dense.append(0)
        else:
            for group in (experts, one_expert, routers, shared):
                group.append(0)
            dense.append(_numel(mlp))
        # every parameter of a layer is in exactly one of these groups
        if per_layer[-1] != mixer[-1] + norms[-1] + experts[-1] + routers[-1] + shared[-1] + dense[-1]:
            raise RuntimeError("count_parameters: a layer has parameters outside the known groups")

    embedding = _numel(lm.embedding) if lm.pre_process else 0
    output_layer = _numel(lm.output_layer) if lm.post_process and not lm.share_embeddings_and_output_weights else 0
    final_norm = _numel(lm.decoder.final_layernorm) if getattr(lm.decoder, "final_layernorm", None) else 0
    n_vision = _numel(vision)
    if embedding + output_layer + final_norm + sum(per_layer) + n_vision != built_total:
        raise RuntimeError("count_parameters: the model has parameters outside the known groups")
    if vision is not None and n_vision != vision_param_count(vision_cfg):
        raise RuntimeError(f"vision tower: built {n_vision} != formula {vision_param_count(vision_cfg)}")

    def over_layers(values, which=range(L)):
        return sum(values[rep[i]] for i in which)

    linear = [i for i in range(L) if text_cfg.layer_types[i] == "linear_attention"]
    full_idx = [i for i in range(L) if i not in linear]
    gdn = {k: getattr(text_cfg, k) for k in GDN_SIZES}
    for i in linear:
        if mixer[rep[i]] != gdn_layer_param_count(text_cfg.hidden_size, gdn):
            raise RuntimeError(f"layer {i}: built Gated DeltaNet {mixer[rep[i]]} != formula "
                               f"{gdn_layer_param_count(text_cfg.hidden_size, gdn)}")
    language = embedding + output_layer + final_norm + over_layers(per_layer)
    inactive = sum((text_cfg.num_experts - text_cfg.num_experts_per_tok) * one_expert[rep[i]]
                   for i in range(L) if text_cfg.moe_layer_pattern[i])
    full_mixer = mixer[rep[full_idx[0]]] if full_idx else 0
    linear_attention = over_layers(mixer, linear)
    return dict(
        total=language + n_vision,
        vision=n_vision,
        language=language,
        linear_attention=linear_attention,
        full_attention=over_layers(mixer, full_idx),
        all_full_attention_total=language + n_vision - linear_attention + len(linear) * full_mixer,
        embedding=embedding,
        output_layer=output_layer,
        final_norm=final_norm,
        layer_norms=over_layers(norms),
        routed_experts=over_layers(experts),
        per_expert=max(one_expert) if one_expert else 0,
        routers=over_layers(routers),
        shared_experts=over_layers(shared),
        dense_mlps=over_layers(dense),
        active_language=language - inactive,
        active=language - inactive + n_vision,
        num_layers=L,
        num_linear_attention_layers=len(linear),
        num_full_attention_layers=len(full_idx),
        layers_built=n_built,
    )


def format_counts(variant: str, counts: dict[str, int]) -> str:
    lines = [f"{variant}:"]
    for k, v in counts.items():
        lines.append(f"  {k:<26} {v:>17,}" + (f"  ({v / 1e9:.2f} B)" if v >= 1e8 else ""))
    return "\n".join(lines)


if __name__ == "__main__":  # python -m multimodal_dev.models.qwen35_vl.params 35B-A3B ...
    import sys

    from multimodal_dev.models.qwen35_vl.variants import VARIANTS

    for name in sys.argv[1:] or list(VARIANTS):
        print(format_counts(name, count_parameters(name)), flush=True)
