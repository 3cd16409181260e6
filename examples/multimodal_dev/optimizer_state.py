"""The optimizer's state in a checkpoint, in the layout-free form (``checkpointing``'s format 2).

megatron-core's ``optimizer.sharded_state_dict`` gives a nested dict whose tensors are sharded
leaves under the model parameters' keys; ``tensor_leaves`` lists them (path, leaf) so a checkpoint
stores them flat, by position, and ``restore_optimizer`` puts the loaded tensors back at the same
paths of the loading run's own structure. The shared Adam step is kept apart
(``optimizer_step`` / ``set_step``) because the optimizers megatron builds keep it in different
places (``step_place``): over torch's Adam the plain (mixed-precision / fp32) one as
``state["common_step"]`` (a tensor, spread per parameter at load) and the distributed one in every
parameter group (a float); TE's and apex's FusedAdam -- what megatron builds whenever TE is
importable -- in every parameter group as an int, plain or distributed. A checkpoint of any loads
into any other. The fp32 main parameters differ the same way (``find_main_parameters``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedBase

__all__ = ["tensor_leaves", "optimizer_parts", "optimizer_step", "step_place", "set_step", "restore_optimizer",
           "find_main_parameters", "shard_place", "MAIN_PREFIXES", "set_path"]


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


def set_path(tree, path, value) -> None:
    """Put ``value`` at ``path`` (as ``tensor_leaves`` yields it) in a nested dict/list."""
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


def _group_steps(ts: dict) -> list:
    """The steps of the parameter groups that have parameters (TE's FusedAdam before 2.20 did not
    advance an empty group's step; megatron aligns the others, ``ChainedOptimizer._synchronize_steps``).
    The distributed optimizer's groups carry no parameter list here: all of them count."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    steps = []
    for g in ts.get("param_groups", []):
        params = g.get("params")
        if isinstance(params, LocalNonpersistentObject):
            params = params.unwrap()
        if g.get("step") is not None and (params is None or len(params) > 0):
            steps.append(g["step"].item() if torch.is_tensor(g["step"]) else g["step"])
    return steps


def optimizer_step(parts) -> Optional[Any]:
    """The Adam step of a (chained) optimizer's state dicts, wherever it is kept (module docstring):
    the plain optimizer's ``state["common_step"]``, else the parameter groups' ``step``. None before
    the first step. Raises ValueError when the groups disagree (megatron asserts the same)."""
    steps = []
    for p in parts:
        ts = _torch_state(p)
        common = ts.get("state", {}).get("common_step")
        steps += [common] if common is not None else _group_steps(ts)
    if len({float(x) for x in steps}) > 1:
        raise ValueError(f"the optimizer's Adam step differs between its parameter groups: {steps}")
    return steps[0] if steps else None


def step_place(opt) -> str:
    """Where one of megatron's optimizers (``chained_optimizers`` member) keeps the Adam step:
    ``"common_step"`` (the plain optimizer over torch's Adam(W): a per-parameter tensor that
    megatron saves once), ``"groups_float"`` (the distributed one over torch's Adam: every group,
    a float that megatron turns into the per-parameter tensor at load) or ``"groups_int"`` (TE's
    or apex's FusedAdam, plain or distributed: every group, an int -- TE's ``load_state_dict``
    refuses a per-parameter ``step`` and its kernel takes an int)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if isinstance(getattr(opt, "optimizer", opt), (torch.optim.Adam, torch.optim.AdamW)):
        return "groups_float" if isinstance(opt, DistributedOptimizer) else "common_step"
    return "groups_int"


def set_step(parts, step, places) -> None:
    """Put the saved Adam step (any format's, see ``optimizer_step``) where this run's optimizers
    keep it, ``places[i]`` (``step_place``) for ``parts[i]``; None (saved before any step) leaves
    no common step and the groups as they are."""
    for p, place in zip(parts, places, strict=True):
        ts = _torch_state(p)
        if place == "common_step":
            ts["state"].pop("common_step", None)
            if step is not None:
                ts["state"]["common_step"] = step if torch.is_tensor(step) else torch.tensor(float(step))
        elif step is not None:
            value = float(step) if place == "groups_float" else int(step)
            for g in ts.get("param_groups", []):
                g["step"] = value


#: where each optimizer stores the fp32 main parameter of model key K: the distributed one under
#: ``optimizer.state.param.K``, the plain mixed-precision one under ``optimizer.state.fp32_param.K``;
#: the plain fp32 one not at all (its main parameters are the model's weights, stored under K)
MAIN_PREFIXES = ("optimizer.state.param.", "optimizer.state.fp32_param.")


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
        prefix = next((p for p in MAIN_PREFIXES if key and key.startswith(p)), None)
        if prefix is None or key in stored:
            continue
        model_key = key[len(prefix):]
        other = next(p for p in MAIN_PREFIXES if p != prefix) + model_key
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
        set_path(osd, path, loaded_opt["tensors"][str(i)])
    _unwrap_local(osd)
    parts = optimizer_parts(osd)
    subs = list(getattr(optimizer, "chained_optimizers", None) or [optimizer])
    if len(subs) != len(parts):
        raise ValueError(f"{len(parts)} optimizer state dicts for {len(subs)} optimizers")
    set_step(parts, loaded_opt.get("step"), [step_place(s) for s in subs])
    from megatron.mcore_ext import fallbacks

    if any(fallbacks.needs_distributed_optimizer_fallback(s) for s in subs):
        # what ChainedOptimizer.load_state_dict does, one optimizer at a time (the steps are equal
        # already: set_step), with the distributed ones through the fallback
        for sub, part in zip(subs, parts):
            if not fallbacks.load_distributed_optimizer_state(sub, part):
                sub.load_state_dict(part)
        return
    optimizer.load_state_dict(osd)
