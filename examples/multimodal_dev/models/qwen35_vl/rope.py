"""Interleaved multimodal RoPE (Qwen3.5 / Qwen3-VL layout) for megatron-core's GPTModel.

HF ``Qwen3_5MoeTextRotaryEmbedding`` (fact sheet section 3.3): with rotary dim ``rd =
int(head_dim * partial_rotary_factor)`` there are ``rd/2`` frequencies
``inv_freq[i] = theta ** (-2i / rd)``. Frequency ``i`` takes its position from one of the three
position rows (temporal, height, width), *interleaved*::

    i = 0 1 2 3 4 5 6 ...      axis = T H W T H W T ...   (H only for i < 3*mrope_section[1],
                                                            W only for i < 3*mrope_section[2],
                                                            T everywhere else)

and the angles are duplicated ``[f | f]`` (rotate-half pairs ``(i, i + rd/2)``). megatron-core
0.19.2's ``MultimodalRotaryEmbedding`` uses *contiguous* sections ``[T..T H..H W..W]`` instead,
and it re-splits its output for context parallelism (``get_pos_emb_on_this_cp_rank``); neither
fits here, so this module replaces it.

Output layout: what megatron's attention expects from ``GPTModel.rotary_pos_emb`` for MRoPE,
``[s, b, 1, rd]`` float32 angles. ``apply_rotary_pos_emb`` (``rope_utils``) rotates the first
``rd`` channels of each head with ``rotate_half`` (``rotary_interleaved=False``) and passes the
remaining ``head_dim - rd`` channels through: exactly HF's partial rotation.

Context parallelism. The position ids that reach ``GPTModel`` are already this CP rank's share
(``MultimodalModel`` splits every per-token tensor with one index), so the angles are computed
from them as they are and are never re-split:

* BSHD: megatron applies ``freqs`` to the local ``[s_local, b, ...]`` query/key as is, so the
  local angles are right.
* THD: megatron's ``_apply_rotary_pos_emb_thd`` *slices* ``freqs`` per packed sample. When
  ``freqs`` has ``cu_seqlens[-1]`` rows (the global packed length) it takes, for every sample,
  the rows of this rank's zigzag chunks at the sample's offset; otherwise it restarts at row 0
  for every sample (wrong for MRoPE). With CP = 1 the local angles already have the global
  length. With CP > 1, ``packed_freqs_for_cp`` scatters the local angles into a zero tensor of
  the global length at this rank's global indices (``thd_partition_index``, the same zigzag
  megatron slices with), so megatron's slicing hands back exactly the local angles.
  ``Qwen35GPTModel._preprocess`` does that, because only it sees ``packed_seq_params``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron.mcore_ext.cp_split import thd_partition_index

__all__ = ["InterleavedMRoPE", "mrope_axis_of_frequency", "packed_freqs_for_cp"]


def mrope_axis_of_frequency(n_freq: int, mrope_section: Sequence[int]) -> torch.Tensor:
    """[n_freq] long: the position row (0 = T, 1 = H, 2 = W) frequency ``i`` uses (HF layout)."""
    if len(mrope_section) != 3:
        raise ValueError(f"mrope_section must have 3 entries (T, H, W), got {list(mrope_section)}")
    if sum(mrope_section) != n_freq:
        raise ValueError(
            f"sum(mrope_section)={sum(mrope_section)} ({list(mrope_section)}) must equal the number "
            f"of rotary frequencies rotary_dim/2={n_freq}"
        )
    axis = torch.zeros(n_freq, dtype=torch.long)
    axis[1 : 3 * mrope_section[1] : 3] = 1
    axis[2 : 3 * mrope_section[2] : 3] = 2
    return axis


class InterleavedMRoPE(torch.nn.Module):
    """Drop-in for ``GPTModel.rotary_pos_emb`` with ``position_embedding_type="mrope"``.

    ``forward(position_ids [3, b, s], mrope_section=None, cp_group=None) -> [s, b, 1, rd]``.
    ``mrope_section`` and ``cp_group`` are accepted for megatron's call signature: the section is
    fixed at construction (a different one passed in is an error) and the CP group is ignored
    (see the module docstring).
    """

    def __init__(self, kv_channels: int, rotary_percent: float, rotary_base: float, mrope_section: Sequence[int]):
        super().__init__()
        rd = int(kv_channels * rotary_percent)
        if rd <= 0 or rd % 2:
            raise ValueError(
                f"rotary dim int(kv_channels={kv_channels} * rotary_percent={rotary_percent}) = {rd} "
                "must be a positive even number"
            )
        self.rotary_dim = rd
        self.mrope_section = [int(x) for x in mrope_section]
        inv_freq = 1.0 / (float(rotary_base) ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axis", mrope_axis_of_frequency(rd // 2, self.mrope_section), persistent=False)

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None, **unused) -> torch.Tensor:
        if mrope_section is not None and [int(x) for x in mrope_section] != self.mrope_section:
            raise ValueError(
                f"InterleavedMRoPE was built for mrope_section={self.mrope_section}, called with "
                f"{list(mrope_section)}"
            )
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(
                f"position_ids must be [3, batch, seq] (T, H, W rows), got shape {tuple(position_ids.shape)}"
            )
        pos = position_ids.to(device=self.inv_freq.device, dtype=torch.float32)  # [3, b, s]
        # [b, s, 3] -> the row each frequency uses -> [b, s, rd/2]
        freqs = pos.permute(1, 2, 0)[..., self.axis] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate_half pairs (i, i + rd/2)
        return emb.transpose(0, 1).unsqueeze(2).contiguous()  # [s, b, 1, rd]


def packed_freqs_for_cp(freqs: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Local THD angles ``[t_local, ...]`` -> ``[cu_seqlens[-1], ...]`` for megatron's THD RoPE.

    Rows at this rank's global indices hold the local angles; the other rows (never read) are 0.
    """
    if cp_size == 1:
        return freqs
    total = int(cu_seqlens[-1])
    idx = thd_partition_index(cu_seqlens, cp_size, cp_rank, device=freqs.device)
    if idx.numel() != freqs.shape[0]:
        raise ValueError(
            f"THD rotary: {freqs.shape[0]} local positions but cu_seqlens {cu_seqlens.tolist()} give "
            f"{idx.numel()} for CP rank {cp_rank} of {cp_size}"
        )
    out = freqs.new_zeros((total, *freqs.shape[1:]))
    out[idx] = freqs
    return out
