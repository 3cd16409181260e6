"""Context-parallel partitioning of per-token tensors, in pure PyTorch.

Two layouts, one rule: a sequence of length ``L`` (divisible by ``2 * cp``) is cut into ``2 * cp``
equal chunks and CP rank ``r`` keeps chunks ``r`` and ``2 * cp - 1 - r`` ("zigzag"), which pairs
an early (cheap under causal attention) chunk with a late (expensive) one so every rank does the
same attention work.

* BSHD: the rule applies to the whole sequence dimension (Megatron's ``get_batch_on_this_cp_rank``).
* THD (packed): the rule applies to every packed sample separately, using ``cu_seqlens_padded``;
  rank ``r``'s tokens are the concatenation, in sample order, of its two chunks of each sample.
  This is the index Transformer Engine's ``thd_get_partitioned_indices`` returns.

``split_batch_for_cp`` applies one index to every per-token tensor of a batch (docs/batch.md),
so that no tensor can be forgotten: a tensor key it does not know raises.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "zigzag_index",
    "thd_partition_index",
    "cp_partition_index",
    "PER_TOKEN_SEQ_DIM",
    "NOT_PER_TOKEN",
    "split_batch_for_cp",
    "unsplit_batch_for_cp",
]


def _check_cp(cp_size: int, cp_rank: int) -> None:
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    if not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be an int in [0, {cp_size}), got {cp_rank!r}")


def zigzag_index(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Indices (long, length ``seq_len // cp_size``) of the tokens CP rank ``cp_rank`` keeps.

    The sequence is cut into ``2 * cp_size`` chunks; the rank keeps chunks ``cp_rank`` and
    ``2 * cp_size - 1 - cp_rank``, in that order.
    """
    _check_cp(cp_size, cp_rank)
    if seq_len % (2 * cp_size) != 0 and cp_size > 1:
        raise ValueError(
            f"sequence length {seq_len} must be divisible by 2*cp_size={2 * cp_size} for the "
            "zigzag split (pad it with pack_or_pad_batch's target_seqlen)"
        )
    if cp_size == 1:
        return torch.arange(seq_len, device=device)
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    last_start = (2 * cp_size - 1 - cp_rank) * chunk
    second = torch.arange(last_start, last_start + chunk, device=device)
    return torch.cat([first, second])


