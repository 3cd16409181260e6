"""``pack_or_pad_batch``: samples (text tokens + images) -> a padded BSHD or a packed THD batch.

The batch contract is docs/batch.md. The points that matter most:

* ``padding_mask`` (bool) is True exactly at positions this collate added, and nowhere else. It is
  *not* ``~loss_mask``: prompt tokens have ``loss_mask == 0`` but are real tokens that the MoE
  router must still route and count.
* ``labels`` are the sample's next-token targets as given (-100 where there is no loss); padded
  positions get -100, ``loss_mask`` 0 and the pad token id.
* Position ids are 3-D MRoPE ids (temporal, height, width) computed on the whole, unsplit sample;
  they restart at 0 for every packed sample. Text tokens advance all three components together; an
  image of grid (t, h, w) occupies ``t*h*w / merge**2`` tokens whose ids are the image's
  (t, h/merge, w/merge) coordinates offset by the position where the image starts; the text after
  it continues at start + max(h/merge, w/merge) (Qwen3.5's rule, docs/qwen35_moe_facts.md section 6:
  the number of frames does not advance it). Collate padding continues the count like text.
* THD: every sample is padded to a multiple of ``divisible_by`` (so the context-parallel zigzag
  split and sequence parallelism can cut it evenly); ``cu_seqlens`` are the real boundaries,
  ``cu_seqlens_padded`` the padded ones, and ``sequence_ids`` [1, T] says which packed segment
  each position is in (the routers' ``seq_aux_loss`` normalises per sample). BSHD: every row is
  padded to ``target_seqlen`` (a row is one sequence).

Everything is vectorised per sample with NumPy (no per-token Python), so one core collates well
over a million tokens per second (``scripts/bench/collate.py``).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

__all__ = [
    "IGNORE_INDEX",
    "CollateConfig",
    "required_seq_multiple",
    "mrope_position_ids",
    "pack_or_pad_batch",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def required_seq_multiple(
    tensor_parallel_size: int = 1,
    context_parallel_size: int = 1,
    sequence_parallel: bool = False,
    extra_multiple: int = 1,
) -> int:
    """The multiple every THD sample (``divisible_by``) or BSHD row (``target_seqlen``) must have.

    * CP > 1: the zigzag split cuts each sequence into ``2 * CP`` equal chunks -> multiple of 2*CP.
    * Sequence parallelism: after the CP split each rank holds ``len / CP`` tokens of a sequence,
      which SP scatters over TP ranks -> ``len / CP`` must divide by TP, i.e. ``len`` by CP*TP.
      (A multiple of TP alone is not enough once CP > 1: CP=2, TP=4, len=4 leaves 2 tokens per
      CP rank for 4 TP ranks.)
    * ``extra_multiple``: anything else a kernel wants (e.g. 8 or 64 for tensor-core tiles).
    """
    for name, v in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("context_parallel_size", context_parallel_size),
        ("extra_multiple", extra_multiple),
    ):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    m = extra_multiple
    if context_parallel_size > 1:
        m = math.lcm(m, 2 * context_parallel_size)
    if sequence_parallel and tensor_parallel_size > 1:
        m = math.lcm(m, context_parallel_size * tensor_parallel_size)
    return m


@dataclass(frozen=True)
class CollateConfig:
    """How to collate.

    layout: "bshd" (padded rows of ``target_seqlen``) or "thd" (packed, one row).
    target_seqlen: BSHD: the row length (required). THD: the longest a single sample may be
        (optional); longer samples are an error unless ``truncate``.
    divisible_by: THD: every sample is padded to a multiple of it. BSHD: ``target_seqlen`` must be
        a multiple of it. Use ``required_seq_multiple`` to derive it from the parallel layout.
    truncate: cut samples longer than ``target_seqlen`` instead of raising (counted and logged). A
        cut never splits an image: an image that would be cut is dropped with its patches.
    pad_token_id: token id written at padded positions.
    image_token_id: the placeholder id of image tokens in the text (needed when there are images).
    spatial_merge_size: the vision merger's spatial factor (2 for 2x2): an image of grid
        (t, h, w) patches takes ``t*h*w / merge**2`` tokens.
    row_multiple: THD only: the packed row is padded up to a multiple of it with one trailing
        segment of padding (its own sequence in ``cu_seqlens_padded``, zero real tokens in
        ``cu_seqlens``), so that rows come in a few lengths (CUDA graphs of the decoder layers are
        captured per length, ``--cuda-graph-layers``). A multiple of ``divisible_by``.
    """

    layout: Literal["bshd", "thd"] = "thd"
    target_seqlen: int | None = None
    divisible_by: int = 1
    truncate: bool = False
    pad_token_id: int = 0
    image_token_id: int | None = None
    spatial_merge_size: int = 2
    row_multiple: int = 1

    def __post_init__(self):
        if self.layout not in ("bshd", "thd"):
            raise ValueError(f"CollateConfig.layout must be 'bshd' or 'thd', got {self.layout!r}")
        if not isinstance(self.divisible_by, int) or self.divisible_by < 1:
            raise ValueError(f"CollateConfig.divisible_by must be a positive int, got {self.divisible_by!r}")
        if self.spatial_merge_size < 1:
            raise ValueError(f"CollateConfig.spatial_merge_size must be >= 1, got {self.spatial_merge_size}")
        if self.target_seqlen is not None and self.target_seqlen < 1:
            raise ValueError(f"CollateConfig.target_seqlen must be >= 1, got {self.target_seqlen}")
        if self.layout == "bshd":
            if self.target_seqlen is None:
                raise ValueError("CollateConfig.target_seqlen is required for the 'bshd' layout")
            if self.target_seqlen % self.divisible_by != 0:
                raise ValueError(
                    f"CollateConfig.target_seqlen={self.target_seqlen} must be a multiple of "
                    f"divisible_by={self.divisible_by} (2*CP, and CP*TP with sequence parallelism)"
                )
        if self.truncate and self.target_seqlen is None:
            raise ValueError("CollateConfig.truncate needs target_seqlen (the length to cut to)")
        if not isinstance(self.row_multiple, int) or self.row_multiple < 1:
            raise ValueError(f"CollateConfig.row_multiple must be a positive int, got {self.row_multiple!r}")
        if self.row_multiple > 1 and self.layout != "thd":
            raise ValueError("CollateConfig.row_multiple applies to the 'thd' layout only (BSHD rows are "
                             "target_seqlen long already)")
        if self.row_multiple > 1 and self.row_multiple % self.divisible_by != 0:
            raise ValueError(
                f"CollateConfig.row_multiple={self.row_multiple} must be a multiple of "
                f"divisible_by={self.divisible_by} (the padding segment is split like every sample)"
            )


def _sample_name(i: int, sample: Mapping) -> str:
    key = sample.get("__key__", sample.get("id"))
    return f"sample {i}" + (f" ('{key}')" if key is not None else "")


def _as_1d_int(x: Any, what: str, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: {what} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: {what} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _image_spans(tokens: np.ndarray, grid: np.ndarray, cfg: CollateConfig, name: str) -> np.ndarray:
    """[n_images, 2] start/end (exclusive) of each image's token run, validated against the grid."""
    merge2 = cfg.spatial_merge_size**2
    is_img = tokens == cfg.image_token_id if cfg.image_token_id is not None else np.zeros(len(tokens), bool)
    n_img_tokens = int(is_img.sum())
    if grid.shape[0] == 0:
        if n_img_tokens:
            raise ValueError(
                f"{name}: the text has {n_img_tokens} image tokens (id {cfg.image_token_id}) "
                "but the sample has no images"
            )
        return np.zeros((0, 2), np.int64)
    counts = grid.prod(axis=1) // merge2
    if n_img_tokens != int(counts.sum()):
        raise ValueError(
            f"{name}: the text has {n_img_tokens} image tokens (id {cfg.image_token_id}) but the "
            f"images' grids {grid.tolist()} need {int(counts.sum())} "
            f"(t*h*w/{merge2} each: {counts.tolist()})"
        )
    pos = np.flatnonzero(is_img)
    starts_in_pos = np.concatenate([[0], np.cumsum(counts)[:-1]])
    starts = pos[starts_in_pos]
    ends = pos[starts_in_pos + counts - 1] + 1
    bad = np.flatnonzero(ends - starts != counts)
    if bad.size:
        k = int(bad[0])
        raise ValueError(
            f"{name}: image {k} needs {int(counts[k])} consecutive image tokens starting at "
            f"position {int(starts[k])}, but its run is interrupted by other tokens"
        )
    return np.stack([starts, ends], axis=1)


