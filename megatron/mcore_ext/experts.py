"""Grouped-GEMM experts without Transformer Engine: ``SequentialMLP``'s parameters, one kernel.

megatron-core 0.19.2 trains MoE experts without TE only through ``SequentialMLP``: a Python loop
over the local experts, two or three GEMMs each, forward and backward. With 32 small experts per
layer that is thousands of kernel launches per step and the GPU waits on the host (measured on an
H100 for the ``proxy`` variant: 245 ms of GPU work in a 1085 ms step; ``aten::mm`` was called
2,600 times per step).

``GroupedGemmSequentialMLP`` keeps ``SequentialMLP`` exactly as it is stored -- the same
``local_experts.{i}.linear_fc1/linear_fc2`` parameters, the same sharded state dict and
checkpoints, the same HF conversion -- and replaces the loop by ``torch._grouped_mm`` over the
stacked expert weights: one GEMM for fc1 and one for fc2, each a single kernel forward and two
backward. The stacked weights are read in place where the experts share one storage (below),
else stacked by a copy each forward; gradients flow back into each expert's own parameter.

It applies when the experts are plain: no bias, no expert tensor parallelism (each rank holds
whole experts), no FP8/FP4, probabilities applied after the activation, ``torch._grouped_mm``
available; otherwise it falls back to ``SequentialMLP.forward``. Plug it in through the spec
(``use_grouped_experts``), like the router. On a GPU the SwiGLU and the probabilities are one
fused kernel (megatron-core's weighted SwiGLU, ``_fused_swiglu_ok``).

One storage for the stacked weights: at construction each expert's ``linear_fc1.weight`` (and
``linear_fc2.weight``) becomes a view ``[out, in]`` of one contiguous ``[E, out, in]`` block, so
the forward reads the stacked weights as a strided view instead of copying them with
``torch.stack`` (``_stacked_view``; the parameters, their names and what a checkpoint holds are
unchanged). Anything that later gives the parameters their own memory -- megatron's distributed
optimizer places each parameter in its DDP buffer, in reverse order -- breaks the layout; the
forward then checks it each call and stacks, as before. Moving or casting the module
(``.cuda()``, ``.to()``) re-forms the block (``_apply``).

Gradient accumulation into ``main_grad`` (under megatron's DDP): left to autograd, the stacked
weight gradient ``[E, out, in]`` is split into one ``.grad`` per expert, and DDP's per-parameter
hook adds each into that parameter's ``main_grad`` -- 64 ``add_`` launches per MoE layer for 32
experts. Instead a hook on the stacked tensor adds the whole gradient with one foreach call and
marks the parameters ``grad_added_to_main_grad``, which DDP's hook honours (megatron's own
``gradient_accumulation_fusion`` contract, which its ``zero_grad_buffer`` resets every
iteration). Every micro-batch of a model takes the same path (the conditions above are fixed
per model); a micro-batch with no local tokens runs ``SequentialMLP.forward``, whose weight
gradients are then exactly zero, so skipping their ``add_`` loses nothing.

With ``skip_param_grad_hooks`` (set by our trainer when DDP does not overlap the gradient
reduction, i.e. nothing waits for a parameter's hook to mark it ready) the stack's backward also
returns no per-expert gradient at all: autograd then skips the 2 x 32 per-expert ``AccumulateGrad``
nodes and DDP hooks of every MoE layer, Python work of ~10 ms per step for ``proxy``
(docs/performance.md). With overlap on, DDP's hooks must run (they start the bucket's reduction),
so the flag stays off and the gradients flow as above.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.transformer.moe.experts import SequentialMLP

__all__ = ["GroupedGemmSequentialMLP", "use_grouped_experts", "grouped_mm_available"]

log = logging.getLogger(__name__)


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


class GroupedGemmSequentialMLP(SequentialMLP):
    """``SequentialMLP`` whose forward runs all local experts as two grouped GEMMs."""

    #: ``tokens_per_expert`` may be a device tensor and the buffer may carry unused rows after the
    #: last expert's (``sorted_dispatch.SortedAllGatherTokenDispatcher``): the grouped path leaves
    #: them alone, the fallback slices them off
    takes_padded_dispatch: bool = True
    #: the stacked weights' backward adds into ``main_grad`` and gives the expert parameters no
    #: ``.grad`` (so no per-parameter hook runs); only when nothing needs those hooks, see above
    skip_param_grad_hooks: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._share_expert_storage()

    def _apply(self, fn, *args, **kwargs):
        """``.cuda()``, ``.to()``, ``.bfloat16()`` ... give every parameter a tensor of its own (the
        local spec initialises on the CPU, ``LOCAL_SPEC_CONFIG``, and the trainer then moves the
        model this way): put the experts' weights back into one block afterwards, as
        ``torch.nn.RNNBase`` re-flattens its."""
        out = super()._apply(fn, *args, **kwargs)
        self._share_expert_storage()
        return out

    def _share_expert_storage(self) -> None:
        experts = getattr(self, "local_experts", None)  # None while SequentialMLP.__init__ runs
        if experts is not None and len(experts) > 1:
            _share_storage([e.linear_fc1.weight for e in experts])
            _share_storage([e.linear_fc2.weight for e in experts])

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        cfg = self.config
        if not grouped_mm_available() or self.num_local_experts < 2 or x.shape[0] == 0:
            return False
        if cfg.gradient_accumulation_fusion:  # megatron's fused wgrad kernels (TE/apex) own main_grad
            return False
        if cfg.add_bias_linear or cfg.fp8 or cfg.fp4 or cfg.moe_apply_probs_on_input:
            return False
        if self.tp_group is not None and self.tp_group.size() > 1:
            return False
        if cfg.use_te_activation_func or getattr(cfg, "activation_func_clamp_value", None) is not None:
            return False
        if cfg.gated_linear_unit and getattr(cfg, "glu_linear_offset", 0.0):
            return False
        if x.is_cuda:  # the CUDA kernel is bf16-only (Hopper and newer)
            return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
        # CPU reference kernel: 16-byte aligned strides
        itemsize = x.element_size()
        return (cfg.hidden_size * itemsize) % 16 == 0 and (cfg.moe_ffn_hidden_size * itemsize) % 16 == 0

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        if not self._grouped_ok(x):
            counts = torch.as_tensor(tokens_per_expert).cpu()  # SequentialMLP splits on the host
            n = int(counts.sum())
            if n == x.shape[0]:
                return super().forward(x, counts, permuted_probs)
            out, bias = super().forward(x[:n], counts, permuted_probs[:n])  # a padded buffer
            return torch.cat([out, out.new_zeros((x.shape[0] - n,) + tuple(out.shape[1:]))]), bias
        counts = torch.as_tensor(tokens_per_expert, device=x.device)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        # [E, in, out] views of the experts' [out, in] weights
        skip = self.skip_param_grad_hooks
        w1 = _stacked([e.linear_fc1.weight for e in self.local_experts], skip).transpose(1, 2)
        w2 = _stacked([e.linear_fc2.weight for e in self.local_experts], skip).transpose(1, 2)
        h = torch._grouped_mm(x, w1.to(x.dtype), offs=offs)
        if self.config.gated_linear_unit and _fused_swiglu_ok(h, self.config):
            h = weighted_bias_swiglu_impl(h, None, permuted_probs.unsqueeze(-1))
        else:
            if self.config.gated_linear_unit:
                gate, up = torch.chunk(h, 2, dim=-1)
                h = self.config.activation_func(gate) * up
            else:
                h = self.config.activation_func(h)
            dtype = h.dtype
            h = (h * permuted_probs.unsqueeze(-1)).to(dtype)
        out = torch._grouped_mm(h, w2.to(h.dtype), offs=offs)
        return out, None


def _fused_swiglu_ok(h: torch.Tensor, cfg) -> bool:
    """Whether ``silu(gate) * up * probs`` runs as megatron-core's fused weighted SwiGLU
    (``weighted_bias_swiglu_impl``: one torch.compile'd kernel forward, one backward, instead of
    five elementwise passes over strided ``[R, F]`` halves, ~3 ms a step for ``proxy-hybrid`` on
    one H200). On CUDA only (inductor's Triton kernels; on CPU it would compile C++ for every shape)
    and only for plain SiLU, where megatron's jit_fuser is torch.compile and Triton imports."""
    return h.is_cuda and cfg.activation_func is F.silu and _compiled_fusions()


@functools.cache
def _compiled_fusions() -> bool:
    from megatron.core import jit

    try:
        import triton  # noqa: F401 - inductor's GPU backend
    except ImportError:
        return False
    return jit.jit_fuser is torch.compile


def _share_storage(weights: list) -> None:
    """Make the experts' equally shaped weights views ``w[i]`` of one contiguous ``[E, out, in]``
    block (values unchanged), so that ``_stacked_view`` finds them stacked; nothing to do when
    they already are. Only weights that each own their memory are moved: one that is a view into
    a buffer of someone else's (megatron DDP's for the distributed optimizer, which keeps updating
    that buffer) stays where it is."""
    first = weights[0]
    if first.is_meta or _stacked_view(weights) is not None:
        return
    if any(w.shape != first.shape or w.dtype != first.dtype or w.device != first.device
           or w.storage_offset() != 0 or w.untyped_storage().nbytes() != w.numel() * w.element_size()
           for w in weights):
        return
    with torch.no_grad():
        block = torch.stack([w.detach() for w in weights])
    for i, w in enumerate(weights):
        w.data = block[i]


def _stacked_view(weights: list):
    """The weights as one ``[E, out, in]`` view (no copy) when they lie back to back in one
    storage in expert order (``_share_storage``), else None. Detached: the callers route the
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


def _stacked(weights: list, skip_param_grad_hooks: bool = False) -> torch.Tensor:
    """``torch.stack(weights)``; when every weight has a DDP ``main_grad`` (and autograd will reach
    them), the stacked gradient goes straight into those buffers (see the module docstring), and
    with ``skip_param_grad_hooks`` the weights get no ``.grad`` at all. Where no gradient is
    wanted (evaluation, frozen experts) the weights are read in place when they share a storage."""
    wanted = torch.is_grad_enabled() and any(p.requires_grad for p in weights)
    if skip_param_grad_hooks and wanted and _takes_main_grad(weights):
        return _StackIntoMainGrad.apply(_ANCHOR, weights)
    view = None if wanted else _stacked_view(weights)
    if view is not None:
        return view
    w = torch.stack(weights)
    if w.requires_grad and _takes_main_grad(weights):
        w.register_hook(functools.partial(_add_to_main_grads, weights))
    return w


def _add_to_main_grads(weights: list, grad: torch.Tensor) -> torch.Tensor:
    """``main_grad[i] += grad[i]`` for every expert. Eager: the gradient cast to the buffers' dtype
    once, then one foreach add (two launches). Inside a CUDA graph capture, where launches cost
    nothing at replay: the uncast gradient, so that each expert's add converts in its own kernel
    (torch's foreach falls back to one add per tensor for mixed dtypes) -- 10 bytes an element
    moved instead of 18 (the cast writes an fp32 copy that the add reads again)."""
    mains = [p.main_grad for p in weights]
    if grad.dtype != mains[0].dtype and not (grad.is_cuda and torch.cuda.is_current_stream_capturing()):
        grad = grad.to(mains[0].dtype)
    torch._foreach_add_(mains, list(grad.unbind(0)))
    for p in weights:
        p.grad_added_to_main_grad = True  # DDP's hook: already in main_grad, do not add .grad
    return grad


#: the one autograd input of ``_StackIntoMainGrad``: the weights are handed over as a plain list,
#: so autograd has no edge to them (had it one, it would run each weight's AccumulateGrad node and
#: DDP's hook on it even for a None gradient); the anchor's own node gets None, a no-op
_ANCHOR = torch.zeros((), requires_grad=True)


class _StackIntoMainGrad(torch.autograd.Function):
    """``torch.stack`` whose backward adds the gradient into the weights' ``main_grad``, with no
    autograd edge to the weights (no ``AccumulateGrad``, no per-parameter hook)."""

    @staticmethod
    def forward(ctx, anchor, weights):
        ctx.weights = weights
        view = _stacked_view(weights)
        _log_layout_once(view is not None)
        return torch.stack(weights) if view is None else view

    @staticmethod
    def backward(ctx, grad):
        _add_to_main_grads(ctx.weights, grad)
        return None, None


def use_grouped_experts(spec, sync_free_dispatch: bool = True):
    """Return a copy of a megatron-core spec tree with ``SequentialMLP`` replaced by ours
    and (``sync_free_dispatch``) ``MoELayer`` by ``GroupedMoELayer``, which gives those experts
    the sync-free allgather dispatcher (``sorted_dispatch``)."""
    from megatron.mcore_ext.spec import replace_modules

    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron.mcore_ext.sorted_dispatch import GroupedMoELayer

    mapping = {SequentialMLP: GroupedGemmSequentialMLP}
    if sync_free_dispatch:
        mapping[MoELayer] = GroupedMoELayer
    return replace_modules(spec, mapping)
