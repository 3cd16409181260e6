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
        _applied = True
        log.info("megatron.mcore_ext.cpu_runtime: no GPU, applied: %s", "; ".join(PATCHES))
        return True