def _validate_grid(sample: Mapping, cfg: CollateConfig, name: str) -> tuple[np.ndarray, torch.Tensor | None]:
    pv = sample.get("pixel_values")
    grid = sample.get("image_grid_thw")
    if pv is None and grid is None:
        return np.zeros((0, 3), np.int64), None
    if pv is None or grid is None:
        raise ValueError(f"{name}: pixel_values and image_grid_thw must be given together")
    g = grid.detach().cpu().numpy() if isinstance(grid, torch.Tensor) else np.asarray(grid)
    g = g.reshape(-1, 3) if g.size % 3 == 0 else g  # a bad size falls through to the named error below
    if g.ndim != 2 or g.shape[1] != 3 or (g.size and not np.issubdtype(g.dtype, np.integer)):
        raise ValueError(f"{name}: image_grid_thw must be an int [n_images, 3] (t, h, w) array, got {g.shape}")
    g = g.astype(np.int64)
    if g.shape[0] and cfg.image_token_id is None:
        raise ValueError(f"{name}: has images but CollateConfig.image_token_id is not set")
    if (g < 1).any():
        raise ValueError(f"{name}: image_grid_thw entries must be >= 1, got {g.tolist()}")
    m = cfg.spatial_merge_size
    if ((g[:, 1] % m) != 0).any() or ((g[:, 2] % m) != 0).any():
        raise ValueError(
            f"{name}: image grid heights and widths must be multiples of the spatial merge size {m}, "
            f"got {g.tolist()}"
        )
    pv_t = pv if isinstance(pv, torch.Tensor) else torch.as_tensor(np.asarray(pv))
    if pv_t.dim() != 2:
        raise ValueError(f"{name}: pixel_values must be [num_patches, patch_dim], got {tuple(pv_t.shape)}")
    n_patches = int(g.prod(axis=1).sum())
    if pv_t.shape[0] != n_patches:
        raise ValueError(
            f"{name}: pixel_values has {pv_t.shape[0]} patches but image_grid_thw {g.tolist()} "
            f"describes {n_patches} (sum of t*h*w)"
        )
    return g, pv_t


