"""Command-line arguments of ``pretrain_multimodal.py`` (Megatron-style flag names) -> typed sections.

``parse_args(argv)`` parses, validates and returns one ``RunConfig``: the sections ``model``,
``data``, ``layout`` (``layout.Layout``), ``optimizer``, ``checkpoint`` and ``logging``, built
once; each part of the trainer receives its section, never the argparse namespace. Every check
that can be made from the flags and the world size alone happens here, before any process group
or model exists, and fails with a message that names the flags and what was expected.

Settings an architecture owns (``--moe-aux-loss-coeff``, ``--moe-z-loss-coeff``,
``--moe-router-load-balancing-type``, ``--moe-router-score-function``) default to ``None``: the
architecture's published value (qwen35_vl: aux-loss coefficient 0.001, no z-loss, softmax); the
trainer logs the resolved values at start.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, Optional, Sequence

from multimodal_dev import evaluation, freezing, lm_loss_flags, recompute
from multimodal_dev.distill import args as distill_args
from multimodal_dev.argument_error import ArgumentError
from multimodal_dev.layout import Layout
from multimodal_dev.models.contract import BuildOptions, MoEOptions, RecomputeOptions, resolve_transformer_impl

__all__ = ["build_parser", "parse_args", "ArgumentError", "RunConfig", "ModelArgs", "DataArgs", "OptimizerArgs",
           "CheckpointArgs", "LoggingArgs"]

# ------------------------------------------------------------------------------------------------
# the typed sections
@dataclasses.dataclass(frozen=True)
class ModelArgs:
    arch: str
    variant: Optional[str]  # None with --hf-checkpoint: the sizes come from its config.json
    hf_checkpoint: Optional[str]  # an HF checkpoint directory: the starting weights and the sizes
    transformer_impl: str  # auto | local | transformer_engine (resolved when the model is built)
    plugins: tuple[str, ...]
    grouped_experts: bool
    sync_free_dispatch: bool
    chunked_lm_loss: bool
    lm_head_loss_rows: bool  # False: --lm-head-all-positions
    cross_entropy_fusion: Optional[str]  # None | native | te (multimodal_dev.lm_loss_flags)
    gdn_kernels: str
    layout_independent_init: bool
    padding_mask: bool  # False: --no-padding-mask (comparisons only)
    cuda_graph_layers: bool
    moe: MoEOptions
    recompute: RecomputeOptions  # --recompute-* (multimodal_dev.recompute)
    freeze: tuple[str, ...]  # frozen parts: vision | projector | language (multimodal_dev.freezing)


@dataclasses.dataclass(frozen=True)
class DataArgs:
    provider: str
    data_path: tuple[str, ...]
    tokenizer: Optional[str]
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    seq_length: int  # BSHD: the row length; THD: the longest a sample may be
    packed: bool  # THD
    truncate: bool
    max_bad_samples: int
    row_multiple: int  # THD: rows padded up to a multiple of this (1: none)
    sample_multiple: int = 1  # THD: each packed sample padded to a multiple of this (besides the layout's)
    chat_template: str = "auto"  # "auto" (next to --tokenizer) | "none" (built-in layout) | a template file
    answer_only_loss: bool = True  # False: --no-answer-only-loss, the loss on all text tokens


@dataclasses.dataclass(frozen=True)
class OptimizerArgs:
    lr: float
    min_lr: float
    warmup_iters: int
    decay_style: str
    decay_iters: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    clip_grad: float
    use_distributed_optimizer: bool
    check_grad_buckets: bool  # --check-grad-buckets: megatron's DDP NaN/Inf check per bucket too
    host_grad_norm_check: bool  # --host-grad-norm-check: the grad norm read before the update (grad_norm_check.py)
    override_scheduler: bool  # --override-opt-param-scheduler: the flags win over a checkpoint's schedule
    use_checkpoint_scheduler: bool  # --use-checkpoint-opt-param-scheduler: the checkpoint's schedule wins


@dataclasses.dataclass(frozen=True)
class CheckpointArgs:
    save: Optional[str]
    load: Optional[str]
    load_optional: bool  # --load of a directory without a checkpoint starts from scratch (else an error)
    save_interval: Optional[int]
    exit_after_iters: Optional[int]
    exit_signal_handler: bool  # SIGTERM: finish the iteration, save, exit 0


@dataclasses.dataclass(frozen=True)
class LoggingArgs:
    log_interval: int
    metrics_file: Optional[str]
    tensorboard_dir: Optional[str]
    log_dir: Optional[str]
    progress_bar: bool


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelArgs
    data: DataArgs
    layout: Layout
    optimizer: OptimizerArgs
    checkpoint: CheckpointArgs
    logging: LoggingArgs
    eval: evaluation.EvalArgs  # --eval-* (multimodal_dev.evaluation)
    train_iters: int
    seed: int
    bf16: bool
    distributed_timeout_minutes: float
    distill: distill_args.DistillArgs = distill_args.DistillArgs()  # --distill, --teacher-*, --kd-* (distill/)

    def build_options(self) -> BuildOptions:
        """The trainer's side of the builder contract (``models.contract``)."""
        m = self.model
        return BuildOptions(
            transformer_impl=resolve_transformer_impl(m.transformer_impl),
            grouped_experts=m.grouped_experts,
            sync_free_dispatch=m.sync_free_dispatch,
            chunked_lm_loss=m.chunked_lm_loss,
            lm_head_loss_rows=m.lm_head_loss_rows,
            cross_entropy_fusion=m.cross_entropy_fusion,
            gdn_kernels=m.gdn_kernels,
            layout_independent_init=m.layout_independent_init,
            seed=self.seed,
            bf16=self.bf16,
            sequence_parallel=self.layout.sequence_parallel,
            variable_seq_lengths=self.layout.pp > 1 and self.data.packed,  # packed micro-batches differ
            per_token_loss=True,  # forward_step's loss normalisation
            cpu_initialization=not _cuda_available() or m.layout_independent_init,
            moe=m.moe,
            recompute=m.recompute,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values of every section (saved with each checkpoint)."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_multimodal.py",
        description="Train a mixture-of-experts vision-language model on megatron-core.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model-arch", default="qwen35_vl", help="architecture in the model registry")
    g.add_argument("--variant", default=None, help="the architecture's size (tiny, proxy, 35B-A3B, ...; default: "
                   "tiny, or --hf-checkpoint's config.json)")
    g.add_argument("--hf-checkpoint", default=None, metavar="DIR",
                   help="start from an HF checkpoint directory (config.json + safetensors shards): the sizes come from "
                        "its config.json, each rank reads only its slices of the weights")
    g.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import this module (dotted name or .py file) first; it may register architectures "
                        "and data providers (repeatable)")
    g.add_argument("--transformer-impl", default="auto", choices=["auto", "local", "transformer_engine"],
                   help="auto = the local spec (measured faster than TE; the reason is logged at start); "
                        "transformer_engine = megatron's TE spec with our experts and packed-row pieces")

    g = p.add_argument_group("data")
    g.add_argument("--dataset-provider", default="mock", help="mock | webdataset | a registered provider")
    g.add_argument("--data-path", nargs="*", default=[], help="WebDataset shards (files, dirs or globs)")
    g.add_argument("--tokenizer", default=None,
                   help="a tokenizer.json, or a checkpoint directory holding one with its tokenizer_config.json "
                        "and chat template (default: --hf-checkpoint's if it has one, else the small one shipped); "
                        "docs/data.md")
    g.add_argument("--chat-template", default="auto",
                   help="auto: the chat template next to --tokenizer (else the built-in Qwen ChatML layout); "
                        "none: the built-in layout; or a .jinja / chat_template.json / tokenizer_config.json file")
    g.add_argument("--answer-only-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="loss on the assistant's answers only (SFT, default); --no-answer-only-loss: on every "
                        "text token (never on image or vision start/end tokens)")
    g.add_argument("--micro-batch-size", type=int, default=2, help="samples per micro-batch and DP rank")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per iteration over all DP ranks (default: micro-batch-size x DP)")
    g.add_argument("--seq-length", type=int, default=256,
                   help="BSHD: the padded row length; THD: the longest a single sample may be")
    g.add_argument("--use-packed-sequence", action="store_true", help="THD: pack each micro-batch in one row")
    g.add_argument("--truncate", action="store_true", help="cut samples longer than --seq-length (counted)")
    g.add_argument("--max-bad-samples", type=int, default=100,
                   help="skipped corrupt shards/samples allowed before it is an error (-1: no limit)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over DP (needs a GPU: megatron-core's distributed optimizer assumes CUDA tensors)")
    g.add_argument("--check-grad-buckets", action="store_true", help="also megatron's DDP NaN/Inf check of each "
                   "gradient bucket, naming rank and bucket (host syncs; a non-finite grad norm stops the run anyway)")
    g.add_argument("--host-grad-norm-check", action="store_true", help="read the grad norm before the update (a sync)")
    g.add_argument("--moe-token-dispatcher-type", default="allgather", choices=["allgather", "alltoall"])
    g.add_argument("--no-grouped-experts", action="store_true",
                   help="run the routed experts with megatron's SequentialMLP loop instead of two grouped "
                        "GEMMs (torch._grouped_mm; same parameters and checkpoints)")
    g.add_argument("--no-sync-free-dispatch", action="store_true",
                   help="with the grouped experts and the allgather dispatcher: permute tokens with "
                        "megatron's dispatcher (reads the per-expert counts to the host every MoE layer) "
                        "instead of our fixed-shape device-side sort (megatron.mcore_ext.sorted_dispatch)")
    g.add_argument("--cuda-graph-layers", action="store_true",
                   help="THD on a GPU: replay each language decoder layer's forward and backward from a CUDA "
                        "graph, one per packed-row length (megatron.mcore_ext.layer_graphs); rows are padded "
                        "up to --thd-row-multiple so that there are few lengths. Needs TP=CP=EP=PP=1 and bf16")
    g.add_argument("--thd-row-multiple", type=int, default=None,
                   help="THD: pad each packed row up to a multiple of this many tokens, as a padding segment "
                        "of its own (default: 1024 with --cuda-graph-layers, else 1: no row padding)")
    g.add_argument("--thd-sample-multiple", type=int, default=None,
                   help="THD: pad each packed sample to a multiple of this many tokens, besides what the layout "
                        "needs (default: 64, fla's chunk, with --cuda-graph-layers (for Gated DeltaNet layers), else 1)")
    lm_loss_flags.add_arguments(g)  # --chunked-lm-loss, --lm-head-all-positions, --cross-entropy-loss-fusion(-impl)
    g.add_argument("--gdn-kernels", default="auto", choices=["auto", "fla", "torch"],
                   help="Gated DeltaNet kernels: flash-linear-attention (GPU) or our pure-PyTorch ones; auto = "
                        "fla when it imports and a GPU is present")

    g = p.add_argument_group("MoE (None = the architecture's value)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None, help="default: the architecture's (qwen35_vl: 0.001)")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None, help="default: the architecture's (qwen35_vl: none)")
    g.add_argument("--moe-router-load-balancing-type", default=None,
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"],
                   help="default: the architecture's (qwen35_vl: aux_loss)")
    g.add_argument("--moe-router-score-function", default=None, choices=["softmax", "sigmoid"],
                   help="default: the architecture's (qwen35_vl: softmax)")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free balancing; needs --moe-router-score-function sigmoid")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--no-padding-mask", action="store_true",
                   help="do not give the padding mask to the model (for comparisons: padding then "
                        "dilutes the router statistics, as in an unfixed stack)")

    recompute.add_arguments(p)
    freezing.add_arguments(p)
    g = p.add_argument_group("training")
    g.add_argument("--train-iters", type=int, default=20)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine"])
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--layout-independent-init", action="store_true",
                   help="draw each global weight from a generator seeded by its name, so every parallel "
                        "layout starts from the same model (layout comparisons, functional tests)")

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="resume from the latest complete checkpoint here")
    g.add_argument("--load-optional", action="store_true",
                   help="with --load: a directory that does not exist starts the run from scratch instead of "
                        "being an error (an existing directory without a checkpoint always does)")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (SLURM's preemption / time-limit warning): finish the current iteration, save "
                        "to --save and exit 0")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="a collective that waits longer than this ends the job with an error (a hung or dead peer)")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on --load, take the learning-rate schedule from the flags, not from the checkpoint")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on --load, take the learning-rate schedule from the checkpoint, not from the flags")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--metrics-file", default=None, help="JSONL: one object per iteration (rank 0)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-dir", default=None, help="where ranks other than 0 write their logs")
    g.add_argument("--no-progress-bar", action="store_true")
    g.add_argument("--exit-after-iters", type=int, default=None,
                   help="stop (as if killed) after this many iterations of this run, without a final save")
    evaluation.add_arguments(p)
    distill_args.add_arguments(p)
    return p


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_positive(**flags) -> None:
    for flag, v in flags.items():
        if v is not None and v < 1:
            raise ArgumentError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")


