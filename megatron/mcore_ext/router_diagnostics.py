"""Routing diagnostics of ``PaddingAwareTopKRouter``: what each router saw, valid tokens only.

Every router holds one ``RoutingDiagnostics`` (``router.diagnostics``): tokens dispatched per
expert, the sum of the router entropy (nats, from the *clean* probabilities: before input jitter
and expert bias) and the number of valid tokens, accumulated over the micro-batches of an
iteration. ``collect_router_diagnostics(model)`` reduces them over the ranks that hold different
tokens and returns one dict per MoE layer; the trainer logs them (``docs/metrics.md``).

Nothing is counted in the no-grad first pass of activation recomputation (the recomputed pass
counts), but evaluation (no grad, eval mode) counts.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["RoutingDiagnostics", "collect_router_diagnostics", "all_reduced", "group_size"]


def all_reduced(t: torch.Tensor, group) -> torch.Tensor:
    """A summed copy of ``t`` over ``group`` (``t`` itself when the group has one rank)."""
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        t = t.clone()
        dist.all_reduce(t, group=group)
    return t


def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


class RoutingDiagnostics(torch.nn.Module):
    """Accumulators of one router (non-persistent buffers: never in a checkpoint)."""

    def __init__(self, num_experts: int, device=None):
        super().__init__()
        f64 = dict(dtype=torch.float64, device=device)
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, **f64), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros((), **f64), persistent=False)
        self.register_buffer("valid_tokens", torch.zeros((), **f64), persistent=False)

    @torch.no_grad()
    def add(self, *, counts: torch.Tensor, entropy_sum: torch.Tensor, valid_tokens) -> None:
        """counts [E]: valid tokens dispatched per expert; entropy_sum, valid_tokens: scalars."""
        self.tokens_per_expert += counts
        self.entropy_sum += entropy_sum
        self.valid_tokens += valid_tokens

    @torch.no_grad()
    def add_entropy_of_logits(self, logits: torch.Tensor, score_function: str,
                              padding_mask: Optional[torch.Tensor]) -> None:
        """Entropy of the routing distribution of ``logits`` [T, E] (the score function's scores,
        normalised), summed over the valid tokens."""
        logits = logits.float()
        if score_function == "softmax":
            p = torch.softmax(logits, dim=-1)
        else:
            p = torch.sigmoid(logits) if score_function == "sigmoid" else torch.nn.functional.softplus(logits).sqrt()
            p = p / (p.sum(-1, keepdim=True) + 1e-20)
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
        if padding_mask is None:
            self.entropy_sum += ent.sum().double()
            self.valid_tokens += ent.shape[0]
        else:
            valid = ~padding_mask.reshape(-1)
            self.entropy_sum += (ent * valid).sum().double()
            self.valid_tokens += valid.sum().double()

    @torch.no_grad()
    def add_dispatched(self, routing_map: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> None:
        rm = routing_map if padding_mask is None else routing_map & ~padding_mask.reshape(-1, 1)
        self.tokens_per_expert += rm.sum(0).double()

    def reset(self) -> None:
        self.tokens_per_expert.zero_()
        self.entropy_sum.zero_()
        self.valid_tokens.zero_()


@torch.no_grad()
def collect_router_diagnostics(model, reset: bool = True) -> list[dict]:
    """Reduce every padding-aware router's accumulated statistics (each ``PaddingAwareTopKRouter``
    holds a ``diagnostics``) to global values.

    Token counts and entropy sums are summed over the ranks that hold *different* tokens: DP x CP,
    and TP when sequence parallelism is on (without it the TP ranks see the same tokens). Must be
    called on every rank of those groups. Returns one dict per MoE layer:
      layer, tokens_per_expert (list), valid_tokens, entropy (mean nats per valid token, from the
      clean probabilities), load_balance (mean / max expert load: 1.0 = perfect balance, 1/E = all
      on one expert), max_min_ratio (max / min expert load; inf if an expert got nothing).
    """
    from megatron.core import parallel_state as ps

    out = []
    for r in (m for m in model.modules() if isinstance(getattr(m, "diagnostics", None), RoutingDiagnostics)):
        d = r.diagnostics
        packed = torch.cat([d.tokens_per_expert, d.entropy_sum[None], d.valid_tokens[None]])
        packed = all_reduced(packed, ps.get_data_parallel_group(with_context_parallel=True))
        if r.config.sequence_parallel:
            packed = all_reduced(packed, ps.get_tensor_model_parallel_group())
        tpe = packed[:-2]
        valid = float(packed[-1])
        mean_load, max_load, min_load = float(tpe.mean()), float(tpe.max()), float(tpe.min())
        out.append(
            {
                "layer": r.layer_number,
                "tokens_per_expert": [int(round(x)) for x in tpe.tolist()],
                "valid_tokens": int(round(valid)),
                "entropy": float(packed[-2]) / valid if valid > 0 else 0.0,
                "load_balance": mean_load / max_load if max_load > 0 else 1.0,
                "max_min_ratio": (max_load / min_load) if min_load > 0 else (math.inf if max_load > 0 else 1.0),
            }
        )
        if reset:
            d.reset()
    return out