def mrope_position_ids(
    length: int, spans: np.ndarray, grid: np.ndarray, spatial_merge_size: int = 2, total_length: int | None = None
) -> np.ndarray:
    """[3, total_length] MRoPE ids of one sample (Qwen-VL rule, see the module docstring).

    ``spans`` are the images' token runs (from the sample's tokens), ``grid`` their (t, h, w)
    patch grids. Positions ``length .. total_length-1`` (collate padding) continue like text.
    """
    total = length if total_length is None else total_length
    out = np.empty((3, total), np.int64)
    next_pos = 0  # the id the next text token gets
    cursor = 0  # the next token index to fill
    m = spatial_merge_size
    for (start, end), (t, h, w) in zip(spans.tolist(), grid.tolist()):
        n_text = start - cursor
        out[:, cursor:start] = np.arange(next_pos, next_pos + n_text)
        base = next_pos + n_text
        gh, gw = h // m, w // m
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        out[0, start:end] = tt.reshape(-1) + base
        out[1, start:end] = hh.reshape(-1) + base
        out[2, start:end] = ww.reshape(-1) + base
        next_pos = base + max(gh, gw)  # Qwen3.5: the spatial grid only, whatever the frame count
        cursor = end
    out[:, cursor:total] = np.arange(next_pos, next_pos + total - cursor)
    return out


