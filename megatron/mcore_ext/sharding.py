"""Where each local parameter sits in its global (unsharded) tensor, from megatron's sharded state dict.

Used to give a model layout-independent weights (``layout_independent_init``: the same global
weights whatever TP / EP / PP layout holds them) and by the multi-rank test harness to compare
and load global tensors.
"""
from __future__ import annotations

import zlib
from typing import Any

__all__ = ["parameter_placements", "layout_independent_init"]


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
