"""The training loop, built from megatron-core parts (``megatron.training`` asserts CUDA).

One visible place for each concern:

* ``initialize``: process group (NCCL on GPU, gloo on CPU after ``cpu_runtime.apply()``), megatron
  parallel state, seeds, per-rank logging;
* ``build_model_and_optimizer``: the registry's model, megatron-core's DDP wrapper,
  ``get_megatron_optimizer`` (distributed optimizer on request, GPU only), ``OptimizerParamScheduler``;
* ``MicroBatchStream``: this data-parallel rank's micro-batches, resumable;
* ``train``: ``get_forward_backward_func`` over the micro-batches of an iteration (gradient
  accumulation), gradient clipping inside the optimizer step, metrics, checkpoints.

Loss normalisation: ``calculate_per_token_loss=True``. ``loss_func`` returns the masked loss sum
and its token count; megatron-core's schedule sums the counts over micro-batches and
``finalize_model_grads`` divides all gradients by the count summed over DP x CP. The MoE
auxiliary losses follow the same convention (see ``megatron.mcore_ext.router``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("multimodal_dev.training")

__all__ = ["initialize", "build_model_and_optimizer", "MicroBatchStream", "train", "main"]


# ------------------------------------------------------------------------------------------------
# initialisation
def _setup_logging(args, rank: int) -> None:
    fmt = "%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"

    class _RankFilter(logging.Filter):
        def filter(self, record):
            record.rank = rank
            return True

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if rank == 0:
        h: logging.Handler = logging.StreamHandler(sys.stderr)
    else:  # other ranks log to files (or only their warnings to stderr when no --log-dir)
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            h = logging.FileHandler(os.path.join(args.log_dir, f"rank{rank:05d}.log"))
        else:
            h = logging.StreamHandler(sys.stderr)
            h.setLevel(logging.WARNING)
    h.setFormatter(logging.Formatter(fmt))
    h.addFilter(_RankFilter())
    root.addHandler(h)
    root.setLevel(logging.INFO)
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # known, harmless notices of megatron-core 0.19.2 that would repeat in every run
    for quiet in ("megatron.core.rerun_state_machine", "megatron.core.models.gpt.gpt_model",
                  "megatron.core.dist_checkpointing.strategies.torch"):
        logging.getLogger(quiet).setLevel(logging.ERROR)


def initialize(args) -> bool:
    """Start the process group and megatron's parallel state. Returns True on CPU."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron.mcore_ext import cpu_runtime
    from megatron.mcore_ext.netutil import free_port

    on_cpu = cpu_runtime.apply()
    from megatron.mcore_ext import fallbacks

    fallbacks.apply()  # foreach grad-norm / scale where megatron would loop per tensor (no apex/TE)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python pretrain_multimodal.py`: one process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("gloo" if on_cpu else "nccl")
    _setup_logging(args, dist.get_rank())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    if on_cpu:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    return on_cpu


