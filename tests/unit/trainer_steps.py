"""The trainer's own steps in one rank of ``run_distributed`` (no subprocess): the model, DDP and
optimizer from ``training.build_model_and_optimizer`` for a command line, then ``train_step`` on
the run's data, with what each step counted (helpers of test_recompute.py and test_freezing.py).

``record_steps`` returns, per iteration: the LM loss (sum, count), the grad norm, every
parameter's finalized gradient (``main_grad`` after ``finalize_model_grads``, before the optimizer
step clips it), the routers' expert-bias token counts (``local_tokens_per_expert`` just before
finalize turns them into the bias update and zeroes them), the MoE tracker's per-layer values
(aux and z-loss, before they are reported), the routing diagnostics, and, after the last step,
every parameter and expert bias (``initial_params``: before the first step). ``patch(model)``, if
given, runs after the build (a test's negative control: a deliberately broken router).
``world_size``: the ranks of the ``run_distributed`` call (its layout flags in ``argv``); each rank
reads its data-parallel share as the trainer does and returns its own parameters and counts.
"""
from __future__ import annotations

import torch

COMMON = ["--variant", "tiny", "--dataset-provider", "mock", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--seq-length", "256", "--layout-independent-init", "--lr-warmup-iters", "1", "--no-progress-bar",
          "--seed", "7", "--moe-z-loss-coeff", "1e-3"]


def build(argv, world_size: int = 1):
    """``(cfg, ddp, model, optimizer, scheduler)`` for ``argv``, seeded like the trainer."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron.mcore_ext import fallbacks
    from multimodal_dev.arguments import parse_args
    from multimodal_dev.models import load_plugin
    from multimodal_dev.training import build_model_and_optimizer

    fallbacks.apply()  # as training.initialize does
    cfg = parse_args(argv, world_size=world_size)
    for plugin in cfg.model.plugins:
        load_plugin(plugin)
    torch.manual_seed(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed, force_reset_rng=True)
    ddp, model, optimizer, scheduler, _ = build_model_and_optimizer(cfg)
    return cfg, ddp, model, optimizer, scheduler


def _routers(model):
    return [m for m in model.modules() if getattr(m, "expert_bias", None) is not None]


def record_steps(argv, iterations: int, patch=None, world_size: int = 1) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from multimodal_dev import metrics
    from multimodal_dev.data.stream import open_data
    from multimodal_dev.training import train_step

    cfg, ddp, model, optimizer, scheduler = build(argv, world_size)
    if patch is not None:
        patch(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = model.config
    finalize, seen = config.finalize_model_grads_func, {}

    def finalize_and_look(*args, **kwargs):
        seen["bias_counts"] = [r.local_tokens_per_expert.clone() for r in _routers(model)]
        out = finalize(*args, **kwargs)
        seen["grads"] = {n: p.main_grad.clone() for n, p in model.named_parameters() if hasattr(p, "main_grad")}
        return out

    config.finalize_model_grads_func = finalize_and_look
    _, stream = open_data(cfg.data, model.data_spec, seed=cfg.seed, seq_multiple=cfg.layout.seq_multiple,
                          reads_data=cfg.layout.reads_data(ps.get_tensor_model_parallel_rank()),
                          dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size())
    steps = []
    for _ in range(iterations):
        stats = metrics.IterationStats()
        losses, _, grad_norm, _ = train_step(cfg, get_forward_backward_func(), ddp, optimizer, scheduler,
                                             stream.next_iteration() if stream is not None else None, stats.hook)
        tracker = {k: v.values.clone() for k, v in get_moe_metrics_tracker().metrics.items()}
        steps.append(dict(loss=metrics.reduce_lm_loss(losses), grad_norm=float(grad_norm), tracker=tracker,
                          moe=metrics.moe_losses(config, cfg.data.num_microbatches),
                          diagnostics=metrics.router_diagnostics(model), **seen))
    return dict(steps=steps, initial_params=initial,
                params={n: p.detach().clone() for n, p in model.named_parameters()},
                expert_bias=[r.expert_bias.clone() for r in _routers(model)],
                requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
                grad_buffer={n: hasattr(p, "main_grad") for n, p in model.named_parameters()},
                optimizer_state=_optimizer_state_names(model, optimizer))


def _optimizer_state_names(model, optimizer) -> dict[str, list[str]]:
    """Parameter name -> the optimizer state it has (exp_avg, ...), for the parameters the
    optimizer holds (megatron keeps fp32 parameters themselves in the torch optimizer)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                out[names.get(id(p), f"<unnamed {tuple(p.shape)}>")] = sorted(opt.optimizer.state.get(p, {}))
    return out
