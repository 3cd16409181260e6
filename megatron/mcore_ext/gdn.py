"""megatron-core 0.19.2's ``GatedDeltaNet`` with its kernels chosen where it is built.

Qwen3.5's linear-attention layers are Gated DeltaNet (GDN). megatron-core's ``GatedDeltaNet``
(``megatron/core/ssm/gated_delta_net``) owns the parameters (one fused ``in_proj`` for
q | k | v | z | beta | alpha, the depthwise ``conv1d``, ``dt_bias``, ``A_log``, ``out_norm``,
``out_proj``), their initialisation, their tensor-parallel sharding and their checkpoint layout
(``sharded_state_dict``), and the context-parallel all-to-alls. ``KernelGatedDeltaNet`` keeps all
of that and changes three things, chosen in the layer spec (``models/spec.py``):

1. The kernels -- causal conv1d, the chunked gated delta rule and the gated RMS norm -- come from
   ``kernels``: ``"fla"`` (flash-linear-attention, GPU) or ``"torch"`` (``mcore_ext.gdn_kernels``:
   pure PyTorch, any device, packed rows included), ``"auto"`` = fla when it imports and a GPU is
   present. megatron's own forward calls fla's functions by module name and its torch fallback
   (deterministic mode) refuses packed input, so the forward here is ours, the same computation as
   megatron's: in_proj -> CP all-to-all (context to head parallel) -> conv1d + SiLU -> gated delta
   rule (state reset at every packed sample, ``cu_seqlens_padded``) -> out_norm(o) * silu(z) -> CP
   all-to-all back -> out_proj. What megatron does as separate PyTorch ops runs inside fla's
   kernels, as their options allow: the l2norm of q and k, g = -exp(A_log) softplus(alpha + dt_bias),
   sigmoid(beta), and q/k at the key heads (grouped value heads, no ``repeat_interleave`` copy);
   the conv runs once per section on the projection's strided slices, so q, k and v reach the rule
   contiguous (``_conv``);
   the output norm is ``GatedRMSNorm`` (the spec's choice for RMSNorm models): norm, weight and
   gate as one kernel. The packed boundaries come from the host
   (``packed_seq.padded_boundaries``: the collate's copy), not read back from the GPU per layer.
2. ``out_norm`` has a plain gamma (``w * norm(x)``, HF's ``RMSNormGated``, weight initialised to 1)
   even where the model's other norms are zero-centred (``(1 + w) * norm(x)``): the weight then
   converts from HF as it is.
3. Construction does not require fla when the torch kernels are chosen: megatron-core 0.19.2's
   ``_GDNBase.__init__`` raises ImportError whenever fla is missing, whatever the kernels, reading
   the module flag ``common.HAVE_FLA``. ``_fla_check_lifted`` sets that flag for the duration of the
   parent constructor only and restores it -- the one place this module touches megatron-core.

Shapes: ``forward(hidden_states [s_local, b, hidden], ...)`` -> ``(out [s_local, b, hidden], bias)``
like megatron's, with ``s_local = T / (CP x TP_sp)``; THD input has ``b = 1`` and global
``cu_seqlens_padded`` in ``packed_seq_params`` (the CP split is the per-sample zigzag of
``cp_split``, which is what megatron's ``_build_thd_cp_a2a_perm`` undoes; BSHD rows are zigzag-split
as ``_undo_attention_load_balancing`` expects).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Callable, Optional

import torch

from megatron.core import tensor_parallel
from megatron.core.ssm.gated_delta_net import GatedDeltaNet
from megatron.core.ssm.gated_delta_net.common import (
    _build_head_perm_for_split_sections,
    _build_thd_cp_a2a_perm,
    get_parameter_local_cp,
    tensor_a2a_cp2hp,
    tensor_a2a_hp2cp,
)
from megatron.core.transformer.spec_utils import build_module

from megatron.mcore_ext.packed_seq import padded_boundaries

__all__ = ["KernelGatedDeltaNet", "GatedRMSNorm", "GDNKernels", "resolve_gdn_kernels", "fla_usable", "FLA_CHUNK",
           "host_chunk_map"]

log = logging.getLogger(__name__)

FLA_CHUNK = 64  # fla's default chunk for the gated delta rule and its causal conv1d (both called with it)


def host_chunk_map(cu_cpu: torch.Tensor, chunk: int) -> torch.Tensor:
    """fla's varlen chunk map from host boundaries ``cu_cpu`` ``[samples + 1]``: ``[chunks, 2]`` int64
    rows ``(sample, chunk within it)`` for every ``chunk``-token chunk of every sample (a sample of
    0 tokens has none, one of 1..chunk tokens one), in order -- what fla 0.6.0's
    ``prepare_chunk_indices`` returns (``test_gdn_gpu.py`` compares the two). From Python integers:
    a few dozen samples take microseconds; fla's tensor version (``repeat_interleave`` on CPU tensors)
    showed as ~4 ms of host time right before this map's copy in the graphed step's profile, at the
    start of the forward, while the GPU waited (docs/performance.md)."""
    b = cu_cpu.tolist()
    rows = [(i, c) for i in range(len(b) - 1) for c in range(-(-(b[i + 1] - b[i]) // chunk))]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 2)


@dataclasses.dataclass(frozen=True)
class GDNKernels:
    """The kernels, with fla's signatures (``mcore_ext.gdn_kernels`` documents them)."""

    name: str
    causal_conv1d: Callable
    chunk_gated_delta_rule: Callable
    rms_norm_gated: Callable


