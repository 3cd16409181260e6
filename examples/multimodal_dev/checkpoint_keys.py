"""The model's part of a load template against what the checkpoint holds, before anything is read.

megatron-core's loader names a tensor the checkpoint lacks only at the front of a ``KeyError``
that then lists every stored key (hundreds: a log's tail shows only stored keys, never the missing
one); ``check_model_keys`` names what is missing instead. One difference is expected and not an
error: Transformer Engine's modules keep an ``_extra_state`` (their FP8 scaling metadata; an empty
tensor in a bf16 run), which TE's norms have and megatron's local norms do not, so a checkpoint
written without TE lacks it. Those entries are dropped from the template and loaded as ``None``,
which TE reads as "no saved state" (``set_extra_state``), and their number is logged.
"""
from __future__ import annotations

import logging

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from multimodal_dev.checkpoint_checks import CheckpointError
from multimodal_dev.optimizer_state import tensor_leaves

__all__ = ["check_model_keys", "restore_fresh_extra_states"]

log = logging.getLogger(__name__)

_SHOWN = 6  # missing keys named in the error (then a count)


def check_model_keys(model_template: dict, stored: dict, path: str, written_format: int) -> list:
    """Raise ``CheckpointError`` when a model tensor of ``model_template`` (the loading model's
    sharded state dict) is not in ``stored`` (``dist_checkpointing.load_sharded_metadata``: tensors
    by key, objects by unique key); drop from the template, in place, every TE ``_extra_state``
    object the checkpoint lacks and return their paths (for ``restore_fresh_extra_states``).
    ``written_format``: the checkpoint's format (``checkpointing.FORMAT``), for the hint."""
    leaves = list(tensor_leaves(model_template))
    missing = sorted({leaf.key for _, leaf in leaves if isinstance(leaf, ShardedTensor) and leaf.key not in stored})
    if missing:
        shown = ", ".join(missing[:_SHOWN]) + (f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else "")
        hint = ("it was written with another model or layer pattern (compare the flags it was saved with), or "
                "before format 3, when --transformer-impl local stored the norms of MoE and Gated DeltaNet layers "
                "under other keys (resume it with the commit that wrote it)" if written_format < 3 else
                "it was written with another model or layer pattern (compare the flags it was saved with)")
        raise CheckpointError(f"--load {path}: {len(missing)} weight(s) of this model are not in the checkpoint: "
                              f"{shown}; {hint}")
    fresh = [p for p, leaf in leaves if isinstance(leaf, ShardedObject) and leaf.key.endswith("_extra_state")
             and leaf.unique_key not in stored]
    for p in fresh:
        _pop(model_template, p)
    if fresh:
        log.info("%s: %d Transformer Engine extra states (FP8 scaling metadata) are not in the checkpoint "
                 "(written without TE): they start empty", path, len(fresh))
    return fresh


def restore_fresh_extra_states(loaded_model: dict, fresh: list) -> None:
    """Put ``None`` (no saved state) where ``check_model_keys`` dropped an extra state, so the
    model's strict ``load_state_dict`` finds every key."""
    for p in fresh:
        tree = loaded_model
        for k in p[:-1]:
            tree = tree[k]
        tree[p[-1]] = None


def _pop(tree, path) -> None:
    for k in path[:-1]:
        tree = tree[k]
    del tree[path[-1]]
