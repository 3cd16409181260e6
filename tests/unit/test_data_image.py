"""``preprocess_image`` equals HF's Qwen2-VL image processor (PIL backend, built from arguments), and
its patch layout is checked against an independent per-patch loop."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from multimodal_dev.data.image import ImageDecodeError, decode_image, preprocess_image, smart_resize

hf_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
HFProcessor = hf_mod.Qwen2VLImageProcessorPil


def _hf(img, P, T, M, mn, mx, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    proc = HFProcessor(patch_size=P, temporal_patch_size=T, merge_size=M, min_pixels=mn, max_pixels=mx,
                       image_mean=list(mean), image_std=list(std))
    out = proc(images=[img], return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


CASES = [
    # patch, (H, W), min_pixels, max_pixels
    (4, (32, 32), 256, 65536),
    (4, (17, 45), 256, 2048),  # resized up and rounded
    (4, (5, 300), 64, 4096),  # extreme aspect
    (4, (200, 150), 256, 4096),  # shrunk to max_pixels
    (16, (100, 77), 56 * 56, 128 * 128),
    (16, (300, 500), 1024, 200 * 200),
    (16, (20, 30), 64 * 64, 1 << 20),  # grown to min_pixels
]


@pytest.mark.parametrize("P, hw, mn, mx", CASES)
def test_equals_hf_processor(P, hw, mn, mx):
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8), "RGB")
    ref_pv, ref_grid = _hf(img, P, 2, 2, mn, mx)
    pv, grid = preprocess_image(img, patch_size=P, temporal_patch_size=2, merge_size=2, min_pixels=mn, max_pixels=mx)
    assert pv.dtype.is_floating_point and str(pv.dtype) == "torch.float32"
    assert grid.tolist() == ref_grid.tolist()
    assert pv.shape == ref_pv.shape == (int(np.prod(ref_grid)), 3 * 2 * P * P)
    np.testing.assert_array_equal(pv.numpy(), ref_pv)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_other_modes_equal_hf(mode):
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    if mode != "RGBA":
        img = img.convert(mode)
    ref_pv, ref_grid = _hf(img, 4, 2, 2, 256, 65536, mean=(0.48, 0.45, 0.4), std=(0.26, 0.26, 0.27))
    pv, grid = preprocess_image(img, patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=256,
                                max_pixels=65536, mean=(0.48, 0.45, 0.4), std=(0.26, 0.26, 0.27))
    assert grid.tolist() == ref_grid.tolist()
    np.testing.assert_array_equal(pv.numpy(), ref_pv)


def test_patch_layout_by_hand():
    """Without resizing (size already a multiple of P*M), every row must be the (C, T, P, P) patch
    at the position given by merge-block order, built here with plain loops."""
    P, T, M = 4, 2, 2
    H, W = 16, 24
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    pv, grid = preprocess_image(Image.fromarray(arr), patch_size=P, temporal_patch_size=T, merge_size=M,
                                min_pixels=1, max_pixels=1 << 20, mean=(0, 0, 0), std=(1, 1, 1))
    gh, gw = H // P, W // P
    assert grid.tolist() == [[1, gh, gw]]
    x = arr.astype(np.float64) / 255
    rows = []
    for bh, bw in itertools.product(range(gh // M), range(gw // M)):  # merge blocks, row-major
        for mh, mw in itertools.product(range(M), range(M)):  # patches inside a block, row-major
            r, c = (bh * M + mh) * P, (bw * M + mw) * P
            patch = x[r : r + P, c : c + P, :].transpose(2, 0, 1)  # (C, P, P)
            rows.append(np.stack([patch] * T, axis=1).reshape(-1))  # (C, T, P, P)
    np.testing.assert_allclose(pv.numpy(), np.stack(rows), rtol=0, atol=1e-6)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2000), st.integers(1, 2000), st.sampled_from([8, 28, 32]), st.integers(1, 64),
       st.integers(1, 2048))
def test_smart_resize_matches_hf(h, w, factor, lo, hi):
    hf_smart_resize = hf_mod.smart_resize  # the PIL module's copy (the other needs torchvision)
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(h, w, factor, lo * factor * factor, hi * factor * factor)
        return
    mn, mx = lo * factor * factor, max(lo, hi) * factor * factor
    got = smart_resize(h, w, factor, mn, mx)
    assert got == hf_smart_resize(h, w, factor, mn, mx)
    assert got[0] % factor == 0 and got[1] % factor == 0 and got[0] >= factor and got[1] >= factor


def test_undecodable_image_error_names_it():
    with pytest.raises(ImageDecodeError, match="shard-7.tar:key42.png"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage", "shard-7.tar:key42.png")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    truncated = buf.getvalue()[:-30]
    with pytest.raises(ImageDecodeError, match="cut.png"):
        decode_image(truncated, "cut.png")
    assert decode_image(buf.getvalue(), "ok.png").size == (32, 32)
