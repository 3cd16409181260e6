"""Where each local parameter sits in its global (unsharded) tensor, from megatron's sharded state dict.

Used to give a model layout-independent weights (``layout_independent_init``: the same global
weights whatever TP / EP / PP layout holds them), to read a rank's slices out of whole tensors
(``load_global_tensors`` / ``local_slices``: converted checkpoints, tests) and to gather a rank's
slices by global key (``global_tensors``: comparing layouts).
"""
from __future__ import annotations

import zlib
from typing import Any

__all__ = ["parameter_placements", "layout_independent_init", "global_tensors", "load_global_tensors", "local_slices"]


def parameter_placements(model) -> dict[str, list[tuple[str, tuple, tuple, tuple]]]:
    """Local parameter name -> [(global key, index into the global tensor, global shape, index
    into the local tensor)].

    Most entries are one ``ShardedTensor`` covering the whole local tensor. A
    ``ShardedTensorFactory`` (megatron's SwiGLU ``linear_fc1``: ``[gate; up]`` stored as two
    shards of one global ``[gate; up]`` tensor, see ``apply_swiglu_sharded_factory``) is built
    here and each of its shards is placed with the rows of the local tensor it views.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def place(st, local_idx):
        if st.flattened_range is not None:
            raise NotImplementedError(f"{st.key}: flattened (distributed-optimizer) shards are not supported")
        n_pre = st.prepend_axis_num
        idx = tuple(st.global_offset[:n_pre]) + tuple(
            slice(off, off + size) for off, size in zip(st.global_offset[n_pre:], st.data.shape)
        )
        return (st.key, idx, tuple(st.global_shape), local_idx)

    out = {}
    for name, st in model.sharded_state_dict().items():
        if isinstance(st, ShardedTensor):
            out[name] = [place(st, (slice(None),))]
        elif isinstance(st, ShardedTensorFactory):
            t = st.data
            parts = st.build()
            parts = parts if isinstance(parts, (list, tuple)) else [parts]
            placed = []
            for part in parts:
                sub = part.data
                # every shard must be a block of whole rows (dim 0) of the local tensor
                if not (isinstance(part, ShardedTensor) and sub.untyped_storage().data_ptr()
                        == t.untyped_storage().data_ptr() and sub.stride() == t.stride()
                        and sub.shape[1:] == t.shape[1:]):
                    raise NotImplementedError(f"{name}: unsupported ShardedTensorFactory layout")
                row = (sub.storage_offset() - t.storage_offset()) // t.stride(0)
                placed.append(place(part, (slice(row, row + sub.shape[0]),)))
            if sum(p[3][0].stop - p[3][0].start for p in placed) != t.shape[0]:
                raise NotImplementedError(f"{name}: ShardedTensorFactory shards do not cover the tensor")
            out[name] = placed
    return out


def layout_independent_init(model, seed: int, include=lambda name: True) -> int:
    """Re-draw every (selected) randomly initialised parameter from a generator seeded by
    ``(seed, global key)``, so that each global tensor gets the same values in every parallel
    layout. The distribution is megatron's: normal(0, ``init_method_std``), with the output
    scaling ``std / sqrt(2 * num_layers)`` for ``linear_proj`` and ``linear_fc2`` weights.
    Parameters that are constant after construction (norm weights, zero biases) are left as they
    are (constant inits do not depend on the layout). Returns the number of tensors re-drawn.

    Memory: one global tensor at a time (on the CPU); meant for small and medium models
    (functional tests, layout comparisons), not for the published sizes.
    """
    import math

    import torch

    config = model.config
    std = float(config.init_method_std)
    out_std = std / math.sqrt(2.0 * config.num_layers)
    params = dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, placed in parameter_placements(model).items():
            p = params.get(name)
            if p is None or not include(name) or p.numel() == 0:
                continue
            if p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                continue  # constant init (norms, biases): layout-independent already
            s = out_std if name.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
            for key, idx, shape, local_idx in placed:
                g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
                full = torch.empty(shape, dtype=torch.float32).normal_(0.0, s, generator=g)
                p[local_idx].copy_(full[idx].to(p.dtype))
            n += 1
    return n


def _state_tensors(model) -> dict[str, Any]:
    """Parameters and buffers by name (``sharded_state_dict`` also holds persistent buffers such
    as the router's ``expert_bias``)."""
    out = dict(model.named_buffers())
    out.update(model.named_parameters())
    return out


def global_tensors(model, which: str = "data") -> dict[str, Any]:
    """Gather a model's parameters and persistent buffers (``which="data"``) or the parameters'
    grads (``"grad"``) by global key.

    In one process this gives full tensors; on a sharded rank only the local slices are filled
    (the rest is NaN), which is enough to compare slices or to feed ``load_global_tensors``.
    """
    import torch

    tensors = _state_tensors(model)
    full: dict[str, torch.Tensor] = {}
    for name, placed in parameter_placements(model).items():
        t = tensors[name]
        src = t if which == "data" else getattr(t, "grad", None)
        if src is None:
            continue
        for key, idx, shape, local_idx in placed:
            g = full.setdefault(key, torch.full(shape, float("nan"), dtype=src.dtype))
            g[idx] = src.detach()[local_idx]
    return full


def load_global_tensors(model, full: dict[str, Any]) -> None:
    """Copy every parameter's (and persistent buffer's, where given) slice out of global tensors."""
    import torch

    params = _state_tensors(model)
    param_names = {n for n, _ in model.named_parameters()}
    with torch.no_grad():
        for name, placed in parameter_placements(model).items():
            for key, idx, shape, local_idx in placed:
                if key not in full:
                    if name not in param_names:
                        continue  # a buffer the source model did not have (e.g. expert_bias): keep it
                    raise KeyError(f"no global tensor '{key}' for parameter '{name}'")
                if tuple(full[key].shape) != shape:
                    raise ValueError(f"global tensor '{key}' has shape {tuple(full[key].shape)}, expected {shape}")
                params[name][local_idx].copy_(full[key][idx])


def local_slices(model, full: dict[str, Any]) -> dict[str, Any]:
    """Parameter name -> the slice of ``full`` (global tensors) this rank holds."""
    import torch

    tensors = _state_tensors(model)
    out = {}
    for name, placed in parameter_placements(model).items():
        if not all(key in full for key, *_ in placed):
            continue
        if len(placed) == 1 and placed[0][3] == (slice(None),):
            key, idx, _, _ = placed[0]
            out[name] = full[key][idx]
            continue
        t = tensors[name]
        out[name] = torch.empty(t.shape, dtype=full[placed[0][0]].dtype)
        for key, idx, _, local_idx in placed:
            out[name][local_idx] = full[key][idx]
    return out
