"""The LM head and its cross entropy on the rows that carry loss, not on every token.

megatron-core's ``GPTModel`` runs the output layer on every position of the micro-batch
(``[s, b, h] -> [s, b, V/TP]``) and the cross entropy on all of it, then the loss function
multiplies the per-token losses by ``loss_mask``: the logits of prompt, image and padding positions
are computed, softmaxed and differentiated (to an exact zero) for nothing. For ``proxy-hybrid``'s
text bench 46% of the positions carry no loss, and the LM head is 31% of the model's FLOPs
(152k vocabulary, hidden 1,024; docs/performance.md).

``loss_rows_lm_loss`` takes the ``bound`` first positions where ``loss_mask`` is non-zero (in the
hidden states' ``[s, b]`` order), runs the output layer -- the module itself, so its hooks and its
tensor-parallel input copy run as ever -- and the model's own ``compute_language_model_loss``
(megatron's vocab-parallel cross entropy, or its fused ``native`` / ``te`` one) on those rows only,
and scatters the losses back into the ``[b, s]`` fp32 loss ``GPTModel`` returns, with 0 at every
other position. The loss function's masked sum, and so every gradient, is unchanged: a position
with ``loss_mask == 0`` contributed ``0 * loss`` and an exactly zero logit gradient before.

``bound`` is an upper bound on the positions with loss, known on the host (the collate's
``loss_tokens`` count; docs/batch.md), so there is no host synchronisation: the row index is
``torch.nonzero_static`` of the mask, ``bound`` long. Where the mask has fewer positions than
``bound`` (a row subset of a batch, one context-parallel rank's share) the index is padded with a
dummy slot: those rows recompute the last position's logits and their losses are written to the
dummy slot and dropped, so they receive no gradient. A bound below the mask's count makes the
loss NaN (the run then stops at its non-finite check rather than train on with positions
dropped). The bound is clipped to the number of positions, so under context parallelism
(``bound`` is the whole micro-batch's count) a rank gains only where the loss positions are fewer
than its share.

Under sequence parallelism each TP rank holds ``s/TP`` positions, and the output layer all-gathers
equal slices of its input: the rows are chosen from the gathered sequence (the same rows on every
rank), the bound is rounded up to a multiple of TP, and each rank hands the output layer its
``1/TP`` of them, which the layer gathers back; the backward's reduce-scatters (the layer's, then
the sequence gather's) bring each position's gradient home. The model (``Qwen35GPTModel``) keeps
megatron's path under MuP (its logit scaling), without labels (the logits path) and without a bound.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["loss_rows_lm_loss"]


def _tp(output_layer) -> tuple[int, int]:
    """(TP size, rank) when the output layer is sequence parallel, else (1, 0)."""
    group = output_layer.tp_group
    if not getattr(output_layer, "sequence_parallel", False) or group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def loss_rows_lm_loss(hidden_states: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, bound: int, *,
                      output_layer, output_weight: Optional[torch.Tensor], compute_language_model_loss,
                      chunked: bool = False) -> torch.Tensor:
    """The ``[b, s]`` fp32 per-token loss of ``GPTModel``, from the LM head on the loss rows only.

    hidden_states: ``[s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism), the decoder's output
    after its final norm; labels: ``[b, s]`` int (any id where the mask is 0); loss_mask: ``[b, s]``,
    non-zero where a token carries loss; bound: an upper bound (host int) on the non-zero positions
    of ``loss_mask``. ``chunked``: the loss through ``lm_loss.chunked_lm_loss`` (no ``[rows, V/TP]``
    logits kept) instead of the output layer + ``compute_language_model_loss``.
    """
    tp, rank = _tp(output_layer)
    if tp > 1:  # the whole sequence, [s, b, h]; backward: reduce-scatter to this rank's positions
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=True,
                                                             group=output_layer.tp_group)
    s, b, h = hidden_states.shape
    if labels.shape != (b, s) or loss_mask.shape != (b, s):
        raise ValueError(f"loss_rows_lm_loss: labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} "
                         f"must be [b, s] = {(b, s)} for hidden states {tuple(hidden_states.shape)}")
    n = s * b
    rows = max(1, min(int(bound), n))  # at least one row: an empty GEMM / cross entropy is avoided
    rows = min(n, -(-rows // tp) * tp)  # equal slices for the output layer's sequence gather
    keep = loss_mask.transpose(0, 1).reshape(n) != 0  # [s*b], hidden_states' order
    idx = torch.nonzero_static(keep, size=rows, fill_value=n).squeeze(-1)  # [rows]; n: the dummy slot
    take = idx.clamp(max=n - 1)
    x = hidden_states.reshape(n, h).index_select(0, take).unsqueeze(1)  # [rows, 1, h]
    y = labels.transpose(0, 1).reshape(n).index_select(0, take).unsqueeze(0)  # [1, rows]
    if tp > 1:  # this rank's slice of the rows; the output layer (or the chunked loss) gathers them
        x = x[rank * (rows // tp):(rank + 1) * (rows // tp)]
    if chunked:
        from megatron.mcore_ext.lm_loss import chunked_lm_loss

        weight = output_weight if output_weight is not None else output_layer.weight
        loss = chunked_lm_loss(x, weight, y, tp_group=output_layer.tp_group, sequence_parallel=tp > 1)
    else:
        logits, _ = output_layer(x, weight=output_weight, runtime_gather_output=False)  # [rows, 1, V/TP]
        loss = compute_language_model_loss(y, logits)  # [1, rows]
    out = loss.new_zeros(n + 1).index_put((idx,), loss.reshape(rows).to(torch.float32))
    # a bound below the mask's count would drop loss positions without a trace: such a batch's loss
    # is made NaN instead (on the device, no host read), which stops the run at its non-finite check
    out = out.masked_fill(keep.sum() > rows, float("nan"))
    return out[:n].view(s, b).transpose(0, 1).contiguous()
