"""Image -> vision-tower inputs, as HF's Qwen2-VL image processor (also used by Qwen3-VL/Qwen3.5).

``preprocess_image`` turns one PIL image into ``pixel_values [N, 3*T*P*P]`` (float32) and
``grid_thw [1, 3]`` = (1, H/P, W/P):

1. convert to RGB (transparency composited onto white);
2. "smart resize" (``smart_resize``): H and W rounded to multiples of ``P * merge`` with the pixel
   count kept in ``[min_pixels, max_pixels]`` and the aspect ratio about the same; bicubic (PIL);
3. rescale by 1/255, normalise with ``mean``/``std`` (float32);
4. repeat the single frame ``T`` (``temporal_patch_size``) times and cut into patches, each row a
   patch flattened as (C, T, P, P); rows in ``merge x merge`` block order (all patches of one
   merged token consecutive, blocks row-major), which is what the vision tower's merger expects.

``decode_image`` opens encoded bytes and raises ``ImageDecodeError`` naming the image when it
cannot.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["ImageDecodeError", "decode_image", "smart_resize", "preprocess_image", "num_image_tokens"]


class ImageDecodeError(ValueError):
    """An image's bytes could not be decoded."""


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, ...) fully; ``name`` goes into the error."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # PIL is lazy: force the decode so truncated data fails here
    except Exception as e:
        raise ImageDecodeError(f"cannot decode image {name!r} ({len(data)} bytes): {type(e).__name__}: {e}") from e
    return img


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H', W'), both multiples of ``factor``, ``min_pixels <= H'*W' <= max_pixels`` (when the
    bounds allow), aspect ratio about kept. The rule of HF's Qwen2-VL ``smart_resize``."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be at most 200, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(
    image: Image.Image,
    *,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    min_pixels: int,
    max_pixels: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values float32 [N, 3*T*P*P], grid_thw int64 [1, 3]); see the module docstring."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess_image needs a PIL.Image.Image, got {type(image).__name__}")
    P, T, M = patch_size, temporal_patch_size, merge_size
    if min(P, T, M) < 1:
        raise ValueError(f"patch_size, temporal_patch_size, merge_size must be >= 1, got {P}, {T}, {M}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean}, {std}")
    image = _to_rgb(image)
    h, w = smart_resize(image.height, image.width, P * M, min_pixels, max_pixels)
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    x = np.asarray(image)  # [H, W, 3] uint8
    # rescale in float64 then float32, normalise in float32 (the order HF uses: same rounding)
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = x.transpose(2, 0, 1)  # [3, H, W]
    gh, gw = h // P, w // P
    # [C, gh/M, M, P, gw/M, M, P] -> [gh/M, gw/M, M, M, C, P, P]
    x = x.reshape(3, gh // M, M, P, gw // M, M, P).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], T, P, P))  # frame repeated T times
    pixel_values = torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * T * P * P))
    grid = torch.tensor([[1, gh, gw]], dtype=torch.long)
    return pixel_values, grid


def num_image_tokens(grid_thw: torch.Tensor, merge_size: int) -> int:
    """Placeholder tokens an image of grid (t, h, w) takes: ``t*h*w / merge**2``."""
    t, h, w = (int(v) for v in grid_thw.reshape(-1)[:3])
    return t * h * w // (merge_size * merge_size)
