#!/usr/bin/env python
"""Distillation throughput and memory on ONE device: the student alone vs the student with a
frozen teacher (``--distill``), on the very same batches.

The data, timing and reporting are ``train_throughput.py``'s (its flags: --variant is the
student's, --seq-length, --samples-per-step, --steps, --warmup, --megatron-args, ...; one packed
THD micro-batch of N samples per step). What runs, one after the other in one process:

1. ``student``: the trainer's ``build_model_and_optimizer`` and a step as ``training.train_step``
   runs it without a teacher;
2. ``distill``: the same student, rebuilt, with a teacher of ``--teacher-variant`` built with the
   teacher's options of the trainer (``distill.teacher.teacher_options``) and frozen as the trainer
   freezes it (``distill.teacher.Teacher``); its weights are random (a throughput figure does not
   depend on them: ``--teacher-load`` would only fill them), and each step is
   ``train_step``'s with ``teacher.prepare_step``: the teacher's forward without gradients, then
   the student's forward, KD + LM loss (``--kd-alpha``, ``--kd-temperature``, ``--kd-top-k``) and
   backward.

Reported: median step time, real tokens/s, peak memory (``max_memory_allocated``) of each, and the
ratio. Example (one H200)::

    python3 scripts/bench/distill_throughput.py --variant proxy --teacher-variant proxy-hybrid \\
        --seq-length 4096 --samples-per-step 4 --warmup 2 --steps 6 --json OUT/distill_proxy.json
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402


def main(argv=None) -> int:
    p = tt.build_parser()
    p.description = __doc__
    p.add_argument("--teacher-variant", default="proxy-hybrid")
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-top-k", type=int, default=None)
    args = p.parse_args(argv)
    args.profile, args.passes = None, max(1, args.passes)

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from multimodal_dev import metrics, training
    from multimodal_dev.distill.args import DistillArgs
    from multimodal_dev.distill.teacher import Teacher, teacher_options
    from multimodal_dev.models import build_model
    from multimodal_dev.models.qwen35_vl.variants import get_variant

    margs = tt.megatron_args(args, "thd")
    args.seq_multiple = margs.layout.seq_multiple
    training.initialize(margs)
    samples, provider, mix = tt.make_samples(get_variant(args.variant), args)
    batches, _ = tt.collate_steps(samples, provider, args, "thd")
    dev = torch.device("cuda", torch.cuda.current_device()) if tt._cuda() else torch.device("cpu")
    batches = [tt._to_device(b, dev) for b in batches]
    tokens = [int(b["stats"]["tokens"]) for b in batches]
    kd = DistillArgs(enabled=True, alpha=args.kd_alpha, temperature=args.kd_temperature, top_k=args.kd_top_k)
    results = []
    for name in ("student", "distill"):
        ddp, model, optimizer, scheduler, _ = training.build_model_and_optimizer(margs)
        flops = [0] * len(batches)  # no MFU here: tokens/s and memory are the figures
        teacher = None
        if name == "distill":
            t_model = build_model(margs.model.arch, args.teacher_variant, teacher_options(margs))
            if tt._cuda():
                t_model.cuda(torch.cuda.current_device())
            teacher = Teacher(t_model, kd, pipelined=False)
        fb = get_forward_backward_func()

        def step(batch, ddp=ddp, optimizer=optimizer, scheduler=scheduler, teacher=teacher):
            losses, _, _, _ = training.train_step(margs, fb, ddp, optimizer, scheduler, [batch], None, teacher)
            return losses

        def after(model=model, teacher=teacher):  # what train() reads per iteration (trackers cleared)
            metrics.moe_losses(model.config, 1)
            if teacher is not None:
                teacher.moe_losses(1)

        def loss_of(losses):
            s = sum(d["lm loss"].double() for d in losses)
            return float(s[0] / s[1].clamp(min=1))

        params = sum(q.numel() for q in model.parameters())
        t_params = sum(q.numel() for q in teacher.model.parameters()) if teacher else 0
        rec = tt.measure(name, step, batches, args, flops, tokens, 0.0, None,
                         dict(student=args.variant, teacher=args.teacher_variant if teacher else None,
                              student_params_b=params / 1e9, teacher_params_b=t_params / 1e9,
                              kd=dataclasses.asdict(kd) if teacher else None,
                              gdn_kernels=margs.model.gdn_kernels),
                         after_step=after, loss_of=loss_of)
        results.append(rec)
        model.config.no_sync_func = model.config.finalize_model_grads_func = model.config.grad_scale_func = None
        del ddp, model, optimizer, scheduler, teacher, fb, step, after
        tt._free_memory()
    s, d = results
    print(f"\n{'config':>8} {'median ms':>10} {'tokens/s':>10} {'peak GiB':>9}")
    for r in results:
        print(f"{r['config']:>8} {r.get('step_ms_median', float('nan')):>10.1f} {r.get('tokens_per_s', 0):>10.0f} "
              f"{r.get('peak_mem_gib') or float('nan'):>9.1f}  {r['status']}")
    if s.get("tokens_per_s") and d.get("tokens_per_s"):
        print(f"distill / student: {d['tokens_per_s'] / s['tokens_per_s']:.2f}x tokens/s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(results=results, mix=mix, args=vars(args), commit=tt._git_commit(),
                           torch=torch.__version__,
                           device=torch.cuda.get_device_name() if tt._cuda() else "cpu"), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
