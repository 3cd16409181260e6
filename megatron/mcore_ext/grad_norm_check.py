"""The optimizer step around megatron's gradient norm: stop on a NaN or Inf gradient without
applying that update, and, where the norm stays on the device, clip (and divide by the token
count) inside torch's fused AdamW instead of in passes of their own.

A NaN or Inf anywhere in the gradients makes their global norm NaN or Inf, and megatron's
``ChainedOptimizer.step`` computes that norm anyway (``get_grad_norm``, reduced over the
model-parallel ranks) before it clips and updates. Left to itself, megatron's step would clip by
``max_norm / nan`` (a NaN scale, or none at all where its float ``clip_coeff < 1`` test is false)
and Adam would write NaN into every weight. ``GradNormCheckedOptimizer`` raises
``NonFiniteGradError`` instead; every rank raises together (the norm is the same on all of them)
and the run stops saying so, with no weight, moment or step counter changed. Two ways, chosen per
step by where megatron left the norm:

* **On the device** (megatron-core 0.19.2 keeps the norm a CUDA tensor when TE provides its
  multi-tensor kernels; with apex alone it reads it itself) and every chained optimizer is torch's
  fused Adam(W): the norm's
  ``~isfinite`` goes to the optimizers as their ``found_inf`` -- torch's own protocol for fused
  optimizers (``torch.amp.GradScaler`` sets the same attribute): the fused kernel then skips the
  update and takes back its step count, on the device. The norm is read to the host once, *after*
  the update's kernels are queued, and a non-finite one raises there. Why: a host read before the
  update makes the host wait for the whole backward and then run the optimizer's Python (megatron's
  clipping lists, the Adam launch, the main -> model copy: ~12 ms a step for ``proxy-hybrid``'s
  1,062 tensors) while the GPU waits (docs/performance.md).
  The clipping goes into the same kernel: its ``grad_scale`` (what ``GradScaler`` unscales by) is
  megatron's ``1 / clip_coeff`` = ``max((norm + 1e-6) / clip_grad, 1)``, which replaces megatron's
  own pass over every fp32 gradient (~3.7 ms a step for ``proxy-hybrid`` on one H200). Only where
  megatron's step would clip nothing else: no separate grad-norm groups, no
  ``grad_norm_skip_threshold``, no precision-aware optimizer, one ``clip_grad`` for all. Where the
  norm is certain to stay on the device (TE's multi-tensor kernels), megatron's per-token division
  of the gradients (``finalize_model_grads`` under ``calculate_per_token_loss``: 4.6 ms a step) is
  folded in too (``defer_token_scaling``): the norm of the raw sums times ``1 / tokens`` is the
  norm megatron would have computed, and ``grad_scale`` grows by the token count.
* **On the host** otherwise (megatron-core 0.19.2's norm without TE is a float: it calls
  ``.item()`` itself; or an optimizer that cannot skip on the device): read before the
  update, which then never starts. ``host_check=True`` forces this way (``--host-grad-norm-check``).

``checked`` also replaces TE's / apex's ``FusedAdam`` -- what megatron builds whenever either is
importable -- by torch's fused AdamW under the plain (not distributed) optimizer: the same update
(AdamW, bias correction, eps after the square root) in one multi-tensor kernel of the same speed
(13.5 vs 13.7 ms a step on one H200, docs/performance.md), but TE's non-capturable kernel ignores its
no-op flag ("I'd like this kernel to propagate infs/nans", TE's ``multi_tensor/adam.cu``), so it
cannot skip on the device. Not replaced: a ``FusedAdam`` with a state already, capturable, holding
master weights or non-fp32 moments (the precision-aware optimizer), and any under the distributed
optimizer (megatron's state handling there is written per Adam class).

This replaces megatron's DDP check (``DistributedDataParallelConfig.check_for_nan_in_grad``) as the
default: that one reads each gradient bucket's norm to the host at the end of every backward (two
host synchronisations per bucket). It stays available (``--check-grad-buckets``): it runs before
the data-parallel reduction and names the rank and the bucket, a diagnostic for finding where a
NaN starts.
"""
from __future__ import annotations

import math

import torch
from megatron.core.optimizer import ChainedOptimizer

__all__ = ["GradNormCheckedOptimizer", "NonFiniteGradError", "checked", "torch_adam_for_fused_adam"]


class NonFiniteGradError(FloatingPointError):
    """The gradient norm of an iteration is NaN or Inf; that iteration's update was not applied."""