# ------------------------------------------------------------------------------------------------
# model, DDP, optimizer, scheduler
def model_overrides(args) -> dict:
    """TransformerConfig fields that come from the flags."""
    on_gpu = torch.cuda.is_available()
    lbl = args.moe_router_load_balancing_type
    o = dict(
        sequence_parallel=args.sequence_parallel,
        moe_router_load_balancing_type=lbl,
        moe_aux_loss_coeff=0.0 if lbl == "none" else args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu or args.layout_independent_init,
        transformer_impl=args.transformer_impl,
        grouped_experts=not getattr(args, "no_grouped_experts", False),
        sync_free_dispatch=not getattr(args, "no_sync_free_dispatch", False),
        chunked_lm_loss=getattr(args, "chunked_lm_loss", False),
    )
    if args.moe_router_score_function is not None:
        o["moe_router_score_function"] = args.moe_router_score_function
    if args.bf16:
        o.update(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    else:
        o.update(pipeline_dtype=torch.float32)
    if args.pipeline_model_parallel_size > 1 and args.use_packed_sequence:
        o["variable_seq_lengths"] = True  # packed micro-batches differ in length
    return o


def build_model_and_optimizer(args):
    """The DDP-wrapped model, its optimizer and scheduler (and the unwrapped model)."""
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core import parallel_state as ps

    from megatron.mcore_ext.ddp import BatchedGradDDP

    from multimodal_dev.models import build_model

    overrides = model_overrides(args)
    transformer_impl = overrides.pop("transformer_impl")
    grouped_experts = overrides.pop("grouped_experts")
    sync_free_dispatch = overrides.pop("sync_free_dispatch")
    chunked_lm_loss = overrides.pop("chunked_lm_loss")
    params_dtype = overrides.pop("params_dtype", torch.float32)
    model = build_model(
        args.model_arch,
        args.variant,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        params_dtype=params_dtype,
        vision_seed=args.seed + 1 if args.layout_independent_init else None,
        transformer_impl=transformer_impl,
        grouped_experts=grouped_experts,
        sync_free_dispatch=sync_free_dispatch,
        chunked_lm_loss=chunked_lm_loss,
        **overrides,
    )
    if args.layout_independent_init:
        from megatron.mcore_ext.sharding import layout_independent_init

        layout_independent_init(model, args.seed, include=lambda n: not n.startswith("vision_encoder."))
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    # megatron's DDP, with the per-parameter gradient hooks batched into one foreach add per
    # backward where nothing waits on them (megatron/mcore_ext/ddp.py)
    ddp = BatchedGradDDP(config=config, ddp_config=ddp_config, module=model)
    # where nothing waits on DDP's per-parameter hooks, the grouped experts' stacked gradient goes
    # into main_grad and the per-expert AccumulateGrad nodes and hooks are skipped (experts.py)
    from megatron.mcore_ext.experts import GroupedGemmSequentialMLP

    for m in model.modules():
        if isinstance(m, GroupedGemmSequentialMLP):
            m.skip_param_grad_hooks = all(ddp.hook_optional(p) for p in m.parameters())
    if getattr(args, "cuda_graph_layers", False):
        from megatron.mcore_ext.layer_graphs import LayerGraphs, check_layer_graphs_supported

        check_layer_graphs_supported(config)
        decoder = model.language_model.decoder
        model.layer_graphs = LayerGraphs(decoder.layers)  # graphs are captured per row length, lazily
        log.info("cuda graphs: %d decoder layers, THD rows padded to multiples of %d tokens",
                 len(decoder.layers), args.thd_row_multiple)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    log.info("optimizer: fused AdamW kernel for %d parameter groups", _use_fused_adam(optimizer))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_iters else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
    # as megatron.training does: the schedules call these
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddp, model, optimizer, scheduler


def _use_fused_adam(optimizer) -> int:
    """Switch megatron's torch (Adam)W to its fused kernel (one launch for all parameters).

    Without TE/apex, megatron-core 0.19.2 builds ``torch.optim.AdamW`` with torch's default
    (``foreach``) implementation and offers no switch; the fused one is the same update in one
    kernel (CUDA, and CPU in recent torch). Set before the first step, so the optimizer state is
    created for it. Returns the number of parameter groups switched.
    """
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    n = 0
    for opt in inner:
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, (torch.optim.AdamW, torch.optim.Adam)) or "fused" not in torch_opt.defaults:
            continue
        for group in torch_opt.param_groups:
            params = group["params"]
            if params and all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in params):
                group["fused"], group["foreach"] = True, False
                n += 1
        torch_opt._step_supports_amp_scaling = True  # what torch sets when built with fused=True
    return n