def _layout(a: argparse.Namespace, world_size: int) -> Layout:
    try:
        return Layout(world_size=world_size, tp=a.tensor_model_parallel_size, pp=a.pipeline_model_parallel_size,
                      cp=a.context_parallel_size, ep=a.expert_model_parallel_size,
                      etp=a.expert_tensor_parallel_size, sequence_parallel=a.sequence_parallel)
    except ValueError as e:
        raise ArgumentError(str(e)) from None


def _data(a: argparse.Namespace, layout: Layout) -> DataArgs:
    _check_positive(micro_batch_size=a.micro_batch_size, seq_length=a.seq_length)
    dp = layout.dp
    gbs = a.global_batch_size if a.global_batch_size is not None else a.micro_batch_size * dp
    if gbs % (a.micro_batch_size * dp) or gbs < 1:
        raise ArgumentError(f"--global-batch-size {gbs} must be a multiple of --micro-batch-size x "
                            f"data-parallel size = {a.micro_batch_size}x{dp}")
    if a.dataset_provider == "webdataset" and not a.data_path:
        raise ArgumentError("--dataset-provider webdataset needs --data-path (tar shards, dirs or globs)")
    if a.dataset_provider == "mock" and a.data_path:
        raise ArgumentError("--dataset-provider mock takes no --data-path (did you mean webdataset?)")
    mult = layout.seq_multiple
    why = "(2 x --context-parallel-size, and CP x TP with --sequence-parallel)"
    if a.seq_length % mult:
        raise ArgumentError(f"--seq-length {a.seq_length} must be a multiple of {mult} {why}")
    row_multiple = a.thd_row_multiple if a.thd_row_multiple is not None else (1024 if a.cuda_graph_layers else 1)
    sample_multiple = a.thd_sample_multiple if a.thd_sample_multiple is not None else (64 if a.cuda_graph_layers else 1)
    for flag, v in (("--thd-row-multiple", row_multiple), ("--thd-sample-multiple", sample_multiple)):
        if v < 1:
            raise ArgumentError(f"{flag} must be >= 1, got {v}")
        if v > 1 and not a.use_packed_sequence:
            raise ArgumentError(f"{flag} applies to packed rows: it needs --use-packed-sequence")
    if sample_multiple > 1:
        mult, why = math.lcm(mult, sample_multiple), f"{why[:-1]}, and --thd-sample-multiple {sample_multiple})"
    if row_multiple > 1 and row_multiple % mult:
        raise ArgumentError(f"--thd-row-multiple {row_multiple} must be a multiple of {mult} {why}")
    from multimodal_dev.data.tokenizer import tokenizer_from_flags
    try:  # --tokenizer (default: --hf-checkpoint's tokenizer.json, if any) and --chat-template exist
        tokenizer = tokenizer_from_flags(a.tokenizer, a.chat_template, a.hf_checkpoint)
    except OSError as e:
        raise ArgumentError(str(e)) from e
    return DataArgs(provider=a.dataset_provider, data_path=tuple(a.data_path), tokenizer=tokenizer,
                    micro_batch_size=a.micro_batch_size, global_batch_size=gbs,
                    num_microbatches=gbs // (a.micro_batch_size * dp), seq_length=a.seq_length,
                    packed=a.use_packed_sequence, truncate=a.truncate, max_bad_samples=a.max_bad_samples,
                    row_multiple=row_multiple, sample_multiple=sample_multiple, chat_template=a.chat_template,
                    answer_only_loss=a.answer_only_loss)


