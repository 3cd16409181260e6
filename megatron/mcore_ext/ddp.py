"""megatron-core DDP with one gradient accumulation per backward instead of a hook per parameter.

megatron-core 0.19.2's ``DistributedDataParallel`` hooks every parameter's ``AccumulateGrad`` node;
the hook adds that parameter's ``.grad`` into its ``main_grad`` buffer (``add_``, one launch) and
drops the ``.grad``. That is a Python call and a kernel launch per parameter per backward, in a
backward whose host already lags the GPU: in the steady-state profile of ``proxy`` on an H100
(docs/performance.md) these hooks were the largest single item of GPU idle time in the backward,
~13 ms per step for ~280 hooked parameters.

``BatchedGradDDP`` keeps megatron's hook where something waits on it -- overlapped gradient
reduction (the hook marks a parameter ready for its bucket), delayed weight-gradient computation,
GTP weight rematerialisation -- and otherwise installs a light hook that only asks autograd for a
callback at the end of the current backward (``queue_callback``, once per backward). The callback
adds every pending ``.grad`` into its ``main_grad`` with one ``torch._foreach_add_`` and drops the
``.grad`` s, skipping, as megatron's hook does, parameters whose gradient is already in
``main_grad`` (``grad_added_to_main_grad``). Each backward (each micro-batch, and each nested
backward of activation recomputation) flushes its own gradients, so the buffers get the same
additions in the same order: bit-equal to megatron's hooks. A backward that raises before its
callback runs leaves its ``.grad`` s behind; ``zero_grad_buffer`` (the start of every iteration)
drops them, and the once-per-backward bookkeeping is keyed by autograd's graph task, so it cannot
get stuck. The ``.grad`` s of one backward live
until its end instead of being dropped one by one (for ``proxy`` at most ~1.2 GB of bf16
gradients, while the activations are being freed).

``grad_scaling_taker`` (set by ``GradNormCheckedOptimizer.defer_token_scaling``): megatron's
``finalize_model_grads`` divides every gradient by the iteration's token count through
``scale_gradients``, a pass over all fp32 gradient buffers; where that optimizer
``takes_token_scaling()``, the factor is kept for it instead, and it applies it inside its fused
Adam kernel (``grad_norm_check.py``).
"""
from __future__ import annotations

import torch

from megatron.core.distributed import DistributedDataParallel
from megatron.core.distributed import distributed_data_parallel as _mcore_ddp

__all__ = ["BatchedGradDDP"]


class BatchedGradDDP(DistributedDataParallel):
    """``DistributedDataParallel`` whose plain per-parameter hooks are batched (see above)."""

    def __init__(self, *args, **kwargs):
        self._batched_params: list = []
        self._flush_params = None  # the batched parameters DDP manages, on the first flush
        self._queued_task = None  # the backward (autograd graph task) whose flush is queued
        super().__init__(*args, **kwargs)

    def hook_optional(self, param) -> bool:
        """Nothing waits on this parameter's backward hook (no overlapped reduction, delayed
        wgrad or GTP remat): its gradient may reach ``main_grad`` any time before the backward ends."""
        cfg = self.ddp_config
        return not (cfg.overlap_grad_reduce or cfg.delay_wgrad_compute
                    or getattr(param, "is_gtp_weight_remat", False))

    def _make_backward_post_hook(self, param: torch.nn.Parameter):
        if not self.hook_optional(param):
            return super()._make_backward_post_hook(param)
        self._batched_params.append(param)

        def hook(*unused):
            if _mcore_ddp.is_graph_capturing():
                return
            # once per backward; keyed by the graph task, so a backward that raised before its
            # callback ran cannot keep later ones from queueing theirs
            task = torch._C._current_graph_task_id()
            if task != self._queued_task:
                self._queued_task = task
                torch.autograd.Variable._execution_engine.queue_callback(self._flush_grads)

        return hook

    grad_scaling_taker = None  # the optimizer that may take scale_gradients' factor (module docstring)
    pending_grad_scale = None  # that factor, until the optimizer's step takes it

    def scale_gradients(self, scaling_factor):
        """megatron's scaling of every gradient buffer, or, where ``grad_scaling_taker`` takes it, its
        factor (a device tensor: 1 / tokens) kept in ``pending_grad_scale``."""
        if self.grad_scaling_taker is None or not self.grad_scaling_taker.takes_token_scaling():
            return super().scale_gradients(scaling_factor)
        if self.pending_grad_scale is not None:
            raise RuntimeError("scale_gradients called twice in one iteration with the scaling deferred to the "
                               "optimizer (which applies one factor per step)")
        self.pending_grad_scale = scaling_factor

    def zero_grad_buffer(self):
        super().zero_grad_buffer()
        self.pending_grad_scale = None  # an iteration that raised before its step must not pass it on
        # what a backward that raised left unflushed must not reach the next iteration's buffers
        self._queued_task = None
        for param in self._batched_params:
            param.grad = None

    def _flush_grads(self):
        """Add the pending ``.grad`` s into ``main_grad`` (what megatron's hook does one by one)."""
        self._queued_task = None
        if self._flush_params is None:  # megatron's hook acts only on the parameters in its buckets
            self._flush_params = [p for p in self._batched_params if p in self.param_to_bucket_group]
        mains, grads = [], []
        for param in self._flush_params:
            grad = param.grad
            if grad is None:
                continue
            if not param.grad_added_to_main_grad or getattr(param, "zero_out_wgrad", False):
                mains.append(param.main_grad)
                grads.append(grad.data)
            param.grad = None
        if mains:
            torch._foreach_add_(mains, grads)
