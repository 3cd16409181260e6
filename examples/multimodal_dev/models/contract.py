"""The typed contract between the trainer and an architecture's builder.

The trainer turns its flags into one ``BuildOptions`` and calls ``build_model(arch, variant,
options)`` (``models.registry``); the builder returns a ``MultimodalModel`` (``models.base``),
which answers what training needs through a small interface:

* ``model.config``: the decoder's megatron ``TransformerConfig`` (generic megatron fields only);
* ``model.decoder_layers()``: the language decoder's layers on this pipeline stage (CUDA graphs);
* ``model.data_spec``: a ``DataSpec`` (vocabulary, special token ids, vision patching) for the
  data pipeline;
* ``model.flops_per_batch(batch)``: useful forward + backward FLOPs of a collated batch (MFU);
* ``model(batch, cp_index=..., return_logits=True)``: on the last pipeline stage the output
  layer's vocabulary-parallel logits ``[s_local, b, V/TP]`` instead of the per-token losses
  (knowledge distillation, ``multimodal_dev.distill``: student and teacher alike).

Settings an architecture owns (the MoE coefficients, the router's score function) are ``None``
in the options unless a flag set them; ``None`` means "the architecture's published value". The
builder resolves them into ``model.config``, where the trainer reads and logs what was used.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

__all__ = ["MoEOptions", "RecomputeOptions", "BuildOptions", "DataSpec", "SetupError", "resolve_transformer_impl",
           "transformer_impl_choice", "te_importable"]


class SetupError(ValueError):
    """A flag, configuration or checkpoint that cannot work, found while the run is set up; the
    message names it and what was expected (the trainer prints it and exits 2, no traceback)."""


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    """MoE settings from the flags. ``None`` = the architecture's own value."""

    aux_loss_coeff: Optional[float] = None
    z_loss_coeff: Optional[float] = None
    load_balancing_type: Optional[str] = None  # aux_loss | seq_aux_loss | global_aux_loss | none
    score_function: Optional[str] = None  # softmax | sigmoid
    enable_expert_bias: bool = False
    bias_update_rate: float = 1e-3
    token_dispatcher_type: str = "allgather"

    def config_overrides(self) -> dict[str, Any]:
        """The ``TransformerConfig`` fields these options set (architecture-owned ones only when
        given; ``load_balancing_type="none"`` also zeroes the aux-loss coefficient)."""
        out: dict[str, Any] = dict(
            moe_router_enable_expert_bias=self.enable_expert_bias,
            moe_router_bias_update_rate=self.bias_update_rate,
            moe_token_dispatcher_type=self.token_dispatcher_type,
        )
        if self.load_balancing_type is not None:
            out["moe_router_load_balancing_type"] = self.load_balancing_type
        if self.aux_loss_coeff is not None:
            out["moe_aux_loss_coeff"] = self.aux_loss_coeff
        if self.load_balancing_type == "none":
            out["moe_aux_loss_coeff"] = 0.0
        if self.z_loss_coeff is not None:
            out["moe_z_loss_coeff"] = self.z_loss_coeff
        if self.score_function is not None:
            out["moe_router_score_function"] = self.score_function
        return out


