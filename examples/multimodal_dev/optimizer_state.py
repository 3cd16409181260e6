"""The optimizer's state in a checkpoint, in the layout-free form (``checkpointing``'s format 2).

megatron-core's ``optimizer.sharded_state_dict`` gives a nested dict whose tensors are sharded
leaves under the model parameters' keys; ``tensor_leaves`` lists them (path, leaf) so a checkpoint
stores them flat, by position, and ``restore_optimizer`` puts the loaded tensors back at the same
paths of the loading run's own structure. The shared Adam step is kept apart
(``optimizer_step`` / ``set_step``) because the two optimizers megatron builds keep it in
different places: the plain (mixed-precision / fp32) one as ``state["common_step"]`` (a tensor),
the distributed one in every parameter group (``param_groups[i]["step"]``, a float, or an int with
TE's FusedAdam); a checkpoint of either loads into the other. The fp32 main parameters differ
the same way (``find_main_parameters``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedBase

__all__ = ["tensor_leaves", "optimizer_parts", "optimizer_step", "set_step", "restore_optimizer",
           "find_main_parameters", "shard_place"]


def tensor_leaves(tree, path=()):
    """(path, sharded leaf) of every ShardedBase in a nested dict/list."""
    if isinstance(tree, ShardedBase):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from tensor_leaves(v, path + (k,))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from tensor_leaves(v, path + (i,))


def _set_path(tree, path, value) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def optimizer_parts(osd) -> list[dict]:
    """The per-optimizer state dicts of a (possibly chained) optimizer's sharded state dict."""
    if isinstance(osd, dict) and osd and all(isinstance(k, int) for k in osd):
        return [osd[k] for k in sorted(osd)]
    return [osd]


def _torch_state(part: dict) -> dict:
    """The torch optimizer state inside one megatron optimizer's sharded state dict (mixed
    precision optimizers nest it under "optimizer", the fp32 one does not)."""
    return part["optimizer"] if "optimizer" in part else part


def optimizer_step(parts) -> Optional[Any]:
    """The Adam step of a (chained) optimizer's state dicts: the plain megatron optimizer keeps it
    as ``state["common_step"]`` (a tensor), the distributed one has no torch "state" there and
    puts it in every parameter group (``param_groups[i]["step"]``, a float without apex/TE)."""
    steps = []
    for p in parts:
        ts = _torch_state(p)
        if "state" in ts:
            steps.append(ts["state"].get("common_step"))
        else:
            steps += [g.get("step") for g in ts.get("param_groups", [])]
    steps = [x for x in steps if x is not None]
    return steps[0] if steps else None


def set_step(parts, step) -> None:
    """Put the saved Adam step (either format's, see ``optimizer_step``) where this run's
    optimizer keeps it; None (saved before any step) leaves the plain optimizer without a common
    step and the distributed one's groups as they are."""
    for p in parts:
        ts = _torch_state(p)
        if "state" in ts:
            if step is None:
                ts["state"].pop("common_step", None)
            else:
                ts["state"]["common_step"] = step if torch.is_tensor(step) else torch.tensor(float(step))
        elif step is not None:  # the distributed optimizer: every group, in the type it holds there
            for g in ts.get("param_groups", []):  # (TE's FusedAdam counts in ints, torch's in floats)
                g["step"] = int(step) if isinstance(g.get("step"), int) else float(step)


#: where each optimizer stores the fp32 main parameter of model key K: the distributed one under
#: ``optimizer.state.param.K``, the plain mixed-precision one under ``optimizer.state.fp32_param.K``;
#: the plain fp32 one not at all (its main parameters are the model's weights, stored under K)
_MAIN_PREFIXES = ("optimizer.state.param.", "optimizer.state.fp32_param.")


def find_main_parameters(leaves, stored: dict) -> dict:
    """Point the loading template's main-parameter leaves at what the checkpoint holds.

    ``leaves``: the template's optimizer leaves (``ShardedTensor`` / factories, by position);
    ``stored``: the checkpoint's tensors by key (``dist_checkpointing.load_tensors_metadata``).
    A main parameter the checkpoint lacks under the asked key is renamed in place to the other
    optimizer's key when that is stored; else, when the model's weight ``K`` is stored in the same
    dtype (a plain fp32 optimizer's checkpoint: the same values), it is returned as
    ``{position: K}`` for the caller to take from the loaded weights. Anything else raises
    ``CheckpointError`` naming the key. Returns ``{}`` when nothing is to be taken from the weights."""
    from multimodal_dev.checkpoint_checks import CheckpointError

    from_model = {}
    for i, leaf in enumerate(leaves):
        key = getattr(leaf, "key", None)
        prefix = next((p for p in _MAIN_PREFIXES if key and key.startswith(p)), None)
        if prefix is None or key in stored:
            continue
        model_key = key[len(prefix):]
        other = next(p for p in _MAIN_PREFIXES if p != prefix) + model_key
        if other in stored:
            leaf.key = other
            continue
        want, have = leaf.data.dtype, getattr(stored.get(model_key), "dtype", None)
        if have != want:
            raise CheckpointError(
                f"the optimizer's main parameter {key!r} is not in the checkpoint (nor {other!r}), and the "
                f"model weight {model_key!r} is stored as {have} where {want} is needed: the checkpoint's "
                "optimizer cannot be restored into this one (resume with the optimizer settings that saved it)")
        from_model[i] = model_key
    return from_model


def shard_place(leaf):
    """What tells apart the sharded leaves of one key (``ShardedTensor`` / factory), e.g. the experts
    or layers megatron stores under one key at their own offsets: a tensor's global offset; a
    factory's build and merge functions (megatron makes them per parameter, and an optimizer's
    leaf is a ``dataclasses.replace`` of the model's, so the two share them)."""
    if hasattr(leaf, "build_fn"):
        return ("factory", leaf.build_fn, leaf.merge_fn)
    return tuple(leaf.global_offset)


def _unwrap_local(tree):
    """Replace megatron's ``LocalNonpersistentObject`` wrappers (values kept from this run, e.g. the
    parameter groups' parameter lists) by what they wrap, as ``dist_checkpointing.load`` does."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    if isinstance(tree, LocalNonpersistentObject):
        return tree.unwrap()
    if isinstance(tree, dict):
        for k, v in tree.items():
            tree[k] = _unwrap_local(v)
    elif isinstance(tree, list):
        tree[:] = [_unwrap_local(v) for v in tree]
    return tree


def restore_optimizer(optimizer, structure, loaded_opt: dict) -> None:
    """The loaded tensors back into this run's optimizer structure, with the saved Adam step."""
    osd, paths = structure
    for i, path in enumerate(paths):
        _set_path(osd, path, loaded_opt["tensors"][str(i)])
    _unwrap_local(osd)
    parts = optimizer_parts(osd)
    set_step(parts, loaded_opt.get("step"))
    from megatron.mcore_ext import fallbacks

    subs = list(getattr(optimizer, "chained_optimizers", None) or [optimizer])
    if len(subs) == len(parts) and any(fallbacks.needs_distributed_optimizer_fallback(s) for s in subs):
        # what ChainedOptimizer.load_state_dict does, one optimizer at a time (the steps are equal
        # already: set_step), with the distributed ones through the fallback
        for sub, part in zip(subs, parts):
            if not fallbacks.load_distributed_optimizer_state(sub, part):
                sub.load_state_dict(part)
        return
    optimizer.load_state_dict(osd)
