"""Faster stand-ins for megatron-core 0.19.2's apex-free multi-tensor fallbacks.

Without Transformer Engine and apex, megatron-core's optimizer falls back to
``megatron.core.utils.local_multi_tensor_l2_norm`` / ``local_multi_tensor_scale``: a Python loop
with one kernel per tensor, and the l2 norm builds ``torch.tensor([...])`` from per-tensor GPU
norms, i.e. one host synchronisation per parameter tensor. On the ``proxy`` variant that is about
a thousand norm kernels and syncs per step (seen in the PyTorch profiler on an H100).

``apply()`` replaces those two fallbacks (and only when TE and apex are absent, so real fused
kernels always win) with ``torch._foreach_norm`` / ``torch._foreach_mul`` versions: the same
arithmetic, a handful of kernels, no host sync. It also replaces the main->model parameter copy
after each bf16 optimizer step, which megatron-core does one tensor at a time even with apex/TE
(``foreach_copy_this_to_that``). Applied by the trainer at start-up; idempotent.

Also: the gradient clipping calls ``to_local_if_dtensor`` on every gradient twice per step, and
that opens a ``torch.no_grad()`` context even for a plain tensor (~6.5 us each: ~13 ms of host
time per ``proxy`` step, 1,044 gradients). ``clip_grads`` gets ``fast_to_local_if_dtensor``, the
same function with the context only where there is a DTensor to convert.

Without Transformer Engine, ``tensor_parallel.CheckpointWithoutOutput`` (megatron's output-
discarding checkpoint: selective recomputation of ``layernorm`` and ``gdn_norm_out``) sets its
``fp8`` flag to ``fp8 is not None`` -- True for its default ``fp8=False`` -- and then calls TE's
``FP8GlobalStateManager``, a NameError. ``apply()`` makes the flag False there (FP8 needs TE).

``use_fused_adam(optimizer)`` (called by the trainer on the optimizer it built) switches
megatron's torch AdamW to torch's fused kernel, for which megatron-core 0.19.2 has no switch.

``init_empty_adam_state`` and ``load_distributed_optimizer_state``: resuming megatron's distributed
optimizer without TE/apex, which megatron-core 0.19.2 cannot do on its own (each says why).
"""
from __future__ import annotations

import torch

__all__ = ["apply", "foreach_l2_norm", "foreach_scale", "foreach_copy_this_to_that", "fast_to_local_if_dtensor",
           "use_fused_adam", "init_empty_adam_state", "needs_distributed_optimizer_fallback",
           "load_distributed_optimizer_state"]

_applied = False


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``amp_C.multi_tensor_l2norm``: (total norm as a 1-element tensor, None)."""
    tensors = [t for t in tensor_lists[0] if t.numel()]
    if not tensors:
        dev = noop_flag.device if torch.is_tensor(noop_flag) else None
        return torch.zeros(1, dtype=torch.float32, device=dev), None
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``amp_C.multi_tensor_scale``: ``dst = src * scale`` for each pair."""
    src, dst = tensor_lists[0], tensor_lists[1]
    same = all(s is d for s, d in zip(src, dst))
    if same:
        torch._foreach_mul_(list(dst), scale)
    else:
        torch._foreach_copy_(list(dst), torch._foreach_mul(list(src), scale))


def foreach_copy_this_to_that(this, that, overflow_buf=None):
    """Drop-in for ``optimizer._multi_tensor_copy_this_to_that``: ``that[i].copy_(this[i])``.

    megatron-core copies the fp32 main parameters into the bf16 model parameters after every
    optimizer step with one ``copy_`` per tensor whenever ``overflow_buf`` is None -- which it
    always is for bf16 training, with or without apex/TE (about a thousand launches per step for
    ``proxy``). ``torch._foreach_copy_`` does the same copies (with the dtype cast) in one call."""
    if overflow_buf is not None:
        overflow_buf.fill_(0)
    this, that = list(this), list(that)
    if len(this) != len(that):
        raise ValueError(f"foreach_copy_this_to_that: {len(this)} sources for {len(that)} destinations")
    if this:
        torch._foreach_copy_(that, this)


def fast_to_local_if_dtensor(tensor):
    """``megatron.core.utils.to_local_if_dtensor`` without a ``no_grad`` context for plain tensors."""
    if type(tensor) is torch.Tensor or type(tensor) is torch.nn.Parameter:
        return tensor
    from megatron.core.utils import to_local_if_dtensor

    return to_local_if_dtensor(tensor)


def apply() -> bool:
    """Swap in the foreach versions where megatron-core would loop per tensor. Returns True when
    it replaced anything."""
    global _applied
    if _applied:
        return True
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

    changed = False
    if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
        changed = True
    if clip_grads.multi_tensor_scale_impl is local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = foreach_scale
        changed = True
    if getattr(moptimizer, "multi_tensor_scale_impl", None) is local_multi_tensor_scale:
        moptimizer.multi_tensor_scale_impl = foreach_scale
        changed = True
    if clip_grads.to_local_if_dtensor is not fast_to_local_if_dtensor:
        clip_grads.to_local_if_dtensor = fast_to_local_if_dtensor
        changed = True
    # bf16 main->model parameter copy: megatron loops per tensor whatever is installed
    if getattr(moptimizer, "_multi_tensor_copy_this_to_that", foreach_copy_this_to_that) is not foreach_copy_this_to_that:
        moptimizer._multi_tensor_copy_this_to_that = foreach_copy_this_to_that
        changed = True
    from megatron.core.tensor_parallel import random as mrandom

    if not mrandom.HAVE_TE and not getattr(mrandom.CheckpointWithoutOutput.__init__, "_fp8_off", False):
        mrandom.CheckpointWithoutOutput.__init__ = _fp8_off(mrandom.CheckpointWithoutOutput.__init__)
        changed = True
    _applied = True
    return changed


