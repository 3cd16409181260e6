"""State-dict conversion: HF ``Qwen3_5MoeForConditionalGeneration`` <-> our ``MultimodalModel``.

``hf_to_mcore`` / ``mcore_to_hf`` combine the two halves' converters:

==================================== ========================================================
HF key prefix                         ``MultimodalModel`` key prefix (converter)
==================================== ========================================================
``model.language_model.*``,           ``language_model.*`` (``language_state_from_hf`` /
``lm_head.weight``                    ``language_state_to_hf``, convert_language.py)
``model.visual.*``                    ``vision_encoder.*`` (``vision_state_from_hf`` /
                                      ``vision_state_to_hf``, vision.py)
``mtp.*`` (published checkpoints)     dropped, as HF itself does (``_keys_to_ignore_on_load_unexpected``)
==================================== ========================================================

Both directions are pure re-layouts (no arithmetic), so they are exact inverses of each other.

Megatron ``_extra_state`` entries: megatron-core's local ``ColumnParallelLinear`` /
``RowParallelLinear`` carry an ``_extra_state`` (``None``) and register a load pre-hook that adds it
when it is missing, so ``hf_to_mcore``'s output loads with ``strict=True`` as it is. Modules whose
extra state is real (Transformer Engine layers: FP8 metadata) need theirs: pass the model's own
``state_dict()`` as ``template`` and its ``_extra_state`` entries are carried over (the weights'
keys are then also checked against the model's). ``mcore_to_hf`` drops ``_extra_state`` entries.

Scope: full, unsharded state dicts (TP = PP = EP = 1, the whole model in one dict). Sharded
checkpoints go through megatron's ``sharded_state_dict`` / ``dist_checkpointing``: convert a
full state dict here, load it into a TP=1 model (or shard it with
``megatron.mcore_ext.sharding.load_global_tensors``) and save with ``dist_checkpointing``, which
reshards on load. Gated DeltaNet (``linear_attention``) layers convert like the others (see
``convert_language._gdn_from_hf``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from multimodal_dev.models.qwen35_vl.configuration import Qwen35TextConfig, configs_from_hf
from multimodal_dev.models.qwen35_vl.convert_language import (
    HF_HEAD,
    HF_LM_PREFIX,
    language_state_from_hf,
    language_state_to_hf,
)
from multimodal_dev.models.qwen35_vl.vision import (
    HF_VISUAL_PREFIX,
    Qwen35VisionConfig,
    vision_state_from_hf,
    vision_state_to_hf,
)

__all__ = ["hf_to_mcore", "mcore_to_hf", "configs_from_hf", "language_state_from_hf", "language_state_to_hf",
           "LM_PREFIX", "VISION_PREFIX", "HF_LM_PREFIX"]

LM_PREFIX = "language_model."
VISION_PREFIX = "vision_encoder."
_HF_IGNORED_PREFIXES = ("mtp.",)
_EXTRA = "_extra_state"


def _text_cfg(cfg) -> Optional[Qwen35TextConfig]:
    if cfg is None or isinstance(cfg, Qwen35TextConfig):
        return cfg
    return Qwen35TextConfig.from_hf(cfg)  # an HF text config or its dict


def _vision_cfg(cfg) -> Optional[Qwen35VisionConfig]:
    if cfg is None or isinstance(cfg, Qwen35VisionConfig):
        return cfg
    return Qwen35VisionConfig.from_hf(cfg)


def _is_extra(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == _EXTRA


def hf_to_mcore(
    hf_state_dict: Mapping[str, torch.Tensor],
    text_cfg: Optional[Any] = None,
    vision_cfg: Optional[Any] = None,
    template: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """HF ``Qwen3_5MoeForConditionalGeneration`` state dict -> ``MultimodalModel`` state dict (TP = 1).

    ``text_cfg``: a ``Qwen35TextConfig`` (or an HF text config / dict); without it the sizes are
    read off the tensors. ``vision_cfg`` is accepted for symmetry (the HF -> ours direction needs
    no vision sizes: the Conv3d kernel is flattened).

    Every key must be a language key (``model.language_model.*``, ``lm_head.weight``), a vision key
    (``model.visual.*``) or ``mtp.*`` (ignored); anything else is an error. Without vision keys no
    ``vision_encoder.*`` entries are produced (a text-only model or a later pipeline stage).

    ``template``: the target model's own ``state_dict()``. Its ``_extra_state`` entries are copied
    into the result and the result's other keys must be exactly the template's (shapes too). The
    result then equals what ``model.state_dict()`` returns after loading.
    """
    del vision_cfg  # not needed in this direction
    unknown = [
        k for k in hf_state_dict
        if not (k.startswith(HF_LM_PREFIX) or k == HF_HEAD or k.startswith(HF_VISUAL_PREFIX)
                or k.startswith(_HF_IGNORED_PREFIXES))
    ]
    if unknown:
        raise KeyError(f"hf_to_mcore: keys that are neither language, vision nor mtp: {unknown[:10]} "
                       f"({len(unknown)} in all)")
    out: dict[str, Any] = {}
    lm = language_state_from_hf(hf_state_dict, _text_cfg(text_cfg))
    out.update({LM_PREFIX + k: v for k, v in lm.items()})
    if any(k.startswith(HF_VISUAL_PREFIX) for k in hf_state_dict):
        vis = vision_state_from_hf(hf_state_dict, prefix=HF_VISUAL_PREFIX)
        out.update({VISION_PREFIX + k: v for k, v in vis.items()})
    if template is None:
        return out

    want = {k: v for k, v in template.items() if not _is_extra(k)}
    missing, unexpected = sorted(set(want) - set(out)), sorted(set(out) - set(want))
    if missing or unexpected:
        raise KeyError(f"hf_to_mcore: the converted keys differ from the template's: missing "
                       f"{missing[:10]} ({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
    bad = [(k, tuple(out[k].shape), tuple(v.shape)) for k, v in want.items()
           if isinstance(v, torch.Tensor) and tuple(out[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"hf_to_mcore: shapes differ from the template's (key, converted, template): {bad[:10]}")
    # the template's order, extra states included
    return {k: (template[k] if _is_extra(k) else out[k]) for k in template}


def mcore_to_hf(
    state_dict: Mapping[str, Any],
    text_cfg: Optional[Any] = None,
    vision_cfg: Optional[Any] = None,
    fused_experts: bool = True,
) -> dict[str, torch.Tensor]:
    """``MultimodalModel`` state dict (TP = 1) -> HF ``Qwen3_5MoeForConditionalGeneration`` keys.

    Inverse of ``hf_to_mcore``; the result loads into the HF model with ``strict=True``.
    ``_extra_state`` entries are dropped; any other key outside ``language_model.*`` /
    ``vision_encoder.*`` is an error. ``vision_cfg`` gives the Conv3d kernel shape ``(C, T, P, P)``
    of the patch embedding (without it ``C=3, T=2`` are assumed and ``P`` is inferred).
    ``fused_experts``: HF 5.23's fused ``experts.gate_up_proj`` / ``experts.down_proj`` (default)
    or per-expert ``experts.{e}.{gate,up,down}_proj.weight`` (both load with ``from_pretrained``).
    """
    lm, vis, unknown = {}, {}, []
    for k, v in state_dict.items():
        if _is_extra(k):
            continue
        if k.startswith(LM_PREFIX):
            lm[k[len(LM_PREFIX):]] = v
        elif k.startswith(VISION_PREFIX):
            vis[k[len(VISION_PREFIX):]] = v
        else:
            unknown.append(k)
    if unknown:
        raise KeyError(f"mcore_to_hf: keys outside {LM_PREFIX}* / {VISION_PREFIX}*: {unknown[:10]} "
                       f"({len(unknown)} in all)")
    out: dict[str, torch.Tensor] = {}
    if vis:
        out.update(vision_state_to_hf(vis, cfg=_vision_cfg(vision_cfg), prefix=HF_VISUAL_PREFIX))
    out.update(language_state_to_hf(lm, _text_cfg(text_cfg), fused_experts=fused_experts))
    return out
