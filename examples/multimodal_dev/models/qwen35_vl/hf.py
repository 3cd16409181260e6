"""``qwen35_vl``'s HF checkpoints (``HFSupport``): build from a directory, compare with a variant,
export to HF's layout, and the ``config.json`` of a named variant.

``build_from_hf_dir`` is what ``--hf-checkpoint DIR`` runs: sizes from ``config.json``, each rank's
parameters read in slices from the shards (``hf_weights``). An export (``hf_convert``) gets the
whole model's HF state dict from ``state_to_hf`` (``convert.mcore_to_hf``: HF 5.x's fused expert
tensors) and, for a run that began from a named variant, ``config_for_variant``'s ``config.json``.
"""
from __future__ import annotations

import dataclasses
import logging

from multimodal_dev.models.contract import BuildOptions
from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant
from multimodal_dev.models.qwen35_vl.hf_weights import HF_MODEL_TYPES, Qwen35HFWeights, configs_from_hf_dict
from multimodal_dev.models.qwen35_vl.model import build_from_configs
from multimodal_dev.models.qwen35_vl.variants import get_variant
from multimodal_dev.models.registry import HFSupport, register_hf_support

__all__ = ["build_from_hf_dir", "config_for_variant"]

log = logging.getLogger(__name__)

_ROPE_KEYS = ("rope_theta", "partial_rotary_factor", "mrope_section")


def build_from_hf_dir(directory: str, options: BuildOptions, load_weights: bool = True):
    """The model of an HF checkpoint directory, its local parameters from the shards when
    ``load_weights`` (each rank logs what it read and the most it held at once)."""
    import torch.distributed as dist

    from multimodal_dev.hf_checkpoint import SafetensorsReader, load_sharded, read_hf_config

    text_cfg, vision_cfg, tokens = configs_from_hf_dict(read_hf_config(directory))
    model = build_from_configs(text_cfg, vision_cfg, tokens, options, init_weights=not load_weights)
    if load_weights:
        reader = SafetensorsReader(directory)
        report = load_sharded(model, Qwen35HFWeights(reader, text_cfg).resolve, reader)
        reader.close()
        rank = dist.get_rank() if dist.is_initialized() else 0
        log.info("--hf-checkpoint %s, rank %d: %s", directory, rank, report.describe())
    return model


def _variant_differences(variant: str, config: dict) -> list[str]:
    ours, theirs = configs_for_variant(variant), configs_from_hf_dict(config)
    diff = []
    for what, a, b in zip(("text", "vision"), ours[:2], theirs[:2]):
        diff += [f"{what} {f.name}: variant {getattr(a, f.name)!r}, checkpoint {getattr(b, f.name)!r}"
                 for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    diff += [f"{k}: variant {v!r}, checkpoint {theirs[2][k]!r}" for k, v in ours[2].items() if theirs[2][k] != v]
    return diff


def config_for_variant(variant: str) -> dict:
    """A ``config.json`` (HF ``Qwen3_5MoeConfig``) describing the named variant."""
    v = get_variant(variant)
    text = {k: val for k, val in v["text"].items() if k not in _ROPE_KEYS}
    text["rope_parameters"] = dict(rope_type="default", mrope_interleaved=True, **{k: v["text"][k] for k in _ROPE_KEYS})
    text["model_type"] = "qwen3_5_moe_text"
    out = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": HF_MODEL_TYPES[0],
           "text_config": text, "vision_config": dict(v["vision"], model_type="qwen3_5_moe_vision"),
           "tie_word_embeddings": bool(text.get("tie_word_embeddings", False))}
    out.update({k: v[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})
    return out


def _state_to_hf(model, config: dict) -> dict:
    from multimodal_dev.models.qwen35_vl.convert import mcore_to_hf

    text, vision, _ = configs_from_hf_dict(config)
    return mcore_to_hf(model.state_dict(), text, vision)


register_hf_support("qwen35_vl", HFSupport(model_types=HF_MODEL_TYPES, build=build_from_hf_dir,
                                           variant_differences=_variant_differences, state_to_hf=_state_to_hf,
                                           config_for_variant=config_for_variant))
