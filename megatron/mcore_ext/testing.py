"""Multi-rank tests on CPU: spawn N gloo ranks with megatron-core's parallel state.

    from megatron.mcore_ext.testing import run_distributed

    def body(x):                       # module-level, so the spawned ranks can import it
        from megatron.core import parallel_state as ps
        return ps.get_tensor_model_parallel_rank(), x * 2

    results = run_distributed(body, world_size=2, tp=2, args=(21,))   # one result per rank

Each call initialises ``parallel_state`` for the requested TP/PP/CP/EP(/ETP) layout (DP is what
is left of the world size), seeds megatron's RNG tracker, runs the function on every rank and
returns the per-rank results in rank order.

The ranks are CPU ranks on every machine: they are started with ``CUDA_VISIBLE_DEVICES=""``, so
on a GPU machine too they see no GPU and run megatron-core through the CPU runtime -- the same
code path as in CI. ``gpu=True`` keeps the GPUs visible instead (tests of GPU kernels), one GPU per rank,
with NCCL for CUDA tensors and gloo for CPU ones (``cpu:gloo,cuda:nccl``). Parallel state, the RNG tracker and the MoE aux-loss
tracker are always torn down afterwards, also when the function raises, and every process group
but the default one is destroyed (a live gloo group keeps a polling thread in the rank).

The ranks are kept alive between calls (one pool per world size; starting a process that imports
torch and megatron-core costs seconds on a small machine), with the default gloo process group
created once. A rank that fails, or a call that exceeds its timeout, kills the whole pool (its
peers may be stuck in a collective) and the error is re-raised here with the rank's traceback; the
next call starts a fresh pool.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import pickle
import queue as queue_mod
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

from megatron.mcore_ext.netutil import free_port as _free_port

__all__ = ["ParallelLayout", "run_distributed", "DistributedTestError", "shutdown_pools"]


class DistributedTestError(RuntimeError):
    """A rank raised, died or timed out."""


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int | None = None  # expert tensor parallel size; None = megatron's default (= tp)

    def validate(self, world_size: int) -> int:
        """Return the data-parallel size, or raise if the layout does not fit the world size."""
        for name in ("tp", "pp", "cp", "ep"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ParallelLayout.{name} must be a positive int, got {v!r}")
        mp_size = self.tp * self.pp * self.cp
        if world_size % mp_size:
            raise ValueError(
                f"world_size={world_size} is not divisible by tp*pp*cp={mp_size} ({self})"
            )
        etp = self.tp if self.etp is None else self.etp
        if world_size % (etp * self.ep * self.pp):
            raise ValueError(
                f"world_size={world_size} is not divisible by etp*ep*pp={etp * self.ep * self.pp} ({self})"
            )
        return world_size // mp_size


def _setup_layout(layout: ParallelLayout, seed: int) -> None:
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def _teardown_layout() -> None:
    from megatron.core import parallel_state as ps

    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()  # not just clear(): that keeps every metric name ever recorded
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # a class-level tensor: a backward outside megatron's schedule creates it as a 0-d scalar, and
    # the schedule's later set_loss_scale(shape [1]) then fails to copy into it (the next test's)
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    ps.destroy_model_parallel()
    _destroy_call_groups()


def _destroy_call_groups() -> None:
    """Destroy every process group but the pool's default one: megatron's ``destroy_model_parallel``
    only forgets the groups of a layout (a few dozen, gloo twins included), and each live gloo group
    keeps a polling thread in the rank. Kept, a pooled rank had thousands of them by the end of a
    CI run, busy on the same two cores as every later test. A destroyed group's threads end when
    its object is freed, and the trainer's model, DDP and optimizer hold the groups in reference
    cycles that a rank idling in ``queue.get`` never collects: hence the collection here."""
    import gc

    import torch.distributed as dist

    default = dist.distributed_c10d._get_default_group()
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not default:
            dist.destroy_process_group(group)
    gc.collect()


def _worker_main(rank: int, world_size: int, port: int, task_q, result_q) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from megatron.mcore_ext import cpu_runtime

    cpu_runtime.apply()
    backend = "gloo"
    if torch.cuda.is_available() and world_size <= torch.cuda.device_count():
        # GPU ranks (``gpu=True``): CUDA tensors (DDP's grad buffers, the trainer's reductions)
        # need NCCL; CPU tensors keep gloo. One GPU per rank: NCCL refuses two ranks on one GPU.
        torch.cuda.set_device(rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=300),
    )
    result_q.put((rank, "ready", None))
    while True:
        msg = task_q.get()
        if msg is None:
            break
        sys_path, payload = msg
        for p in reversed(sys_path):
            if p not in sys.path:
                sys.path.insert(0, p)
        try:
            fn, layout, seed, args, kwargs = pickle.loads(payload)
            _setup_layout(layout, seed)
            try:
                out = fn(*args, **kwargs)
            finally:
                _teardown_layout()
            result_q.put((rank, "ok", pickle.dumps(out)))
        except BaseException:  # report everything, including assertion errors, to the parent
            result_q.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int, gpu: bool = False, start_timeout: float = 300.0):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        port = _free_port()
        self.result_q = ctx.Queue()
        self.task_qs = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(r, world_size, port, self.task_qs[r], self.result_q),
                daemon=True,
                name=f"mcore-test-rank{r}",
            )
            for r in range(world_size)
        ]
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not gpu:  # the children inherit the environment they are started with
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        try:
            for p in self.procs:
                p.start()
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        self._collect(start_timeout, expect="ready")

    def _collect(self, timeout: float, expect: str) -> list[Any]:
        deadline = time.monotonic() + timeout
        got: dict[int, Any] = {}
        while len(got) < self.world_size:
            try:
                rank, status, payload = self.result_q.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    raise DistributedTestError(
                        f"rank process {dead[0].name} died (exit code {dead[0].exitcode})"
                    )
                if time.monotonic() > deadline:
                    missing = sorted(set(range(self.world_size)) - set(got))
                    raise DistributedTestError(
                        f"timed out after {timeout:.0f}s waiting for ranks {missing}"
                    )
                continue
            if status == "error":
                raise DistributedTestError(f"rank {rank} raised:\n{payload}")
            if status != expect:
                raise DistributedTestError(f"rank {rank}: unexpected status {status!r}")
            got[rank] = payload
        return [got[r] for r in range(self.world_size)]

    def run(self, fn, layout: ParallelLayout, seed: int, args, kwargs, timeout: float) -> list[Any]:
        payload = pickle.dumps((fn, layout, seed, args, kwargs))
        for q in self.task_qs:
            q.put((list(sys.path), payload))
        results = self._collect(timeout, expect="ok")
        return [pickle.loads(r) for r in results]

    def close(self, graceful: bool = True) -> None:
        if graceful:
            for q in self.task_qs:
                try:
                    q.put(None)
                except Exception:
                    pass
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


_POOLS: dict[tuple[int, bool], _Pool] = {}


def shutdown_pools() -> None:
    """Stop every cached rank pool (also done at interpreter exit)."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.close()