def _model(a: argparse.Namespace, layout: Layout) -> ModelArgs:
    if layout.tp > 1 and not layout.sequence_parallel:
        # megatron-core refuses MoE with TP but without SP during training (see MoELayer)
        raise ArgumentError("--tensor-model-parallel-size > 1 with MoE layers needs --sequence-parallel "
                            "(megatron-core 0.19.2 does not train MoE under TP without it)")
    if layout.pp > 1 and a.use_packed_sequence and a.moe_token_dispatcher_type == "allgather":
        raise ArgumentError(
            "--pipeline-model-parallel-size > 1 with --use-packed-sequence sends micro-batches of varying "
            "length between stages, which megatron-core's allgather dispatcher refuses: use "
            "--moe-token-dispatcher-type alltoall"
        )
    if a.moe_router_enable_expert_bias and a.moe_router_score_function != "sigmoid":
        raise ArgumentError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid "
                            "(megatron-core's expert bias is defined for sigmoid scores)")
    if a.cuda_graph_layers:
        if not a.use_packed_sequence:
            raise ArgumentError("--cuda-graph-layers needs --use-packed-sequence (it graphs THD rows)")
        from megatron.mcore_ext.layer_graphs import layout_problems

        problems = layout_problems(tp=layout.tp, cp=layout.cp, ep=layout.ep, pp=layout.pp,
                                   cuda=_cuda_available(), half=a.bf16)
        if problems:
            raise ArgumentError("--cuda-graph-layers " + "; ".join(problems))
    moe = MoEOptions(aux_loss_coeff=a.moe_aux_loss_coeff, z_loss_coeff=a.moe_z_loss_coeff,
                     load_balancing_type=a.moe_router_load_balancing_type,
                     score_function=a.moe_router_score_function, enable_expert_bias=a.moe_router_enable_expert_bias,
                     bias_update_rate=a.moe_router_bias_update_rate, token_dispatcher_type=a.moe_token_dispatcher_type)
    if a.hf_checkpoint and a.layout_independent_init:
        raise ArgumentError("--layout-independent-init draws random weights; --hf-checkpoint gives them: use one")
    variant = a.variant if a.variant is not None or a.hf_checkpoint else "tiny"
    return ModelArgs(arch=a.model_arch, variant=variant, hf_checkpoint=a.hf_checkpoint,
                     transformer_impl=a.transformer_impl, gdn_kernels=a.gdn_kernels,
                     plugins=tuple(a.plugin), grouped_experts=not a.no_grouped_experts,
                     sync_free_dispatch=not a.no_sync_free_dispatch, **lm_loss_flags.model_options(a),
                     layout_independent_init=a.layout_independent_init, padding_mask=not a.no_padding_mask,
                     cuda_graph_layers=a.cuda_graph_layers, moe=moe, recompute=recompute.options_from_flags(a),
                     freeze=freezing.parts_from_flags(a))


