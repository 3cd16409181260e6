"""An allgather token dispatcher with no host synchronisation, for the grouped-GEMM experts.

megatron-core 0.19.2's ``MoEAllGatherTokenDispatcher`` sizes its permutation on the host: it reads
``tokens_per_expert`` (``.cpu()``) and the total routed tokens (``.item()``) every MoE layer, and
its unfused ``permute``/``masked_select`` size their outputs from the data. Each read stops the
host until the GPU has caught up, so the host can never run ahead of the GPU (measured on an H100
for ``proxy``, 12 MoE layers: ``cudaStreamSynchronize`` calls per training step 58 with megatron's
dispatcher, 22.5 with this one, none of them left in a MoE layer).

``SortedAllGatherTokenDispatcher`` keeps megatron's gather / reduce-scatter and replaces the
permutation by a fixed-shape one computed on the device:

* every token has at most ``min(top-k, local experts)`` slots for local experts; the
  ``R = tokens x slots`` slots are the buffer's rows, whatever the routing -- no shape depends on
  the data;
* each slot gets its expert (``topk`` over the token's row of the local routing map) or, when
  unused (a padded token, whose row the padding-aware router empties, or a token routed to fewer
  local experts under expert parallelism), the sentinel ``L``; a stable sort by that key orders
  the used slots by expert and, within an expert, by token -- the order megatron's ``permute``
  gives -- and puts the unused ones last;
* ``tokens_per_expert`` stays on the device; the grouped GEMM takes its cumulative sum as the
  group offsets and leaves the rows after the last offset alone;
* the combine puts the rows back in slot order with the inverse permutation and sums each token's
  slots (fp32 accumulation inside ``sum``; megatron scatter-adds in the activation dtype).

Unused rows never reach a result or a gradient: they enter the experts as zeros with probability
zero, the combine selects them away (whatever the grouped GEMM left in those rows, NaN included),
and the grouped GEMM's weight gradients cover only the rows inside the offsets.

The gather into the buffer and the combine are each other's adjoints, and ``_GatherSlots`` /
``_SumSlots`` give each the other as its backward: gathers and a sum, no ``index_put`` with
accumulation (an advanced-indexing backward: a sort and a scatter per use) and no zero-filled
``[R, H]`` gradient. Gathers from ``[T, H]`` read a zero row appended to the source instead of
masking the ``[R, H]`` result (a 1/k-sized copy instead of a pass over the buffer), which the
broadcast ``where`` made a slow strided kernel (measured on one H200, ``proxy-hybrid``:
docs/performance.md).

It is used only where the experts take device counts and a padded buffer
(``GroupedGemmSequentialMLP`` on its grouped path, see ``experts.py``); for anything else it is
megatron's dispatcher unchanged. ``use_grouped_experts`` installs it through ``GroupedMoELayer``.
"""
from __future__ import annotations

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

__all__ = ["SortedAllGatherTokenDispatcher", "GroupedMoELayer"]


