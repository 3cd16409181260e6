"""Save and resume through megatron-core's ``dist_checkpointing``, never leaving a half-written
latest checkpoint.

Layout under ``--save``::

    iter_0000040/                      a complete checkpoint (dist_checkpointing files + COMPLETE)
    iter_0000050.partial/              a save in progress (or one that crashed): never loaded
    latest_checkpointed_iteration.txt  the newest complete iteration (Megatron's tracker name)

A save writes everything into ``iter_N.partial``; only when every rank has finished does rank 0
write the ``COMPLETE`` marker, rename the directory to ``iter_N`` and then replace the tracker
file (write to a temporary file, fsync, ``os.replace``). A crash at any point leaves the tracker
on the previous complete checkpoint. Loading takes the tracker's iteration (or, without a tracker,
the newest ``iter_N`` that has its marker) and ignores ``.partial`` directories; the next save
removes them.

What a checkpoint holds: the model and optimizer as sharded tensors (so a different parallel
layout can load them), the learning-rate scheduler, the iteration, the flags it was written
with, and per rank its RNG states and its data reader's position (a ``ShardedObject`` per rank:
restored when the world size is the same; with another world size the data position is derived
from the iteration instead, with a warning), and ``MANIFEST.json`` (``checkpoint_trust``).

The optimizer is stored in a layout-free form (format 2): its state tensors under the model
parameters' sharded keys (no ``chained_i.`` prefix, which depends on how many optimizers megatron
chains: one with EP=1, two with EP>1) and the shared Adam step; the parameter groups come from the
run that loads (their learning rate and weight decay are the scheduler's anyway; ``optimizer_state``). So TP, EP, PP, DP
and CP can all change between save and load. Since format 3 the backend can change too: both store
the norms under the TE spec's keys (``mcore_ext.spec.te_norm_keys``), and what only TE's modules
keep (their extra state) starts empty when a checkpoint lacks it (``checkpoint_keys``, which also
reads format 2's local norm keys).

A weights-only checkpoint (``save_checkpoint(..., optimizer=None)``: ``scripts/convert_hf.py
import``) holds the model and the settings only; ``--load`` starts a run from it at iteration 0.
With ``--hf-checkpoint`` the common state also keeps its ``config.json`` (``hf_config``), which an
export writes back.

Before anything of a checkpoint is read it must pass its manifest and hold no code
(``checkpoint_trust``), and agree with the flags on the schedule and the model
(``checkpoint_checks``); ``open_checkpoint`` does all of it before the model is built,
``load_checkpoint`` then fills the model, optimizer and scheduler.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import re
import shutil
import warnings
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron.mcore_ext import fallbacks

from multimodal_dev import checkpoint_trust
from multimodal_dev.checkpoint_keys import match_checkpoint, restore_fresh_extra_states, stored_metadata
from multimodal_dev.optimizer_state import (find_main_parameters, optimizer_parts, optimizer_step, restore_optimizer,
                                            shard_place, tensor_leaves)
from multimodal_dev.checkpoint_checks import (CheckpointError, check_resolved, check_scheduler, check_settings,
                                              resolved_settings)

__all__ = ["save_checkpoint", "open_checkpoint", "load_checkpoint", "load_weights", "latest_checkpoint",
           "complete_checkpoints", "Checkpoint", "CheckpointError", "TRACKER", "COMPLETE"]

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
COMPLETE = "COMPLETE"
# 2: the optimizer's layout-free form (module docstring; 1: megatron's own, same layout only, refused);
# 3: the local backend's norms under the TE backend's keys (``mcore_ext.spec.te_norm_keys``)
FORMAT = 3
# the optimizer's sharded-state options: the same tensor keys whatever the number of chained optimizers
_OPTIMIZER_METADATA = {"chained_optim_avoid_prefix": True, "distrib_optim_sharding_type": "fully_reshardable"}


_ITER_RE = re.compile(r"^iter_(\d{7})$")


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def latest_checkpoint(root: str) -> Optional[int]:
    """The newest complete iteration under ``root`` (None if there is none)."""
    if not root or not os.path.isdir(root):
        return None
    tracker = os.path.join(root, TRACKER)
    if os.path.exists(tracker):
        text = open(tracker).read().strip()
        try:
            it = int(text)
        except ValueError:
            raise RuntimeError(f"checkpoint tracker {tracker} holds {text!r}, expected an iteration number")
        if not os.path.exists(os.path.join(_iter_dir(root, it), COMPLETE)):
            raise RuntimeError(f"checkpoint tracker {tracker} names iteration {it}, but "
                               f"{_iter_dir(root, it)} is missing or has no {COMPLETE} marker")
        return it
    done = []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        if m and os.path.exists(os.path.join(root, name, COMPLETE)):
            done.append(int(m.group(1)))
    return max(done) if done else None


def complete_checkpoints(root: str) -> list[int]:
    """Iterations of the complete checkpoints under ``root``, oldest first."""
    if not root or not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(root)
                  if (m := _ITER_RE.match(n)) and os.path.exists(os.path.join(root, n, COMPLETE)))


def _rng_state() -> dict:
    """Plain values and tensors only (``checkpoint_trust`` loads them with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"python": random.getstate(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    st["tracker"] = get_cuda_rng_tracker().get_states()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(st["tracker"])


def _sharded_state(model, optimizer, scheduler, iteration: int, args_dict: dict, rank_state: Any, loading: bool):
    """The state dict that is saved (``loading=False``) or the template a load fills, plus, when
    loading, the optimizer's own structure the loaded tensors go back into."""
    model_sd = model.sharded_state_dict()
    rank, world = dist.get_rank(), dist.get_world_size()
    sd = {"model": model_sd, "iteration": iteration, "args": args_dict, "resolved": resolved_settings(model.config),
          "world_size": world, "format": FORMAT}
    hf_dir = (args_dict.get("model") or {}).get("hf_checkpoint") if isinstance(args_dict, dict) else None
    if hf_dir and not loading:  # the config.json the sizes came from: an export writes it back
        from multimodal_dev.hf_checkpoint import read_hf_config

        sd["hf_config"] = read_hf_config(hf_dir)
    if optimizer is None:  # weights only (scripts/convert_hf.py import): a run's starting point
        sd["weights_only"] = True
        return sd, None
    osd = optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=dict(_OPTIMIZER_METADATA))
    leaves = dict(tensor_leaves(osd))
    sd["optimizer"] = {"tensors": {str(i): leaf for i, leaf in enumerate(leaves.values())},
                       "step": optimizer_step(optimizer_parts(osd))}
    sd["scheduler"] = scheduler.state_dict()
    if rank_state is not None:
        sd["rank_state"] = ShardedObject("rank_state", rank_state, (world,), (rank,), replica_id=0)
    return sd, (osd, list(leaves))


def _in_process_results_queue() -> None:
    """Saves here are synchronous: megatron-core's writer threads report to a results queue that
    0.19.2 creates as a multiprocessing ``Manager().Queue()`` (a spawned server process, meant for
    async saves). An in-process queue does the same job, saves a process start per run, and leaves
    no orphan process holding the job's stdout when a rank dies in the middle of a save."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, args_dict: dict, data_state: Any) -> str:
    """Save on every rank (collective). Returns the checkpoint directory. ``optimizer=None``: the
    model's weights only (a converted checkpoint: ``--load`` starts a run from it at iteration 0)."""
    rank = dist.get_rank()
    _in_process_results_queue()
    final, partial = _iter_dir(root, iteration), _iter_dir(root, iteration) + ".partial"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of crashed saves
            if name.endswith(".partial"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    rank_state = {"rng": _rng_state(), "data": data_state} if optimizer is not None else None
    sd, _ = _sharded_state(model, optimizer, scheduler, iteration, args_dict, rank_state, loading=False)
    try:
        dist_checkpointing.save(sd, partial)
        checkpoint_trust.write_manifest(partial)
    except Exception as e:
        _raise_save_failure(e, root, iteration, partial)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(partial, COMPLETE), "w") as f:
            f.write(f"{iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # saving the same iteration again: replace it
            shutil.rmtree(final)
        os.rename(partial, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
    dist.barrier()
    return final


def _disk_full(e: BaseException, root: str) -> bool:
    import errno

    chain, x = [], e
    while x is not None and len(chain) < 10:
        chain.append(x)
        x = x.__cause__ or x.__context__
    text = " ".join(str(c) for c in chain)
    if any(getattr(c, "errno", None) == errno.ENOSPC for c in chain) or "No space left" in text:
        return True
    # torch's zip writer reports a short write as "unexpected pos ..."; look at the disk then
    return "unexpected pos" in text and shutil.disk_usage(root).free < (64 << 20)


def _raise_save_failure(e: BaseException, root: str, iteration: int, partial: str) -> None:
    """A failed save: remove its partial directory (never loaded), keep the previous checkpoint as
    the latest, and say why -- a full disk in so many words."""
    shutil.rmtree(partial, ignore_errors=True)
    previous = complete_checkpoints(root)
    kept = f"iter_{previous[-1]:07d} stays the latest complete checkpoint" if previous else "no checkpoint was kept"
    if _disk_full(e, root):
        free = shutil.disk_usage(root).free / 2**20
        raise CheckpointError(f"saving iteration {iteration} to {root} failed: the disk is full ({free:.0f} MiB free; "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}); {kept}; free space or point "
                              "--save elsewhere") from e
    raise CheckpointError(f"saving iteration {iteration} to {root} failed ({type(e).__name__}: {e}); {kept}") from e


@contextlib.contextmanager
def _quiet_dcp():
    """torch's checkpoint reader warns at every load about how megatron-core 0.19.2 calls it (the
    common state read "in a single process" on purpose, a positional argument, ShardedTensor's
    deprecation): nothing a user can act on."""
    with warnings.catch_warnings():
        for message in ("torch.distributed is disabled", "The argument order of load has been changed",
                        "Please use DTensor instead"):
            warnings.filterwarnings("ignore", message=message)
        yield


def _refuse(root: str, path: str, why: str) -> None:
    older = [f"iter_{i:07d}" for i in complete_checkpoints(root) if _iter_dir(root, i) != path]
    hint = (f"the older complete checkpoints there are {', '.join(older)} (move {os.path.basename(path)} aside to "
            "resume from the newest of them)") if older else "there is no other complete checkpoint there"
    raise CheckpointError(f"--load {root}: refusing {path}: {why}; {hint}")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint that passed every check of ``open_checkpoint`` (its common state already read)."""

    path: str
    iteration: int
    common: dict


def open_checkpoint(root: str, *, schedule: dict, scheduler_policy: str = "refuse", settings: Optional[dict] = None,
                    optional: bool = False) -> Optional[Checkpoint]:
    """The newest complete checkpoint under ``root``, checked before any model exists (collective).

    In order: ``root`` must exist unless ``optional`` (``--load-optional``; an existing directory
    without a checkpoint starts the run from scratch: None); the manifest and the no-code check
    (``checkpoint_trust``); then, from its common state, the learning-rate schedule against
    ``schedule`` (``checkpoint_checks.schedule_from_flags``, ``scheduler_policy``), the run
    settings against ``settings`` (this run's ``RunConfig.to_dict()``) and the format.
    """
    if not os.path.isdir(root):  # a mistyped path must not train from scratch silently
        if optional:
            log.warning("--load %s does not exist (--load-optional): starting from scratch", root)
            return None
        raise CheckpointError(f"--load {root}: no such directory (give --load-optional to start from scratch "
                              "when it does not exist yet)")
    it = latest_checkpoint(root)
    if it is None:  # an empty --save/--load directory: a job's first start (a requeued job finds its saves)
        log.warning("--load %s: no complete checkpoint there, starting from scratch", root)
        return None
    path = _iter_dir(root, it)
    damaged = checkpoint_trust.verify_manifest(path)
    if damaged:
        _refuse(root, path, f"it is damaged: {damaged}")
    unsafe = checkpoint_trust.verify_no_code(path)
    if unsafe:
        _refuse(root, path, f"it holds more than data: {unsafe}")
    with _quiet_dcp():
        common = dist_checkpointing.load_common_state_dict(path)
    if not common.get("weights_only"):
        check_scheduler(common["scheduler"], schedule, scheduler_policy, path)
    if settings is not None:
        check_settings(common.get("args"), settings, path, resume=not common.get("weights_only"))
    if common.get("format", 1) < 2:
        raise CheckpointError(f"--load {path}: written in checkpoint format {common.get('format', 1)} (before the "
                              "layout-free optimizer state of format 2); resume it with the commit that wrote it")
    return Checkpoint(path, it, common)


def load_weights(ckpt: Checkpoint, model) -> int:
    """The model's weights only, from any checkpoint (collective); returns 0: a run that starts
    from them starts at iteration 0 with a fresh optimizer, schedule and data order."""
    template = {"model": model.sharded_state_dict()}
    _, fresh = match_checkpoint(template, ckpt.path, ckpt.common.get("format", 1))
    with _quiet_dcp():
        loaded = dist_checkpointing.load(template, ckpt.path)
    restore_fresh_extra_states(loaded["model"], fresh)
    model.load_state_dict(loaded["model"])
    if dist.get_rank() == 0:
        log.info("started from the weights of %s (%s): iteration 0, a fresh optimizer", ckpt.path,
                 "a converted checkpoint" if ckpt.common.get("weights_only") else "its model only")
    return 0


def _main_parameters(template: dict, path: str, stored: Optional[dict] = None) -> dict:
    """The optimizer's fp32 main parameters under the key the saving optimizer used
    (``optimizer_state.find_main_parameters``); those to take from the stored model weights are
    dropped from the template and returned as ``{position: (path in the model state dict, model
    key, the main parameter's leaf)}`` (found before the load, which turns the template's leaves
    into tensors). ``stored``: ``stored_metadata(path)`` when the caller has read it already."""
    stored = stored_metadata(path) if stored is None else stored
    tensors = template["optimizer"]["tensors"]
    from_model = find_main_parameters([tensors[str(i)] for i in range(len(tensors))], stored)
    if not from_model:
        return {}
    where, ambiguous = {}, set()
    for p, leaf in tensor_leaves(template["model"]):
        place = (leaf.key, shard_place(leaf))
        if place in where:
            ambiguous.add(place)
        where[place] = p
    taken = {}
    for i, key in from_model.items():
        place = (key, shard_place(tensors[str(i)]))
        if place not in where or place in ambiguous:
            raise CheckpointError(f"{path}: the optimizer's main parameter of {key!r} matches "
                                  f"{'several shards' if place in ambiguous else 'no shard'} of that model weight; "
                                  "cannot take it from the loaded weights")
        taken[i] = (where[place], key, tensors.pop(str(i)))
    log.info("%s: %d fp32 main parameters taken from the model weights (saved by an fp32 optimizer, which "
             "keeps none apart)", path, len(taken))
    return taken


def _main_parameters_from_weights(loaded: dict, from_model: dict, path: str) -> None:
    """The main parameters of ``_main_parameters`` into ``loaded``: a loaded weight of the main
    parameter's dtype is those values (an fp32 model); a weight loaded in another dtype (a bf16
    model resuming an fp32 checkpoint) is rounded, so those main parameters are read once more
    from the stored fp32 weights, into leaves of their own: a collective read, so every rank
    takes part when any rank needs it (an empty read on the others)."""
    again = {}
    for i, (where, key, leaf) in from_model.items():
        value = loaded["model"]
        for k in where:
            value = value[k]
        if value.dtype == leaf.data.dtype:
            loaded["optimizer"]["tensors"][str(i)] = value.detach().clone()
        else:
            again[str(i)] = dataclasses.replace(leaf, key=key)
    needed = [False] * dist.get_world_size()
    dist.all_gather_object(needed, bool(again))
    if any(needed):
        with _quiet_dcp():
            loaded["optimizer"]["tensors"].update(dist_checkpointing.load(again, path))


def load_checkpoint(ckpt: Checkpoint, model, optimizer, scheduler, restore_rank_state: bool = True):
    """Load ``ckpt`` (from ``open_checkpoint``) into model, optimizer and scheduler (collective).

    Returns ``(iteration, data_state, saved_args)``; ``data_state`` is this rank's data position
    when the world size matches the one that saved, else None (with a warning).
    """
    path, it, common = ckpt.path, ckpt.iteration, ckpt.common
    check_resolved(common.get("resolved"), model.config, path)
    if common.get("weights_only"):
        return load_weights(ckpt, model), None, common.get("args")
    same_world = int(common.get("world_size", -1)) == dist.get_world_size()
    if not same_world:
        log.warning(
            "checkpoint %s was written by %s ranks, this run has %d: RNG and data positions are "
            "not restored per rank (the data position follows from the iteration)",
            path, common.get("world_size"), dist.get_world_size(),
        )
    fallbacks.init_empty_adam_state(optimizer)  # megatron's distributed optimizer asserts a state exists
    template, structure = _sharded_state(
        model, optimizer, scheduler, it, {}, {} if (same_world and restore_rank_state) else None, loading=True
    )
    stored, fresh = match_checkpoint(template, path, common.get("format", 1))
    from_model = _main_parameters(template, path, stored)
    with _quiet_dcp():
        loaded = dist_checkpointing.load(template, path)
    _main_parameters_from_weights(loaded, from_model, path)
    restore_fresh_extra_states(loaded["model"], fresh)
    model.load_state_dict(loaded["model"])
    restore_optimizer(optimizer, structure, loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    data_state = None
    if "rank_state" in loaded and loaded["rank_state"]:
        _set_rng_state(loaded["rank_state"]["rng"])
        data_state = loaded["rank_state"]["data"]
    if dist.get_rank() == 0:
        log.info("resumed from %s (iteration %d)", path, it)
    return int(loaded["iteration"]), data_state, loaded.get("args")