def _error(norm: float, where: str) -> NonFiniteGradError:
    return NonFiniteGradError(
        f"the gradient norm is {norm}: a NaN or Inf gradient in this iteration's backward (a diverged loss, a "
        f"bad sample, a kernel); the update was not applied ({where}) and the run stops (--check-grad-buckets "
        "has megatron's DDP name the first rank and gradient bucket holding it)")


def _live(chained) -> list:
    """megatron's optimizers under ``chained`` but its stubs (a rank without parameters of a kind)."""
    return [opt for opt in chained if not getattr(opt, "is_stub_optimizer", False)]


def _device_skippers(chained) -> list | None:
    """The torch optimizers under ``chained`` when every one can skip its update on the device
    (torch's Adam/AdamW with every non-empty group fused), else None."""
    inner = []
    for opt in _live(chained):
        torch_opt = getattr(opt, "optimizer", None)
        if not isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            return None
        if not all(g.get("fused") for g in torch_opt.param_groups if g["params"]):
            return None
        inner.append(torch_opt)
    return inner or None


class GradNormCheckedOptimizer(ChainedOptimizer):
    """megatron's ``ChainedOptimizer`` that raises ``NonFiniteGradError`` for a non-finite gradient
    norm, its update not applied (module docstring: on the device or on the host)."""

    host_check = False  # True: always read the norm before the update
    _unread = None  # (device norm, optimizers given its found_inf) until step() reads it
    _clip = ...  # the clip_grad that _step_clipping_in_adam applies, None: megatron's step (set once)
    _token_chunks = ()  # DDP chunks whose per-token gradient scaling this optimizer applies
    _token_scale = None  # this step's 1 / tokens, taken from them by get_grad_norm
    _takes = None  # takes_token_scaling(), once decided

    def defer_token_scaling(self, chunks) -> None:
        """Offer to take megatron's per-token division of the gradients of ``chunks``
        (``BatchedGradDDP``, each asked at its ``scale_gradients``) into the fused kernel (module
        docstring); every chunk or none."""
        if chunks and all(hasattr(c, "grad_scaling_taker") for c in chunks):
            for c in chunks:
                c.grad_scaling_taker = self
            self._token_chunks = tuple(chunks)

    def takes_token_scaling(self) -> bool:
        """Whether the per-token scaling is taken: chunks offered it, the clipping goes into the
        kernel, and megatron-core returns the norm as a device tensor (it does when TE provides
        ``multi_tensor_scale_tensor``). Asked first after the optimizer's kernels are chosen (the
        trainer's start-up log), then decided."""
        if not self._token_chunks:
            return False
        if self._takes is None:
            from megatron.core.optimizer import clip_grads

            self._takes = self.clip_in_adam() is not None and clip_grads.multi_tensor_scale_tensor_impl is not None
        return self._takes

    def _take_token_scale(self):
        pending = [c.pending_grad_scale for c in self._token_chunks]
        for c in self._token_chunks:
            c.pending_grad_scale = None
        if any(p is None for p in pending) and not all(p is None for p in pending):
            raise RuntimeError("the per-token gradient scaling reached only some model chunks in this iteration")
        return pending[0] if pending else None

    def get_grad_norm(self):
        norm = super().get_grad_norm()
        self._token_scale = self._take_token_scale() if self.takes_token_scaling() else None
        if self._token_scale is not None and norm is not None:  # the norm of the per-token gradients
            norm = norm * self._token_scale if torch.is_tensor(norm) else norm * float(self._token_scale)
        skippers = None if self.host_check or not torch.is_tensor(norm) else _device_skippers(self.chained_optimizers)
        if skippers is not None:
            flag = (~torch.isfinite(norm)).to(torch.float32).reshape(())
            for opt in skippers:
                opt.found_inf = flag  # read by torch's fused kernel: skip the update, keep the step count
            self._unread = (norm, skippers)
            return norm
        if norm is not None and not math.isfinite(float(norm)):
            raise _error(float(norm), "the norm was read before it")
        return norm

    def clip_in_adam(self) -> float | None:
        """``clip_grad`` when the clipping can be torch's fused Adam's ``grad_scale`` (module
        docstring), else None; decided when first asked -- after the trainer chose the optimizer's
        kernels (``fallbacks.use_fused_adam``), by its start-up log -- then kept."""
        if self._clip is ...:
            from megatron.core.optimizer.optimizer import GRAD_NORM_GROUP_ATTR

            live = _live(self.chained_optimizers)
            clips = {o.config.clip_grad for o in live}
            simple = not self.host_check and _device_skippers(self.chained_optimizers) is not None and len(clips) == 1 \
                and not any(math.isfinite(getattr(o.config, "grad_norm_skip_threshold", math.inf))
                            or o.config.use_precision_aware_optimizer for o in live) \
                and not any(getattr(p, GRAD_NORM_GROUP_ATTR, None) is not None for o in live for p in o.get_parameters())
            self._clip = clips.pop() if simple else None
        return self._clip

    def _step_clipping_in_adam(self, clip: float):
        """megatron's ``ChainedOptimizer.step`` for the case ``clip_in_adam`` allows, the clipping
        of a device norm left to the fused kernel."""
        self.grad_norms_by_group = {}
        if self.prepare_grads():  # fp16's loss scaler found an Inf: megatron skips the step
            return False, None, None
        norm = self.get_grad_norm()
        tokens = self._token_scale  # 1 / tokens still to apply (defer_token_scaling), else None
        if self._unread is not None:  # on the device: the kernel divides the gradients by grad_scale
            scale = ((norm.float() + 1.0e-6) / clip).clamp_min(1.0) if clip > 0.0 else None
            if tokens is not None:
                scale = (1.0 if scale is None else scale) / tokens.float()
            for opt in self._unread[1] if scale is not None else ():
                opt.grad_scale = scale.reshape(())
        else:  # a host float: megatron's clipping (and the deferred scaling first, as a pass of its own)
            from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

            live = [o for o in _live(self.chained_optimizers) if o.get_parameters()]
            if tokens is not None:
                grads = [p.grad for o in live for p in o.get_parameters() if p.grad is not None]
                torch._foreach_mul_(grads, float(tokens))
            for opt in live if clip > 0.0 and norm is not None else ():
                clip_grad_by_total_norm_fp32(opt.get_parameters(), max_norm=clip, total_norm=norm)
        zeros = self.count_zeros() if self.config.log_num_zeros_in_grad else None
        return self.step_with_ready_grads(), norm, zeros

    def step(self):
        self._unread = None
        clip = self.clip_in_adam()
        try:
            result = super().step() if clip is None else self._step_clipping_in_adam(clip)
        finally:
            unread, self._unread = self._unread, None
            for opt in unread[1] if unread else ():
                opt.__dict__.pop("found_inf", None)
                opt.__dict__.pop("grad_scale", None)
        if unread is not None:
            value = float(unread[0])  # the step's one host read, after its update was queued
            if not math.isfinite(value):
                raise _error(value, "skipped on the device")
        return result


