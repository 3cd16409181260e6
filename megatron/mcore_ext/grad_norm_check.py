"""Stop on a NaN or Inf gradient at the optimizer's gradient norm, before the update, with one host
synchronisation per step.

A NaN or Inf anywhere in the gradients makes their global norm NaN or Inf, and megatron's
``ChainedOptimizer.step`` computes that norm anyway (``get_grad_norm``, reduced over the
model-parallel ranks) before it clips and updates. ``GradNormCheckedOptimizer`` reads it there and
raises ``NonFiniteGradError``, so the update of that iteration is never applied, every rank raises
together (the norm is the same on all of them), and the run stops saying so. Left to itself,
megatron's step would clip by ``max_norm / nan`` (a NaN scale, or none at all where its float
``clip_coeff < 1`` test is false) and Adam would write NaN into every weight. The read costs nothing extra without TE and apex
(megatron-core 0.19.2's fallback norm calls ``.item()`` itself); with them megatron keeps the norm on
the device, and this read is the step's one host synchronisation (a device-side skip of the update
would remove it: docs/performance.md).

This replaces megatron's DDP check (``DistributedDataParallelConfig.check_for_nan_in_grad``) as the
default: that one reads each gradient bucket's norm to the host at the end of every backward (two
host synchronisations per bucket), so all the host work after it -- ``finalize_model_grads``, the
optimizer's per-parameter Python before its own norm -- runs while the GPU waits. With the decoder
layers replayed from CUDA graphs the host is otherwise far ahead of the GPU by then
(docs/performance.md). The DDP check stays available (``--check-grad-buckets``): it runs before the
data-parallel reduction and names the rank and the bucket, a diagnostic for finding where a NaN
starts.
"""
from __future__ import annotations

import math

from megatron.core.optimizer import ChainedOptimizer

__all__ = ["GradNormCheckedOptimizer", "NonFiniteGradError", "checked"]


class NonFiniteGradError(FloatingPointError):
    """The gradient norm of an iteration is NaN or Inf; that iteration's update was not applied."""


class GradNormCheckedOptimizer(ChainedOptimizer):
    """megatron's ``ChainedOptimizer`` whose gradient norm raises ``NonFiniteGradError`` when it is
    not finite (its ``step`` reads the norm before clipping and updating, so nothing is updated)."""

    def get_grad_norm(self):
        norm = super().get_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            raise NonFiniteGradError(
                f"the gradient norm is {float(norm)}: a NaN or Inf gradient in this iteration's backward "
                "(a diverged loss, a bad sample, a kernel); the update was not applied and the run stops "
                "(--check-grad-buckets has megatron's DDP name the first rank and gradient bucket holding it)")
        return norm


def checked(optimizer) -> GradNormCheckedOptimizer:
    """``optimizer`` from ``get_megatron_optimizer`` (a ``ChainedOptimizer``, or one optimizer) as a
    ``GradNormCheckedOptimizer`` over the same optimizers (nothing is copied or rebuilt)."""
    inner = optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    return GradNormCheckedOptimizer(list(inner))
