"""The frozen teacher of ``--distill``: built beside the student, loaded, frozen, run without gradients.

Build (``Teacher.build``, collective, after the student): the same ``BuildOptions`` as the student
(layout, TP/SP/CP/EP/PP, dtype, transformer implementation, dispatcher), so the teacher is split
exactly like the student and its last pipeline stage holds the same tokens and vocabulary slice;
its sizes are its own (layers, hidden size, experts, hybrid pattern may differ):

* ``--teacher-hf-checkpoint DIR``: ``models.build_model_from_hf`` (sizes and weights from the HF
  checkpoint, each rank reading its slices);
* ``--teacher-load CKPT``: a checkpoint of this trainer (a run's ``--save`` or a converted one),
  through the same trust checks as ``--load`` (manifest, no code); the architecture and variant
  are the checkpoint's unless ``--teacher-model-arch`` / ``--teacher-variant`` say otherwise, and
  the router settings it was trained with (score function, expert bias, loss types and
  coefficients) are the checkpoint's, checked against the built model before a weight is read;
  then ``checkpointing.load_weights`` (any layout loads any other).

The global and megatron RNG states are restored after the build: the student's run draws the same
random numbers with or without a teacher. The teacher must read the student's batches: its
``DataSpec`` (vocabulary, special tokens, vision patching) must equal the student's, or the build
fails naming both.

Frozen: ``requires_grad`` False everywhere (never wrapped in DDP, never given to an optimizer: no
gradient buffer, no optimizer state), ``eval()`` mode, its routers' expert bias marked
``frozen_expert_bias`` (and only ``finalize_model_grads`` of the student's DDP ever updates a bias;
the routers add to their token counts only with gradients on), their diagnostics off.

Router statistics kept apart: every teacher forward runs under the teacher's own megatron
``MoEMetricsTracker`` (swapped in and out), with its routers' ``record_eval_losses`` on, so its
load-balancing and z-losses are recorded there (logged as ``distill/teacher_moe_lb_loss``), never
in the student's tracker, and with no gradient attached.

Running it: without pipeline parallelism, inline -- the student's ``forward_step`` asks
``targets_for`` for the micro-batch it has just read, and the teacher's logits of that one
micro-batch live only until its targets (``loss.teacher_targets``) are formed. With pipeline
parallelism the teacher's stages must talk to each other, so each iteration starts with a
forward-only pass of the teacher through megatron's schedule over the same micro-batches
(``prepare_step``); its last stage keeps each micro-batch's targets, in order, for the student's
loss (memory: the targets of all micro-batches of an iteration on the last stage -- ``--kd-top-k``
keeps that small).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import logging
import os
from typing import Optional

import torch

from multimodal_dev.distill import step as distill_step
from multimodal_dev.distill.loss import TeacherTargets, loss_rows, teacher_targets
from multimodal_dev.models.contract import MoEOptions, RecomputeOptions, SetupError

log = logging.getLogger("multimodal_dev.distill")

__all__ = ["Teacher", "teacher_options"]


@contextlib.contextmanager
def _rng_untouched():
    """Restore the CPU/GPU generators and megatron's RNG tracker after the block."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    states = dict(tracker.get_states())
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    tracker.set_states(states)


def _from_hf(args, options):
    from multimodal_dev.models import build_model_from_hf

    try:
        return build_model_from_hf(args.teacher_hf_checkpoint, options, arch=args.teacher_arch,
                                   variant=args.teacher_variant, load_weights=True)
    except SetupError as e:  # its messages name the student's flags
        raise SetupError(f"the teacher (--teacher-hf-checkpoint {args.teacher_hf_checkpoint}): {e} "
                         "[--hf-checkpoint/--model-arch/--variant above mean --teacher-hf-checkpoint/"
                         "--teacher-model-arch/--teacher-variant]") from None


