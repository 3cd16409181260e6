"""Qwen3.5-MoE vision tower: a pure-PyTorch re-implementation of HF ``Qwen3_5MoeVisionModel``.

Fact sheet: ``docs/qwen35_moe_facts.md`` section 2 (forward) and section 7 (state-dict keys).

Input: ``pixel_values [N, C*T*P*P]`` (each row one patch flattened as ``(C, T, P, P)``, patches of
an image in 2x2 spatial-merge-block order, frames one after the other) and ``image_grid_thw
[n_images, 3]`` (t, h, w in patches, ``N = sum(t*h*w)``). Output: ``[N / merge**2,
out_hidden_size]``, the merged features of all images concatenated in ``image_grid_thw`` order
(HF's ``pooler_output``).

Forward, as in HF:

1. patch embedding: a ``Linear(C*T*P*P, D)`` with bias (HF stores it as a ``Conv3d`` whose kernel
   equals its stride, which is the same map; the conversion reshapes the weight);
2. learned ``sqrt(n_pos) x sqrt(n_pos)`` position grid, bilinearly resampled (``align_corners=True``,
   border clamp) to each image's ``(h, w)``, emitted in merge-block order and repeated per frame;
3. 2-D axial rotary embedding over the full head dim (``rotate_half``), angles
   ``[row * inv_freq | col * inv_freq]`` duplicated, computed and applied in fp32;
4. ``depth`` pre-norm blocks (LayerNorm eps 1e-6): non-causal attention, block-diagonal per image
   frame, then an MLP with tanh-approximated GELU;
5. merger: LayerNorm per patch, 4 consecutive patches concatenated, ``fc1 -> exact GELU -> fc2``.

Attention is computed with ``F.scaled_dot_product_attention`` on frames batched by length: all
frames of the same ``h*w`` are gathered into one ``[frames, heads, h*w, head_dim]`` call, so no
``N x N`` mask is ever built and images of one size (the common case) cost a single call.

The module is device-agnostic and runs in any floating dtype; positions, interpolation weights
and the rotary angles are computed in fp32 as HF does.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Qwen35VisionConfig",
    "Qwen35VisionTower",
    "vision_state_from_hf",
    "vision_state_to_hf",
    "vision_param_count",
    "HF_VISUAL_PREFIX",
]

HF_VISUAL_PREFIX = "model.visual."


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------
@dataclass
class Qwen35VisionConfig:
    """Vision tower hyper-parameters (names as in HF ``Qwen3_5MoeVisionConfig``)."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    num_position_embeddings: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"Qwen35VisionConfig: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"Qwen35VisionConfig: head_dim ({self.head_dim}) must be divisible by 4 for the "
                "2-D axial rotary embedding"
            )
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ValueError(
                f"Qwen35VisionConfig: num_position_embeddings ({self.num_position_embeddings}) must "
                "be a perfect square"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, ``C * T * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def num_grid_per_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size * self.spatial_merge_size

    @classmethod
    def from_hf(cls, hf_config: Any) -> "Qwen35VisionConfig":
        """From an HF ``Qwen3_5MoeVisionConfig`` (object or dict, e.g. ``config.json``'s
        ``vision_config``)."""
        get = (lambda k, d=None: hf_config.get(k, d)) if isinstance(hf_config, Mapping) else (
            lambda k, d=None: getattr(hf_config, k, d)
        )
        act = get("hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", None):
            raise ValueError(f"Qwen35VisionConfig.from_hf: hidden_act {act!r} unsupported "
                             "(expected 'gelu_pytorch_tanh')")
        rope = get("rope_parameters", None) or {}
        kwargs = dict(
            depth=get("depth"),
            hidden_size=get("hidden_size"),
            num_heads=get("num_heads"),
            intermediate_size=get("intermediate_size"),
            out_hidden_size=get("out_hidden_size"),
            num_position_embeddings=get("num_position_embeddings"),
            patch_size=get("patch_size", 16),
            temporal_patch_size=get("temporal_patch_size", 2),
            in_channels=get("in_channels", 3),
            spatial_merge_size=get("spatial_merge_size", 2),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )
        missing = [k for k, v in kwargs.items() if v is None]
        if missing:
            raise ValueError(f"Qwen35VisionConfig.from_hf: missing fields {missing}")
        return cls(**kwargs)


def vision_param_count(cfg: Qwen35VisionConfig) -> int:
    """Number of parameters of the tower (HF ``model.visual``, merger included), from the formula."""
    d, i, o, u = cfg.hidden_size, cfg.intermediate_size, cfg.out_hidden_size, cfg.merge_unit
    patch_embed = cfg.patch_dim * d + d
    pos_embed = cfg.num_position_embeddings * d
    block = (
        2 * 2 * d  # norm1, norm2 (weight + bias)
        + d * 3 * d + 3 * d  # qkv
        + d * d + d  # proj
        + d * i + i  # mlp fc1
        + i * d + d  # mlp fc2
    )
    merger = 2 * d + (u * d) * (u * d) + u * d + (u * d) * o + o
    return patch_embed + pos_embed + cfg.depth * block + merger


# --------------------------------------------------------------------------------------------
# Index helpers (grid_thw -> per-patch coordinates, frame segments)
# --------------------------------------------------------------------------------------------
def _patch_coords(grid_thw: torch.Tensor, merge: int, device: torch.device):
    """Per patch (in merge-block order, frames repeated): ``row, col, height, width`` (long)."""
    grid = grid_thw.to(device=device, dtype=torch.long)
    t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
    if bool(((h % merge) != 0).any()) or bool(((w % merge) != 0).any()):
        raise ValueError(
            f"image_grid_thw: h and w must be divisible by spatial_merge_size={merge}, got "
            f"{grid_thw.tolist()}"
        )
    counts = t * h * w
    heights = torch.repeat_interleave(h, counts)
    widths = torch.repeat_interleave(w, counts)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    pos = (torch.arange(int(counts.sum()), device=device) - starts) % (heights * widths)
    # pos = ((block_row * (w/m) + block_col) * m + in_row) * m + in_col
    in_col = pos % merge
    in_row = (pos // merge) % merge
    block = pos // (merge * merge)
    blocks_w = widths // merge
    row = (block // blocks_w) * merge + in_row
    col = (block % blocks_w) * merge + in_col
    return row, col, heights, widths


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int):
    """Bilinear, align_corners=True: the two source taps along one axis and their weights."""
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1).float()
    lo = torch.floor(src)
    frac = src - lo
    lo = lo.long().clamp(0, side - 1)
    hi = (lo + 1).clamp(max=side - 1)
    return torch.stack([lo, hi], -1), torch.stack([1.0 - frac, frac], -1)


class _Frames(list):
    """Frames grouped by length: a list of ``(length, token_index [n_frames, length] or None)``
    (``None``: every frame has this length, so a plain reshape does the gathering), and, for the
    flash varlen kernel, the frames' boundaries ``cu_seqlens`` (int32, on the device) and the
    longest frame ``max_len``."""

    cu_seqlens: torch.Tensor
    max_len: int


def _varlen_ok(q: torch.Tensor) -> bool:
    """Frames on a GPU in half precision: one varlen flash kernel instead of a gather / SDPA /
    scatter per length (host-bound for small images), or of a dense SDPA when all frames have
    one length (cuDNN's per-shape plans, see ``_VisionAttention.forward``)."""
    from megatron.mcore_ext.attention import varlen_available

    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and varlen_available()


def _frame_groups(grid_thw: torch.Tensor, device: torch.device) -> _Frames:
    """Frames of the images in patch order (see ``_Frames``)."""
    lens = []
    for t, h, w in grid_thw.tolist():
        lens += [int(h) * int(w)] * int(t)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    frames = _Frames()
    frames.cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    frames.max_len = max(lens, default=0)
    if len(set(lens)) == 1:
        frames.append((lens[0], None))
        return frames
    starts = [0]
    for n in lens[:-1]:
        starts.append(starts[-1] + n)
    by_len: dict[int, list[int]] = {}
    for s, n in zip(starts, lens):
        by_len.setdefault(n, []).append(s)
    for n, ss in by_len.items():
        idx = torch.tensor(ss, device=device)[:, None] + torch.arange(n, device=device)[None, :]
        frames.append((n, idx))
    return frames


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------
class _VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen35VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups) -> torch.Tensor:
        n = x.shape[0]
        # qkv rows are [all q | all k | all v], each head-major.
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        dtype = q.dtype
        qf, kf = q.float(), k.float()
        q = (qf * cos + _rotate_half(qf) * sin).to(dtype)
        k = (kf * cos + _rotate_half(kf) * sin).to(dtype)

        if _varlen_ok(q):
            # also when every frame has the same length: the dense SDPA below would pick cuDNN on
            # Hopper, which builds a plan for every new (frames, length) shape, ~1 s each on the
            # H100 (docs/performance.md), and image sizes vary from step to step
            from megatron.mcore_ext.attention import varlen_thd_attention

            out = varlen_thd_attention(q, k, v, groups.cu_seqlens, groups.cu_seqlens, groups.max_len,
                                       groups.max_len, causal=False, scale=self.head_dim ** -0.5)
            out = out.reshape(n, -1)
        elif len(groups) == 1 and groups[0][1] is None:
            length = groups[0][0]
            qs, ks, vs = (t.view(n // length, length, self.num_heads, self.head_dim).transpose(1, 2)
                          for t in (q, k, v))
            out = F.scaled_dot_product_attention(qs, ks, vs, scale=self.head_dim ** -0.5)
            out = out.transpose(1, 2).reshape(n, -1)
        else:
            out = q.new_empty(n, self.num_heads, self.head_dim)
            for length, idx in groups:
                qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # [frames, heads, L, hd]
                o = F.scaled_dot_product_attention(qs, ks, vs, scale=self.head_dim ** -0.5)
                out[idx.reshape(-1)] = o.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)
            out = out.view(n, -1)
        return self.proj(out)