def torch_adam_for_fused_adam(chained) -> int:
    """Replace each TE / apex ``FusedAdam`` that megatron built under a plain optimizer of
    ``chained`` by torch's fused AdamW (Adam) over the same parameter groups (module docstring says
    why and which are kept). Before the first step. Returns the number replaced."""
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if mcore_optimizer.USING_PYTORCH_OPTIMIZER:
        return 0
    n = 0
    for opt in chained:
        fused = getattr(opt, "optimizer", None)
        if (type(fused) is not mcore_optimizer.Adam or isinstance(opt, DistributedOptimizer) or len(fused.state)
                or getattr(fused, "capturable", False) or getattr(fused, "master_weights", False)
                or getattr(fused, "use_decoupled_grad", False)
                or any(d != torch.float32 for d in getattr(fused, "name_to_dtype_map", {}).values())):
            continue
        groups = fused.param_groups
        if not groups or not all(p.is_floating_point() for g in groups for p in g["params"]):
            continue
        first = groups[0]
        decoupled = getattr(fused, "adam_w_mode", first.get("adam_w_mode", True))
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        opt.optimizer = cls(groups, lr=first["lr"], betas=first["betas"], eps=first["eps"],
                            weight_decay=first["weight_decay"], fused=True)
        n += 1
    return n


def checked(optimizer, host_check: bool = False, model_chunks=()) -> GradNormCheckedOptimizer:
    """``optimizer`` from ``get_megatron_optimizer`` (a ``ChainedOptimizer``, or one optimizer) as a
    ``GradNormCheckedOptimizer`` over the same optimizers (nothing is copied or rebuilt but a
    replaced ``FusedAdam``, which has no state yet). ``host_check``: read the norm before the update
    always, and keep megatron's ``FusedAdam``. ``model_chunks``: the DDP-wrapped chunks whose
    per-token gradient scaling it may take over (``defer_token_scaling``)."""
    inner = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    replaced = 0 if host_check else torch_adam_for_fused_adam(inner)
    out = GradNormCheckedOptimizer(list(inner))
    out.host_check, out.replaced_fused_adam = host_check, replaced  # the trainer logs both (fused_adam_summary)
    if model_chunks:
        out.defer_token_scaling(list(model_chunks))
    return out