def thd_partition_index(
    cu_seqlens_padded: torch.Tensor | Sequence[int], cp_size: int, cp_rank: int, device=None
) -> torch.Tensor:
    """Indices into a packed ``[T]`` sequence of the tokens CP rank ``cp_rank`` keeps.

    Every sample ``i`` (``cu_seqlens_padded[i]:cu_seqlens_padded[i+1]``) is zigzag-split on its
    own. Same result as Transformer Engine's
    ``thd_get_partitioned_indices(cu_seqlens_padded, T, cp_size, cp_rank)``.
    """
    _check_cp(cp_size, cp_rank)
    cu = torch.as_tensor(cu_seqlens_padded, dtype=torch.long).cpu()
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens_padded must be a 1-D tensor starting at 0, got {cu.tolist()}")
    lens = cu[1:] - cu[:-1]
    if (lens < 0).any():
        raise ValueError(f"cu_seqlens_padded must be non-decreasing, got {cu.tolist()}")
    bad = (lens % (2 * cp_size)) != 0 if cp_size > 1 else torch.zeros_like(lens, dtype=torch.bool)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"packed sample {i} has padded length {int(lens[i])}, which is not divisible by "
            f"2*cp_size={2 * cp_size} (collate with divisible_by a multiple of {2 * cp_size})"
        )
    total = int(cu[-1])
    if cp_size == 1:
        return torch.arange(total, device=device)
    # Vectorised: local position j within the rank's share of sample i maps to
    #   j < half:  start_i + cp_rank * half + j
    #   j >= half: start_i + (2*cp-1-cp_rank) * half + (j - half)
    # where half = len_i / (2 * cp).
    local_lens = lens // cp_size
    n_local = int(local_lens.sum())
    sample_of = torch.repeat_interleave(torch.arange(lens.numel()), local_lens)
    local_starts = torch.cumsum(local_lens, 0) - local_lens
    j = torch.arange(n_local) - local_starts[sample_of]
    half = (lens // (2 * cp_size))[sample_of]
    in_second = j >= half
    chunk_id = torch.where(in_second, 2 * cp_size - 1 - cp_rank, cp_rank)
    idx = cu[:-1][sample_of] + chunk_id * half + torch.where(in_second, j - half, j)
    return idx.to(device) if device is not None else idx


def cp_partition_index(batch: Mapping, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The CP index of this rank for a collated batch: THD if it carries ``cu_seqlens_padded``."""
    ref = None
    for key in ("tokens", "labels", "loss_mask", "padding_mask", "position_ids"):
        if batch.get(key) is not None:
            ref = batch[key]  # sequence in the last dim
            break
    if ref is None:
        raise ValueError(
            f"cp_partition_index: the batch has none of tokens/labels/loss_mask/padding_mask/position_ids "
            f"(keys: {sorted(batch)}); the sequence length is unknown"
        )
    if batch.get("cu_seqlens_padded") is not None:  # the collate's host copy when there: no device read
        cu = batch.get("cu_seqlens_padded_host")
        return thd_partition_index(batch["cu_seqlens_padded"] if cu is None else cu, cp_size, cp_rank, device=ref.device)
    return zigzag_index(ref.shape[-1], cp_size, cp_rank, device=ref.device)


# Per-token tensors and the dimension that is the sequence. ``decoder_input`` / ``embeddings`` are
# Megatron's [S, B, H] layout; position ids are [3, B, S] (MRoPE) or [B, S]. (A [B, 1, S, S]
# attention mask is deliberately absent: it would need its query dim split, not its last one;
# an unknown tensor key raises instead of being split wrongly.)
PER_TOKEN_SEQ_DIM: dict[str, int] = {
    "tokens": -1,
    "labels": -1,
    "loss_mask": -1,
    "padding_mask": -1,
    "position_ids": -1,
    "sequence_ids": -1,
    "decoder_input": 0,
    "embeddings": 0,
}
# Keys that are never split: vision inputs, packing metadata and scalars.
NOT_PER_TOKEN = frozenset(
    {
        "pixel_values",
        "image_grid_thw",
        "cu_seqlens",
        "cu_seqlens_padded",
        "max_seqlen",
    }
)


def _resolve_seq_dims(batch: Mapping, seq_dims: Mapping[str, int] | None) -> dict[str, int]:
    dims = dict(PER_TOKEN_SEQ_DIM)
    if seq_dims:
        dims.update(seq_dims)
    out = {}
    for key, value in batch.items():
        if key in dims and isinstance(value, torch.Tensor):
            out[key] = dims[key]
        elif isinstance(value, torch.Tensor) and key not in NOT_PER_TOKEN:
            raise KeyError(
                f"batch key '{key}' (a tensor of shape {tuple(value.shape)}) is neither a known "
                "per-token tensor nor a known non-split one: pass its sequence dimension in "
                "seq_dims (or add it to NOT_PER_TOKEN) so the CP split cannot skip it silently"
            )
    return out


def split_batch_for_cp(
    batch: Mapping,
    cp_size: int,
    cp_rank: int,
    seq_dims: Mapping[str, int] | None = None,
    index: torch.Tensor | None = None,
) -> dict:
    """Return a copy of ``batch`` with every per-token tensor reduced to this CP rank's tokens.

    The index comes from ``cp_partition_index`` (zigzag for BSHD, per-sample zigzag for THD)
    unless given. Non-per-token entries (vision inputs, ``cu_seqlens*``: attention needs the global
    boundaries) are passed through unchanged. ``seq_dims`` adds or overrides sequence dimensions,
    e.g. ``{"decoder_input": 0}`` for an [S, B, H] embedding tensor.
    """
    _check_cp(cp_size, cp_rank)
    dims = _resolve_seq_dims(batch, seq_dims)
    if cp_size == 1:
        return dict(batch)
    if index is None:
        index = cp_partition_index(batch, cp_size, cp_rank)
    full_len = None
    out = dict(batch)
    for key, dim in dims.items():
        t = batch[key]
        n = t.shape[dim]
        if full_len is None:
            full_len = n
        elif n != full_len:
            raise ValueError(
                f"batch key '{key}' has sequence length {n} along dim {dim}, but other per-token "
                f"tensors have {full_len}: they cannot be split by one index"
            )
        out[key] = t.index_select(dim, index.to(t.device))
    return out


def unsplit_batch_for_cp(
    parts: Sequence[Mapping],
    seq_dims: Mapping[str, int] | None = None,
    indices: Sequence[torch.Tensor] | None = None,
) -> dict:
    """Invert ``split_batch_for_cp``: ``parts[r]`` is CP rank r's split; returns the full batch."""
    cp_size = len(parts)
    if cp_size == 0:
        raise ValueError("unsplit_batch_for_cp needs at least one part")
    if cp_size == 1:
        return dict(parts[0])
    if indices is None:
        # Every part carries the unsplit metadata; derive each rank's index from it.
        ref = parts[0]
        if ref.get("cu_seqlens_padded") is not None:
            indices = [thd_partition_index(ref["cu_seqlens_padded"], cp_size, r) for r in range(cp_size)]
        else:
            local = ref["tokens"].shape[-1]
            indices = [zigzag_index(local * cp_size, cp_size, r) for r in range(cp_size)]
    dims = _resolve_seq_dims(parts[0], seq_dims)
    out = dict(parts[0])
    for key, dim in dims.items():
        pieces = [p[key] for p in parts]
        d = dim % pieces[0].dim()
        shape = list(pieces[0].shape)
        shape[d] = sum(p.shape[d] for p in pieces)
        full = pieces[0].new_empty(shape)
        for idx, piece in zip(indices, pieces):
            full.index_copy_(d, idx.to(piece.device), piece)
        out[key] = full
    return out
