"""Run megatron-core 0.19.2 on CPU (gloo backend) when no GPU is present.

megatron-core assumes CUDA in a few places that the CPU-only test and demo paths reach. Instead of
forking those modules, this file applies a short, explicit list of patches, and only when
``torch.cuda.is_available()`` is False (``apply()`` refuses to patch on a GPU machine unless
forced). Every patch, with why:

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``.
   megatron-core allocates buffers with ``device=torch.cuda.current_device()`` throughout
   (``GlobalMemoryBuffer.get_tensor`` used by the local ``DotProductAttention``, the tensor-parallel
   all-gather / reduce-scatter mappings, the MoE router's aux-loss tensors, the DDP grad buffers,
   ``GPTModel``'s MTP/loss paths, ...). Without a GPU, ``torch.cuda.current_device()`` raises
   "Found no NVIDIA driver". Returning the CPU device makes every such allocation land on CPU.
2. ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> the CPU generator.
   Used by ``CudaRNGStatesTracker.fork`` and by activation recomputation (``CheckpointFunction``)
   to save and restore the RNG; on CPU the generator that dropout and init draw from is the CPU one.
3. ``CudaRNGStatesTracker.add`` / ``.fork`` -> CPU-generator versions.
   ``add`` calls ``torch.cuda.get_rng_state()`` (raises without a GPU); ``fork`` would otherwise log
   "CPU RNG state changed within GPU RNG context" on every dropout, because on CPU the forked state
   *is* the CPU state. Semantics are kept: named, independently seeded streams (data-parallel,
   tensor-parallel, expert-parallel) that ``model_parallel_cuda_manual_seed`` sets up.
4. ``transformer.utils.get_default_causal_mask`` / ``get_sliding_window_causal_mask`` (and their
   imported copies in ``fusions.fused_softmax``) -> built on CPU. The originals hard-code
   ``device="cuda"``; the local ``DotProductAttention`` reaches them through ``FusedScaleMaskSoftmax``
   when no explicit mask is given.

5. ``pipeline_parallel.schedules`` / ``.p2p_communication``, ``optimizer.clip_grads`` /
   ``.optimizer``, ``distributed.param_and_grad_buffer``, ``transformer.moe.token_dispatcher``
   and ``dist_checkpointing.strategies.filesystem_async`` / ``.async_utils`` see a ``torch`` whose tensor constructors (``zeros``, ``ones``, ``empty``, ``full``,
   ``tensor``) map ``device="cuda"`` to the CPU, and whose CUDA streams and events
   (``torch.cuda.Stream/Event/stream/current_stream/synchronize``) are no-ops: CPU work is
   synchronous, and the DDP grad sync, the pipeline send/receive, the alltoall dispatcher's
   device-to-host side stream and the checkpoint writer use them unconditionally.
   The schedules allocate their token counter with ``device="cuda"`` (used with
   ``calculate_per_token_loss``), the grad-norm code its accumulators, the fp32 optimizer its
   loss scale. Only those modules' global name ``torch`` is replaced, nothing in torch itself.
6. ``clip_grads.l2_norm_impl`` (apex-free fallback ``utils.local_multi_tensor_l2_norm`` returns a
   "cuda" tensor) and ``clip_grad_by_total_norm_fp32`` (asserts ``torch.cuda.FloatTensor`` grads)
   -> CPU versions with the same arithmetic (also where ``optimizer.optimizer`` imported it).
7. ``token_dispatcher.maybe_move_tensor_to_cpu`` -> also honours ``as_numpy`` for tensors already
   on the CPU (the original converts only CUDA tensors, so on CPU the alltoall dispatcher hands
   tensors where ``all_to_all_single`` wants split-size sequences, and fails).
8. ``transformer.moe.moe_utils.te_general_gemm`` -> None. With Transformer Engine installed
   (every NGC container), the router's gating linear (``RouterGatingLinearFunction``) calls TE's
   GEMM, a CUDA kernel, whatever device its inputs are on; on a machine without a visible GPU it
   fails ("No CUDA GPUs are available"). None is the value megatron-core itself uses without TE:
   the gating then runs ``torch.mm`` in the router dtype (the same arithmetic).

Nothing else is changed; in particular collectives run through ``torch.distributed`` with gloo
exactly as megatron-core issues them.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading

import torch

__all__ = ["apply", "is_applied", "PATCHES", "cpu_device"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_applied = False

PATCHES = (
    "torch.cuda.current_device -> cpu device",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state -> CPU generator",
    "megatron.core.tensor_parallel.random.CudaRNGStatesTracker.add/fork -> CPU generator",
    "megatron.core.transformer.utils.get_default_causal_mask/get_sliding_window_causal_mask -> CPU",
    "megatron.core pipeline schedules/p2p, optimizer, DDP grad buffer: torch constructors map "
    "device='cuda' -> cpu, torch.cuda.current_stream/synchronize -> no-ops",
    "megatron.core.optimizer.clip_grads.l2_norm_impl / clip_grad_by_total_norm_fp32 -> CPU versions",
    "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu -> honours as_numpy on CPU",
    "megatron.core.transformer.moe.moe_utils.te_general_gemm -> None (the router gating's torch.mm)",
)


def cpu_device() -> torch.device:
    return torch.device("cpu")


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _tracker_add(self, name, seed):
    """CPU version of CudaRNGStatesTracker.add: a named stream seeded with ``seed``."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _tracker_fork(self, name=None):
    """CPU version of CudaRNGStatesTracker.fork: run the block on stream ``name``, then restore."""
    from megatron.core.tensor_parallel import random as mrandom

    if name is None:
        name = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
    if name not in self.states_:
        raise Exception(f"rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(
                f"current rng state name {self._current_state_name} is not the forked name {name}"
            )
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


