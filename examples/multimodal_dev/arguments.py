"""Command-line arguments of ``pretrain_multimodal.py`` (Megatron-style flag names).

``parse_args(argv)`` parses and validates. Every check that can be made from the flags and the
world size alone happens in ``validate_args``, before any process group or model exists, and fails
with a message that names the flags and what was expected.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence

__all__ = ["build_parser", "parse_args", "validate_args", "ArgumentError"]


class ArgumentError(ValueError):
    """A flag, or a combination of flags, that cannot work."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_multimodal.py",
        description="Train a mixture-of-experts vision-language model on megatron-core.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model-arch", default="qwen35_vl", help="architecture in the model registry")
    g.add_argument("--variant", default="tiny", help="size of the architecture (tiny, proxy, 35B-A3B, ...)")
    g.add_argument("--transformer-impl", default="auto", choices=["auto", "local", "transformer_engine"],
                   help="auto = Transformer Engine when importable, else the pure-PyTorch local spec")

    g = p.add_argument_group("data")
    g.add_argument("--dataset-provider", default="mock", help="mock | webdataset")
    g.add_argument("--data-path", nargs="*", default=[], help="WebDataset shards (files, dirs or globs)")
    g.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the one shipped)")
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
                   help="shard optimizer state over DP (needs a GPU: megatron-core's distributed "
                        "optimizer assumes CUDA tensors)")
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
                        "up to --thd-row-multiple so that there are few lengths. Needs TP=CP=EP=PP=1, no "
                        "dropout, no overlapped gradient reduction")
    g.add_argument("--thd-row-multiple", type=int, default=None,
                   help="THD: pad each packed row up to a multiple of this many tokens, as a padding segment "
                        "of its own (default: 1024 with --cuda-graph-layers, else 1: no row padding)")
    g.add_argument("--chunked-lm-loss", action="store_true",
                   help="compute the training loss from the LM head in token chunks (megatron.mcore_ext."
                        "lm_loss) instead of from full [tokens, vocab] logits with megatron's vocab-parallel "
                        "cross entropy: less memory (measured on proxy, 1 H100: -2.2 GiB THD, -4.3 GiB "
                        "BSHD), one more LM-head GEMM per step")

    g = p.add_argument_group("MoE")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"])
    g.add_argument("--moe-router-score-function", default=None, choices=["softmax", "sigmoid"],
                   help="default: the architecture's (qwen35_vl: softmax)")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free balancing; needs --moe-router-score-function sigmoid")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--no-padding-mask", action="store_true",
                   help="do not give the padding mask to the model (for comparisons: padding then "
                        "dilutes the router statistics, as in an unfixed stack)")

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
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--metrics-file", default=None, help="JSONL: one object per iteration (rank 0)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-dir", default=None, help="where ranks other than 0 write their logs")
    g.add_argument("--no-progress-bar", action="store_true")
    g.add_argument("--exit-after-iters", type=int, default=None,
                   help="stop (as if killed) after this many iterations of this run, without a final save")
    return p


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Check the flags against each other and the world size; fill derived values."""
    ws = _world_size() if world_size is None else world_size
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    ep = args.expert_model_parallel_size
    etp = args.expert_tensor_parallel_size if args.expert_tensor_parallel_size is not None else tp
    for flag, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                    ("--context-parallel-size", cp), ("--expert-model-parallel-size", ep),
                    ("--expert-tensor-parallel-size", etp), ("--micro-batch-size", args.micro_batch_size),
                    ("--seq-length", args.seq_length), ("--train-iters", args.train_iters),
                    ("--log-interval", args.log_interval)):
        if v < 1:
            raise ArgumentError(f"{flag} must be >= 1, got {v}")
    if ws % (tp * pp * cp):
        raise ArgumentError(
            f"world size {ws} is not divisible by --tensor-model-parallel-size x "
            f"--pipeline-model-parallel-size x --context-parallel-size = {tp}x{pp}x{cp}"
        )
    dp = ws // (tp * pp * cp)
    if ws % (etp * ep * pp):
        raise ArgumentError(
            f"world size {ws} is not divisible by --expert-tensor-parallel-size x "
            f"--expert-model-parallel-size x --pipeline-model-parallel-size = {etp}x{ep}x{pp}"
        )
    args.data_parallel_size = dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of --micro-batch-size x "
            f"data-parallel size = {args.micro_batch_size}x{dp}"
        )
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)

    if args.sequence_parallel and tp == 1:
        raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if tp > 1 and not args.sequence_parallel:
        # megatron-core refuses MoE with TP but without SP during training (see MoELayer)
        raise ArgumentError(
            "--tensor-model-parallel-size > 1 with MoE layers needs --sequence-parallel "
            "(megatron-core 0.19.2 does not train MoE under TP without it)"
        )
    if pp > 1 and args.use_packed_sequence and args.moe_token_dispatcher_type == "allgather":
        raise ArgumentError(
            "--pipeline-model-parallel-size > 1 with --use-packed-sequence sends micro-batches of varying "
            "length between stages, which megatron-core's allgather dispatcher refuses: use "
            "--moe-token-dispatcher-type alltoall"
        )
    if args.moe_router_enable_expert_bias and args.moe_router_score_function != "sigmoid":
        raise ArgumentError(
            "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (megatron-core's "
            "expert bias is defined for sigmoid scores)"
        )
    if args.dataset_provider == "webdataset" and not args.data_path:
        raise ArgumentError("--dataset-provider webdataset needs --data-path (tar shards, dirs or globs)")
    if args.dataset_provider == "mock" and args.data_path:
        raise ArgumentError("--dataset-provider mock takes no --data-path (did you mean webdataset?)")
    if args.save_interval is not None:
        if args.save is None:
            raise ArgumentError("--save-interval needs --save (a checkpoint directory)")
        if args.save_interval < 1:
            raise ArgumentError(f"--save-interval must be >= 1, got {args.save_interval}")
    if args.exit_after_iters is not None and args.exit_after_iters < 1:
        raise ArgumentError(f"--exit-after-iters must be >= 1, got {args.exit_after_iters}")
    if args.use_distributed_optimizer and not _cuda_available():
        raise ArgumentError(
            "--use-distributed-optimizer needs a GPU: megatron-core 0.19.2's distributed optimizer "
            "only accepts torch.cuda tensors (the plain optimizer is used on CPU)"
        )
    if args.bf16 and not _cuda_available():
        raise ArgumentError("--bf16 needs a GPU (CPU runs are fp32)")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters >= max(args.lr_decay_iters, 1) and args.lr_decay_style != "constant":
        raise ArgumentError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be < --lr-decay-iters {args.lr_decay_iters}"
        )
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} must not exceed --lr {args.lr}")
    # The multiple every THD sample / BSHD row must have (zigzag CP halves, SP scatter).
    mult = 1
    if cp > 1:
        mult = math.lcm(mult, 2 * cp)
    if args.sequence_parallel:
        mult = math.lcm(mult, cp * tp)
    args.seq_multiple = mult
    if args.seq_length % mult:
        raise ArgumentError(
            f"--seq-length {args.seq_length} must be a multiple of {mult} "
            f"(2 x --context-parallel-size, and CP x TP with --sequence-parallel)"
        )
    if args.cuda_graph_layers:
        if not args.use_packed_sequence:
            raise ArgumentError("--cuda-graph-layers needs --use-packed-sequence (it graphs THD rows)")
        from megatron.mcore_ext.layer_graphs import layout_problems

        problems = layout_problems(tp=args.tensor_model_parallel_size, cp=args.context_parallel_size,
                                   ep=args.expert_model_parallel_size, pp=args.pipeline_model_parallel_size,
                                   cuda=_cuda_available(), half=args.bf16)
        if problems:
            raise ArgumentError("--cuda-graph-layers " + "; ".join(problems))
    if args.thd_row_multiple is None:
        args.thd_row_multiple = 1024 if args.cuda_graph_layers else 1
    if args.thd_row_multiple < 1:
        raise ArgumentError(f"--thd-row-multiple must be >= 1, got {args.thd_row_multiple}")
    if args.thd_row_multiple > 1 and not args.use_packed_sequence:
        raise ArgumentError("--thd-row-multiple applies to packed rows: it needs --use-packed-sequence")
    if args.thd_row_multiple > 1 and args.thd_row_multiple % mult:
        raise ArgumentError(
            f"--thd-row-multiple {args.thd_row_multiple} must be a multiple of {mult} "
            f"(2 x --context-parallel-size, and CP x TP with --sequence-parallel)"
        )
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    return validate_args(args, world_size)
