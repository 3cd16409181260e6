"""The ``qwen35_vl`` architecture: Qwen35VisionTower + Qwen35GPTModel inside MultimodalModel."""
from __future__ import annotations

from typing import Optional

import torch

from multimodal_dev.models import register_architecture
from multimodal_dev.models.base import MultimodalModel
from multimodal_dev.models.qwen35_vl.language import Qwen35TextConfig, build_qwen35_language_model
from multimodal_dev.models.qwen35_vl.variants import GDN_FIELDS, get_variant
from multimodal_dev.models.qwen35_vl.vision import Qwen35VisionConfig, Qwen35VisionTower

__all__ = ["build_qwen35_vl", "configs_for_variant"]


def configs_for_variant(variant: str) -> tuple[Qwen35TextConfig, Qwen35VisionConfig, dict]:
    """(text config, vision config, token ids) of a named variant."""
    v = get_variant(variant)
    text = {k: val for k, val in v["text"].items() if k not in GDN_FIELDS}
    tokens = {k: v[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return Qwen35TextConfig(**text), Qwen35VisionConfig(**v["vision"]), tokens


@register_architecture("qwen35_vl")
def build_qwen35_vl(
    variant: str,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    params_dtype: torch.dtype = torch.float32,
    vision_seed: Optional[int] = None,
    **overrides,
) -> MultimodalModel:
    """Build a Qwen3.5-VL-style MoE model under the initialised megatron parallel state.

    The vision tower is replicated on every rank of the first pipeline stage (it is small next to
    the MoE decoder); ``overrides`` go into the decoder's TransformerConfig. ``vision_seed``: draw
    the vision tower's initial weights from a generator of their own (the same in every parallel
    layout), instead of the global one.
    """
    text_cfg, vision_cfg, tokens = configs_for_variant(variant)
    lm = build_qwen35_language_model(
        text_cfg, pre_process=pre_process, post_process=post_process, params_dtype=params_dtype, **overrides
    )
    vision = None
    if lm.pre_process:
        if vision_seed is None:
            vision = Qwen35VisionTower(vision_cfg).to(params_dtype)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(vision_seed)
                vision = Qwen35VisionTower(vision_cfg).to(params_dtype)
    model = MultimodalModel(lm, vision, image_token_id=tokens["image_token_id"], mrope=True)
    model.variant_config = get_variant(variant)  # vision/vocabulary settings for the data pipeline
    return model
