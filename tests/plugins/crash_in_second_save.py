"""Test plugin (``pretrain_multimodal.py --plugin tests/plugins/crash_in_second_save.py``): the
process dies hard (exit code 17) in the middle of its second checkpoint save -- after every shard
is written, before the save is marked complete, renamed or recorded in the tracker. Fault
injection for ``tests/unit/test_trainer.py``; the product code has no hook for it."""
import os

from megatron.core import dist_checkpointing

_real_save = dist_checkpointing.save
_calls = {"n": 0}


def _save_then_die(*args, **kwargs):
    out = _real_save(*args, **kwargs)
    _calls["n"] += 1
    if _calls["n"] == 2:
        print("crash_in_second_save: killing the process in the middle of save #2", flush=True)
        os._exit(17)
    return out


dist_checkpointing.save = _save_then_die