def _fp8_off(init):
    """``CheckpointWithoutOutput.__init__`` with ``fp8`` False (no TE: no FP8; module docstring)."""
    def __init__(self, fp8=False):
        init(self, fp8)
        self.fp8 = False

    __init__._fp8_off = True
    return __init__


def use_fused_adam(optimizer) -> int:
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


def fused_adam_summary(optimizer, switched: int) -> str:
    """One log line: which Adam implementation megatron built and how many groups ``use_fused_adam``
    switched to torch's fused kernel (a TE/apex ``FusedAdam`` is fused already: 0 switched is right), and
    what ``grad_norm_check.checked`` chose: FusedAdams replaced, or the host read kept."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    kinds = {type(getattr(o, "optimizer", o)) for o in inner}
    names = sorted(f"{k.__module__.split('.')[0]}.{k.__name__}" for k in kinds)
    line = f"{', '.join(names)}; torch's fused AdamW kernel switched on for {switched} parameter groups"
    if replaced := getattr(optimizer, "replaced_fused_adam", 0):  # grad_norm_check.checked
        line += (f"; megatron's FusedAdam replaced by torch's fused AdamW in {replaced} of {len(inner)} "
                 "optimizers (the same update; it can skip an update on the device, so the gradient-norm check "
                 "reads the norm after the update is queued; --host-grad-norm-check keeps FusedAdam)")
    elif getattr(optimizer, "host_check", False):
        line += "; the gradient norm is read before the update (--host-grad-norm-check)"
    clip_in_adam = getattr(optimizer, "clip_in_adam", None)  # grad_norm_check.GradNormCheckedOptimizer
    if clip_in_adam is not None and clip_in_adam() is not None:
        line += "; a device gradient norm's clipping is done inside the fused AdamW kernel (its grad_scale)"
        if getattr(optimizer, "takes_token_scaling", lambda: False)():
            line += ", and megatron's division of the gradients by the token count too"
    return line


def init_empty_adam_state(optimizer) -> int:
    """Give every parameter of megatron's *distributed* optimizer without TE/apex an Adam state
    (``step`` 0, zero moments) when it has none yet, before a checkpoint load builds its template.

    Why: megatron-core 0.19.2's ``DistributedOptimizer.sharded_state_dict(..., is_loading=True)``
    first calls ``state_dict()``, which without TE/apex reads the one ``step`` all parameters share
    (``assert len(steps) == 1``) -- false before the first step, when torch's Adam holds no state
    at all, so every resume into a fresh distributed optimizer failed (measured on one H200: the
    off -> on resume of tests/unit/test_faults.py). The load then overwrites these values in place
    (moments and step from the checkpoint), exactly as megatron's own dummy-state path intends.
    Returns the number of parameters given a state.
    """
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    n = 0
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if HAVE_APEX_OR_TE or not isinstance(opt, DistributedOptimizer):
            continue
        torch_opt = opt.optimizer
        for group in torch_opt.param_groups:
            on_device = bool(group.get("fused") or group.get("capturable"))  # torch keeps step there then
            for p in group["params"]:
                if torch_opt.state.get(p):
                    continue
                torch_opt.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                n += 1
    return n


def needs_distributed_optimizer_fallback(opt) -> bool:
    """Whether ``opt`` is megatron's distributed optimizer over torch's Adam (no TE/apex): the one
    whose state megatron-core 0.19.2 cannot load (``load_distributed_optimizer_state``)."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    return not HAVE_APEX_OR_TE and isinstance(opt, DistributedOptimizer)


def load_distributed_optimizer_state(opt, state_dict) -> bool:
    """Load a megatron *distributed* optimizer's state without TE/apex, where megatron cannot.

    Why: megatron-core 0.19.2's ``DistributedOptimizer.load_state_dict`` first gives every
    parameter's torch Adam state the checkpoint's ``step`` (a tensor: torch's Adam keeps it per
    parameter, TE's and apex's fused Adam do not), then copies the parameter state in with
    ``_set_main_param_and_optimizer_states``, which copies every tensor of that state from the
    loaded ones -- where ``step`` is deliberately left out -- so every load raised ``KeyError:
    'step'`` (found on one H200: the off -> on resume of tests/unit/test_faults.py). Here the
    groups and the step load through megatron's own method without the parameter state, then the
    parameter state loads through megatron's ``load_parameter_state_from_fully_reshardable`` with
    the per-parameter steps set aside for the duration and put back after.

    Returns False (nothing done) where megatron's own load works: TE or apex present, not a
    distributed optimizer, or no parameter state in ``state_dict``.
    """
    if not needs_distributed_optimizer_fallback(opt) or "param_state" not in state_dict:
        return False
    kind = state_dict.get("param_state_sharding_type")
    if kind != "fully_reshardable":
        raise ValueError(f"distributed optimizer state of sharding type {kind!r}: only 'fully_reshardable' "
                         "(what our checkpoints store) loads without TE/apex")
    opt.load_state_dict({k: v for k, v in state_dict.items() if k not in ("param_state", "param_state_sharding_type")})
    state = opt.optimizer.state
    steps = {p: s.pop("step") for p, s in state.items() if "step" in s}
    try:
        opt.load_parameter_state_from_fully_reshardable(state_dict["param_state"])
    finally:
        for p, step in steps.items():
            state[p]["step"] = step
    return True