class SortedAllGatherTokenDispatcher(MoEAllGatherTokenDispatcher):
    """``MoEAllGatherTokenDispatcher`` whose local permutation needs no host synchronisation."""

    def __init__(self, *args, experts=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._experts = [experts]  # a list: not a submodule of the dispatcher (nor of its state dict)
        self._sorted = False

    def _sorted_ok(self, hidden_states: torch.Tensor) -> bool:
        experts = self._experts[0]
        return (
            experts is not None
            and getattr(experts, "takes_padded_dispatch", False)
            and hidden_states.shape[0] > 0
            and experts._grouped_ok(hidden_states)
        )

    def dispatch_postprocess(self, hidden_states, probs):
        self._sorted = self._sorted_ok(hidden_states)
        if not self._sorted:
            return super().dispatch_postprocess(hidden_states, probs)
        self.hidden_shape_before_permute = hidden_states.shape
        first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        local_map = self.routing_map[:, first:last]
        local_probs = probs[:, first:last]
        self.routing_map = None
        T, L = local_map.shape
        k = min(self.router_topk, L)
        with torch.no_grad():
            used, slot_expert = torch.topk(local_map.to(torch.int8), k, dim=1)  # [T, k]
            key = torch.where(used.bool(), slot_expert, L).reshape(-1)  # [T*k], L = unused
            sorted_key, order = torch.sort(key, stable=True)  # expert-major, token-minor, unused last
            valid = (sorted_key < L).unsqueeze(-1)  # [R, 1]
            token = order // k
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            tokens_per_expert = local_map.sum(dim=0)  # device, int64
            rows = torch.where(valid.squeeze(-1), token, T)  # [R]: the source row, T = a zero row
            slot_used = used.bool().reshape(-1, 1)  # [T*k, 1]: slot s is used (its row inverse[s] valid)
        self._slots = (rows, inverse, slot_used, k)
        x = _GatherSlots.apply(hidden_states, *self._slots)
        p = torch.where(valid.squeeze(-1), local_probs.gather(1, slot_expert).reshape(-1)[order], 0)
        # token_combine reads only its dtype: kept detached, so the module holds no autograd graph
        # (and through it no parameter's AccumulateGrad node) from one step to the next
        self.local_probs = p.detach()
        return x, tokens_per_expert, p

    def combine_preprocess(self, hidden_states):
        if not self._sorted:
            return super().combine_preprocess(hidden_states)
        out = _SumSlots.apply(hidden_states, *self._slots)
        self._slots = None
        return out


def _gather_slots(src, rows):
    """``[R, H]``: ``src[rows[r]]``, zero where ``rows[r] == len(src)`` (an unused slot)."""
    return torch.cat([src, src.new_zeros((1, src.shape[1]))]).index_select(0, rows)


def _sum_slots(buf, inverse, slot_used, k):
    """``[T, H]``: each token's ``k`` slots of ``buf`` (in slot order through ``inverse``) summed,
    the unused ones selected away (not multiplied: they may hold NaN)."""
    g = torch.where(slot_used, buf.index_select(0, inverse), 0)
    return g.view(-1, k, buf.shape[1]).sum(dim=1)


class _GatherSlots(torch.autograd.Function):
    """The buffer ``[R, H]`` from the tokens ``[T, H]``; backward: ``_sum_slots`` of the gradient."""

    @staticmethod
    def forward(ctx, src, rows, inverse, slot_used, k):
        ctx.save_for_backward(inverse, slot_used)
        ctx.k = k
        return _gather_slots(src, rows)

    @staticmethod
    def backward(ctx, grad):
        inverse, slot_used = ctx.saved_tensors
        return _sum_slots(grad, inverse, slot_used, ctx.k), None, None, None, None


class _SumSlots(torch.autograd.Function):
    """The tokens ``[T, H]`` from the buffer ``[R, H]``; backward: ``_gather_slots`` of the gradient
    (zero for the unused rows)."""

    @staticmethod
    def forward(ctx, buf, rows, inverse, slot_used, k):
        ctx.save_for_backward(rows)
        return _sum_slots(buf, inverse, slot_used, k)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return _gather_slots(grad, rows), None, None, None, None


class GroupedMoELayer(MoELayer):
    """``MoELayer`` that gives grouped-GEMM experts the sync-free allgather dispatcher."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, is_mtp_layer=False,
                 name=None):
        if pg_collection is None:  # as MoELayer does; the dispatcher below needs the same groups
            from megatron.core.transformer.moe.moe_layer import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer, name=name)
        if (
            config.moe_token_dispatcher_type == "allgather"
            and getattr(self.experts, "takes_padded_dispatch", False)
            and type(self.token_dispatcher) is MoEAllGatherTokenDispatcher
        ):
            old = self.token_dispatcher
            self.token_dispatcher = SortedAllGatherTokenDispatcher(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection,
                experts=self.experts,
            )
            if getattr(old, "shared_experts", None) is not None:
                self.token_dispatcher.set_shared_experts(old.shared_experts)
