"""``get_batch``, ``forward_step`` and ``loss_func`` in Megatron's shape.

* ``get_batch``: the first rank of each tensor-parallel group reads the next collated batch and
  broadcasts it to its TP peers (every key, shapes included: THD batches vary in length).
  Unlike Megatron-LM's usual ``get_batch``, *every* pipeline stage gets the per-token tensors:
  position ids and packed-sequence boundaries drive attention on every stage, and the padding mask
  must reach every stage that holds MoE layers, or their routers would count padding silently.
  (Each stage reads the same deterministic data stream of its data-parallel rank.)
* ``forward_step(data_iterator, model)`` returns ``(output, loss_func)``. It computes the
  micro-batch's context-parallel index once (``cp_split.cp_partition_index``); the model splits
  its embeddings and per-token tensors with it, and the loss function gets the loss mask split
  with the same index.
* ``loss_func`` returns ``(masked loss sum, valid-token count, {"lm loss": [sum, count]})``: with
  ``calculate_per_token_loss=True`` megatron-core's schedules add the counts over micro-batches and
  ``finalize_model_grads`` divides the gradients by the token count summed over DP x CP, so every
  token weighs the same whatever micro-batch, CP rank or DP rank it landed in.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps

from megatron.mcore_ext.cp_split import cp_partition_index

__all__ = ["get_batch", "broadcast_batch", "local_batch", "local_tokens", "forward_step", "loss_func"]

_TENSOR = "t"
_VALUE = "v"


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def broadcast_batch(batch: Optional[dict], src: int, group) -> dict:
    """Broadcast a collated batch (tensors, ints, dicts, None) from global rank ``src`` in ``group``.

    The metadata (keys, shapes, dtypes, non-tensor values) goes first as one object, then each
    tensor. Tensors arrive on this rank's device.
    """
    dev = _device()
    if dist.get_world_size(group) == 1:
        return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    meta = None
    if dist.get_rank() == src:
        meta = {
            k: (_TENSOR, tuple(v.shape), v.dtype) if torch.is_tensor(v) else (_VALUE, v)
            for k, v in batch.items()
        }
    box = [meta]
    dist.broadcast_object_list(box, src=src, group=group)
    meta = box[0]
    out: dict[str, Any] = {}
    for k, m in meta.items():
        if m[0] == _VALUE:
            out[k] = m[1]
            continue
        if dist.get_rank() == src:
            t = batch[k].to(dev).contiguous()
        else:
            t = torch.empty(m[1], dtype=m[2], device=dev)
        dist.broadcast(t, src=src, group=group)
        out[k] = t
    return out


def get_batch(data_iterator: Optional[Iterator[dict]]) -> dict:
    """The next batch on every rank of the TP group (read on its first rank)."""
    batch = None
    if ps.get_tensor_model_parallel_rank() == 0:
        if data_iterator is None:
            raise RuntimeError("get_batch: the first rank of a tensor-parallel group needs a data iterator")
        batch = next(data_iterator)
    return broadcast_batch(batch, ps.get_tensor_model_parallel_src_rank(), ps.get_tensor_model_parallel_group())


def cp_index(batch: dict) -> Optional[torch.Tensor]:
    """This CP rank's token index into the micro-batch (None without context parallelism)."""
    cp = ps.get_context_parallel_world_size()
    return None if cp == 1 else cp_partition_index(batch, cp, ps.get_context_parallel_rank())


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked sum of the per-token losses and the number of tokens it covers."""
    losses = output_tensor.float()
    mask = loss_mask.to(losses.dtype)
    if losses.shape != mask.shape:
        raise ValueError(f"per-token losses {tuple(losses.shape)} and loss mask {tuple(mask.shape)} differ")
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def local_batch(data_iterator, *, use_padding_mask: bool = True, batch_hook=None):
    """``(batch, cp_index)`` of the next micro-batch: read (``get_batch``), shown to ``batch_hook``,
    without its padding mask when ``use_padding_mask`` is False, and this CP rank's token index
    (None without CP). The one place a forward step reads its batch (also ``distill.step``)."""
    batch = get_batch(data_iterator)
    if batch_hook is not None:
        batch_hook(batch)
    if not use_padding_mask:
        batch = dict(batch, padding_mask=None)
    return batch, cp_index(batch)


def local_tokens(t: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """This CP rank's tokens of a per-token ``[b, s]`` tensor (``index`` from ``local_batch``)."""
    return t if index is None else t.index_select(-1, index)


def forward_step(data_iterator, model, *, use_padding_mask: bool = True, batch_hook=None):
    """Megatron ``forward_step_func``: one micro-batch through the model, and its loss function.

    ``use_padding_mask=False`` drops the padding mask before the model (``--no-padding-mask``, for
    comparisons only: the loss stays masked by ``loss_mask``, but the routers then count padding).
    ``batch_hook(batch)`` (optional) sees every batch on every rank, e.g. to count tokens.
    """
    batch, index = local_batch(data_iterator, use_padding_mask=use_padding_mask, batch_hook=batch_hook)
    loss_mask = local_tokens(batch["loss_mask"], index)
    output = model(batch, cp_index=index)
    return output, functools.partial(loss_func, loss_mask)
