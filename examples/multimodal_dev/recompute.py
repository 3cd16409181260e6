"""Activation recomputation of the language decoder: ``--recompute-granularity``, ``--recompute-method``,
``--recompute-num-layers``, ``--recompute-modules``, with megatron-core's meanings.

The flags become a ``models.contract.RecomputeOptions``; the builder contract puts it into the
decoder's ``TransformerConfig`` (``BuildOptions.config_overrides``: ``recompute_granularity``,
``recompute_method``, ``recompute_num_layers``, ``recompute_modules``) and megatron-core 0.19.2's
own modules recompute (the vision encoder is not a megatron block and keeps its activations):

* full: ``TransformerBlock`` runs its layers through ``tensor_parallel.checkpoint``
  (``CheckpointFunction``): the forward runs under ``torch.no_grad()`` and keeps only the chunk's
  inputs; the backward restores the RNG states, runs the chunk's forward again with gradients on
  and back-propagates through that re-run. uniform: chunks of N layers over the stage; block: the
  first N layers of each pipeline stage one by one, the others keep their activations.
* selective (every layer): ``core_attn`` -- each ``Attention``'s core attention (ours, local or
  TE; ``CheckpointFunction``); ``layernorm`` -- the input and pre-MLP norms that are modules of
  their own (``CheckpointWithoutOutput``: the output is freed and recomputed by a hook in the
  backward); ``mlp`` -- dense MLPs; ``moe`` -- the whole MoE layer (router, dispatch, experts,
  shared experts); ``shared_experts``; ``gdn_norm_out`` -- the Gated DeltaNet output norm.

Counted once. What our router counts -- routing diagnostics, the expert-bias token counts
(``local_tokens_per_expert``), the aux- and z-loss values in megatron's tracker, global_aux_loss's
running counts -- it counts only with gradients on (diagnostics also in eval mode): in a
checkpointed region that is the re-run, never the first pass (``megatron.mcore_ext.router``;
megatron's ``TopKRouter`` keeps its expert-bias counts the same way), so the counts equal those of
a run without recomputation. Both passes route identically, so the forward's outputs and the
re-run's graph agree (tests/unit/test_recompute.py compares losses, gradients and every count).

Refused, because it would silently do nothing or go wrong:

* ``moe_act``: megatron recomputes the expert activation only inside Transformer Engine's
  grouped-GEMM experts (``TEGroupedMLP``); our experts never look at it;
* a module that affects no layer of the built model (``check_applies``: ``mlp`` in an all-MoE model,
  ``gdn_norm_out`` without Gated DeltaNet layers, ``mla_up_proj`` without MLA, ...);
* ``--cuda-graph-layers``: a graphed layer replays the forward and backward captured once, with
  their activations in the graph's memory pool; megatron's checkpoint is skipped while a graph is
  captured (``layer_graphs`` refuses recomputation too);
* pipeline parallelism with packed sequences and seq_aux_loss, when the router is re-run: the
  router's per-sample ids are set per forward (``PaddingAwareTopKRouter.set_sequence_ids``) and the
  1F1B schedule runs later micro-batches' forwards before an earlier one's backward re-run.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from multimodal_dev.argument_error import ArgumentError
from multimodal_dev.models.contract import RecomputeOptions, SetupError

__all__ = ["MODULES", "add_arguments", "options_from_flags", "check_applies"]

#: megatron-core 0.19.2's recompute_modules (transformer_config.py), all accepted by the flag
MODULES = ("core_attn", "layernorm", "mlp", "moe", "shared_experts", "gdn_norm_out", "moe_act", "mla_up_proj")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("activation recomputation (megatron-core's meanings; the language decoder only)")
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"],
                   help="recompute activations in the backward instead of keeping them: full = whole decoder "
                        "layers (needs --recompute-method and --recompute-num-layers), selective = the "
                        "--recompute-modules parts of every layer")
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"],
                   help="full: uniform = checkpoint chunks of --recompute-num-layers layers; block = checkpoint "
                        "only the first --recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="full: layers per chunk (uniform) or layers recomputed per pipeline stage (block)")
    g.add_argument("--recompute-modules", nargs="+", default=None, choices=MODULES, metavar="MODULE",
                   help="selective: what to recompute in each layer (default core_attn), of: " + ", ".join(MODULES))


def options_from_flags(a: argparse.Namespace) -> RecomputeOptions:
    """The checked flags (``ArgumentError`` names the flags of a combination that cannot work)."""
    gran, method, n, modules = (a.recompute_granularity, a.recompute_method, a.recompute_num_layers,
                                a.recompute_modules)
    if gran is None:
        given = [f for f, v in (("--recompute-method", method), ("--recompute-num-layers", n),
                                ("--recompute-modules", modules)) if v is not None]
        if given:
            raise ArgumentError(f"{', '.join(given)} need --recompute-granularity (full or selective)")
        return RecomputeOptions()
    if getattr(a, "cuda_graph_layers", False):
        raise ArgumentError("--recompute-granularity with --cuda-graph-layers: a graphed layer replays the forward "
                            "and backward captured once, its activations in the graph's memory pool; megatron-core "
                            "does not recompute inside a captured graph. Use one of the two")
    if n is not None and n < 1:
        raise ArgumentError(f"--recompute-num-layers must be >= 1, got {n}")
    if gran == "full":
        if method is None or n is None:
            raise ArgumentError("--recompute-granularity full needs --recompute-method (uniform or block) and "
                                "--recompute-num-layers N (megatron-core has no default for either)")
        if modules is not None:
            raise ArgumentError("--recompute-modules applies to --recompute-granularity selective (full recomputes "
                                "whole layers)")
        return RecomputeOptions(granularity=gran, method=method, num_layers=n)
    if method is not None or n is not None:
        raise ArgumentError("--recompute-method and --recompute-num-layers apply to --recompute-granularity full "
                            "(selective recomputes the --recompute-modules parts of every layer)")
    modules = tuple(dict.fromkeys(modules or ("core_attn",)))
    if "moe_act" in modules:
        raise ArgumentError("--recompute-modules moe_act: megatron-core recomputes the expert activation only in "
                            "Transformer Engine's grouped-GEMM experts (TEGroupedMLP); this trainer's experts "
                            "would ignore it (use moe to recompute the whole MoE layer)")
    return RecomputeOptions(granularity=gran, modules=modules)


def _applies(model) -> dict[str, bool]:
    """Which selective modules change something in this rank's part of ``model`` (the flags
    megatron-core's modules derive from ``recompute_modules`` when they are built)."""
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    found = dict.fromkeys(MODULES, False)
    for m in model.modules():
        if isinstance(m, Attention) and m.checkpoint_core_attention:
            found["core_attn"] = True
        if isinstance(m, TransformerLayer):
            found["layernorm"] |= bool(m.recompute_input_layernorm or m.recompute_pre_mlp_layernorm)
            found["mlp"] |= bool(m.recompute_mlp)
        if isinstance(m, MoELayer):
            found["moe"] |= bool(m.moe_layer_recompute)
            found["shared_experts"] |= bool(m.shared_experts_recompute and m.use_shared_expert
                                            and not m.shared_expert_overlap)
        found["gdn_norm_out"] |= bool(getattr(m, "recompute_norm_out", False))
        found["mla_up_proj"] |= bool(getattr(m, "recompute_up_proj", False))
    return found


