"""A pure-PyTorch LayerNorm / RMSNorm for megatron-core specs that supports sequence parallelism.

megatron-core 0.19.2's ``WrappedTorchNorm`` (what the local spec uses without apex) asserts
``not config.sequence_parallel``. Nothing in a norm needs more than the usual rule for replicated
weights under sequence parallelism: each TP rank sees only its part of the sequence, so the
weights' gradients are partial and must be summed over TP. megatron-core does that for every
parameter marked ``sequence_parallel = True`` (``finalize_model_grads``), so this norm marks its
weights and is otherwise ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (with optional
zero-centred gamma, i.e. the weight stored as ``gamma - 1``).
"""
from __future__ import annotations

import torch

__all__ = ["TorchNorm"]


class TorchNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        kind = getattr(config, "normalization", "LayerNorm")
        if kind not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"TorchNorm: normalization must be LayerNorm or RMSNorm, got {kind!r}")
        self.kind = kind
        self.eps = eps
        self.zero_centered_gamma = bool(getattr(config, "layernorm_zero_centered_gamma", False))
        init = 0.0 if self.zero_centered_gamma else 1.0
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), init, dtype=config.params_dtype))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if kind == "LayerNorm"
            else None
        )
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.kind == "LayerNorm":
            return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, self.bias, self.eps)
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, self.eps)