def pack_or_pad_batch(samples: Sequence[Mapping], config: CollateConfig) -> dict[str, Any]:
    """Collate ``samples`` into a BSHD or THD batch (docs/batch.md).

    Each sample is a mapping with ``tokens`` (1-D ints) and ``labels`` (same length; -100 where no
    loss), and optionally ``pixel_values`` ([num_patches, patch_dim]) with ``image_grid_thw``
    ([n_images, 3]). ``__key__`` or ``id``, when present, is used in error messages.

    Besides the contract's keys the batch has ``stats``: a dict with ``samples``, ``tokens`` (real),
    ``padding_tokens``, ``truncated_samples`` and ``dropped_images`` (images cut by truncation).
    """
    cfg = config
    if len(samples) == 0:
        raise ValueError("pack_or_pad_batch: got no samples")
    # ---- validate and (optionally) truncate every sample --------------------------------------
    prepared = []  # (tokens, labels, spans, grid, pixel_values)
    n_truncated = 0
    n_dropped_images = 0
    for i, sample in enumerate(samples):
        name = _sample_name(i, sample)
        if "tokens" not in sample or "labels" not in sample:
            raise ValueError(f"{name}: needs 'tokens' and 'labels', has {sorted(sample.keys())}")
        tokens = _as_1d_int(sample["tokens"], "tokens", name)
        labels = _as_1d_int(sample["labels"], "labels", name)
        if tokens.size == 0:
            raise ValueError(f"{name}: is empty (0 tokens); every sample needs at least one token")
        if labels.size != tokens.size:
            raise ValueError(f"{name}: has {tokens.size} tokens but {labels.size} labels; they must match")
        grid, pv = _validate_grid(sample, cfg, name)
        spans = _image_spans(tokens, grid, cfg, name)
        limit = cfg.target_seqlen
        if limit is not None and tokens.size > limit:
            if not cfg.truncate:
                raise ValueError(
                    f"{name}: has {tokens.size} tokens, longer than target_seqlen={limit} "
                    "(set truncate=True / --truncate to cut such samples)"
                )
            cut = limit
            crossing = np.flatnonzero((spans[:, 0] < cut) & (spans[:, 1] > cut))
            if crossing.size:
                cut = int(spans[crossing[0], 0])  # never split an image: cut before it
            if cut == 0:
                raise ValueError(
                    f"{name}: cannot be truncated to {limit} tokens: its first image alone "
                    f"({int(spans[0, 1] - spans[0, 0])} tokens) starts at position 0 and does not fit"
                )
            keep = spans[:, 1] <= cut
            n_keep = int(keep.sum())  # images are in token order, so kept ones are a prefix
            n_dropped_images += len(spans) - n_keep
            if pv is not None:
                pv = pv[: int(grid[:n_keep].prod(axis=1).sum())]
            grid, spans = grid[:n_keep], spans[:n_keep]
            tokens, labels = tokens[:cut], labels[:cut]
            n_truncated += 1
        if pv is not None and grid.shape[0] == 0:
            pv = None
        prepared.append((tokens, labels, spans, grid, pv))

    if n_truncated:
        log.warning(
            "pack_or_pad_batch: truncated %d of %d samples to target_seqlen=%d (%d images dropped)",
            n_truncated, len(samples), cfg.target_seqlen, n_dropped_images,
        )

    # ---- lay out -----------------------------------------------------------------------------
    n_samples = len(prepared)
    lengths = np.fromiter((p[0].size for p in prepared), np.int64, len(prepared))
    if cfg.layout == "bshd":
        row_len = cfg.target_seqlen
        padded = np.full(len(prepared), row_len, np.int64)
        offsets = np.arange(len(prepared), dtype=np.int64) * row_len
        shape = (len(prepared), row_len)
    else:
        d = cfg.divisible_by
        padded = (lengths + d - 1) // d * d
        tail = -int(padded.sum()) % cfg.row_multiple
        if tail:  # the row's padding up to row_multiple: a segment of its own, with no real tokens
            lengths = np.append(lengths, 0)
            padded = np.append(padded, tail)
            prepared.append((np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.int64),
                             np.zeros((0, 3), np.int64), None))
        offsets = np.concatenate([[0], np.cumsum(padded)[:-1]])
        shape = (1, int(padded.sum()))
    n_total = shape[0] * shape[1]

    tokens_out = np.full(n_total, cfg.pad_token_id, np.int64)
    labels_out = np.full(n_total, IGNORE_INDEX, np.int64)
    padding_out = np.ones(n_total, bool)
    pos_out = np.empty((3, n_total), np.int64)
    pixel_values, grids = [], []
    for (tokens, labels, spans, grid, pv), off, n, n_pad in zip(prepared, offsets, lengths, padded):
        off, n, n_pad = int(off), int(n), int(n_pad)
        tokens_out[off : off + n] = tokens
        labels_out[off : off + n] = labels
        padding_out[off : off + n] = False
        if spans.shape[0]:
            pos_out[:, off : off + n_pad] = mrope_position_ids(n, spans, grid, cfg.spatial_merge_size, n_pad)
            pixel_values.append(pv)
            grids.append(grid)
        else:
            pos_out[:, off : off + n_pad] = np.arange(n_pad)

    batch: dict[str, Any] = {
        "tokens": torch.from_numpy(tokens_out).view(shape),
        "labels": torch.from_numpy(labels_out).view(shape),
        "loss_mask": torch.from_numpy((labels_out != IGNORE_INDEX).astype(np.float32)).view(shape),
        "position_ids": torch.from_numpy(pos_out).view(3, *shape),
        "padding_mask": torch.from_numpy(padding_out).view(shape),
        "pixel_values": torch.cat(pixel_values, 0) if pixel_values else None,
        "image_grid_thw": torch.from_numpy(np.concatenate(grids, 0)) if grids else None,
        # the image-token positions of the batch, on the host (the model checks the vision
        # encoder's output against it without reading the tokens back)
        "image_tokens": sum(int((sp[:, 1] - sp[:, 0]).sum()) for _, _, sp, _, _ in prepared),
        # the positions with loss (loss_mask 1), on the host: the LM head runs on those rows only
        # without reading the mask back (mcore_ext.lm_head_rows)
        "loss_tokens": int(np.count_nonzero(labels_out != IGNORE_INDEX)),
    }
    if cfg.layout == "thd":
        cu = np.zeros(len(prepared) + 1, np.int32)
        cu[1:] = np.cumsum(lengths)
        cu_p = np.zeros(len(prepared) + 1, np.int32)
        cu_p[1:] = np.cumsum(padded)
        batch["cu_seqlens"] = torch.from_numpy(cu)
        batch["cu_seqlens_padded"] = torch.from_numpy(cu_p)
        batch["cu_seqlens_padded_host"] = tuple(int(x) for x in cu_p)  # stays on the host (packed_seq.py)
        batch["max_seqlen"] = int(padded.max())
        # which packed segment (sample, or the row's padding segment) each position is in
        batch["sequence_ids"] = torch.from_numpy(np.repeat(np.arange(len(prepared), dtype=np.int64), padded)).view(shape)
    n_real = int(lengths.sum())
    batch["stats"] = {
        "samples": n_samples,
        "tokens": n_real,
        "padding_tokens": n_total - n_real,
        "truncated_samples": n_truncated,
        "dropped_images": n_dropped_images,
    }
    return batch