# ------------------------------------------------------------------------------------------------
# data
class MicroBatchStream:
    """This data-parallel rank's micro-batches, iteration by iteration, resumable.

    ``global_order=True`` (the mock provider): every rank reads the one global sample stream and
    keeps its block of each global batch: DP rank r of D gets samples ``[r*G/D, (r+1)*G/D)`` of
    global batch i. The micro-batches are then the same whatever the DP size (a DP=2 run sees
    exactly the micro-batches a DP=1 run with 2 micro-batches sees), which makes parallel layouts
    comparable. ``global_order=False`` (WebDataset): each DP rank reads its own shards (what
    large runs need: no rank reads every sample).
    """

    def __init__(self, provider, collate_config, args, dp_rank: int, dp_size: int, global_order: bool,
                 state: Optional[dict] = None):
        self.provider = provider
        self.collate_config = collate_config
        self.global_order = global_order
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.mbs, self.gbs, self.n_mb = args.micro_batch_size, args.global_batch_size, args.num_microbatches
        # samples longer than --seq-length are skipped (counted) unless --truncate cuts them
        self.max_tokens = None if args.truncate else args.seq_length
        self._open(state)

    def _open(self, state):
        r, d = (0, 1) if self.global_order else (self.dp_rank, self.dp_size)
        self._it = self.provider.samples(r, d, state=state, max_tokens=self.max_tokens)

    @property
    def stats(self) -> dict:
        return dict(self._it.stats)

    def state_dict(self):
        return self._it.state_dict()

    def skip_iterations(self, n: int) -> None:
        """Fast-forward ``n`` iterations (when no per-rank data position could be restored)."""
        per_iter = self.gbs if self.global_order else self.gbs // self.dp_size
        for _ in range(n * per_iter):
            next(self._it)

    def next_iteration(self) -> list[dict]:
        from multimodal_dev.data.collate import pack_or_pad_batch

        per_rank = self.gbs // self.dp_size
        if self.global_order:
            samples = [next(self._it) for _ in range(self.gbs)]
            samples = samples[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        else:
            samples = [next(self._it) for _ in range(per_rank)]
        return [
            pack_or_pad_batch(samples[i * self.mbs:(i + 1) * self.mbs], self.collate_config)
            for i in range(self.n_mb)
        ]


def build_data(args, model) -> tuple[Any, Any]:
    """(provider, CollateConfig) for this run; the vision and vocabulary settings come from the
    model's variant (``MultimodalModel.variant_config``)."""
    from multimodal_dev.data.providers import DataConfig, build_provider

    if args.dataset_provider not in ("mock", "webdataset"):
        from multimodal_dev.data.providers import available_providers

        if args.dataset_provider not in available_providers():
            raise ValueError(f"--dataset-provider {args.dataset_provider!r} is unknown; available: "
                             f"{available_providers()}")
    cfg = DataConfig.from_variant(
        model.variant_config,
        provider=args.dataset_provider,
        data_path=list(args.data_path),
        seed=args.seed,
        tokenizer_path=args.tokenizer,
        max_bad_samples=args.max_bad_samples,
    )
    provider = build_provider(cfg)
    collate = provider.collate_config(
        layout="thd" if args.use_packed_sequence else "bshd",
        target_seqlen=args.seq_length,
        divisible_by=args.seq_multiple,
        truncate=args.truncate,
        row_multiple=getattr(args, "thd_row_multiple", 1) if args.use_packed_sequence else 1,
    )
    return provider, collate


def unigram_baseline(provider_config, num_samples: int = 512, max_tokens: Optional[int] = None) -> float:
    """Entropy (nats per token) of the trained-on tokens' unigram distribution over the first
    ``num_samples`` samples: the loss of a model that ignores its inputs and predicts token
    frequencies. A model that learns from the images and the text goes well below it."""
    import numpy as np

    from multimodal_dev.data.providers import build_provider

    it = build_provider(provider_config).samples(0, 1, max_tokens=max_tokens)
    counts: dict[int, int] = {}
    for _ in range(num_samples):
        lab = np.asarray(next(it)["labels"])
        vals, cnt = np.unique(lab[lab != -100], return_counts=True)
        for v, c in zip(vals.tolist(), cnt.tolist()):
            counts[v] = counts.get(v, 0) + c
    c = np.array(list(counts.values()), dtype=np.float64)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------------
# metrics
class IterationStats:
    """Token counts of the micro-batches this rank ran (from the collate's stats)."""

    def __init__(self):
        self.tokens = 0
        self.padding = 0

    def hook(self, batch):
        st = batch.get("stats") or {}
        self.tokens += int(st.get("tokens", 0))
        self.padding += int(st.get("padding_tokens", 0))


def _reduce_lm_loss(losses_reduced) -> tuple[float, float]:
    """Global (sum, count) of the masked LM loss: over micro-batches, DP x CP and PP stages."""
    from megatron.core import parallel_state as ps

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    acc = torch.zeros(2, dtype=torch.float64, device=dev)
    if ps.is_pipeline_last_stage():
        for d in losses_reduced:
            acc += d["lm loss"].to(acc)
        dist.all_reduce(acc, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:  # rank 0 sits on the first stage
        dist.all_reduce(acc, group=ps.get_pipeline_model_parallel_group())
    return float(acc[0]), float(acc[1])


def _moe_losses(args, config, num_microbatches: int) -> dict[str, float]:
    """The MoE metrics tracker's values for this iteration (megatron's reduction), then cleared."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    names = []
    lbl = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
           "global_aux_loss": "global_load_balancing_loss"}.get(args.moe_router_load_balancing_type)
    if lbl:
        names.append(lbl)
    if args.moe_z_loss_coeff:
        names.append("z_loss")
    out = {"load_balancing_loss": 0.0, "z_loss": 0.0}
    if not names:
        return out
    tracker = get_moe_metrics_tracker()
    total: dict = {}
    tracker.report(
        loss_scale=1.0 / num_microbatches,
        iteration=0,
        force_initialize=True,
        track_names=names,
        num_layers=config.num_layers,
        moe_layer_freq=config.moe_layer_freq,
        total_loss_dict=total,
    )
    if lbl and lbl in total:
        out["load_balancing_loss"] = float(total[lbl])
    if "z_loss" in total:
        out["z_loss"] = float(total["z_loss"])
    return out


def _router_diagnostics(model) -> list[dict]:
    """Per MoE layer, over the whole model (all pipeline stages), globally reduced."""
    from megatron.core import parallel_state as ps

    from megatron.mcore_ext.router import collect_router_diagnostics

    diags = collect_router_diagnostics(model)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, diags, group=ps.get_pipeline_model_parallel_group())
        diags = sorted((d for p in parts for d in p), key=lambda d: d["layer"])
    return diags


class MetricsWriter:
    """Rank 0: JSONL (DESIGN section 6), TensorBoard scalars, console lines and the progress bar."""

    def __init__(self, args, start_iteration: int, enabled: bool):
        self.enabled = enabled
        self.args = args
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if args.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(args.metrics_file)), exist_ok=True)
            self.jsonl = open(args.metrics_file, "a")
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=args.tensorboard_dir)
        if not args.no_progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=args.train_iters, initial=start_iteration, desc="train", unit="it",
                            dynamic_ncols=True, file=sys.stdout)

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        it = rec["iteration"]
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k in ("lm_loss", "load_balancing_loss", "z_loss", "grad_norm", "lr", "tokens_per_sec",
                      "padding_fraction"):
                if rec.get(k) is not None and math.isfinite(rec[k]):
                    self.tb.add_scalar(k, rec[k], it)
            for d in rec.get("router", []):
                for k in ("entropy", "load_balance", "max_min_ratio"):
                    v = d[k]
                    if math.isfinite(v):
                        self.tb.add_scalar(f"router/layer{d['layer']}/{k}", v, it)
        line = (f"iter {it:>6}/{self.args.train_iters} | lm loss {rec['lm_loss']:.4f} | "
                f"lb loss {rec['load_balancing_loss']:.4g} | z loss {rec['z_loss']:.4g} | "
                f"grad norm {rec['grad_norm']:.3f} | lr {rec['lr']:.3g} | "
                f"tok/s {rec['tokens_per_sec']:.0f} | pad {rec['padding_fraction']:.1%}")
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {rec['lm_loss']:.3f}", refresh=False)
            self.bar.update(1)
            if it % self.args.log_interval == 0:
                self.bar.write(line)
        elif it % self.args.log_interval == 0:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


# ------------------------------------------------------------------------------------------------
def train(args) -> list[dict]:
    """Run the whole job; returns the per-iteration records (rank 0: the metrics written)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from multimodal_dev import checkpointing
    from multimodal_dev.forward_step import forward_step

    initialize(args)
    rank = dist.get_rank()
    ddp, model, optimizer, scheduler = build_model_and_optimizer(args)
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s/%s: %.2fM parameters on rank 0; layout TP=%d PP=%d CP=%d EP=%d DP=%d; %s",
             args.model_arch, args.variant, n_params / 1e6, args.tensor_model_parallel_size,
             args.pipeline_model_parallel_size, args.context_parallel_size, args.expert_model_parallel_size,
             args.data_parallel_size, "THD (packed)" if args.use_packed_sequence else "BSHD (padded)")

    provider, collate = build_data(args, model)
    reads_data = ps.get_tensor_model_parallel_rank() == 0
    stream = None
    iteration, data_state = 0, None
    if args.load:
        iteration, data_state, _ = checkpointing.load_checkpoint(args.load, model, optimizer, scheduler)
    if reads_data:
        stream = MicroBatchStream(provider, collate, args, ps.get_data_parallel_rank(),
                                  ps.get_data_parallel_world_size(),
                                  global_order=args.dataset_provider == "mock", state=data_state)
        if iteration and data_state is None:
            stream.skip_iterations(iteration)
    args_dict = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}

    baseline = None
    if rank == 0:
        baseline = unigram_baseline(provider.config, max_tokens=None if args.truncate else args.seq_length)
        log.info("unigram baseline of the trained-on tokens: %.4f nats/token (a model that ignores its "
                 "inputs gets this loss)", baseline)
    writer = MetricsWriter(args, iteration, enabled=rank == 0)
    fb = get_forward_backward_func()
    records = []
    seq_length = args.seq_length
    crash_hook = _test_crash_hook()
    start_iteration = iteration
    stopped_early = False
    try:
        while iteration < args.train_iters:
            t0 = time.perf_counter()
            micro = stream.next_iteration() if stream is not None else [None] * args.num_microbatches
            data_it = iter(micro) if stream is not None else None
            stats = IterationStats()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            losses = fb(
                forward_step_func=functools.partial(forward_step, use_padding_mask=not args.no_padding_mask,
                                                    batch_hook=stats.hook),
                data_iterator=data_it,
                model=[ddp],
                num_microbatches=args.num_microbatches,
                seq_length=seq_length,
                micro_batch_size=1 if args.use_packed_sequence else args.micro_batch_size,
                decoder_seq_length=None,
                forward_only=False,
            )
            lr = float(optimizer.param_groups[0]["lr"])  # the rate this iteration's update uses
            update_ok, grad_norm, _ = optimizer.step()
            if update_ok:
                scheduler.step(increment=1)
            iteration += 1

            loss_sum, loss_count = _reduce_lm_loss(losses)
            moe = _moe_losses(args, config, args.num_microbatches)
            diags = _router_diagnostics(model)
            n_skipped = 0  # cumulative; a global-order stream is read whole by every DP rank: count it once
            if stream is not None and (not stream.global_order or stream.dp_rank == 0):
                n_skipped = stream.stats.get("skipped_samples", 0) + stream.stats.get("skipped_shards", 0)
            counts = torch.tensor([stats.tokens, stats.padding, n_skipped], dtype=torch.float64)
            if torch.cuda.is_available():
                counts = counts.cuda()
            # one count per DP replica: its data reader (TP rank 0) on CP rank 0 of the first stage
            if not (reads_data and ps.get_context_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0):
                counts.zero_()
            dist.all_reduce(counts)
            elapsed = time.perf_counter() - t0
            tokens, padding, skipped = int(counts[0]), int(counts[1]), int(counts[2])
            rec = {
                "iteration": iteration,
                "lm_loss": loss_sum / max(loss_count, 1.0),
                "load_balancing_loss": moe["load_balancing_loss"],
                "z_loss": moe["z_loss"],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": lr,
                "tokens": tokens,
                "padding_tokens": padding,
                "padding_fraction": padding / max(tokens + padding, 1),
                "loss_tokens": int(loss_count),
                "tokens_per_sec": tokens / elapsed if elapsed > 0 else 0.0,
                "iteration_time_s": elapsed,
                "expert_tokens": [d["tokens_per_expert"] for d in diags],
                "router": [{k: d[k] for k in ("layer", "entropy", "load_balance", "max_min_ratio")} for d in diags],
                "skipped_samples": skipped,
                "unigram_baseline": baseline,
            }
            graphs = getattr(model, "layer_graphs", None)
            if graphs is not None:  # cumulative: graphs captured, layer calls replayed, eager layer calls
                rec["cuda_graphs"] = {"captures": graphs.stats["captures"], "replays": graphs.stats["replays"],
                                      "eager": sum(graphs.stats["eager"].values())}
            records.append(rec)
            writer.write(rec)
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                checkpointing.save_checkpoint(args.save, iteration, model, optimizer, scheduler, args_dict,
                                              stream.state_dict() if stream is not None else None,
                                              crash_hook=crash_hook)
            if args.exit_after_iters is not None and iteration - start_iteration >= args.exit_after_iters:
                log.warning("--exit-after-iters %d reached: stopping without a final save", args.exit_after_iters)
                stopped_early = True
                break
        if args.save and not stopped_early and (not args.save_interval or iteration % args.save_interval != 0):
            checkpointing.save_checkpoint(args.save, iteration, model, optimizer, scheduler, args_dict,
                                          stream.state_dict() if stream is not None else None)
    finally:
        writer.close()
    return records


def _test_crash_hook():
    """MMDEV_CRASH_IN_SAVE=N (tests): die hard in the middle of saving iteration N."""
    target = os.environ.get("MMDEV_CRASH_IN_SAVE")
    if not target:
        return None
    state = {"n": 0}

    def hook(stage):
        state["n"] += 1
        if state["n"] == int(target):
            log.warning("MMDEV_CRASH_IN_SAVE: killing the process in the middle of save #%s", target)
            os._exit(17)

    return hook


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def main(argv=None) -> int:
    from multimodal_dev.arguments import ArgumentError, parse_args

    try:
        args = parse_args(argv)
    except ArgumentError as e:
        print(f"pretrain_multimodal.py: error: {e}", file=sys.stderr)
        return 2
    try:
        train(args)
    finally:
        shutdown()
    return 0
