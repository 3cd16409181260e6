"""The training loop, built from megatron-core parts (``megatron.training`` asserts CUDA).

One visible place for each concern:

* ``initialize``: process group (NCCL on GPU, gloo on CPU after ``cpu_runtime.apply()``), megatron
  parallel state from the run's ``Layout``, seeds, per-rank logging (``startup.setup_logging``);
* ``build_model_and_optimizer``: the registry's model (``BuildOptions`` from the flags),
  megatron-core's DDP wrapper, ``get_megatron_optimizer`` (distributed optimizer on request, GPU
  only), ``OptimizerParamScheduler``;
* ``train_step``: one iteration -- ``get_forward_backward_func`` over its micro-batches (gradient
  accumulation), then the optimizer step with gradient clipping;
* ``train``: the loop, metrics (``metrics.py``) and checkpoints (``checkpointing.py``).

Loss normalisation: ``calculate_per_token_loss=True``. ``loss_func`` returns the masked loss sum
and its token count; megatron-core's schedule sums the counts over micro-batches and
``finalize_model_grads`` divides all gradients by the count summed over DP x CP. The MoE
auxiliary losses follow the same convention (see ``megatron.mcore_ext.router``).
"""
from __future__ import annotations

import datetime
import functools
import logging
import os
import sys
import time
import traceback
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("multimodal_dev.training")

__all__ = ["initialize", "build_model_and_optimizer", "train_step", "train", "main"]

# TransformerConfig fields the architecture owns unless a flag set them: logged once at start
_RESOLVED_FIELDS = ("moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                    "moe_router_score_function", "moe_router_topk", "num_moe_experts", "moe_token_dispatcher_type",
                    "transformer_impl")


# ------------------------------------------------------------------------------------------------
# initialisation
def initialize(cfg) -> bool:
    """Start the process group and megatron's parallel state. Returns True on CPU."""
    from megatron.mcore_ext import cpu_runtime, fallbacks
    from megatron.mcore_ext.netutil import free_port
    from multimodal_dev.models import load_plugin
    from multimodal_dev.models.contract import transformer_impl_choice
    from multimodal_dev.startup import accelerator_summary, setup_logging

    on_cpu = cpu_runtime.apply()
    fallbacks.apply()  # foreach grad-norm / scale where megatron would loop per tensor (no apex/TE)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a plain `python pretrain_multimodal.py`: one process
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("gloo" if on_cpu else "nccl",
                                timeout=datetime.timedelta(minutes=cfg.distributed_timeout_minutes))
    setup_logging(cfg.logging, dist.get_rank())
    if dist.get_rank() == 0:
        log.info("%s; %s", accelerator_summary(), transformer_impl_choice(cfg.model.transformer_impl)[1])
    cfg.layout.initialize()
    for plugin in cfg.model.plugins:
        load_plugin(plugin)
    seed_everything(cfg.seed)
    if on_cpu:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    return on_cpu