def _from_checkpoint(args, options):
    from multimodal_dev import checkpointing
    from multimodal_dev.checkpoint_checks import check_resolved
    from multimodal_dev.models import build_model

    root = args.teacher_load
    if not os.path.isdir(root) or checkpointing.latest_checkpoint(root) is None:
        raise SetupError(f"--teacher-load {root}: no complete checkpoint there (a directory written by --save or "
                         "scripts/convert_hf.py import)")
    try:  # the manifest and no-code checks of --load; the teacher's schedule is not ours to check
        ckpt = checkpointing.open_checkpoint(root, schedule={}, scheduler_policy="checkpoint", settings=None)
    except SetupError as e:
        raise SetupError(f"--teacher-load: {e}") from None
    saved = (ckpt.common.get("args") or {}).get("model") or {}
    resolved = ckpt.common.get("resolved") or {}
    arch = args.teacher_arch or saved.get("arch")
    variant = args.teacher_variant or saved.get("variant")
    if arch is None or variant is None:
        raise SetupError(f"--teacher-load {ckpt.path}: the checkpoint does not name its "
                         f"{'architecture' if arch is None else 'variant'} (a run started from an HF checkpoint): "
                         "give --teacher-model-arch / --teacher-variant, or use --teacher-hf-checkpoint")
    moe = MoEOptions(aux_loss_coeff=resolved.get("moe_aux_loss_coeff"), z_loss_coeff=resolved.get("moe_z_loss_coeff"),
                     load_balancing_type=resolved.get("moe_router_load_balancing_type"),
                     score_function=resolved.get("moe_router_score_function"),
                     enable_expert_bias=bool(resolved.get("moe_router_enable_expert_bias")),
                     token_dispatcher_type=options.moe.token_dispatcher_type)
    try:
        model = build_model(arch, variant, dataclasses.replace(options, moe=moe))
        check_resolved(resolved, model.config, ckpt.path)
        checkpointing.load_weights(ckpt, model)
    except SetupError as e:
        raise SetupError(f"--teacher-load (--teacher-model-arch {arch} --teacher-variant {variant}): {e}") from None
    return model


def teacher_options(cfg):
    """The teacher's ``BuildOptions``: the student's (layout, dtype, implementation, dispatcher),
    without what only training needs (recomputation, the chunked LM loss, a layout-independent
    random init: its weights are loaded) and with the MoE settings left to the teacher (its
    checkpoint's or its architecture's)."""
    return dataclasses.replace(cfg.build_options(), chunked_lm_loss=False, layout_independent_init=False,
                               recompute=RecomputeOptions(),
                               moe=MoEOptions(token_dispatcher_type=cfg.model.moe.token_dispatcher_type))


def _check_same_data(teacher, student) -> None:
    a, b = dataclasses.asdict(teacher.data_spec), dataclasses.asdict(student.data_spec)
    diff = [f"{k}: teacher {a[k]!r}, student {b[k]!r}" for k in a if a[k] != b[k]]
    if diff:
        raise SetupError("--distill: the teacher reads the student's batches, so its vocabulary, special tokens and "
                         "vision patching must be the student's; they differ: " + "; ".join(diff))


