"""The ``qwen35_vl`` architecture: ``Qwen35VisionTower`` + ``Qwen35GPTModel`` inside ``MultimodalModel``.

``build_qwen35_vl(variant, options)`` is the registered builder: the variant's configs
(``configuration.py``), the decoder block spec from the architecture-agnostic ``models.spec``,
the language model, the vision tower (replicated on every rank of the first pipeline stage: it is
small next to the MoE decoder), the ``DataSpec`` and the FLOP count (``flops.py``). Its parts for
``--freeze-*``: "vision" = the tower without its merger, "projector" = the 2x2 patch merger
(``vision.merger``, which projects to the LM hidden size), "language" = the language model.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Optional

import torch

from megatron.core.models.gpt.gpt_model import GPTModel

from megatron.mcore_ext.packed_seq import padded_boundaries

from multimodal_dev.models.base import MultimodalModel
from multimodal_dev.models.contract import BuildOptions
from multimodal_dev.models.qwen35_vl.configuration import Qwen35TextConfig, configs_for_variant, data_spec
from multimodal_dev.models.qwen35_vl.flops import model_flops_per_step
from multimodal_dev.models.qwen35_vl.rope import InterleavedMRoPE, packed_freqs_for_cp
from multimodal_dev.models.qwen35_vl.variants import VARIANTS
from multimodal_dev.models.qwen35_vl.vision import Qwen35VisionConfig, Qwen35VisionTower
from multimodal_dev.models.registry import register_architecture

__all__ = ["Qwen35GPTModel", "build_qwen35_language_model", "build_qwen35_vl", "build_from_configs"]

_log = logging.getLogger(__name__)


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

    With labels, ``loss_mask`` and ``lm_head_loss_rows``, the LM head and its cross entropy run on
    the positions that carry loss only (``megatron.mcore_ext.lm_head_rows``: the same [b, s] loss,
    0 elsewhere), given the collate's host count of them as ``output_processor_context={"loss_rows":
    int}``; with ``chunked_lm_loss`` they run in token chunks (``megatron.mcore_ext.lm_loss``: no
    [tokens, vocab] logits in memory), also on the loss rows only; without labels the logits come
    back as ever.
    """

    def __init__(self, config, transformer_layer_spec, *, mrope_section, chunked_lm_loss: bool = False,
                 lm_head_loss_rows: bool = True, **kwargs):
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
        self.lm_head_loss_rows = bool(lm_head_loss_rows)
        self._loss_rows_logged = False

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels", args[4] if len(args) > 4 else None)  # GPTModel.forward's 5th
        if labels is not None and kwargs.get("output_processor") is None and not self.config.use_mup:
            # (MuP scales the logits: megatron's path)
            rows = self._loss_rows_bound(kwargs)
            if rows is not None:
                kwargs["output_processor"] = functools.partial(self._loss_rows, rows)
            elif self.chunked_lm_loss:
                kwargs["output_processor"] = self._chunked_loss
        return super().forward(*args, **kwargs)

    def _loss_rows_bound(self, kwargs) -> Optional[int]:
        """The host bound on the loss positions when the LM head runs on those rows only, else None;
        the first call with ``lm_head_loss_rows`` on logs which, and why not."""
        if not self.lm_head_loss_rows or not self.post_process or kwargs.get("loss_mask") is None:
            return None
        context = kwargs.get("output_processor_context")
        bound = context.get("loss_rows") if isinstance(context, dict) else None
        why = None if bound is not None else "no host count of the loss positions (the batch has no 'loss_tokens')"
        if not self._loss_rows_logged:
            self._loss_rows_logged = True
            if why is None:
                n = kwargs["loss_mask"].numel()
                _log.info("LM head: on the positions with loss only (the first micro-batch: at most %d of %d on this "
                          "rank; --lm-head-all-positions: on every position)", min(int(bound), n), n)
            else:
                _log.info("LM head: on every position, not only those with loss: %s", why)
        return int(bound) if why is None else None

    def _loss_rows(self, bound, *, hidden_states, output_layer, output_weight, labels, loss_mask,
                   compute_language_model_loss, **unused):
        from megatron.mcore_ext.lm_head_rows import loss_rows_lm_loss

        return loss_rows_lm_loss(hidden_states, labels, loss_mask, bound, output_layer=output_layer,
                                 output_weight=output_weight, compute_language_model_loss=compute_language_model_loss,
                                 chunked=self.chunked_lm_loss)

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
                _, cu = padded_boundaries(packed_seq_params)  # on the host (the collate's copy when there)
                rot = packed_freqs_for_cp(rot, cu, cp_size, cp_group.rank())
                out = (out[0], rot, *out[2:])
        return out