def seed_everything(seed: int) -> None:
    """torch's global generator and megatron's per-parallel-region CUDA generators from ``seed``:
    a model built next starts from the weights every model built after this seed gets."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# model, DDP, optimizer, scheduler
def build_model_and_optimizer(cfg, load_hf_weights: bool = True):
    """``(ddp, model, optimizer, scheduler, layer_graphs)``: the DDP-wrapped model, the unwrapped
    model, its optimizer and scheduler, and the decoder layers' CUDA graphs (or None)."""
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron.mcore_ext import grad_norm_check
    from megatron.mcore_ext.ddp import BatchedGradDDP
    from megatron.mcore_ext.experts import GroupedGemmSequentialMLP
    from megatron.mcore_ext.fallbacks import fused_adam_summary, use_fused_adam
    from multimodal_dev import freezing, recompute
    from multimodal_dev.checkpoint_checks import schedule_from_flags
    from multimodal_dev.models import build_model, build_model_from_hf

    options = cfg.build_options()
    if cfg.model.hf_checkpoint:  # a resumed run takes its weights from the checkpoint instead
        model = build_model_from_hf(cfg.model.hf_checkpoint, options, arch=cfg.model.arch,
                                    variant=cfg.model.variant, load_weights=load_hf_weights)
    else:
        model = build_model(cfg.model.arch, cfg.model.variant, options)
    config = model.config
    recompute.check_applies(model, cfg.model.recompute, packed=cfg.data.packed, pipeline_parallel=cfg.layout.pp)
    log.info(freezing.freeze(model, cfg.model.freeze))  # before the DDP wrap: no grad buffer, no optimizer state
    log.info("resolved model settings: %s",
             ", ".join(f"{k}={getattr(config, k, None)!r}" for k in _RESOLVED_FIELDS))
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        # opt-in (host syncs every backward): a NaN/Inf grad norm stops the run anyway (grad_norm_check.py)
        check_for_nan_in_grad=cfg.optimizer.check_grad_buckets,
    )
    # megatron's DDP, with the per-parameter gradient hooks batched into one foreach add per
    # backward where nothing waits on them (megatron/mcore_ext/ddp.py)
    ddp = BatchedGradDDP(config=config, ddp_config=ddp_config, module=model)
    # where nothing waits on DDP's per-parameter hooks, the grouped experts' stacked gradient goes
    # into main_grad and the per-expert AccumulateGrad nodes and hooks are skipped (experts.py)
    for m in model.modules():
        if isinstance(m, GroupedGemmSequentialMLP):
            m.skip_param_grad_hooks = all(ddp.hook_optional(p) for p in m.parameters())
    graphs = None
    if cfg.model.cuda_graph_layers:
        from megatron.mcore_ext.layer_graphs import LayerGraphs, check_layer_graphs_supported

        check_layer_graphs_supported(config)
        graphs = LayerGraphs(model.decoder_layers(), sample_multiple=cfg.data.sample_multiple)  # per row length, lazily
        log.info("cuda graphs: %d decoder layers, THD rows padded to multiples of %d tokens",
                 len(model.decoder_layers()), cfg.data.row_multiple)
    o = cfg.optimizer
    optimizer = grad_norm_check.checked(get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, clip_grad=o.clip_grad, bf16=cfg.bf16, params_dtype=options.params_dtype,
        use_distributed_optimizer=o.use_distributed_optimizer,
    ), [ddp]), host_check=o.host_grad_norm_check, model_chunks=[ddp])  # a NaN/Inf grad norm raises, no update
    log.info("optimizer: %s", fused_adam_summary(optimizer, use_fused_adam(optimizer)))
    scheduler = OptimizerParamScheduler(optimizer, **schedule_from_flags(o))
    # as megatron.training does: the schedules call these
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return ddp, model, optimizer, scheduler, graphs


# ------------------------------------------------------------------------------------------------
def train_step(cfg, forward_backward, ddp, optimizer, scheduler, micro_batches, batch_hook, teacher=None):
    """One iteration: forward and backward over its micro-batches, then the optimizer step (``teacher``:
    --distill's). Returns ``(losses per micro-batch, lr used, grad norm, whether the update was applied)``."""
    from multimodal_dev.forward_step import forward_step

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward(
        forward_step_func=functools.partial(forward_step, use_padding_mask=cfg.model.padding_mask, batch_hook=batch_hook)
        if teacher is None else teacher.prepare_step(cfg, micro_batches, batch_hook),  # --distill: KD + LM loss
        data_iterator=iter(micro_batches) if micro_batches is not None else None,
        model=[ddp], num_microbatches=cfg.data.num_microbatches, seq_length=cfg.data.seq_length,
        micro_batch_size=1 if cfg.data.packed else cfg.data.micro_batch_size, decoder_seq_length=None,
        forward_only=False,
    )
    lr = float(optimizer.param_groups[0]["lr"])  # the rate this iteration's update uses
    update_ok, grad_norm, _ = optimizer.step()
    if update_ok:
        scheduler.step(increment=1)
    return losses, lr, grad_norm, update_ok