@functools.lru_cache(maxsize=32)
def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


@functools.lru_cache(maxsize=32)
def _cpu_sliding_window_causal_mask(sq, skv, window_size):
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])


def _cpu_if_cuda(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CpuTorch:
    """``torch`` as one megatron module sees it: tensor constructors never land on "cuda"."""

    def __init__(self, real):
        self.__dict__["_real"] = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _wrap(name):  # noqa: N805 - a factory used in the class body
        def ctor(self, *args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_if_cuda(kwargs["device"])
            return getattr(self._real, name)(*args, **kwargs)

        ctor.__name__ = name
        return ctor

    @property
    def cuda(self):
        return _CpuCuda(self._real.cuda)

    zeros = _wrap("zeros")
    ones = _wrap("ones")
    empty = _wrap("empty")
    full = _wrap("full")
    tensor = _wrap("tensor")
    del _wrap


class _NullEvent:
    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def record(self, stream=None):
        pass


class _NullStream:
    """A CUDA stream on CPU: work is synchronous, waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return _NullEvent()

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


class _CpuCuda:
    def __init__(self, real):
        self.__dict__["_real"] = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    Stream = _NullStream
    Event = _NullEvent

    def current_stream(self, device=None):
        return _NullStream()

    def stream(self, stream):
        return contextlib.nullcontext()

    def synchronize(self, device=None):
        pass


def _cpu_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    norms = [torch.linalg.vector_norm(t.float()) for t in tensor_lists[0]]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    return total.reshape(1), None


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip_grad_by_total_norm_fp32 without its CUDA-type assertion."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for p in parameters:
        g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if g is not None:
            grads.append(to_local_if_dtensor(g).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
        for g in grads:
            g.mul_(clip_coeff.to(g.dtype))
    elif clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


def _cpu_maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def is_applied() -> bool:
    return _applied


def apply(force: bool = False) -> bool:
    """Apply the CPU patches if no GPU is present (or ``force``). Idempotent.

    Returns True when the patches are (now) in effect, False when a GPU is present and nothing was
    changed.
    """
    global _applied
    with _lock:
        if _applied:
            return True
        if torch.cuda.is_available() and not force:
            return False
        from megatron.core.fusions import fused_softmax
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.transformer import utils as tutils

        torch.cuda.current_device = cpu_device  # 1
        mrandom._get_cuda_rng_state = _cpu_get_rng_state  # 2
        mrandom._set_cuda_rng_state = _cpu_set_rng_state
        mrandom.CudaRNGStatesTracker.add = _tracker_add  # 3
        mrandom.CudaRNGStatesTracker.fork = _tracker_fork
        for mod in (tutils, fused_softmax):  # 4
            mod.get_default_causal_mask = _cpu_default_causal_mask
            mod.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask
        from megatron.core.optimizer import clip_grads
        from megatron.core.optimizer import optimizer as moptimizer
        from megatron.core.distributed import param_and_grad_buffer
        from megatron.core.pipeline_parallel import p2p_communication, schedules
        from megatron.core.transformer.moe import token_dispatcher
        from megatron.core.dist_checkpointing.strategies import async_utils, filesystem_async

        for mod in (schedules, clip_grads, moptimizer, param_and_grad_buffer, p2p_communication,
                    token_dispatcher, filesystem_async, async_utils):  # 5
            mod.torch = _CpuTorch(torch)
        token_dispatcher.maybe_move_tensor_to_cpu = _cpu_maybe_move_tensor_to_cpu  # 7
        clip_grads.l2_norm_impl = _cpu_l2_norm  # 6
        clip_grads.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
        moptimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
        from megatron.core.transformer.moe import moe_utils

        moe_utils.te_general_gemm = None  # 8
        _applied = True
        log.info("megatron.mcore_ext.cpu_runtime: no GPU, applied: %s", "; ".join(PATCHES))
        return True