atexit.register(shutdown_pools)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    args: tuple = (),
    kwargs: dict | None = None,
    seed: int = 1234,
    timeout: float = 600.0,
    gpu: bool = False,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks under the given parallel layout.

    ``fn`` must be importable by name (a module-level function) and its return value picklable.
    Returns the list of per-rank return values, in rank order. ``gpu``: keep the machine's GPUs
    visible to the ranks (default: CPU ranks, see the module docstring).
    """
    layout = ParallelLayout(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp)
    layout.validate(world_size)
    key = (world_size, bool(gpu))
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = _Pool(world_size, gpu=gpu)
    try:
        return pool.run(fn, layout, seed, args, kwargs or {}, timeout)
    except BaseException as exc:
        _POOLS.pop(key, None)
        pool.close(graceful=False)
        if isinstance(exc, DistributedTestError):
            raise DistributedTestError(f"{fn.__qualname__} on {layout}, world_size={world_size}: {exc}") from None
        raise


# ---------------------------------------------------------------------------------------------
# Tiny models and moving weights between one-process references and sharded (TP/EP/PP) models.
# ---------------------------------------------------------------------------------------------


def tiny_moe_gpt(
    *,
    num_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    num_query_groups: int | None = None,
    num_moe_experts: int | None = 4,
    moe_router_topk: int = 2,
    ffn_hidden_size: int = 64,
    vocab_size: int = 64,
    max_sequence_length: int = 64,
    moe_layer_freq: int | list[int] = 1,
    sequence_parallel: bool = False,
    parallel_output: bool = True,
    padding_aware_router: bool = True,
    scatter_embedding_sequence_parallel: bool = True,
    **config_overrides,
):
    """A small megatron-core ``GPTModel`` with MoE layers (local spec, allgather dispatcher, fp32).

    Uses our pure-PyTorch attention and norms and, unless ``padding_aware_router=False``, our
    padding-aware router.

    Parallel sizes are read from the initialised ``parallel_state``; ``config_overrides`` go into
    the ``TransformerConfig`` (e.g. ``moe_aux_loss_coeff``, ``moe_router_enable_expert_bias``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron.mcore_ext.spec import LOCAL_SPEC_CONFIG

    cfg_kwargs = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        ffn_hidden_size=ffn_hidden_size,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        context_parallel_size=ps.get_context_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        sequence_parallel=sequence_parallel,
        add_bias_linear=False,
        params_dtype=__import__("torch").float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **LOCAL_SPEC_CONFIG,
    )
    if num_moe_experts:
        cfg_kwargs.update(
            num_moe_experts=num_moe_experts,
            moe_router_topk=moe_router_topk,
            moe_ffn_hidden_size=ffn_hidden_size,
            moe_token_dispatcher_type="allgather",
            moe_layer_freq=moe_layer_freq,
            moe_aux_loss_coeff=0.0,
            moe_z_loss_coeff=None,
        )
    cfg_kwargs.update(config_overrides)
    config = TransformerConfig(**cfg_kwargs)
    from megatron.mcore_ext.spec import local_spec

    if num_moe_experts:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="LayerNorm")
    else:
        spec = get_gpt_layer_local_spec()
    # torch's own norm refuses sequence parallelism and the local attention knows neither THD nor
    # CP: take our pure-PyTorch ones (megatron.mcore_ext.norm / .attention)
    spec = local_spec(spec)
    if padding_aware_router and num_moe_experts:  # False: megatron-core 0.19.2's own TopKRouter (regression tests)
        from megatron.mcore_ext.router import use_padding_aware_router

        spec = use_padding_aware_router(spec)
    return GPTModel(
        config,
        spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=parallel_output,
        scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
    )
