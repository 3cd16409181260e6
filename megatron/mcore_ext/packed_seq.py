"""megatron-core's ``PackedSeqParams`` plus the padded sample boundaries as a host tensor.

Why: layers that must know the packed boundaries on the host -- fla's varlen kernels build their
chunk maps from them, megatron-core's GDN checks them with two device reads per layer -- would
otherwise read them back from the GPU in every layer, forward and backward, and each read stops
the host from queueing work ahead of the GPU. The collate computed the boundaries on the host in
the first place (``cu_seqlens_padded_host`` in the batch, docs/batch.md), so they travel with the
parameters instead of being re-derived.

``HostPackedSeqParams`` is a ``PackedSeqParams`` (every megatron consumer takes it as such) with one
more field, ``cu_seqlens_q_padded_cpu``: int64 ``[N+1]`` on the CPU, equal to
``cu_seqlens_q_padded``. ``padded_boundaries(psp)`` returns ``(device, host)`` boundaries for any
``PackedSeqParams``: the host copy when it is there, else one read of the device tensor. Its
``derived`` dict holds what layers compute from the boundaries once per micro-batch and share.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

__all__ = ["HostPackedSeqParams", "padded_boundaries"]


@dataclasses.dataclass
class HostPackedSeqParams(PackedSeqParams):
    """``PackedSeqParams`` with ``cu_seqlens_q_padded_cpu`` (module docstring)."""

    cu_seqlens_q_padded_cpu: Optional[torch.Tensor] = None
    # what layers derive from the boundaries once per micro-batch (e.g. fla's chunk map), by name
    derived: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        host = self.cu_seqlens_q_padded_cpu
        if host is not None:
            if host.device.type != "cpu" or host.dim() != 1:
                raise ValueError(f"cu_seqlens_q_padded_cpu must be a 1-d CPU tensor, got {tuple(host.shape)} "
                                 f"on {host.device}")
            if self.cu_seqlens_q_padded is None or host.numel() != self.cu_seqlens_q_padded.numel():
                raise ValueError("cu_seqlens_q_padded_cpu needs cu_seqlens_q_padded with as many entries")
            self.cu_seqlens_q_padded_cpu = host.to(torch.int64)


def padded_boundaries(psp: PackedSeqParams) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cu [N+1] on the device, cu_cpu int64 [N+1] on the host)``: the padded boundaries when
    given, else the real ones (megatron's choice in ``_resolve_cu_seqlens``)."""
    cu = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
    if cu is None:
        raise ValueError("packed (THD) input without cu_seqlens_q / cu_seqlens_q_padded")
    host = getattr(psp, "cu_seqlens_q_padded_cpu", None) if psp.cu_seqlens_q_padded is not None else None
    return cu, (host if host is not None else cu.detach().to("cpu", torch.int64))
