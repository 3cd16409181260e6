"""Test plugin (``pretrain_multimodal.py --plugin tests/plugins/faults.py``): injects the fault that
``MMDEV_FAULT`` names, for ``tests/unit/test_faults.py``; the product code has no hook for it.

``MMDEV_FAULT`` is one of

* ``sigterm:<iteration>``: rank 0 sends SIGTERM to its whole process group as that iteration
  starts (what SLURM's ``--signal`` does to a job step: torchrun and every worker get it);
* ``raise:<rank>:<iteration>``: that rank raises ``RuntimeError("injected fault ...")`` as the
  iteration starts, while the other ranks go on into the iteration's collectives;
* ``enospc:<save>``: the n-th checkpoint save writes its shards, then fails as a full disk does
  (``OSError(ENOSPC)``);
* ``payload:<path>``: every save stores, in each rank's RNG state, an object whose unpickling
  creates the file ``path`` (a checkpoint crafted to run code at load).
"""
import errno
import os
import signal

import torch.distributed as dist
from megatron.core import dist_checkpointing

from multimodal_dev import checkpointing, training

_kind, _, _arg = os.environ.get("MMDEV_FAULT", "").partition(":")
_state = {"iteration": 0, "saves": 0}

if _kind in ("sigterm", "raise"):
    _real_step = training.train_step

    def _step(*args, **kwargs):
        _state["iteration"] += 1
        it, rank = _state["iteration"], dist.get_rank()
        if _kind == "sigterm" and rank == 0 and it == int(_arg):
            print(f"faults: SIGTERM to process group at iteration {it}", flush=True)
            os.killpg(os.getpgrp(), signal.SIGTERM)
        if _kind == "raise":
            want_rank, want_it = (int(x) for x in _arg.split(":"))
            if rank == want_rank and it == want_it:
                raise RuntimeError(f"injected fault on rank {rank} at iteration {it}")
        return _real_step(*args, **kwargs)

    training.train_step = _step

elif _kind == "enospc":
    _real_save = dist_checkpointing.save

    def _save(*args, **kwargs):
        _state["saves"] += 1
        out = _real_save(*args, **kwargs)
        if _state["saves"] == int(_arg):
            raise OSError(errno.ENOSPC, "No space left on device")
        return out

    dist_checkpointing.save = _save

elif _kind == "payload":

    class _Payload:
        def __reduce__(self):
            return (os.system, (f"touch {_arg}",))

    _real_rng = checkpointing._rng_state

    def _rng_with_payload():
        st = _real_rng()
        st["payload"] = _Payload()
        return st

    checkpointing._rng_state = _rng_with_payload