def check_applies(model, options: RecomputeOptions, *, packed: bool, pipeline_parallel: int) -> None:
    """After the build, on every rank (collective when selective): refuse recomputation that
    would do nothing or go wrong in this model (module docstring)."""
    config = model.config
    if options.granularity is None:
        return
    reruns_router = options.granularity == "full" or "moe" in options.modules
    lb_type = config.moe_router_load_balancing_type or ""
    if reruns_router and pipeline_parallel > 1 and packed and config.num_moe_experts and "seq_aux_loss" in lb_type:
        raise SetupError("--recompute-granularity with --pipeline-model-parallel-size > 1, --use-packed-sequence and "
                         "seq_aux_loss: the re-run router would see a later micro-batch's packed-sample ids "
                         "(set per forward); recompute selectively without moe, or use another load balancing")
    if options.granularity != "selective":
        return
    found = _applies(model)
    hit = torch.tensor([float(found[m]) for m in options.modules])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(hit, op=dist.ReduceOp.MAX)  # a pipeline stage may lack what another has
    idle = [m for m, h in zip(options.modules, hit.tolist()) if not h]
    if idle:
        raise SetupError(f"--recompute-modules {' '.join(idle)}: affects no layer of this model (e.g. mlp needs "
                         "dense MLP layers, gdn_norm_out Gated DeltaNet layers, shared_experts shared experts), "
                         "so it would do nothing; drop it")