def build_qwen35_language_model(
    text_cfg: Qwen35TextConfig,
    options: Optional[BuildOptions] = None,
    *,
    parallel_output: bool = True,
    vp_stage: Optional[int] = None,
    **config_overrides,
) -> Qwen35GPTModel:
    """The Qwen3.5 text decoder as a megatron-core GPTModel, under an initialised ``parallel_state``.

    ``options`` (default ``BuildOptions()``: local spec, grouped experts, padding-aware router)
    choose the implementation and give the trainer's config fields; ``config_overrides`` win over
    both (tests, e.g. ``perform_initialization=False``). The embedding does not scatter to
    sequence parallelism (``MultimodalModel`` does it after merging the image embeddings).
    """
    from megatron.core import parallel_state as ps

    from multimodal_dev.models.spec import decoder_block_spec

    options = options if options is not None else BuildOptions()
    config = text_cfg.to_transformer_config(**{**options.config_overrides(), **config_overrides})
    spec = decoder_block_spec(config, options, vp_stage=vp_stage)
    pre = options.pre_process if options.pre_process is not None else ps.is_pipeline_first_stage()
    post = options.post_process if options.post_process is not None else ps.is_pipeline_last_stage()
    return Qwen35GPTModel(
        config,
        spec,
        mrope_section=text_cfg.mrope_section,
        chunked_lm_loss=options.chunked_lm_loss,
        lm_head_loss_rows=options.lm_head_loss_rows,
        pre_process=pre,
        post_process=post,
        parallel_output=parallel_output,
        scatter_embedding_sequence_parallel=False,
        vp_stage=vp_stage,
        **text_cfg.gpt_model_kwargs(),
    )


def build_from_configs(text_cfg: Qwen35TextConfig, vision_cfg: Qwen35VisionConfig, tokens: dict,
                       options: BuildOptions, init_weights: bool = True) -> MultimodalModel:
    """The whole model from its configs (a named variant or an HF ``config.json``).
    ``init_weights=False``: the decoder's weights are left uninitialised (megatron's
    ``perform_initialization=False``), for weights that are loaded next."""
    lm = build_qwen35_language_model(text_cfg, options, **({} if init_weights else {"perform_initialization": False}))
    vision = None
    if lm.pre_process:
        # layout-independent init: the vision tower's weights from a generator of their own (the
        # same in every parallel layout), not from the global one
        rng = contextlib.nullcontext()
        if options.layout_independent_init:
            rng = torch.random.fork_rng(devices=[])
        with rng:
            if options.layout_independent_init:
                torch.manual_seed(options.seed + 1)
            vision = Qwen35VisionTower(vision_cfg).to(options.params_dtype)
    return MultimodalModel(
        lm, vision, image_token_id=tokens["image_token_id"], mrope=True,
        data_spec=data_spec(text_cfg, vision_cfg, tokens),
        flops_fn=functools.partial(model_flops_per_step, text_cfg, vision_cfg),
        projector=vision.merger if vision is not None else None,  # the 2x2 patch merger (--freeze-projector)
    )


@register_architecture("qwen35_vl", variants=lambda: sorted(VARIANTS))
def build_qwen35_vl(variant: str, options: BuildOptions) -> MultimodalModel:
    """A named Qwen3.5-VL-style MoE variant (``variants.py``)."""
    text_cfg, vision_cfg, tokens = configs_for_variant(variant)
    return build_from_configs(text_cfg, vision_cfg, tokens, options)