def _optimizer(a: argparse.Namespace) -> OptimizerArgs:
    decay_iters = a.lr_decay_iters if a.lr_decay_iters is not None else a.train_iters
    if a.lr_warmup_iters >= max(decay_iters, 1) and a.lr_decay_style != "constant":
        raise ArgumentError(f"--lr-warmup-iters {a.lr_warmup_iters} must be < --lr-decay-iters {decay_iters}")
    if a.min_lr > a.lr:
        raise ArgumentError(f"--min-lr {a.min_lr} must not exceed --lr {a.lr}")
    if a.use_distributed_optimizer and not _cuda_available():
        raise ArgumentError("--use-distributed-optimizer needs a GPU: megatron-core 0.19.2's distributed optimizer "
                            "only accepts torch.cuda tensors (the plain optimizer is used on CPU)")
    if a.override_opt_param_scheduler and a.use_checkpoint_opt_param_scheduler:
        raise ArgumentError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
    return OptimizerArgs(lr=a.lr, min_lr=a.min_lr, warmup_iters=a.lr_warmup_iters, decay_style=a.lr_decay_style,
                         decay_iters=decay_iters, weight_decay=a.weight_decay, adam_beta1=a.adam_beta1,
                         adam_beta2=a.adam_beta2, clip_grad=a.clip_grad, use_distributed_optimizer=a.use_distributed_optimizer,
                         check_grad_buckets=a.check_grad_buckets, host_grad_norm_check=a.host_grad_norm_check,
                         override_scheduler=a.override_opt_param_scheduler, use_checkpoint_scheduler=a.use_checkpoint_opt_param_scheduler)