class _VisionMLP(nn.Module):
    def __init__(self, cfg: Qwen35VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class _VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen35VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = _VisionAttention(cfg)
        self.mlp = _VisionMLP(cfg)

    def forward(self, x, cos, sin, groups):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class _PatchMerger(nn.Module):
    def __init__(self, cfg: Qwen35VisionConfig):
        super().__init__()
        self.merged_size = cfg.hidden_size * cfg.merge_unit
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.linear_fc1 = nn.Linear(self.merged_size, self.merged_size, bias=True)
        self.linear_fc2 = nn.Linear(self.merged_size, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).view(-1, self.merged_size)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Qwen35VisionTower(nn.Module):
    """HF ``Qwen3_5MoeVisionModel`` (merged output). See the module docstring."""

    def __init__(self, cfg: Qwen35VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.hidden_size, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList([_VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = _PatchMerger(cfg)
        quarter = cfg.head_dim // 2  # frequencies per axis: head_dim / 4
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _positions(self, grid_thw: torch.Tensor, device: torch.device):
        """(interpolated position embedding [N, D] fp32, cos [N, 1, hd], sin [N, 1, hd])."""
        cfg = self.config
        row, col, heights, widths = _patch_coords(grid_thw, cfg.spatial_merge_size, device)
        side = cfg.num_grid_per_side
        h_idx, h_wt = _axis_taps(row, heights, side)
        w_idx, w_wt = _axis_taps(col, widths, side)
        idx = (h_idx[:, :, None] * side + w_idx[:, None, :]).reshape(-1, 4)
        wt = (h_wt[:, :, None] * w_wt[:, None, :]).reshape(-1, 4)
        pos = (self.pos_embed(idx).float() * wt[:, :, None]).sum(1)

        inv_freq = self.inv_freq.to(device=device, dtype=torch.float)
        angles = torch.cat([row[:, None].float() * inv_freq, col[:, None].float() * inv_freq], -1)
        angles = torch.cat([angles, angles], -1)[:, None, :]  # [N, 1, hd]
        return pos, angles.cos(), angles.sin()

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(
                f"pixel_values: expected [num_patches, {cfg.patch_dim}] (C*T*P*P), got "
                f"{tuple(pixel_values.shape)}"
            )
        n_expected = int((image_grid_thw[:, 0] * image_grid_thw[:, 1] * image_grid_thw[:, 2]).sum())
        if pixel_values.shape[0] != n_expected:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw "
                f"{image_grid_thw.tolist()} describes {n_expected}"
            )
        device = pixel_values.device
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        pos, cos, sin = self._positions(image_grid_thw, device)
        x = x + pos.to(x.dtype)
        groups = _frame_groups(image_grid_thw, device)
        for blk in self.blocks:
            x = blk(x, cos, sin, groups)
        return self.merger(x)


# --------------------------------------------------------------------------------------------
# State-dict conversion (HF <-> ours). Only the patch embedding differs: Conv3d <-> Linear.
# --------------------------------------------------------------------------------------------
_HF_PATCH_W, _HF_PATCH_B = "patch_embed.proj.weight", "patch_embed.proj.bias"
_OUR_PATCH_W, _OUR_PATCH_B = "patch_embed.weight", "patch_embed.bias"
_SHARED_KEY = re.compile(
    r"^(pos_embed\.weight"
    r"|blocks\.\d+\.(norm1|norm2)\.(weight|bias)"
    r"|blocks\.\d+\.attn\.(qkv|proj)\.(weight|bias)"
    r"|blocks\.\d+\.mlp\.(linear_fc1|linear_fc2)\.(weight|bias)"
    r"|merger\.(norm|linear_fc1|linear_fc2)\.(weight|bias))$"
)


def vision_state_from_hf(hf_state: Mapping[str, torch.Tensor], prefix: str = "") -> dict:
    """HF visual state dict -> ours.

    ``prefix`` is what precedes the visual keys in ``hf_state``: ``""`` for
    ``model.visual.state_dict()``, ``"model.visual."`` (``HF_VISUAL_PREFIX``) for a full checkpoint,
    whose other keys are then ignored. Unknown keys under the prefix are an error.
    """
    out = {}
    for key, value in hf_state.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if k == _HF_PATCH_W:
            out[_OUR_PATCH_W] = value.reshape(value.shape[0], -1)
        elif k == _HF_PATCH_B:
            out[_OUR_PATCH_B] = value
        elif _SHARED_KEY.match(k):
            out[k] = value
        else:
            raise KeyError(f"vision_state_from_hf: unexpected key {key!r}")
    if _OUR_PATCH_W not in out:
        raise KeyError(f"vision_state_from_hf: no {prefix + _HF_PATCH_W!r} in the state dict")
    return out


def vision_state_to_hf(
    state: Mapping[str, torch.Tensor],
    cfg: Optional[Qwen35VisionConfig] = None,
    prefix: str = "",
) -> dict:
    """Our state dict -> HF visual keys (each prefixed with ``prefix``, e.g. ``HF_VISUAL_PREFIX``).

    The Conv3d kernel shape ``(C, T, P, P)`` comes from ``cfg``; without it ``C=3, T=2`` are assumed
    and ``P`` is inferred from the flattened patch length."""
    out = {}
    for k, value in state.items():
        if k == _OUR_PATCH_W:
            if cfg is not None:
                c, t, p = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size
            else:
                c, t = 3, 2
                p = math.isqrt(value.shape[1] // (c * t))
            if c * t * p * p != value.shape[1]:
                raise ValueError(
                    f"vision_state_to_hf: patch_embed.weight has {value.shape[1]} inputs, not "
                    f"C*T*P*P = {c}*{t}*{p}*{p}; pass cfg"
                )
            out[prefix + _HF_PATCH_W] = value.reshape(value.shape[0], c, t, p, p)
        elif k == _OUR_PATCH_B:
            out[prefix + _HF_PATCH_B] = value
        elif _SHARED_KEY.match(k):
            out[prefix + k] = value
        else:
            raise KeyError(f"vision_state_to_hf: unexpected key {k!r}")
    return out