def _record(iteration, loss, moe, grad_norm, lr, counts, elapsed, diags, baseline, graphs) -> dict:
    loss_sum, loss_count = loss
    tokens, padding, skipped, truncated = (int(c) for c in counts)
    rec = {
        "iteration": iteration,
        "split": "train",
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
        "truncated_samples": truncated,
        "unigram_baseline": baseline,
    }
    if graphs is not None:  # cumulative: graphs captured, layer calls replayed, eager layer calls
        rec["cuda_graphs"] = {"captures": graphs.stats["captures"], "replays": graphs.stats["replays"],
                              "eager": sum(graphs.stats["eager"].values())}
    return rec


def train(cfg) -> list[dict]:
    """Run the whole job; returns the training and validation records (rank 0: the metrics written)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron.mcore_ext.grad_norm_check import NonFiniteGradError
    from multimodal_dev import checkpointing, distill, evaluation, metrics
    from multimodal_dev.checkpoint_checks import schedule_from_flags, scheduler_policy
    from multimodal_dev.data.stream import open_data

    from multimodal_dev.exit_signal import ExitSignal

    # installed first: a signal during the set-up stops the run after its first iteration
    exit_signal = ExitSignal() if cfg.checkpoint.exit_signal_handler else None
    initialize(cfg)
    rank = dist.get_rank()
    ck = cfg.checkpoint
    checkpoint = None
    if ck.load:  # every check of the checkpoint against the flags, before the model is built
        checkpoint = checkpointing.open_checkpoint(
            ck.load, schedule=schedule_from_flags(cfg.optimizer), scheduler_policy=scheduler_policy(cfg.optimizer),
            settings=cfg.to_dict(), optional=ck.load_optional)
    ddp, model, optimizer, scheduler, graphs = build_model_and_optimizer(cfg, load_hf_weights=checkpoint is None)
    teacher = distill.build_teacher(cfg, model)  # --distill: the frozen teacher (None without)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s/%s: %.2fM parameters on rank 0; layout %s; %s", cfg.model.arch,
             cfg.model.variant or cfg.model.hf_checkpoint, n_params / 1e6, cfg.layout.describe(), "THD (packed)" if cfg.data.packed else "BSHD (padded)")
    iteration, data_state = 0, None
    if checkpoint is not None:
        iteration, data_state, _ = checkpointing.load_checkpoint(checkpoint, model, optimizer, scheduler)
    tp_rank = ps.get_tensor_model_parallel_rank()
    provider, stream = open_data(cfg.data, model.data_spec, seed=cfg.seed, seq_multiple=cfg.layout.seq_multiple,
                                 reads_data=cfg.layout.reads_data(tp_rank), dp_rank=ps.get_data_parallel_rank(),
                                 dp_size=ps.get_data_parallel_world_size(), state=data_state)
    if stream is not None and iteration and data_state is None:
        stream.skip_iterations(iteration)
    counts_here = cfg.layout.counts_once(tp_rank, ps.get_context_parallel_rank(),
                                         ps.get_pipeline_model_parallel_rank())
    baseline = None
    if rank == 0:
        baseline = metrics.unigram_baseline(provider, max_tokens=None if cfg.data.truncate else cfg.data.seq_length)
        log.info("unigram baseline of the trained-on tokens: %.4f nats/token (a model that ignores its "
                 "inputs gets this loss)", baseline)
    writer = metrics.MetricsWriter(cfg.logging, cfg.train_iters, iteration, enabled=rank == 0)
    forward_backward = get_forward_backward_func()
    evaluator = evaluation.Evaluator(cfg, ddp, model, graphs) if cfg.eval.interval else None

    def evaluate(final: bool = False) -> None:  # --eval-interval (evaluation.py)
        rec = evaluator.maybe_evaluate(iteration, final) if evaluator is not None else None
        if rec is not None:
            records.append(rec)
            writer.write(rec)

    def save() -> None:
        checkpointing.save_checkpoint(ck.save, iteration, model, optimizer, scheduler, cfg.to_dict(),
                                      stream.state_dict() if stream is not None else None)

    records, start_iteration, warned_lr0, saved_at, truncated = [], iteration, False, None, 0
    try:
        while iteration < cfg.train_iters:
            t0 = time.perf_counter()
            stats = metrics.IterationStats()
            micro = stream.next_iteration() if stream is not None else None
            try:
                losses, lr, grad_norm, _ = train_step(cfg, forward_backward, ddp, optimizer, scheduler, micro,
                                                      stats.hook, teacher)
            except NonFiniteGradError as e:  # nothing was updated; say in which iteration
                raise NonFiniteGradError(f"iteration {iteration + 1}: {e}") from None
            iteration += 1
            if lr == 0.0 and iteration > cfg.optimizer.warmup_iters + 1 and not warned_lr0:
                log.warning("iteration %d trains with learning rate 0: the schedule (decay over %d iterations to "
                            "--min-lr %g) has ended; later iterations do not change the weights",
                            iteration, scheduler.lr_decay_steps, scheduler.min_lr)
                warned_lr0 = True
            skipped = 0  # cumulative
            if stream is not None and stream.counts_skips:
                skipped = stream.stats.get("skipped_samples", 0) + stream.stats.get("skipped_shards", 0)
            truncated += stats.truncated
            counts = metrics.count_across_replicas([stats.tokens, stats.padding, skipped, truncated], counts_here)
            rec = _record(iteration, metrics.reduce_lm_loss(losses),
                          metrics.moe_losses(model.config, cfg.data.num_microbatches), grad_norm, lr, counts,
                          time.perf_counter() - t0, metrics.router_diagnostics(model), baseline, graphs)
            rec.update(distill.record(teacher, losses, rec, model.config, cfg.data.num_microbatches))
            records.append(rec)
            writer.write(rec)
            evaluate()
            if ck.save and ck.save_interval and iteration % ck.save_interval == 0:
                save()
                saved_at = iteration
            if exit_signal is not None and exit_signal.stop_requested():
                if saved_at != iteration:
                    save()
                log.warning("stopped on %s after iteration %d, saved to %s; resume with --load %s",
                            exit_signal.received.name if exit_signal.received else "a peer's signal", iteration,
                            ck.save, ck.save)
                return records
            if ck.exit_after_iters is not None and iteration - start_iteration >= ck.exit_after_iters:
                log.warning("--exit-after-iters %d reached: stopping without a final save", ck.exit_after_iters)
                return records
        if ck.save and saved_at != iteration:
            save()
        evaluate(final=True)
    finally:
        writer.close()
        if exit_signal is not None:
            exit_signal.restore()
    return records


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _fail(message: str, code: int) -> None:
    """Say which rank failed and why, and end this process now. No barrier, no teardown: the other
    ranks may be waiting in a collective for this one; they fail on its closed connection (gloo),
    on torchrun's teardown, or at --distributed-timeout-minutes."""
    rank = dist.get_rank() if dist.is_initialized() else os.environ.get("RANK", "0")
    sys.stdout.flush()
    print(f"pretrain_multimodal.py: rank {rank}: {message}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(code)


def main(argv: Optional[list] = None) -> int:
    from multimodal_dev.arguments import ArgumentError, parse_args
    from multimodal_dev.models.contract import SetupError

    try:
        cfg = parse_args(argv)
    except ArgumentError as e:
        print(f"pretrain_multimodal.py: error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except SetupError as e:  # a named problem of the flags, the model or a checkpoint
        _fail(f"error: {e}", 2)
    except BaseException:  # noqa: BLE001 - every failure ends the job, with its traceback
        _fail("failed:\n" + traceback.format_exc(), 1)
    shutdown()
    return 0