class Teacher:
    """The frozen teacher of one run (module docstring)."""

    def __init__(self, model, args, pipelined: bool):
        from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

        from megatron.mcore_ext.router import PaddingAwareTopKRouter

        self.model, self.args, self.pipelined = model, args, pipelined
        self.tracker = MoEMetricsTracker()
        self._pending: collections.deque[TeacherTargets] = collections.deque()
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for m in model.modules():
            if getattr(m, "expert_bias", None) is not None:
                m.frozen_expert_bias = True
            if isinstance(m, PaddingAwareTopKRouter):
                m.record_eval_losses = True  # its LB / z-loss values, into the teacher's tracker
                m.record_diagnostics = False

    @classmethod
    def build(cls, cfg, student) -> "Teacher":
        """Build, load and freeze the teacher of ``cfg.distill`` beside ``student`` (collective)."""
        args, options = cfg.distill, teacher_options(cfg)
        with _rng_untouched():
            model = _from_hf(args, options) if args.teacher_hf_checkpoint else _from_checkpoint(args, options)
        _check_same_data(model, student)
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        teacher = cls(model, args, pipelined=cfg.layout.pp > 1)
        n = sum(p.numel() for p in model.parameters())
        log.info("distillation: teacher %s (%.2fM parameters on this rank, frozen, eval mode), alpha %g, "
                 "temperature %g, %s; %s", args.teacher_hf_checkpoint or args.teacher_load, n / 1e6, args.alpha,
                 args.temperature, f"top-{args.top_k} logits" if args.top_k else "full distribution",
                 "forward-only pre-pass per iteration (pipeline parallel)" if teacher.pipelined else "inline")
        return teacher

    @property
    def config(self):
        return self.model.config

    @contextlib.contextmanager
    def _isolated(self):
        """No gradients and the teacher's own MoE metrics tracker for the block."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker, set_moe_metrics_tracker

        student_tracker = get_moe_metrics_tracker()
        set_moe_metrics_tracker(self.tracker)
        try:
            with torch.no_grad():
                yield
        finally:
            set_moe_metrics_tracker(student_tracker)

    def _targets(self, logits: torch.Tensor, loss_mask: torch.Tensor) -> TeacherTargets:
        """The targets of the loss-mask tokens of this micro-batch's ``[s, b, V/TP]`` logits."""
        from megatron.core import parallel_state as ps

        rows, _ = loss_rows(loss_mask)
        flat = logits.reshape(-1, logits.shape[-1]).index_select(0, rows)
        return teacher_targets(flat, self.args.temperature, self.args.top_k, ps.get_tensor_model_parallel_group())

    def targets_for(self, batch: dict, cp_index, loss_mask: torch.Tensor) -> Optional[TeacherTargets]:
        """The teacher's targets for the micro-batch the student is about to run (``loss_mask``:
        this CP rank's ``[b, s]``). Inline: computed now; pipelined: the pre-pass's next ones on the
        last stage, None on the others."""
        if self.pipelined:
            from megatron.core import parallel_state as ps

            if not ps.is_pipeline_last_stage():
                return None
            if not self._pending:
                raise RuntimeError("distillation: the student ran more micro-batches than the teacher's pre-pass")
            return self._pending.popleft()
        with self._isolated():
            return self._targets(self.model(batch, cp_index=cp_index, return_logits=True), loss_mask)

    def _pre_pass_step(self, data_iterator, model, *, use_padding_mask: bool):
        batch, index, loss_mask, _ = distill_step.local_inputs(data_iterator, use_padding_mask)
        output = model(batch, cp_index=index, return_logits=True)

        def keep(logits):  # the last stage: this micro-batch's targets, for the student's loss
            self._pending.append(self._targets(logits, loss_mask))
            return torch.zeros((), device=logits.device), torch.zeros((), dtype=torch.int, device=logits.device), {}

        return output, keep

    def prepare_step(self, cfg, micro_batches, batch_hook):
        """The student's ``forward_step_func`` for this iteration's ``micro_batches`` (pipelined:
        after the teacher's forward-only pass over them; collective then)."""
        self.model.eval()  # whatever else may have switched modes: the teacher runs in eval mode
        if self.pipelined:
            from megatron.core.pipeline_parallel import get_forward_backward_func

            self._pending.clear()
            d = cfg.data
            with self._isolated():
                get_forward_backward_func()(
                    forward_step_func=functools.partial(self._pre_pass_step, use_padding_mask=cfg.model.padding_mask),
                    data_iterator=iter(micro_batches) if micro_batches is not None else None, model=[self.model],
                    num_microbatches=d.num_microbatches, seq_length=d.seq_length,
                    micro_batch_size=1 if d.packed else d.micro_batch_size, decoder_seq_length=None,
                    forward_only=True)
        return functools.partial(distill_step.forward_step, teacher=self, alpha=self.args.alpha,
                                 use_padding_mask=cfg.model.padding_mask, batch_hook=batch_hook)

    def moe_losses(self, num_microbatches: int) -> dict[str, float]:
        """The teacher's load-balancing and z-losses of the iteration (its tracker; then cleared).
        Collective."""
        from multimodal_dev import metrics

        with self._isolated():
            return metrics.moe_losses(self.model.config, num_microbatches)
