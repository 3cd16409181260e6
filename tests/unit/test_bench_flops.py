"""``multimodal_dev.models.qwen35_vl.flops.model_flops_per_step`` (the MFU numerator of scripts/bench/train_throughput.py)
against a hand count for the ``tiny`` variant on one packed batch, derived independently as
"2 FLOPs per weight a token touches" plus the attention (query, key) pairs; and the same samples
padded (BSHD) give the same useful FLOPs (padding is not useful work).

variants.py and flops.py are loaded from their files: importing them through ``multimodal_dev.models``
would import megatron-core (~8 s), and this test needs none of it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import multimodal_dev
from multimodal_dev.data.collate import CollateConfig, pack_or_pad_batch


def _load(name):
    path = Path(multimodal_dev.__file__).parent / "models" / "qwen35_vl" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}_for_flops_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_flops = _load("flops")
sample_lengths = _flops.sample_lengths


def get_variant(name):
    return _load("variants").get_variant(name)


def model_flops_per_step(variant, batch):
    return _flops.model_flops_per_step(variant["text"], variant["vision"], batch)


IMG, VS, VE = 250, 248, 249  # tiny's image / vision-start / vision-end token ids


def _samples():
    """A text-only sample of 10 tokens and one of 20 tokens holding one 1x4x4-patch image (4 tokens)."""
    text = list(range(1, 11))
    with_image = [1, 2, 3, VS, IMG, IMG, IMG, IMG, VE] + list(range(20, 31))
    assert len(with_image) == 20

    def labels(tokens):
        return tokens[1:] + [-100]

    return [
        dict(tokens=text, labels=labels(text)),
        dict(tokens=with_image, labels=labels(with_image), pixel_values=torch.zeros(16, 3 * 2 * 4 * 4),
             image_grid_thw=torch.tensor([[1, 4, 4]])),
    ]


def _hand_count() -> int:
    """tiny: H=64, 4 heads / 2 KV groups of 32, 8 experts top-2 of width 32, shared expert 48,
    vocab 256, 2 layers; vision width 32, MLP 64, 4 heads, depth 2, patches 3x2x4x4 = 96, merge 2,
    out 64. Weight shapes as (in, out)."""
    layer = [
        (64, 2 * 4 * 32),  # q_proj with the output gate
        (64, 2 * 32), (64, 2 * 32),  # k_proj, v_proj
        (4 * 32, 64),  # o_proj
        (64, 8),  # router
        (64, 2 * 32), (32, 64), (64, 2 * 32), (32, 64),  # two active experts: gate|up, down
        (64, 2 * 48), (48, 64), (64, 1),  # shared expert gate|up, down; its sigmoid gate
    ]
    per_token = 2 * sum(a * b for a, b in layer) + 2 * 64 * 256 // 2  # 2 layers + LM head
    assert per_token == 2 * 54848 + 16384
    text = 2 * per_token * 30  # 30 real tokens, 2 FLOPs per weight
    # causal pairs: 10*11/2 + 20*21/2 = 265; per pair and layer: QK^T 2*32 + PV 2*32 per head, 4 heads
    attention = 265 * 4 * (2 * 32 + 2 * 32) * 2
    patch = [(96, 32)] + 2 * [(32, 3 * 32), (32, 32), (32, 64), (64, 32)]  # embed; qkv, proj, fc1, fc2 per block
    vision = 16 * 2 * sum(a * b for a, b in patch)
    vision += 16 * 16 * 4 * (2 * 8 + 2 * 8) * 2  # one frame of 16 patches, bidirectional, 4 heads x 8, 2 blocks
    vision += 4 * 2 * (128 * 128 + 128 * 64)  # merger on 16 / 2^2 merged tokens
    return 3 * (text + attention + vision)  # forward + backward


def test_tiny_packed_batch_matches_hand_count():
    thd = pack_or_pad_batch(_samples(), CollateConfig(layout="thd", image_token_id=IMG, spatial_merge_size=2))
    assert sample_lengths(thd) == [10, 20]
    got = model_flops_per_step(get_variant("tiny"), thd)
    assert got["total"] == _hand_count() == 26_162_688
    assert got["total"] == 3 * got["forward"]
    parts = {k: v for k, v in got.items() if k not in ("total", "forward")}
    assert sum(parts.values()) == got["total"]
    assert got["attention_core"] == 3 * 265 * 4 * 128 * 2


def test_padding_is_not_useful_work():
    samples = _samples()
    thd = pack_or_pad_batch(samples, CollateConfig(layout="thd", image_token_id=IMG, spatial_merge_size=2,
                                                   divisible_by=8))  # 10 -> 16 tokens: padded
    bshd = pack_or_pad_batch(samples, CollateConfig(layout="bshd", target_seqlen=64, image_token_id=IMG,
                                                    spatial_merge_size=2))
    assert sample_lengths(bshd) == [10, 20]
    assert model_flops_per_step(get_variant("tiny"), bshd) == model_flops_per_step(get_variant("tiny"), thd)
    assert model_flops_per_step(get_variant("tiny"), thd)["total"] == _hand_count()


def test_gated_deltanet_layers_are_counted_by_hand():
    """tiny-hybrid (3 GDN + 1 full-attention layer): each GDN layer replaces the attention terms by
    its projections (H=64: in_proj 64 -> 2*32 + 2*64 + 2*4 = 200, out_proj 64 -> 64), its conv
    (kernel 4 over 2*32 + 64 = 128 channels) and its recurrence (4 value heads, 6 * 16 * 16 each)."""
    thd = pack_or_pad_batch(_samples(), CollateConfig(layout="thd", image_token_id=IMG, spatial_merge_size=2))
    hyb, full = model_flops_per_step(get_variant("tiny-hybrid"), thd), model_flops_per_step(get_variant("tiny"), thd)
    tokens = 30
    per_gdn = 2 * 64 * 200 + 2 * 64 * 64 + 2 * 4 * 128 + 4 * 6 * 16 * 16
    assert hyb["gdn_projections"] + hyb["gdn_conv"] + hyb["gdn_recurrence"] == 3 * 3 * tokens * per_gdn
    # one full-attention layer of tiny's two: half its attention terms
    assert hyb["attention_projections"] * 2 == full["attention_projections"]
    assert hyb["attention_core"] * 2 == full["attention_core"]
    assert hyb["total"] == sum(v for k, v in hyb.items() if k not in ("total", "forward"))


def test_model_flops_per_batch_is_the_total_of_the_architectures_count():
    """``MultimodalModel.flops_per_batch`` (the contract's one number) from qwen35's per-part dict."""
    from types import SimpleNamespace

    from multimodal_dev.models.base import MultimodalModel

    thd = pack_or_pad_batch(_samples(), CollateConfig(layout="thd", image_token_id=IMG, spatial_merge_size=2))
    stub = SimpleNamespace(_flops_fn=lambda b: model_flops_per_step(get_variant("tiny"), b))
    assert MultimodalModel.flops_per_batch(stub, thd) == float(_hand_count())
