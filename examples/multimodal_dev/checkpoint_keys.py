"""The model's part of a load template against what the checkpoint holds, before anything is read.

megatron-core's loader names a tensor the checkpoint lacks only at the front of a ``KeyError``
that then lists every stored key (hundreds: a log's tail shows only stored keys, never the missing
one); ``check_model_keys`` names what is missing instead. One difference is expected and not an
error: Transformer Engine's modules keep an ``_extra_state`` (their FP8 scaling metadata; an empty
tensor in a bf16 run), which TE's norms have and megatron's local norms do not, so a checkpoint
written without TE lacks it. Those entries are dropped from the template and loaded as ``None``,
which TE reads as "no saved state" (``set_extra_state``), and their number is logged.

Checkpoints of format 2 written by the local backend stored two norms under megatron's local keys,
not TE's (``mcore_ext.spec.te_norm_keys`` changed that in format 3): a MoE layer's pre-MLP norm under
``mlp.linear_fc1.layer_norm_``, a Gated DeltaNet layer's input norm under ``linear_qkv``'s.
``read_format2_local_keys`` points the template's leaves (the weights and their optimizer state)
at those keys, so such a checkpoint still resumes.
"""
from __future__ import annotations

import logging

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from multimodal_dev.checkpoint_checks import CheckpointError
from multimodal_dev.optimizer_state import MAIN_PREFIXES, set_path, tensor_leaves

__all__ = ["stored_metadata", "match_checkpoint", "read_format2_local_keys", "check_model_keys",
           "restore_fresh_extra_states"]

log = logging.getLogger(__name__)

_SHOWN = 6  # missing keys named in the error (then a count)
# (format 3's key part, format 2's local backend's): megatron's local layer spec's keys map
_FORMAT2_LOCAL_KEYS = ((".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"),
                       (".self_attention.in_proj.layer_norm_", ".self_attention.linear_qkv.layer_norm_"))


def stored_metadata(path: str) -> dict:
    """What the checkpoint at ``path`` holds, from its metadata alone: tensors by key, objects by
    unique key (``dist_checkpointing``'s ``load_sharded_metadata``)."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    return load_sharded_metadata(path)


def match_checkpoint(template: dict, path: str, written_format: int) -> tuple[dict, list]:
    """Before a load of ``template`` (``{"model": ..., ...}``) from the checkpoint at ``path``:
    its leaves pointed at format 2's local keys where needed (``read_format2_local_keys``), the
    model's keys checked (``check_model_keys``). Returns what the checkpoint holds
    (``stored_metadata``) and the extra states to restore after the load
    (``restore_fresh_extra_states``)."""
    stored = stored_metadata(path)
    read_format2_local_keys(template, stored, path, written_format)
    return stored, check_model_keys(template["model"], stored, path)


def read_format2_local_keys(template: dict, stored: dict, path: str, written_format: int) -> int:
    """In a checkpoint before format 3, read every leaf of ``template`` (model and optimizer) whose
    key is not stored from the key the local backend used then, where that is stored (``leaf.key``
    renamed in place). Returns how many were renamed (logged)."""
    if written_format >= 3:
        return 0
    renamed = 0
    for _, leaf in tensor_leaves(template):
        key = getattr(leaf, "key", None)
        if not isinstance(key, str) or key in stored:
            continue
        old = next((key.replace(new, was) for new, was in _FORMAT2_LOCAL_KEYS if new in key), None)
        if old is None:
            continue
        # a main parameter stored by neither key is taken from the weight (find_main_parameters),
        # which is then stored under the former key
        main = next((p for p in MAIN_PREFIXES if old.startswith(p)), None)
        if old in stored or (main is not None and old[len(main):] in stored):
            leaf.key, renamed = old, renamed + 1
    if renamed:
        log.info("%s: written in format %d by the local backend: %d norm tensors read from its former keys",
                 path, written_format, renamed)
    return renamed


def check_model_keys(model_template: dict, stored: dict, path: str) -> list:
    """Raise ``CheckpointError`` when a model tensor of ``model_template`` (the loading model's
    sharded state dict) is not in ``stored`` (``dist_checkpointing.load_sharded_metadata``: tensors
    by key, objects by unique key); drop from the template, in place, every TE ``_extra_state``
    object the checkpoint lacks and return their paths (for ``restore_fresh_extra_states``)."""
    leaves = list(tensor_leaves(model_template))
    missing = sorted({leaf.key for _, leaf in leaves if isinstance(leaf, ShardedTensor) and leaf.key not in stored})
    if missing:
        shown = ", ".join(missing[:_SHOWN]) + (f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else "")
        raise CheckpointError(f"--load {path}: {len(missing)} weight(s) of this model are not in the checkpoint: "
                              f"{shown}; it was written with another model or layer pattern (compare the flags "
                              "it was saved with)")
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
        set_path(loaded_model, p, None)


def _pop(tree, path) -> None:
    for k in path[:-1]:
        tree = tree[k]
    del tree[path[-1]]