@dataclasses.dataclass(frozen=True)
class RecomputeOptions:
    """Activation recomputation of the language decoder, megatron-core's ``TransformerConfig``
    fields of the same names (the vision encoder is not a megatron block: never recomputed).

    granularity: None (keep every activation), "full" (checkpoint whole decoder layers: their
        forward runs again in the backward) or "selective" (checkpoint the ``modules`` only).
    method / num_layers ("full" only): "uniform" checkpoints chunks of ``num_layers`` layers (the
        input of each chunk is kept), "block" checkpoints the first ``num_layers`` layers of each
        pipeline stage one by one and keeps the rest.
    modules ("selective" only): megatron's ``recompute_modules`` (default ``("core_attn",)``).
    The trainer's flags check the combinations (``arguments``); what applies to a built model is
    checked by ``multimodal_dev.recompute``.
    """

    granularity: Optional[str] = None
    method: Optional[str] = None
    num_layers: Optional[int] = None
    modules: tuple[str, ...] = ("core_attn",)

    def config_overrides(self) -> dict[str, Any]:
        if self.granularity is None:
            return {}
        out: dict[str, Any] = dict(recompute_granularity=self.granularity, recompute_method=self.method,
                                   recompute_num_layers=self.num_layers)
        if self.granularity == "selective":
            out["recompute_modules"] = list(self.modules)
        return out


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Everything a builder may take from the trainer.

    transformer_impl: "local" (pure PyTorch) or "transformer_engine", already resolved
        (``resolve_transformer_impl``).
    grouped_experts / sync_free_dispatch: the routed experts as two grouped GEMMs and, with the
        allgather dispatcher, a device-side sort instead of megatron's host-synchronising
        permutation (``megatron.mcore_ext.experts`` / ``sorted_dispatch``).
    padding_aware_router: ``PaddingAwareTopKRouter`` in every MoE layer (padding excluded from
        every routing statistic); off only for comparisons.
    chunked_lm_loss: the training loss from the LM head in token chunks (``mcore_ext.lm_loss``).
    lm_head_loss_rows: the training loss from the LM head on the positions with loss only
        (``mcore_ext.lm_head_rows``; the same loss and gradients; ``--lm-head-all-positions`` turns it off).
    cross_entropy_fusion: None, or megatron-core's fused LM cross entropy, "native" or "te"
        (``TransformerConfig.cross_entropy_loss_fusion`` / ``cross_entropy_fusion_impl``).
    gdn_kernels: Gated DeltaNet kernels: "fla", "torch" or "auto" (``mcore_ext.gdn``).
    layout_independent_init / seed: every global weight drawn from a generator seeded by its name,
        so every parallel layout starts from the same model.
    bf16, sequence_parallel, variable_seq_lengths: the matching ``TransformerConfig`` fields.
    per_token_loss: megatron's ``calculate_per_token_loss`` (the trainer's loss normalisation:
        every token weighs the same across micro-batches, CP and DP ranks; forward_step).
    cpu_initialization: ``use_cpu_initialization`` (None: the architecture's default).
    recompute: activation recomputation of the decoder (``RecomputeOptions``).
    pre_process / post_process: None = this rank's pipeline stage.
    """

    transformer_impl: str = "local"
    grouped_experts: bool = True
    sync_free_dispatch: bool = True
    padding_aware_router: bool = True
    chunked_lm_loss: bool = False
    lm_head_loss_rows: bool = True
    cross_entropy_fusion: Optional[str] = None
    gdn_kernels: str = "auto"
    layout_independent_init: bool = False
    seed: int = 1234
    bf16: bool = False
    sequence_parallel: bool = False
    variable_seq_lengths: bool = False
    per_token_loss: bool = False
    cpu_initialization: Optional[bool] = None
    moe: MoEOptions = MoEOptions()
    recompute: RecomputeOptions = RecomputeOptions()
    pre_process: Optional[bool] = None
    post_process: Optional[bool] = None

    def __post_init__(self):
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise ValueError(f"BuildOptions.transformer_impl must be 'local' or 'transformer_engine' (resolved), "
                             f"got {self.transformer_impl!r}")

    @property
    def use_te(self) -> bool:
        return self.transformer_impl == "transformer_engine"

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def config_overrides(self, moe: bool = True) -> dict[str, Any]:
        """``TransformerConfig`` fields that come from the trainer (on top of the architecture's);
        ``moe=False``: without the MoE fields (an architecture without MoE layers)."""
        out: dict[str, Any] = dict(
            sequence_parallel=self.sequence_parallel,
            calculate_per_token_loss=self.per_token_loss,
            transformer_impl=self.transformer_impl,
            params_dtype=self.params_dtype,
            pipeline_dtype=self.params_dtype,
            bf16=self.bf16,
        )
        if self.variable_seq_lengths:
            out["variable_seq_lengths"] = True
        if self.cpu_initialization is not None:
            out["use_cpu_initialization"] = self.cpu_initialization
        if self.cross_entropy_fusion is not None:
            out.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl=self.cross_entropy_fusion)
        if moe:
            out.update(self.moe.config_overrides())
        out.update(self.recompute.config_overrides())
        return out


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What the data pipeline must know of a model: its vocabulary, its special tokens and how its
    vision encoder cuts images (a text-only model leaves the vision fields ``None``)."""

    vocab_size: int
    image_token_id: Optional[int] = None
    video_token_id: Optional[int] = None
    vision_start_token_id: Optional[int] = None
    vision_end_token_id: Optional[int] = None
    patch_size: Optional[int] = None
    temporal_patch_size: Optional[int] = None
    spatial_merge_size: Optional[int] = None

    @property
    def has_vision(self) -> bool:
        return self.image_token_id is not None and self.patch_size is not None


def te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def transformer_impl_choice(transformer_impl: str) -> tuple[str, str]:
    """``--transformer-impl`` -> (``"local"`` or ``"transformer_engine"``, why: one log line).

    ``auto`` picks the backend measured faster and proven correct for both row layouts: the local
    one (docs/performance.md, one H200, ``proxy``, 4 samples of up to 4,096 tokens, bf16, side by
    side: local 328 ms/step BSHD and 248 ms THD, TE 360 ms BSHD; TE's fused THD attention backward
    is wrong at Qwen3.5's head_dim 256, see ``mcore_ext.te_attention``). ``transformer_engine``
    stays selectable (and is refused when TE is not importable).
    """
    if transformer_impl not in ("auto", "local", "transformer_engine"):
        raise ValueError(f"--transformer-impl must be auto, local or transformer_engine, got {transformer_impl!r}")
    have_te = te_importable()
    if transformer_impl == "transformer_engine" and not have_te:
        raise ValueError("--transformer-impl transformer_engine: Transformer Engine is not importable here")
    if transformer_impl != "auto":
        return transformer_impl, f"transformer impl: {transformer_impl} (asked for)"
    why = ("Transformer Engine is importable, but the local backend was measured faster (BSHD 328 vs 360 ms/step "
           "for proxy on an H200; docs/performance.md); --transformer-impl transformer_engine selects TE"
           if have_te else "Transformer Engine is not importable")
    return "local", f"transformer impl: local (auto: {why})"


def resolve_transformer_impl(transformer_impl: str) -> str:
    """``--transformer-impl`` resolved (``transformer_impl_choice`` without the reason)."""
    return transformer_impl_choice(transformer_impl)[0]
