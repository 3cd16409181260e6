"""A TopKRouter whose routing statistics ignore padding exactly, under TP/SP, EP, CP and DP.

Plug it in through the MoE layer spec (``MoESubmodules.router``); see ``use_padding_aware_router``.
``padding_mask`` follows megatron-core 0.19.2's *code* (and docs/batch.md): True = a position
the collate added. (Some 0.19.2 docstrings, e.g. ``TopKRouter.routing``, say the opposite.)

Conventions. Every rank of the TP x CP group that shares a sequence computes a *partial* loss; the
partials sum to the one-process loss over the valid tokens of that sequence (megatron-core's own
convention: it sums router-weight grads over TP under sequence parallelism and compensates the
DDP average over CP in ``MoEAuxLossAutoScaler``'s scale). What this module changes:

* z-loss: ``coeff * sum_{local valid} logsumexp(logits)^2 / N_valid(TP x CP)``. Upstream divides
  each rank's sum by its *own* valid count and weights ranks equally (``coeff / tp_cp``), which is
  biased whenever ranks hold different numbers of valid tokens (uneven padding under CP / SP).
* aux_loss: as upstream, from the padding-masked routing map and scores, with the token counts
  (numerator ``f_i`` and the denominator ``T``) reduced over TP x CP; guarded so that a micro-batch
  of nothing but padding gives 0, not 0/0.
* seq_aux_loss: per sequence, each sequence normalised by its *own* valid token count (upstream
  uses the average over the batch, which is wrong when sequences are padded differently). For
  packed (THD) batches the model tells each router which packed sample a token is in
  (``set_sequence_ids``: the collate's ``sequence_ids``, split and scattered like the tokens).
* global_aux_loss: counts and denominator over TP x DP x CP, accumulated over micro-batches; the
  attached loss is scaled by the DP size because DDP *averages* router grads over DP while the
  per-rank partials are shares of one global loss (upstream's gradient is 1/DP of its logged loss).
* expert bias: ``local_tokens_per_expert`` counts valid tokens only (upstream crashes here: it ands
  a [tokens, experts] map with a [tokens] mask). finalize_model_grads sums it over TP x DP x CP.
* diagnostics (on by default, cheap): per layer, tokens per expert and the router entropy from the
  clean probabilities (before input jitter and expert bias), valid tokens only
  (``router_diagnostics``).
* evaluation (``record_eval_losses``, off by default): megatron computes the load-balancing and
  z-losses only in training mode with gradients on. With the flag set, a router in eval mode
  records the same values (same definitions, same metric names) in megatron's metrics tracker,
  with no gradient attached and no running state touched (global_aux_loss then uses each
  micro-batch's own global counts: its running counts belong to training).

``LOAD_BALANCING_METRICS`` / ``Z_LOSS_METRIC``: the names under which the losses are recorded in
megatron's MoE metrics tracker, one table for the router and the trainer's metrics.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter

# collect_router_diagnostics is re-exported: the router's statistics are read through it
from megatron.mcore_ext.router_diagnostics import (  # noqa: F401
    RoutingDiagnostics,
    all_reduced,
    collect_router_diagnostics,
    group_size,
)

__all__ = [
    "PaddingAwareTopKRouter",
    "use_padding_aware_router",
    "collect_router_diagnostics",
    "LOAD_BALANCING_METRICS",
    "Z_LOSS_METRIC",
]

#: --moe-router-load-balancing-type -> the name its loss is recorded under (megatron's tracker)
LOAD_BALANCING_METRICS = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}
Z_LOSS_METRIC = "z_loss"


class PaddingAwareTopKRouter(TopKRouter):
    """``TopKRouter`` with padding masked at every routing statistic (see the module docstring)."""

    #: record tokens-per-expert / entropy diagnostics (one [T, E] pass per layer; cheap)
    record_diagnostics: bool = True
    #: send padded tokens to no expert (upstream dispatches them with full weight). Only with the
    #: allgather dispatcher, which sizes its buffers from the routing map; the alltoall
    #: dispatcher's dropless path sizes them as tokens x top-k and fails on a thinned map, so there
    #: padded tokens stay dispatched (their outputs never reach a loss, and every routing statistic
    #: above excludes them either way).
    mask_padding_dispatch: bool = True
    #: the common configuration (softmax, top-k, micro-batch aux loss) in one fused pass with the
    #: same results (``_fast_routing``); False forces megatron's generic routing path
    fast_routing: bool = True
    #: in eval mode, record the aux and z-loss values in megatron's tracker (see the module
    #: docstring; set by ``multimodal_dev.evaluation`` around its forwards)
    record_eval_losses: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        E = self.config.num_moe_experts
        dev = self.weight.device
        self.diagnostics = RoutingDiagnostics(E, device=dev)
        # running valid-token total for global_aux_loss (upstream normalises the running expert
        # counts by the *current* micro-batch's token count)
        self.register_buffer("global_valid_tokens", torch.zeros((), dtype=torch.float32, device=dev), persistent=False)
        self._clean_logits = None
        self._sequence_ids: Optional[tuple[torch.Tensor, int]] = None

    def set_sequence_ids(self, ids: Optional[torch.Tensor], num_sequences: Optional[int] = None) -> None:
        """Which packed sample each of this router's tokens is in, for ``seq_aux_loss``.

        ``ids``: long ``[s, b]`` laid out like the router's tokens (after the CP split and the
        sequence-parallel scatter), values in ``[0, num_sequences)``; ``num_sequences`` is the
        same on every rank of the TP x CP group (default ``ids.max() + 1``). ``None``: a BSHD
        batch, whose sequences are its batch columns. The model sets this before every forward;
        it stays until the next one replaces it (an activation-recomputed forward sees it)."""
        if ids is None:
            self._sequence_ids = None
            return
        n = int(ids.max()) + 1 if num_sequences is None else int(num_sequences)
        self._sequence_ids = (ids, n)

    # ------------------------------------------------------------------ forward / diagnostics
    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if padding_mask is not None:
            if padding_mask.shape != input.shape[:-1]:
                raise ValueError(
                    f"router padding_mask has shape {tuple(padding_mask.shape)} but the router's "
                    f"tokens are {tuple(input.shape[:-1])} ([s, b] as the MoE layer sees them: after "
                    "the CP split and the sequence-parallel scatter)"
                )
            padding_mask = padding_mask.bool()
        if self.record_diagnostics and self.config.moe_input_jitter_eps is not None:
            with torch.no_grad():  # clean logits: no jitter
                self._clean_logits = self.gating(input).detach()
        else:
            self._clean_logits = None
        try:
            # TopKRouter.forward: expert-bias upkeep, input jitter, gating, then self.routing
            return super().forward(input, padding_mask=padding_mask)
        finally:
            self._clean_logits = None

    def _masks_dispatch(self, padding_mask: Optional[torch.Tensor]) -> bool:
        return (padding_mask is not None and self.mask_padding_dispatch
                and self.config.moe_token_dispatcher_type == "allgather")

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if self._fast_routing_applies():
            return self._fast_routing(logits, padding_mask)
        if self._diagnostics_on():
            clean = self._clean_logits if self._clean_logits is not None else logits
            self.diagnostics.add_entropy_of_logits(clean.reshape(-1, self.config.num_moe_experts),
                                                   self.score_function, padding_mask)
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self._eval_losses_on() and self.is_aux_loss_enabled():
            self._record_eval_aux_losses(logits, padding_mask)
        if self._masks_dispatch(padding_mask):
            # Padded tokens go to no expert: no expert FLOPs, no dispatch traffic. (The aux losses
            # are attached upstream of probs, so this changes nothing for them.)
            valid = ~padding_mask.reshape(-1, 1)
            routing_map = routing_map & valid
            probs = probs * valid
        return probs, routing_map

    def _eval_losses_on(self) -> bool:
        return self.record_eval_losses and not self.training

    def _record_eval_aux_losses(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> None:
        """Evaluation on the generic path: megatron's ``routing`` computes the load-balancing
        losses in training only; the same inputs (``compute_routing_scores_for_aux_loss``) and the
        same ``_apply_*`` here, which in eval mode record the value and attach nothing."""
        from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss

        seq_length, bsz = logits.shape[:2]
        flat = logits.reshape(-1, self.config.num_moe_experts)
        pad = None if padding_mask is None else padding_mask.reshape(-1)
        rmap, scores = compute_routing_scores_for_aux_loss(flat, self.topk, self.score_function,
                                                           fused=self.config.moe_router_fusion, padding_mask=pad)
        self._apply_aux_loss(None, scores, rmap)  # probs None: nothing to attach to
        self._apply_seq_aux_loss(None, scores, rmap, seq_length, bsz)
        self._apply_global_aux_loss(None, scores, rmap)

    # ------------------------------------------------------------------ fused common case
    def _fast_routing_applies(self) -> bool:
        """The common configuration (Qwen3.5's): softmax scores, plain top-k, at most the
        micro-batch aux loss (+ z-loss). Everything else takes the generic path."""
        c = self.config
        return (
            self.fast_routing
            and self.score_function == "softmax"
            and self.expert_bias is None
            and self.routing_type not in ("sinkhorn", "quantile_balancing")
            and self.get_aux_loss_coeff("seq_aux_loss") == 0
            and self.get_aux_loss_coeff("global_aux_loss") == 0
            and not c.moe_router_num_groups
            and not c.moe_router_group_topk
            and c.moe_expert_capacity_factor is None
            and not c.moe_router_fusion
            and self.router_replay is None
            and not torch.are_deterministic_algorithms_enabled()
        )

    def _fast_routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        """The generic path's results with about half its kernel launches (the router was ~70
        launches per layer, a third of a MoE layer's forward, in a host-bound step): one softmax
        serves the aux loss and the diagnostics, one top-k the dispatch map, the aux-loss map and
        the counts, and the Switch loss of one group reduces to ``E / k * <c, p> / T^2``.

        Same values as the generic path (``fast_routing = False``) up to fp32 summation order,
        except that the aux loss counts the dispatched top-k (top-k of the logits) where megatron
        takes the top-k of the softmax scores again: the same experts unless two scores tie in fp32
        at the k-th place."""
        E, k = self.config.num_moe_experts, self.topk
        logits = logits.view(-1, E)
        pad = None if padding_mask is None else padding_mask.reshape(-1)
        valid = None if pad is None else ~pad
        logits = self.apply_z_loss(logits, padding_mask=pad)

        coeff = self.get_aux_loss_coeff("aux_loss")
        aux_on = coeff > 0 and ((self.training and torch.is_grad_enabled()) or self._eval_losses_on())
        diag_on = self._diagnostics_on()
        pre_softmax = self.config.moe_router_pre_softmax
        scores = (torch.softmax(logits, dim=-1, dtype=torch.float32)
                  if (aux_on or pre_softmax or (diag_on and self._clean_logits is None)) else None)
        # sorted in training: the no-grad first pass of activation recomputation must sum the
        # top-k softmax in the same order as its re-run (and as a run without recomputation)
        ordered = self.training or torch.is_grad_enabled()
        if pre_softmax:
            probs_k, top = torch.topk(scores, k, dim=1, sorted=ordered)
        else:
            top_logits, top = torch.topk(logits, k, dim=1, sorted=ordered)
            probs_k = torch.softmax(top_logits, dim=-1, dtype=torch.float32)
        if self.config.moe_router_topk_scaling_factor:
            probs_k = probs_k * self.config.moe_router_topk_scaling_factor
        routing_map = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(1, top, True)
        valid_map = routing_map if valid is None else routing_map & valid[:, None]
        masked = self._masks_dispatch(padding_mask)
        if masked:
            probs_k = probs_k * valid[:, None]
        probs = torch.zeros_like(logits).scatter(1, top, probs_k.to(logits.dtype))

        counts = valid_map.sum(0, dtype=torch.float32) if (aux_on or diag_on) else None  # [E], valid tokens
        valid_f = None if valid is None or not (aux_on or diag_on) else valid.float()
        if aux_on:
            p_local = scores.sum(0) if valid_f is None else torch.mv(scores.t(), valid_f)
            c = all_reduced(counts, self.tp_cp_group)
            n_group = c.sum() / k  # valid tokens of the TP x CP group (each is routed to k experts)
            # _lbl_partial with one group: E * sum_i c_i / (k T) * p_i / T (0 when T == 0: c == 0)
            partial = torch.dot(c, p_local) * (E / k) / n_group.clamp_min(1.0).square()
            probs = self._attach(probs, coeff=coeff, partial=partial, name=LOAD_BALANCING_METRICS["aux_loss"],
                                 reduce_group=self.tp_cp_group, needs_dp_avg=True, group_valid=n_group)
        if diag_on:
            with torch.no_grad():
                clean = scores if self._clean_logits is None else torch.softmax(
                    self._clean_logits.reshape(-1, E), dim=-1, dtype=torch.float32)
                ent = torch.special.entr(clean).sum(-1)
                if valid_f is None:
                    self.diagnostics.add(counts=counts, entropy_sum=ent.sum(), valid_tokens=ent.shape[0])
                else:
                    self.diagnostics.add(counts=counts, entropy_sum=torch.dot(ent, valid_f), valid_tokens=valid.sum())
        return probs, (valid_map if masked else routing_map)

    def _diagnostics_on(self) -> bool:
        # Like the expert-bias counts: not in the no-grad first pass of activation recomputation
        # (the recomputed pass counts), but yes in evaluation.
        return self.record_diagnostics and (torch.is_grad_enabled() or not self.training)

    # ------------------------------------------------------------------ z-loss
    def apply_z_loss(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        trains = self.training and torch.is_grad_enabled()
        if self.config.moe_z_loss_coeff is None or not (trains or self._eval_losses_on()):
            return logits
        coeff = self.config.moe_z_loss_coeff
        z = torch.logsumexp(logits.float(), dim=-1).square()
        if padding_mask is not None:
            valid = ~padding_mask.reshape(-1)
            z = torch.where(valid, z, torch.zeros_like(z))  # not z * valid: inf * 0 would be NaN
            n_local = valid.sum().to(torch.float32)
        else:
            n_local = torch.tensor(float(z.shape[0]), device=z.device)
        n_global = all_reduced(n_local.detach(), self.tp_cp_group)
        # shares of coeff * mean over the valid tokens of the TP x CP group
        partial = z.sum() * coeff / n_global.clamp_min(1.0) * self._mtp_scale()
        if trains:  # evaluation records the value only
            # per-token loss: coeff * local valid sum (finalize divides by all tokens)
            attached = partial * n_global if self.calculate_per_token_loss else partial
            logits = MoEAuxLossAutoScaler.apply(logits, attached)
        self._record_metric(Z_LOSS_METRIC, partial / coeff, reduce_group=self.tp_cp_group, needs_dp_avg=True)
        return logits

    # ------------------------------------------------------------------ load-balancing losses
    def _lbl_partial(
        self,
        scores: torch.Tensor,
        routing_map: torch.Tensor,
        *,
        reduce_group,
        group_ids: Optional[torch.Tensor] = None,
        num_groups: int = 1,
        accumulate: bool = False,
    ):
        """This rank's share of the mean over groups g of the Switch load-balancing loss:

            L_g = E * sum_i f_gi * P_gi,   f_gi = c_gi / (k * T_g),   P_gi = (sum_t s_ti) / T_g

        with ``c_gi`` the valid tokens of group g routed to expert i and ``T_g`` the valid tokens
        of group g, both reduced over ``reduce_group``; this rank adds only its own tokens' scores
        to ``P``, so the partials sum over ``reduce_group`` to ``L``. ``scores``/``routing_map`` are
        already zero at padded tokens. Groups without valid tokens are left out of the mean.
        With ``accumulate`` (global_aux_loss) ``f`` uses the running counts of the global batch.
        Returns (partial loss, valid tokens of the whole group).
        """
        E, k = self.config.num_moe_experts, self.topk
        rm = routing_map.float()
        if group_ids is None:
            c_local = rm.sum(0, keepdim=True)  # [1, E]
            p_local = scores.float().sum(0, keepdim=True)
        else:
            c_local = torch.zeros(num_groups, E, device=rm.device).index_add_(0, group_ids, rm)
            p_local = torch.zeros(num_groups, E, device=rm.device).index_add_(0, group_ids, scores.float())
        c = all_reduced(c_local.detach(), reduce_group)
        T = c.sum(-1) / k  # [G]
        if accumulate:
            self.global_tokens_per_expert += c[0]
            self.global_valid_tokens += T[0]
            self.ga_steps += 1
            f = self.global_tokens_per_expert[None] / (k * self.global_valid_tokens.clamp_min(1.0))
        else:
            f = c / (k * T.clamp_min(1.0))[:, None]
        per_group = E * (f * p_local).sum(-1) / T.clamp_min(1.0)
        nonempty = T > 0
        per_group = torch.where(nonempty, per_group, torch.zeros_like(per_group))
        return per_group.sum() / nonempty.sum().clamp_min(1), T.sum()

    def reset_global_aux_loss_tracker(self):
        super().reset_global_aux_loss_tracker()
        self.global_valid_tokens.zero_()

    def _mtp_scale(self) -> float:
        # a repeated MTP layer runs mtp_num_layers times: count its losses once
        if self.is_mtp_layer and self.config.mtp_use_repeated_layer and self.config.mtp_num_layers:
            return 1.0 / self.config.mtp_num_layers
        return 1.0

    def _attach(self, probs, *, coeff, partial, name, reduce_group, needs_dp_avg, group_valid, grad_scale=1.0):
        if self._mtp_scale() != 1.0:
            partial = partial * self._mtp_scale()
        self._record_metric(name, partial, reduce_group=reduce_group, needs_dp_avg=needs_dp_avg)
        if not self.training:  # evaluation (record_eval_losses): the value only
            return probs
        if self.calculate_per_token_loss:
            # Grads are summed over DP and finalize_model_grads divides them by the global token
            # count; the partials are shares of a mean over ``group_valid`` tokens, so multiply
            # that (rank-constant) count back in. (Upstream multiplies by this rank's own count
            # times tp_cp, over-weighting the ranks with more valid tokens.)
            attached = partial * coeff * group_valid
        else:
            attached = partial * coeff * grad_scale
        return MoEAuxLossAutoScaler.apply(probs, attached)

    def _apply_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask=False):
        coeff = self.get_aux_loss_coeff("aux_loss")
        if coeff == 0:
            return probs
        partial, n_group = self._lbl_partial(scores_for_aux_loss, routing_map, reduce_group=self.tp_cp_group)
        return self._attach(probs, coeff=coeff, partial=partial, name=LOAD_BALANCING_METRICS["aux_loss"],
                            reduce_group=self.tp_cp_group, needs_dp_avg=True, group_valid=n_group)

    def _apply_seq_aux_loss(self, probs, scores_for_aux_loss, routing_map, seq_length, bsz, with_padding_mask=False):
        coeff = self.get_aux_loss_coeff("seq_aux_loss")
        if coeff == 0:
            return probs
        if self._sequence_ids is not None:
            ids, n = self._sequence_ids
            ids = ids.reshape(-1).to(routing_map.device, torch.long)
            if ids.numel() != routing_map.shape[0]:
                raise ValueError(
                    f"the sequence ids have {ids.numel()} entries but the router has {routing_map.shape[0]} "
                    "tokens; set_sequence_ids takes them in the router's layout (after CP split and SP scatter)"
                )
        else:  # BSHD: token t of the flattened [s, b] is in sequence t % b
            ids = torch.arange(routing_map.shape[0], device=routing_map.device) % bsz
            n = bsz
        partial, n_group = self._lbl_partial(scores_for_aux_loss, routing_map, reduce_group=self.tp_cp_group,
                                             group_ids=ids, num_groups=n)
        return self._attach(probs, coeff=coeff, partial=partial, name=LOAD_BALANCING_METRICS["seq_aux_loss"],
                            reduce_group=self.tp_cp_group, needs_dp_avg=True, group_valid=n_group)

    def _apply_global_aux_loss(self, probs, scores_for_aux_loss, routing_map, with_padding_mask=False):
        coeff = self.get_aux_loss_coeff("global_aux_loss")
        if coeff == 0:
            return probs
        partial, n_group = self._lbl_partial(
            scores_for_aux_loss, routing_map, reduce_group=self.tp_dp_cp_group, accumulate=self.training
        )  # evaluation: this micro-batch's counts (the running ones are training's)
        # Partials sum over TP x DP x CP to the global loss; DDP averages router grads over DP, so
        # the gradient-carrying copy is scaled by the DP size (CP is compensated by megatron's
        # aux-loss scale; with calculate_per_token_loss grads are summed, see _attach).
        dp = group_size(self.tp_dp_cp_group) // max(1, group_size(self.tp_cp_group))
        return self._attach(
            probs, coeff=coeff, partial=partial, name=LOAD_BALANCING_METRICS["global_aux_loss"],
            reduce_group=self.tp_dp_cp_group, needs_dp_avg=False, group_valid=n_group, grad_scale=dp,
        )

    # ------------------------------------------------------------------ expert bias
    def _apply_expert_bias(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        # Called once per routing() with the dispatch map: count it for the diagnostics too.
        if self._diagnostics_on():
            self.diagnostics.add_dispatched(routing_map, padding_mask)
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & ~padding_mask.reshape(-1, 1)
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    # ------------------------------------------------------------------ logging
    def _record_metric(self, name, value, *, reduce_group, needs_dp_avg):
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer_number = self.layer_number + (self.config.num_layers if self.is_mtp_layer else 0)
        get_moe_metrics_tracker().record(
            name, value.detach(), layer_number, num_layers, reduce_group=reduce_group, needs_dp_avg=needs_dp_avg
        )


def use_padding_aware_router(spec):
    """Return a copy of a megatron-core spec tree with ``TopKRouter`` replaced by ours."""
    from megatron.mcore_ext.spec import replace_modules

    return replace_modules(spec, {TopKRouter: PaddingAwareTopKRouter})
