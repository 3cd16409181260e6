"""Helpers of test_distill.py, run inside ``run_distributed`` ranks (no subprocess).

``save_teacher``: a weights-only checkpoint (what ``--teacher-load`` reads) of a model built from a
command line, its weights perturbed (non-trivial norms) and, when it has one, its expert bias set
to random values (so that "unchanged" is a real check). ``steps``: the trainer's own
``build_model_and_optimizer`` + ``distill.build_teacher`` + ``train_step`` for a command line, in
whatever layout ``run_distributed`` set up, recording per iteration the globally reduced losses
(``distill.record`` included), grad norm, experts' token counts, the student's tracker and
expert-bias counts, every finalized gradient (one process only: layouts shard them), and, at the
end, what the teacher looks like.
"""
from __future__ import annotations

import torch

from trainer_steps import _routers, build  # the trainer's build for any world size, the routers


def save_teacher(root: str, argv, seed: int = 11) -> dict:
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from multimodal_dev.arguments import parse_args
    from multimodal_dev.checkpointing import save_checkpoint
    from multimodal_dev.models import build_model, load_plugin

    cfg = parse_args(argv, world_size=1)
    for plugin in cfg.model.plugins:
        load_plugin(plugin)
    torch.manual_seed(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed, force_reset_rng=True)
    model = build_model(cfg.model.arch, cfg.model.variant, cfg.build_options())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for r in _routers(model):
            r.expert_bias.copy_(torch.randn(r.expert_bias.shape, generator=g) * 0.1)
    save_checkpoint(root, 0, model, None, None, cfg.to_dict(), None)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "expert_bias": [r.expert_bias.clone() for r in _routers(model)]}


def save_student_init(root: str, argv) -> None:
    """A weights-only checkpoint of the student exactly as the trainer builds it for ``argv``."""
    from multimodal_dev.checkpointing import save_checkpoint

    cfg, _, model, _, _ = build(argv)
    save_checkpoint(root, 0, model, None, None, cfg.to_dict(), None)


def zero_lm_step(data_iterator, model, *, batch_hook=None):
    """The plain forward step with its LM loss multiplied by 0 (what is left: the router losses)."""
    from multimodal_dev.forward_step import forward_step

    output, loss = forward_step(data_iterator, model, batch_hook=batch_hook)

    def zeroed(out):
        total, count, report = loss(out)
        return total * 0.0, count, report

    return output, zeroed


def steps(argv, iterations: int, world_size: int = 1, reference_zero_lm: bool = False, keep_grads: bool = False) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from multimodal_dev import distill, metrics
    from multimodal_dev.data.stream import open_data
    from multimodal_dev.training import train_step

    cfg, ddp, model, optimizer, scheduler = build(argv, world_size=world_size)
    teacher = distill.build_teacher(cfg, model)
    t_before = None
    if teacher is not None:
        t_before = {"params": {n: p.detach().clone() for n, p in teacher.model.named_parameters()},
                    "expert_bias": [r.expert_bias.clone() for r in _routers(teacher.model)]}
    config = model.config
    finalize, seen = config.finalize_model_grads_func, {}

    def finalize_and_look(*args, **kwargs):
        seen["bias_counts"] = [r.local_tokens_per_expert.tolist() for r in _routers(model)]
        out = finalize(*args, **kwargs)
        if keep_grads:
            seen["grads"] = {n: p.main_grad.clone() for n, p in model.named_parameters() if hasattr(p, "main_grad")}
        return out

    config.finalize_model_grads_func = finalize_and_look
    tp_rank = ps.get_tensor_model_parallel_rank()
    _, stream = open_data(cfg.data, model.data_spec, seed=cfg.seed, seq_multiple=cfg.layout.seq_multiple,
                          reads_data=cfg.layout.reads_data(tp_rank), dp_rank=ps.get_data_parallel_rank(),
                          dp_size=ps.get_data_parallel_world_size())
    fb = get_forward_backward_func()
    out = []
    for _ in range(iterations):
        stats = metrics.IterationStats()
        micro = stream.next_iteration() if stream is not None else None
        if reference_zero_lm:
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            losses = fb(forward_step_func=lambda it, m: zero_lm_step(it, m, batch_hook=stats.hook),
                        data_iterator=iter(micro) if micro is not None else None, model=[ddp],
                        num_microbatches=cfg.data.num_microbatches, seq_length=cfg.data.seq_length,
                        micro_batch_size=1 if cfg.data.packed else cfg.data.micro_batch_size,
                        decoder_seq_length=None, forward_only=False)
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
        else:
            losses, _, grad_norm, _ = train_step(cfg, fb, ddp, optimizer, scheduler, micro, stats.hook, teacher)
        tracker = {k: v.values.tolist() for k, v in get_moe_metrics_tracker().metrics.items()}
        lm_sum, count = metrics.reduce_lm_loss(losses)
        rec = {"lm_loss": lm_sum / max(count, 1.0), "loss_tokens": count,
               **metrics.moe_losses(config, cfg.data.num_microbatches)}
        rec.update(distill.record(teacher, losses, rec, config, cfg.data.num_microbatches))
        rec.update(grad_norm=float(grad_norm), tracker=tracker,
                   expert_tokens=[d["tokens_per_expert"] for d in metrics.router_diagnostics(model)], **seen)
        out.append(rec)
    result = {"steps": out, "rank": torch.distributed.get_rank()}
    if teacher is not None:
        tm = teacher.model
        opt_params = {id(p) for opt in (getattr(optimizer, "chained_optimizers", None) or [optimizer])
                      for group in opt.optimizer.param_groups for p in group["params"]}
        result["teacher"] = dict(
            unchanged=all(torch.equal(t_before["params"][n], p) for n, p in tm.named_parameters()),
            bias_unchanged=all(torch.equal(a, r.expert_bias) for a, r in zip(t_before["expert_bias"], _routers(tm))),
            expert_bias=[r.expert_bias.clone() for r in _routers(tm)],
            params={n: p.detach().clone() for n, p in tm.named_parameters()} if world_size == 1 else None,
            requires_grad=any(p.requires_grad for p in tm.parameters()),
            grad=any(p.grad is not None or hasattr(p, "main_grad") for p in tm.parameters()),
            in_optimizer=any(id(p) in opt_params for p in tm.parameters()),
            training=any(m.training for m in tm.modules()),
            bias_counts=[r.local_tokens_per_expert.tolist() for r in _routers(tm)],
        )
        result["student_bias"] = [r.expert_bias.clone() for r in _routers(model)]
    return result
