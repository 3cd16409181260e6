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
from the iteration instead, with a warning).
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "scheduler_policy", "check_scheduler",
           "CheckpointError", "TRACKER", "COMPLETE"]

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (the message says why and what resolves it)."""

COMPLETE = "COMPLETE"
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


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    st["tracker"] = get_cuda_rng_tracker().get_states()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(st["tracker"])


def _sharded_state(model, optimizer, scheduler, iteration: int, args_dict: dict, rank_state: Any, loading: bool):
    model_sd = model.sharded_state_dict()
    rank, world = dist.get_rank(), dist.get_world_size()
    sd = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=loading),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "args": args_dict,
        "world_size": world,
    }
    if rank_state is not None:
        sd["rank_state"] = ShardedObject("rank_state", rank_state, (world,), (rank,), replica_id=0)
    return sd


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
    """Save on every rank (collective). Returns the checkpoint directory."""
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
    rank_state = {"rng": _rng_state(), "data": data_state}
    sd = _sharded_state(model, optimizer, scheduler, iteration, args_dict, rank_state, loading=False)
    dist_checkpointing.save(sd, partial)
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


# the learning-rate schedule: scheduler state key -> (what it is, the flags that set it)
_SCHEDULE_FIELDS = {
    "max_lr": ("peak learning rate", "--lr"),
    "min_lr": ("minimum learning rate", "--min-lr"),
    "lr_warmup_steps": ("warm-up iterations", "--lr-warmup-iters"),
    "lr_decay_steps": ("decay iterations", "--lr-decay-iters (default: --train-iters)"),
    "lr_decay_style": ("decay style", "--lr-decay-style"),
    "start_wd": ("weight decay", "--weight-decay"),
    "end_wd": ("weight decay", "--weight-decay"),
}


def scheduler_policy(optimizer_args) -> str:
    """"flags" (--override-opt-param-scheduler), "checkpoint" (--use-checkpoint-opt-param-scheduler)
    or "refuse" (neither: a difference between the two is an error)."""
    if optimizer_args.override_scheduler:
        return "flags"
    return "checkpoint" if optimizer_args.use_checkpoint_scheduler else "refuse"


def check_scheduler(saved: dict, scheduler, policy: str, path: str) -> None:
    """Refuse a checkpoint whose learning-rate schedule differs from the flags' (``policy`` "refuse").

    megatron-core's scheduler silently keeps the checkpoint's values by default: continuing a
    150-iteration run with ``--train-iters 300`` then decays to the old horizon and trains the
    new iterations at learning rate 0. Here the difference is named with both values and the two
    flags that resolve it."""
    if policy != "refuse":
        return
    ours = scheduler.state_dict()
    diff = [(k, saved[k], ours[k]) for k in _SCHEDULE_FIELDS if k in saved and saved[k] != ours[k]]
    if diff:
        lines = "; ".join(f"{_SCHEDULE_FIELDS[k][0]} ({_SCHEDULE_FIELDS[k][1]}): checkpoint {a!r}, flags {b!r}"
                          for k, a, b in diff)
        raise CheckpointError(
            f"--load {path}: the checkpoint's learning-rate schedule differs from the flags: {lines}. Pass "
            "--override-opt-param-scheduler to continue with the flags' schedule, or "
            "--use-checkpoint-opt-param-scheduler to keep the checkpoint's"
        )


def load_checkpoint(root: str, model, optimizer, scheduler, restore_rank_state: bool = True,
                    scheduler_policy: str = "refuse"):
    """Load the newest complete checkpoint under ``root`` into model, optimizer and scheduler.

    ``scheduler_policy``: see ``check_scheduler`` (checked before any tensor is read).

    Returns ``(iteration, data_state, saved_args)``, or ``(0, None, None)`` when there is none.
    ``data_state`` is this rank's data position when the world size matches, else None.
    """
    it = latest_checkpoint(root)
    if it is None:
        log.warning("--load %s: no complete checkpoint there, starting from scratch", root)
        return 0, None, None
    path = _iter_dir(root, it)
    common = dist_checkpointing.load_common_state_dict(path)
    check_scheduler(common["scheduler"], scheduler, scheduler_policy, path)
    same_world = int(common.get("world_size", -1)) == dist.get_world_size()
    if not same_world:
        log.warning(
            "checkpoint %s was written by %s ranks, this run has %d: RNG and data positions are "
            "not restored per rank (the data position follows from the iteration)",
            path, common.get("world_size"), dist.get_world_size(),
        )
    template = _sharded_state(
        model, optimizer, scheduler, it, {}, {} if (same_world and restore_rank_state) else None, loading=True
    )
    loaded = dist_checkpointing.load(template, path)
    model.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    data_state = None
    if "rank_state" in loaded and loaded["rank_state"]:
        _set_rng_state(loaded["rank_state"]["rng"])
        data_state = loaded["rank_state"]["data"]
    if dist.get_rank() == 0:
        log.info("resumed from %s (iteration %d)", path, it)
    return int(loaded["iteration"]), data_state, loaded.get("args")
