"""``build_sample``: chat layout, image token runs, next-token labels on answers only, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal_dev.data.collate import CollateConfig, pack_or_pad_batch
from multimodal_dev.data.sample import SampleError, build_sample
from multimodal_dev.data.tokenizer import TextTokenizer

KW = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=256, max_pixels=65536)


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.from_file()


def _img(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


CONV = [
    {"role": "user", "content": "<image>\nWhat shape is this?"},
    {"role": "assistant", "content": "a red circle"},
    {"role": "user", "content": "And <image> here?"},
    {"role": "assistant", "content": "two"},
]


def test_layout_and_labels(tok):
    # 24x40 -> no resize (multiples of 8) -> grid (1, 6, 10) -> 60 patches -> 15 tokens;
    # 16x16 -> grid (1, 4, 4) -> 4 tokens
    s = build_sample(CONV, [_img(24, 40), _img(16, 16, 1)], tok, image_processor_kwargs=KW, key="k1")
    assert s["__key__"] == "k1"
    assert s["image_grid_thw"].tolist() == [[1, 6, 10], [1, 4, 4]]
    assert s["pixel_values"].shape == (60 + 16, 3 * 2 * 4 * 4)
    tokens, labels = s["tokens"].tolist(), s["labels"].tolist()
    assert len(tokens) == len(labels)
    expected_text = (
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 15 + "<|vision_end|>\nWhat shape is this?<|im_end|>\n"
        "<|im_start|>assistant\na red circle<|im_end|>\n"
        "<|im_start|>user\nAnd <|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|> here?<|im_end|>\n"
        "<|im_start|>assistant\ntwo<|im_end|>"
    )
    assert tok.decode(tokens) == expected_text
    assert tokens.count(250) == 19 and tokens.count(248) == 2 and tokens.count(249) == 2

    # labels: next-token targets exactly on the answers and their <|im_end|>
    header = tok.encode("<|im_start|>assistant\n")
    trained = set()
    for i in range(len(tokens) - len(header) + 1):
        if tokens[i : i + len(header)] == header:
            j = i + len(header)
            end = tokens.index(3, j)  # the answer's <|im_end|>
            trained |= set(range(j, end + 1))
    assert len(trained) == len(tok.encode("a red circle")) + 1 + len(tok.encode("two")) + 1
    for i, lab in enumerate(labels):
        if i + 1 in trained:
            assert lab == tokens[i + 1], i
        else:
            assert lab == -100, i
    assert labels[-1] == -100
    targets = [lab for lab in labels if lab != -100]
    assert tok.decode(targets) == "a red circle<|im_end|>two<|im_end|>"


def test_collate_accepts_it(tok):
    s = build_sample(CONV, [_img(24, 40), _img(16, 16, 1)], tok, image_processor_kwargs=KW, key="k1")
    b = pack_or_pad_batch([s], CollateConfig(layout="thd", divisible_by=8, image_token_id=250))
    assert b["loss_mask"].sum().item() == (s["labels"] != -100).sum().item()
    assert b["pixel_values"].shape == s["pixel_values"].shape


def test_text_only_and_proxy_ids():
    t = TextTokenizer.for_model(151936, 151655, 151652, 151653)
    s = build_sample([{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "yo"}],
                     [_img(64, 64)], t, image_processor_kwargs=dict(KW, patch_size=16, min_pixels=4096), key="p")
    assert (s["tokens"] == 151655).sum().item() == 4  # 64x64, patch 16 -> grid 4x4 -> 4 tokens
    assert s["tokens"].tolist()[1 + len(t.encode("user\n"))] == 151652
    s2 = build_sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], [], t,
                      image_processor_kwargs=KW)
    assert s2["pixel_values"] is None and s2["image_grid_thw"] is None
    assert s2["tokens"].dtype == torch.long and s2["labels"].dtype == torch.long


@pytest.mark.parametrize(
    "conv, n_images, match",
    [
        (CONV, 1, "2 <image> markers but the sample has 1 images"),
        (CONV, 3, "2 <image> markers but the sample has 3 images"),
        ([{"role": "user", "content": "hi"}], 0, "no assistant turn"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}], 1, "only user turns"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], 0, "turn 0"),
        ([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}], 0, "turn 0"),
        ([], 0, "non-empty list"),
    ],
)
def test_errors_name_the_key(tok, conv, n_images, match):
    with pytest.raises(SampleError, match="shard-3:key-9") as e:
        build_sample(conv, [_img(16, 16)] * n_images, tok, image_processor_kwargs=KW, key="shard-3:key-9")
    assert match in str(e.value)