def fla_usable() -> Optional[str]:
    """None when fla's kernels can run here, else why not."""
    if not torch.cuda.is_available():
        return "no GPU (fla's kernels are Triton)"
    try:
        from fla.modules.convolution import causal_conv1d  # noqa: F401
        from fla.modules.fused_norm_gate import rms_norm_gated  # noqa: F401
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
    except Exception as e:  # not installed
        return f"flash-linear-attention is not importable ({type(e).__name__}: {e})"
    # fla 0.6 imports with any Triton but raises in the backward on Hopper with Triton in
    # [3.4, 3.7.1) (wrong gradients upstream, fla #640): decide here, not in the first backward
    import triton

    version = tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:3] if x.isdigit())
    if torch.cuda.get_device_capability()[0] == 9 and (3, 4, 0) <= version < (3, 7, 1):
        return (f"flash-linear-attention refuses Triton {triton.__version__} on Hopper (wrong gradients upstream, "
                "fla #640): needs Triton >= 3.7.1")
    return None


def resolve_gdn_kernels(kernels: str) -> GDNKernels:
    """``"fla"``, ``"torch"`` or ``"auto"`` (fla when usable, else torch) -> the kernels."""
    if kernels not in ("auto", "fla", "torch"):
        raise ValueError(f"--gdn-kernels must be auto, fla or torch, got {kernels!r}")
    why_not = fla_usable() if kernels != "torch" else "asked for torch"
    if kernels == "fla" and why_not:
        raise ValueError(f"--gdn-kernels fla: {why_not}")
    if why_not is None:
        from fla.modules.convolution import causal_conv1d
        from fla.modules.fused_norm_gate import rms_norm_gated
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        def fla_rms_norm_gated(x, gate, weight, eps=1e-6, activation="silu"):
            return rms_norm_gated(x, gate, weight, None, activation=activation, eps=eps)

        return GDNKernels("fla", causal_conv1d, chunk_gated_delta_rule, fla_rms_norm_gated)
    from megatron.mcore_ext import gdn_kernels

    return GDNKernels("torch", gdn_kernels.causal_conv1d, gdn_kernels.chunk_gated_delta_rule,
                      gdn_kernels.rms_norm_gated)


@contextlib.contextmanager
def _fla_check_lifted(needed: bool):
    """See the module docstring, point 3."""
    if not needed:
        yield
        return
    from megatron.core.ssm.gated_delta_net import common

    saved = common.HAVE_FLA
    common.HAVE_FLA = True
    try:
        yield
    finally:
        common.HAVE_FLA = saved


