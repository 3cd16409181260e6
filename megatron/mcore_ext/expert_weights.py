"""The grouped experts' stacked weights: read in place from one storage, and their gradient
added straight into megatron DDP's ``main_grad`` (``experts.GroupedGemmSequentialMLP`` uses both).

One storage for the stacked weights: at construction each expert's ``linear_fc1.weight`` (and
``linear_fc2.weight``) becomes a view ``[out, in]`` of one contiguous ``[E, out, in]`` block, so
the forward reads the stacked weights as a strided view instead of copying them with
``torch.stack`` (``stacked_view``; the parameters, their names and what a checkpoint holds are
unchanged). Anything that later gives the parameters their own memory -- megatron's distributed
optimizer places each parameter in its DDP buffer, in reverse order -- breaks the layout; the
forward then checks it each call and stacks, as before. Moving or casting the module
(``.cuda()``, ``.to()``) re-forms the block (``GroupedGemmSequentialMLP._apply``).

Gradient accumulation into ``main_grad`` (under megatron's DDP): left to autograd, the stacked
weight gradient ``[E, out, in]`` is split into one ``.grad`` per expert, and DDP's per-parameter
hook adds each into that parameter's ``main_grad`` -- 64 ``add_`` launches per MoE layer for 32
experts. Instead a hook on the stacked tensor adds the whole gradient with one foreach call and
marks the parameters ``grad_added_to_main_grad``, which DDP's hook honours (megatron's own
``gradient_accumulation_fusion`` contract, which its ``zero_grad_buffer`` resets every
iteration). Every micro-batch of a model takes the same path (``GroupedGemmSequentialMLP._grouped_ok``'s
conditions are fixed per model); a micro-batch with no local tokens runs ``SequentialMLP.forward``, whose weight
gradients are then exactly zero, so skipping their ``add_`` loses nothing.

With ``skip_param_grad_hooks`` (set by our trainer when DDP does not overlap the gradient
reduction, i.e. nothing waits for a parameter's hook to mark it ready) the stack's backward also
returns no per-expert gradient at all: autograd then skips the 2 x 32 per-expert ``AccumulateGrad``
nodes and DDP hooks of every MoE layer, Python work of ~10 ms per step for ``proxy``
(docs/performance.md). With overlap on, DDP's hooks must run (they start the bucket's reduction),
so the flag stays off and the gradients flow as above.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch

__all__ = ["share_storage", "stacked_view", "stacked", "add_to_main_grads", "graph_form", "ANCHOR"]

log = logging.getLogger(__name__)


def share_storage(weights: list) -> None:
    """Make the experts' equally shaped weights views ``w[i]`` of one contiguous ``[E, out, in]``
    block (values unchanged), so that ``stacked_view`` finds them stacked; nothing to do when
    they already are. Only weights that each own their memory are moved: one that is a view into
    a buffer of someone else's (megatron DDP's for the distributed optimizer, which keeps updating
    that buffer) stays where it is."""
    first = weights[0]
    if first.is_meta or stacked_view(weights) is not None:
        return
    if any(w.shape != first.shape or w.dtype != first.dtype or w.device != first.device
           or w.storage_offset() != 0 or w.untyped_storage().nbytes() != w.numel() * w.element_size()
           for w in weights):
        return
    with torch.no_grad():
        block = torch.stack([w.detach() for w in weights])
    for i, w in enumerate(weights):
        w.data = block[i]


def stacked_view(weights: list):
    """The weights as one ``[E, out, in]`` view (no copy) when they lie back to back in one
    storage in expert order (``share_storage``), else None. Detached: the callers route the
    gradient themselves."""
    first = weights[0]
    if not first.is_contiguous():
        return None
    size = first.numel()
    base, ptr = first.untyped_storage().data_ptr(), first.data_ptr()
    step = size * first.element_size()
    for i, w in enumerate(weights):
        if (w.shape != first.shape or w.dtype != first.dtype or not w.is_contiguous()
                or w.untyped_storage().data_ptr() != base or w.data_ptr() != ptr + i * step):
            return None
    return first.detach().as_strided((len(weights),) + tuple(first.shape), (size,) + first.stride(),
                                     first.storage_offset())


@functools.cache
def _log_layout_once(in_place: bool) -> None:
    if in_place:
        log.info("grouped experts: the stacked expert weights are read in place (one storage per layer)")
    else:
        log.info("grouped experts: the expert weights do not lie in one storage (e.g. in the distributed "
                 "optimizer's buffers): they are stacked by a copy in each forward")


def _takes_main_grad(weights: list) -> bool:
    return all(hasattr(p, "main_grad") and hasattr(p, "grad_added_to_main_grad")
               and not getattr(p, "zero_out_wgrad", False) for p in weights)


def stacked(weights: list, skip_param_grad_hooks: bool = False) -> torch.Tensor:
    """``torch.stack(weights)``; when every weight has a DDP ``main_grad`` (and autograd will reach
    them), the stacked gradient goes straight into those buffers (see the module docstring), and
    with ``skip_param_grad_hooks`` the weights get no ``.grad`` at all. Where no gradient is
    wanted (evaluation, frozen experts) the weights are read in place when they share a storage."""
    wanted = torch.is_grad_enabled() and any(p.requires_grad for p in weights)
    if skip_param_grad_hooks and wanted and _takes_main_grad(weights):
        return _StackIntoMainGrad.apply(ANCHOR, weights)
    view = None if wanted else stacked_view(weights)
    if view is not None:
        return view
    w = torch.stack(weights)
    if w.requires_grad and _takes_main_grad(weights):
        w.register_hook(functools.partial(add_to_main_grads, weights))
    return w


def add_to_main_grads(weights: list, grad: torch.Tensor) -> torch.Tensor:
    """``main_grad[i] += grad[i]`` for every expert. Eager: the gradient cast to the buffers' dtype
    once, then one foreach add (two launches). Inside a CUDA graph capture, where launches cost
    nothing at replay: the uncast gradient, so that each expert's add converts in its own kernel
    (torch's foreach falls back to one add per tensor for mixed dtypes) -- 10 bytes an element
    moved instead of 18 (the cast writes an fp32 copy that the add reads again). Inside
    ``graph_form()`` (``layer_graphs``' warm-up) the capture's form too, so that the warm-up loads
    the kernels the capture records."""
    mains = [p.main_grad for p in weights]
    captured = _GRAPH_FORM[0] > 0 or (grad.is_cuda and torch.cuda.is_current_stream_capturing())
    added = grad if grad.dtype == mains[0].dtype or captured else grad.to(mains[0].dtype)
    torch._foreach_add_(mains, list(added.unbind(0)))
    for p in weights:
        p.grad_added_to_main_grad = True  # DDP's hook: already in main_grad, do not add .grad
    return grad  # as a tensor hook: the gradient autograd goes on with, unchanged


_GRAPH_FORM = [0]  # > 0 inside graph_form()


@contextlib.contextmanager
def graph_form():
    """Within: ``add_to_main_grads`` runs as inside a CUDA graph capture, captured or not (for a
    warm-up that runs what the capture will record)."""
    _GRAPH_FORM[0] += 1
    try:
        yield
    finally:
        _GRAPH_FORM[0] -= 1


#: the one autograd input of ``_StackIntoMainGrad``: the weights are handed over as a plain list,
#: so autograd has no edge to them (had it one, it would run each weight's AccumulateGrad node and
#: DDP's hook on it even for a None gradient); the anchor's own node gets None, a no-op
ANCHOR = torch.zeros((), requires_grad=True)


class _StackIntoMainGrad(torch.autograd.Function):
    """``torch.stack`` whose backward adds the gradient into the weights' ``main_grad``, with no
    autograd edge to the weights (no ``AccumulateGrad``, no per-parameter hook)."""

    @staticmethod
    def forward(ctx, anchor, weights):
        ctx.weights = weights
        view = stacked_view(weights)
        _log_layout_once(view is not None)
        return torch.stack(weights) if view is None else view

    @staticmethod
    def backward(ctx, grad):
        add_to_main_grads(ctx.weights, grad)
        return None, None
