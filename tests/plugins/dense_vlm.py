"""A second architecture that lives outside the package: a small dense (no MoE) text + vision model.

Registered as ``dense_vlm_test`` when imported (``pretrain_multimodal.py --plugin
tests/plugins/dense_vlm.py --model-arch dense_vlm_test --variant small``). It proves the plug-in
path: the trainer, forward_step, the arguments and the data pipeline know nothing of it. What it
supplies is what the contract asks (``models.contract``): a builder ``(variant, BuildOptions) ->
MultimodalModel`` whose decoder spec comes from the architecture-agnostic ``models.spec``, a
``DataSpec`` and a FLOP count.

The vision encoder is one linear map of each ``merge x merge`` block of patches (the data
pipeline orders a block's patches consecutively), i.e. the smallest thing that makes images
matter; the decoder is a 2-layer GPT with rotary positions and a SwiGLU MLP.
"""
from __future__ import annotations

import torch

from megatron.core import parallel_state as ps
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron.mcore_ext.spec import LOCAL_SPEC_CONFIG
from multimodal_dev.models import BuildOptions, DataSpec, MultimodalModel, register_architecture
from multimodal_dev.models.spec import decoder_block_spec

VARIANTS = {"small": dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64)}
DATA = DataSpec(vocab_size=256, image_token_id=250, video_token_id=251, vision_start_token_id=248,
                vision_end_token_id=249, patch_size=4, temporal_patch_size=2, spatial_merge_size=2)


class BlockPatchEncoder(torch.nn.Module):
    """[n_patches, C*T*P*P] in merge-block order -> [n_patches / merge^2, hidden]."""

    def __init__(self, patch_dim: int, merge: int, hidden: int):
        super().__init__()
        self.group = merge * merge
        self.proj = torch.nn.Linear(self.group * patch_dim, hidden)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.proj.weight.dtype)
        return self.proj(x.reshape(-1, self.group * x.shape[-1]))


@register_architecture("dense_vlm_test", variants=lambda: sorted(VARIANTS))
def build(variant: str, options: BuildOptions) -> MultimodalModel:
    if variant not in VARIANTS:
        raise ValueError(f"--variant {variant!r} is unknown for dense_vlm_test; available: {sorted(VARIANTS)}")
    sizes = VARIANTS[variant]
    overrides = options.config_overrides(moe=False)  # no MoE layers: the MoE flags mean nothing here
    config = TransformerConfig(
        **sizes,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        **{**LOCAL_SPEC_CONFIG, **overrides},
    )
    lm = GPTModel(
        config,
        decoder_block_spec(config, options),
        vocab_size=DATA.vocab_size,
        max_sequence_length=4096,
        position_embedding_type="rope",
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        scatter_embedding_sequence_parallel=False,
    )
    patch_dim = 3 * DATA.temporal_patch_size * DATA.patch_size ** 2
    vision = BlockPatchEncoder(patch_dim, DATA.spatial_merge_size, sizes["hidden_size"]) if lm.pre_process else None
    n_params = sum(p.numel() for p in lm.parameters())

    def flops(batch) -> float:  # 6 FLOPs per parameter and real token (forward + backward)
        return 6.0 * n_params * int((~batch["padding_mask"]).sum())

    return MultimodalModel(lm, vision, image_token_id=DATA.image_token_id, data_spec=DATA, flops_fn=flops)