class GatedRMSNorm(torch.nn.Module):
    """GDN's output norm as one kernel: ``rms_norm(x) * weight * act(gate)`` per value head (HF's
    ``RMSNormGated``; plain gamma, weight initialised to 1), x and gate ``[N, head_dim]`` ->
    ``[N, head_dim]`` in x's dtype. The kernel is fla's fused ``rms_norm_gated`` or its torch twin,
    chosen like the layer's (``kernels``). One ``weight`` parameter, as the norm it replaces (same
    checkpoint key ``out_norm.weight``, replicated over TP and summed over TP under SP)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, *, kernels: str = "auto", **unused):
        super().__init__()
        self.eps = eps
        self.activation = config.activation_func.__name__
        self.kernel = resolve_gdn_kernels(kernels).rms_norm_gated
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, gate, self.weight, eps=self.eps, activation=self.activation)


class KernelGatedDeltaNet(GatedDeltaNet):
    """``GatedDeltaNet`` with chosen kernels and a plain-gamma output norm (module docstring)."""

    def __init__(self, config, submodules, layer_number=None, *, kernels: str = "auto", **kwargs):
        chosen = resolve_gdn_kernels(kernels)
        object.__setattr__(self, "_pending_kernels", chosen)  # read by _setup_variant_attrs
        with _fla_check_lifted(chosen.name == "torch"):
            super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        self.kernels = chosen
        del self._pending_kernels
        plain = copy.copy(config)
        plain.layernorm_zero_centered_gamma = False
        self.out_norm = build_module(submodules.out_norm, config=plain, hidden_size=self.value_head_dim,
                                     eps=config.layernorm_epsilon)

    def _setup_variant_attrs(self):
        super()._setup_variant_attrs()
        self.gated_delta_rule = self._pending_kernels.chunk_gated_delta_rule

    # ------------------------------------------------------------------------------------------
    def forward(self, hidden_states, attention_mask=None, inference_context=None, packed_seq_params=None,
                sequence_len_offset=None, *, inference_params=None, **kwargs):
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("KernelGatedDeltaNet: inference (a recurrent-state cache) is not supported")
        s_local, batch, _ = hidden_states.shape
        seq_len = s_local * self.sp_size * self.cp_size  # the whole row
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        cu = cu_cpu = None
        if thd:
            if batch != 1:
                raise ValueError(f"GDN: packed (THD) input needs batch 1, got {batch}")
            cu, cu_cpu = self._boundaries(packed_seq_params, seq_len)
        chunks = self.chunk_indices(packed_seq_params, cu, cu_cpu) if thd else None
        x, _ = self.in_proj(hidden_states)  # [s / CP, b, D_tp]
        x, inverse = self._context_to_heads(x, cu, seq_len)  # [T, b, D_tp / CP]
        x = x.transpose(0, 1)  # [b, T, .]
        qkv, gate, beta, alpha = torch.split(x, self.feat_dim_split, dim=-1)
        query, key, value = self._conv(qkv, cu, cu_cpu, chunks)
        cp = self.pg_collection.cp
        a_log = get_parameter_local_cp(self.A_log, dim=0, cp_group=cp)
        dt_bias = get_parameter_local_cp(self.dt_bias, dim=0, cp_group=cp)
        # q, k stay at the key heads (the kernel maps value head h to key head h // (H / Hk)); the
        # l2norm, the decay g = -exp(A_log) softplus(alpha + dt_bias) and sigmoid(beta) run in the kernel
        out, _ = self.gated_delta_rule(query, key, value, g=alpha, beta=beta, initial_state=None,
                                       output_final_state=False, use_qk_l2norm_in_kernel=self.use_qk_l2norm,
                                       use_gate_in_kernel=True, A_log=a_log, dt_bias=dt_bias,
                                       use_beta_sigmoid_in_kernel=True, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu,
                                       chunk_indices=chunks)
        if self.recompute_norm_out:
            self.norm_out_checkpoint = tensor_parallel.CheckpointWithoutOutput()
            y = self.norm_out_checkpoint.checkpoint(self._norm_and_back, out, gate, inverse, cu)
        else:
            y = self._norm_and_back(out, gate, inverse, cu)
        out, out_bias = self.out_proj(y)
        if self.recompute_norm_out:
            self.norm_out_checkpoint.discard_output_and_register_recompute(out)
        return out, out_bias

    def _context_to_heads(self, x, cu, seq_len):
        """CP: [s/CP, b, D] -> the whole sequence, in order, for 1/CP of the heads (+ the inverse
        permutation for packed rows)."""
        if self.cp_size == 1:
            return x, None
        cp = self.pg_collection.cp
        # one unsectioned all-to-all per section: permute the heads first (megatron's recipe)
        x = x.index_select(-1, _build_head_perm_for_split_sections(tuple(self.in_proj_split_sections),
                                                                   self.cp_size, x.device))
        if cu is None:
            return tensor_a2a_cp2hp(x, seq_dim=0, head_dim=-1, cp_group=cp), None
        x = tensor_a2a_cp2hp(x, seq_dim=0, head_dim=-1, cp_group=cp, undo_attention_load_balancing=False)
        idx, inverse = _build_thd_cp_a2a_perm(cu, self.cp_size, seq_len)
        return x.index_select(0, idx), inverse

    def _boundaries(self, psp, seq_len):
        """The packed boundaries on the device and on the host (``packed_seq.padded_boundaries``:
        the collate's host copy, so no device read), checked on the host as megatron's
        ``_resolve_cu_seqlens`` checks them."""
        cu, cu_cpu = padded_boundaries(psp)
        if int(cu_cpu[-1]) != seq_len:
            raise ValueError(f"GDN: the packed boundaries end at {int(cu_cpu[-1])}, the row has {seq_len} tokens "
                             f"(cu_seqlens {cu_cpu.tolist()})")
        lens = cu_cpu[1:] - cu_cpu[:-1]
        if bool((lens % self.cp_size != 0).any()):
            raise ValueError(f"GDN: every packed sample's length must be divisible by CP={self.cp_size}, "
                             f"got {lens.tolist()}")
        return cu, cu_cpu

    def chunk_indices(self, psp, cu, cu_cpu):
        """fla's varlen chunk map ``[chunks, 2]`` (sample, chunk within it; 64-token chunks, what
        its conv and rule use), built on the host and copied without a sync, once per micro-batch
        (cached in ``psp.derived``; a map already there is used as it is, which is how
        ``layer_graphs`` hands a graph's static copy in). Without it each fla call builds the map
        itself, which needs a stream synchronisation (a host read, or a blocking copy of
        ``cu_seqlens_cpu``). None for the torch kernels and for a plain ``PackedSeqParams``."""
        cache = getattr(psp, "derived", None)
        if self.kernels.name != "fla" or cache is None:
            return None
        if "fla_chunk_indices" not in cache:
            host = host_chunk_map(cu_cpu, FLA_CHUNK)
            cache["fla_chunk_indices"] = host.to(cu.dtype).pin_memory().to(cu.device, non_blocking=True)
        return cache["fla_chunk_indices"]

    def _conv(self, qkv, cu, cu_cpu, chunks):
        """Causal conv1d + SiLU over each sequence -> q, k ``[b, T, key heads, K]`` and v
        ``[b, T, value heads, V]`` (q and k not yet l2-normed: the rule's kernel does that).

        The conv is depthwise, so it runs once per section (q, k, v) on the strided slices of the
        projection: each output is contiguous, as the rule's kernels need their inputs (fla makes
        them so), instead of one output split into three strided views that fla then copies, and
        whose gradients the split's backward concatenates again (two copies of ``[T, q+k+v]`` per
        layer)."""
        cp = self.pg_collection.cp
        sections = [self.qk_dim_local_tp, self.qk_dim_local_tp, self.v_dim_local_tp]
        local = [n // self.cp_size for n in sections]
        weight = get_parameter_local_cp(self.conv1d.weight, dim=0, cp_group=cp, split_sections=sections)
        weights = torch.split(weight.squeeze(1), local, 0)
        biases = ((None,) * 3 if not self.conv_bias else torch.split(
            get_parameter_local_cp(self.conv1d.bias, dim=0, cp_group=cp, split_sections=sections), local, 0))
        b, t = qkv.shape[:2]
        out = []
        for x, w, bias, head_dim in zip(torch.split(qkv, local, -1), weights, biases,
                                        (self.key_head_dim, self.key_head_dim, self.value_head_dim)):
            y, _ = self.kernels.causal_conv1d(x=x, weight=w, bias=bias, activation=self.activation,
                                              initial_state=None, output_final_state=False, cu_seqlens=cu,
                                              cu_seqlens_cpu=cu_cpu, chunk_indices=chunks)
            out.append(y.reshape(b, t, -1, head_dim))
        return tuple(out)

    def _norm_and_back(self, out, gate, inverse, cu):
        """out_norm(o) * silu(z) per value head, then back to [s/CP, b, D_tp / CP x CP]."""
        b, t = out.shape[:2]
        d = self.value_head_dim
        if isinstance(self.out_norm, GatedRMSNorm):  # norm, weight and gate in one kernel
            y = self.out_norm(out.reshape(-1, d), gate.reshape(-1, d))
        else:
            y = self.out_norm(out.reshape(-1, d))
            y = (y * self.act_fn(gate.reshape(-1, d).float())).to(out.dtype)
        y = y.reshape(b, t, -1).transpose(0, 1).contiguous()  # [T, b, .]
        if self.cp_size == 1:
            return y
        cp = self.pg_collection.cp
        if cu is None:
            return tensor_a2a_hp2cp(y, seq_dim=0, head_dim=-1, cp_group=cp)
        y = y.index_select(0, inverse)
        return tensor_a2a_hp2cp(y, seq_dim=0, head_dim=-1, cp_group=cp, redo_attention_load_balancing=False)
