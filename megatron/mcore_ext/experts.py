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
backward. The stacked weights are read in place where the experts share one storage, else
stacked by a copy each forward; gradients flow back into each expert's own parameter, or straight
into megatron DDP's ``main_grad`` (``expert_weights`` says how and when).

It applies when the experts are plain: no bias, no expert tensor parallelism (each rank holds
whole experts), no FP8/FP4, probabilities applied after the activation, ``torch._grouped_mm``
available; otherwise it falls back to ``SequentialMLP.forward``. Plug it in through the spec
(``use_grouped_experts``), like the router. On a GPU the SwiGLU and the probabilities are one
fused kernel (megatron-core's weighted SwiGLU, ``_fused_swiglu_ok``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron.mcore_ext import expert_weights

__all__ = ["GroupedGemmSequentialMLP", "use_grouped_experts", "grouped_mm_available"]


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


class GroupedGemmSequentialMLP(SequentialMLP):
    """``SequentialMLP`` whose forward runs all local experts as two grouped GEMMs."""

    #: ``tokens_per_expert`` may be a device tensor and the buffer may carry unused rows after the
    #: last expert's (``sorted_dispatch.SortedAllGatherTokenDispatcher``): the grouped path leaves
    #: them alone, the fallback slices them off
    takes_padded_dispatch: bool = True
    #: the stacked weights' backward adds into ``main_grad`` and gives the expert parameters no
    #: ``.grad`` (so no per-parameter hook runs); only when nothing needs those hooks (``expert_weights``)
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
            expert_weights.share_storage([e.linear_fc1.weight for e in experts])
            expert_weights.share_storage([e.linear_fc2.weight for e in experts])

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
        w1 = expert_weights.stacked([e.linear_fc1.weight for e in self.local_experts], skip).transpose(1, 2)
        w2 = expert_weights.stacked([e.linear_fc2.weight for e in self.local_experts], skip).transpose(1, 2)
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
