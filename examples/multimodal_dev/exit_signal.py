"""Stop cleanly on a signal: finish the iteration, save, exit 0 (``--exit-signal-handler``).

SLURM sends SIGTERM before preemption and ahead of the time limit (``#SBATCH --signal=TERM@S``);
torchrun forwards the SIGTERM it receives to its workers and kills them ``--shutdown-timeout``
(``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) seconds later. ``ExitSignal`` records the signal in every
process; at the end of each iteration the ranks agree (one all-reduce of a flag: a rank that got
the signal stops them all at the same iteration), the trainer saves and returns normally.

Without the handler, a signal keeps its default effect (the process dies at once).
"""
from __future__ import annotations

import logging
import signal
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["ExitSignal"]

log = logging.getLogger(__name__)


class ExitSignal:
    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.received: Optional[signal.Signals] = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        if self.received is None:  # log once; a second signal changes nothing
            self.received = signal.Signals(signum)
            log.warning("received %s: finishing this iteration, then saving and exiting", self.received.name)

    def stop_requested(self) -> bool:
        """Collective: True on every rank when any rank received the signal."""
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=dev)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