def _checkpoint(a: argparse.Namespace) -> CheckpointArgs:
    if a.save_interval is not None:
        if a.save is None:
            raise ArgumentError("--save-interval needs --save (a checkpoint directory)")
        _check_positive(save_interval=a.save_interval)
    _check_positive(exit_after_iters=a.exit_after_iters)
    if a.load_optional and not a.load:
        raise ArgumentError("--load-optional needs --load (the directory to resume from when it holds a checkpoint)")
    if a.exit_signal_handler and not a.save:
        raise ArgumentError("--exit-signal-handler needs --save (where the checkpoint on exit goes)")
    return CheckpointArgs(save=a.save, load=a.load, load_optional=a.load_optional, save_interval=a.save_interval,
                          exit_after_iters=a.exit_after_iters, exit_signal_handler=a.exit_signal_handler)


def validate_args(a: argparse.Namespace, world_size: Optional[int] = None) -> RunConfig:
    """Check the flags against each other and the world size; build the typed sections once."""
    ws = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    _check_positive(train_iters=a.train_iters, log_interval=a.log_interval)
    if a.distributed_timeout_minutes <= 0:
        raise ArgumentError(f"--distributed-timeout-minutes must be > 0, got {a.distributed_timeout_minutes}")
    layout = _layout(a, ws)
    if a.bf16 and not _cuda_available():
        raise ArgumentError("--bf16 needs a GPU (CPU runs are fp32)")
    return RunConfig(
        model=_model(a, layout),
        data=_data(a, layout),
        layout=layout,
        optimizer=_optimizer(a),
        checkpoint=_checkpoint(a),
        eval=evaluation.args_from_flags(a),
        logging=LoggingArgs(log_interval=a.log_interval, metrics_file=a.metrics_file,
                            tensorboard_dir=a.tensorboard_dir, log_dir=a.log_dir, progress_bar=not a.no_progress_bar),
        train_iters=a.train_iters,
        seed=a.seed,
        bf16=a.bf16,
        distributed_timeout_minutes=a.distributed_timeout_minutes,
        distill=distill_args.args_from_flags(a),
    )


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> RunConfig:
    return validate_args(build_parser().parse_args(argv), world_size)
