"""``pack_or_pad_batch`` against the batch contract (docs/batch.md), property-based.

Every expectation here is derived independently of the code under test: samples are generated
from a small "segment" description (text runs and images), and the expected batch -- tokens,
labels, masks, MRoPE position ids, packing boundaries, vision inputs, stats -- is rebuilt from that
description with plain per-token Python loops. Nothing is derived from the collate's own helpers,
and the padding mask is derived from the sample lengths, never from the labels.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from multimodal_dev.data.collate import (
    IGNORE_INDEX,
    CollateConfig,
    mrope_position_ids,
    pack_or_pad_batch,
    required_seq_multiple,
)

IMG = 99  # image placeholder token id; text tokens are drawn from [1, VOCAB)
VOCAB = 50
PATCH_DIM = 6
MERGE = 2

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------------------------
# The test's own model of a sample
# ------------------------------------------------------------------------------------------------
def image_tokens(grid) -> int:
    t, h, w = grid
    return t * h * w // (MERGE * MERGE)


@dataclass
class Truth:
    """A sample as the test knows it: segments plus the concrete values drawn for it."""

    segments: list  # [("text", n) | ("image", (t, h, w))], in token order
    tokens: list[int]
    labels: list[int]
    prompt_len: int  # labels are -100 on [0, prompt_len), real targets after
    patches: list[torch.Tensor] = field(default_factory=list)  # one [t*h*w, D] per image
    key: str | None = None

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def grids(self) -> list[tuple[int, int, int]]:
        return [v for k, v in self.segments if k == "image"]


def _fmt(values: list[int], kind: str):
    if kind == "list":
        return list(values)
    if kind == "numpy":
        return np.asarray(values, dtype=np.int32)
    return torch.tensor(values, dtype=torch.long)


def to_sample(truth: Truth, fmt: str = "torch", empty_vision: bool = False) -> dict:
    s = {"tokens": _fmt(truth.tokens, fmt), "labels": _fmt(truth.labels, fmt)}
    if truth.grids:
        s["pixel_values"] = torch.cat(truth.patches, 0)
        s["image_grid_thw"] = torch.tensor(truth.grids, dtype=torch.long)
    elif empty_vision:  # a text-only sample that still carries (empty) vision keys
        s["pixel_values"] = torch.zeros(0, PATCH_DIM)
        s["image_grid_thw"] = torch.zeros(0, 3, dtype=torch.long)
    if truth.key is not None:
        s["__key__"] = truth.key
    return s


def build_truth(segments, prompt_frac: float, seed: int, key: str | None) -> Truth:
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    tokens, patches = [], []
    for kind, val in segments:
        if kind == "text":
            tokens += rng.integers(1, VOCAB, size=val).tolist()
        else:
            tokens += [IMG] * image_tokens(val)
            t, h, w = val
            patches.append(torch.randn(t * h * w, PATCH_DIM, generator=g))
    n = len(tokens)
    prompt_len = min(n, int(round(prompt_frac * n)))
    labels = [IGNORE_INDEX] * prompt_len + rng.integers(0, VOCAB, size=n - prompt_len).tolist()
    return Truth(segments, tokens, labels, prompt_len, patches, key)


grid_st = st.tuples(st.integers(1, 2), st.sampled_from([2, 4, 6]), st.sampled_from([2, 4, 6]))


@st.composite
def truths(draw, max_text: int = 20, max_images: int = 3, images: bool = True):
    n_img = draw(st.integers(0, max_images)) if images else 0
    texts = draw(st.lists(st.integers(0, max_text), min_size=n_img + 1, max_size=n_img + 1))
    grids = draw(st.lists(grid_st, min_size=n_img, max_size=n_img))
    if n_img == 0 and texts[0] == 0:
        texts[0] = 1  # at least one token
    segments = []
    for i, n in enumerate(texts):  # text_0 img_0 text_1 img_1 ... text_n (texts may be 0: adjacent images)
        if n:
            segments.append(("text", n))
        if i < n_img:
            segments.append(("image", grids[i]))
    prompt_frac = draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    key = draw(st.one_of(st.none(), st.text("abcdef0123456789-/", min_size=1, max_size=8)))
    return build_truth(segments, prompt_frac, seed, key)


@st.composite
def batches(draw, min_samples=1, max_samples=4, images=True):
    ts = draw(st.lists(truths(images=images), min_size=min_samples, max_size=max_samples))
    fmt = draw(st.sampled_from(["list", "numpy", "torch"]))
    empty_vision = draw(st.booleans())
    return ts, [to_sample(t, fmt, empty_vision) for t in ts]


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------
def ref_mrope(segments, total_len: int, merge: int = MERGE) -> list[tuple[int, int, int]]:
    """Qwen3.5 MRoPE ids, one token at a time (HF ``get_rope_index``, facts section 6).

    Text: all three ids = a running counter, which then advances by one. An image (t, h, w) with
    merge m is t*(h/m)*(w/m) tokens; token (ti, hi, wi) (row-major) gets (ti, hi, wi) + start,
    where start is the counter when the image begins; afterwards counter = start + max(h/m, w/m).
    Padding after the sample continues like text.
    """
    ids = []
    counter = 0
    for kind, val in segments:
        if kind == "text":
            for _ in range(val):
                ids.append((counter, counter, counter))
                counter += 1
        else:
            t, h, w = val
            gh, gw = h // merge, w // merge
            start = counter
            for ti in range(t):
                for hi in range(gh):
                    for wi in range(gw):
                        ids.append((start + ti, start + hi, start + wi))
            counter = start + max(gh, gw)
    while len(ids) < total_len:
        ids.append((counter, counter, counter))
        counter += 1
    assert len(ids) == total_len
    return ids


def ref_truncate(truth: Truth, limit: int) -> tuple[Truth | None, bool, int]:
    """(truncated truth or None if it cannot be cut, was_truncated, images dropped)."""
    if truth.length <= limit:
        return truth, False, 0
    segs, pos, kept = [], 0, 0
    for kind, val in truth.segments:
        if kind == "text":
            take = min(val, limit - pos)
            if take > 0:
                segs.append(("text", take))
                pos += take
        else:
            n = image_tokens(val)
            if pos + n > limit:  # crosses (or starts at) the cut: dropped with all that follows
                break
            segs.append(("image", val))
            pos += n
            kept += 1
        if pos >= limit:
            break
    dropped = len(truth.grids) - kept
    if pos == 0:
        return None, True, dropped
    cut = Truth(
        segs, truth.tokens[:pos], truth.labels[:pos], min(truth.prompt_len, pos), truth.patches[:kept], truth.key
    )
    return cut, True, dropped


def expected_layout(truths_: list[Truth], cfg: CollateConfig):
    """[(row, offset, padded_len)] per sample and the batch shape, from the lengths alone."""
    if cfg.layout == "bshd":
        return [(i, 0, cfg.target_seqlen) for i in range(len(truths_))], (len(truths_), cfg.target_seqlen)
    d = cfg.divisible_by
    places, off = [], 0
    for t in truths_:
        padded = -(-t.length // d) * d
        places.append((0, off, padded))
        off += padded
    return places, (1, off)


def check_batch(batch: dict, truths_: list[Truth], cfg: CollateConfig, n_truncated=0, n_dropped=0):
    """Assert the whole batch contract for samples ``truths_`` (already truncated if needed)."""
    places, shape = expected_layout(truths_, cfg)
    B, S = shape
    thd = cfg.layout == "thd"
    # A per-token tensor the CP split does not know raises there, and the THD/BSHD decision
    # downstream is made on the presence of cu_seqlens_padded: the key set is part of the contract.
    keys = {"tokens", "labels", "loss_mask", "position_ids", "padding_mask", "pixel_values", "image_grid_thw", "stats",
            "image_tokens", "loss_tokens"}
    if thd:
        keys |= {"cu_seqlens", "cu_seqlens_padded", "cu_seqlens_padded_host", "max_seqlen", "sequence_ids"}
    assert set(batch) == keys

    # ---- shapes and dtypes ----
    for k, dtype in (("tokens", torch.long), ("labels", torch.long), ("loss_mask", torch.float32),
                     ("padding_mask", torch.bool)):
        assert isinstance(batch[k], torch.Tensor), k
        assert batch[k].dtype == dtype, (k, batch[k].dtype)
        assert tuple(batch[k].shape) == shape, (k, tuple(batch[k].shape), shape)
    assert batch["position_ids"].dtype == torch.long
    assert tuple(batch["position_ids"].shape) == (3, B, S)

    # ---- expected per-token tensors, built position by position ----
    exp_tok = torch.full(shape, cfg.pad_token_id, dtype=torch.long)
    exp_lab = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    exp_loss = torch.zeros(shape)
    exp_pad = torch.ones(shape, dtype=torch.bool)
    exp_pos = torch.full((3, B, S), -1, dtype=torch.long)
    covered = torch.zeros(shape, dtype=torch.bool)
    for t, (r, off, plen) in zip(truths_, places):
        ids = ref_mrope(t.segments, plen)
        for j in range(plen):
            assert not covered[r, off + j]
            covered[r, off + j] = True
            exp_pos[:, r, off + j] = torch.tensor(ids[j])
            if j < t.length:  # a real token
                exp_tok[r, off + j] = t.tokens[j]
                exp_lab[r, off + j] = t.labels[j]
                exp_loss[r, off + j] = 1.0 if j >= t.prompt_len else 0.0
                exp_pad[r, off + j] = False
    assert bool(covered.all()), "the expected layout leaves holes"

    assert torch.equal(batch["tokens"], exp_tok)
    assert torch.equal(batch["labels"], exp_lab)
    assert torch.equal(batch["loss_mask"], exp_loss)
    assert torch.equal(batch["padding_mask"], exp_pad)
    assert torch.equal(batch["position_ids"], exp_pos)
    # the host count of image-token positions (the model's check reads it instead of the tokens)
    assert type(batch["image_tokens"]) is int and batch["image_tokens"] == int((exp_tok == IMG).sum())
    # the host count of positions with loss (the LM head's row bound, mcore_ext.lm_head_rows)
    assert type(batch["loss_tokens"]) is int and batch["loss_tokens"] == int(exp_loss.sum())

    # ---- the same facts, stated the way the contract states them ----
    pad = batch["padding_mask"]
    assert bool((batch["labels"][pad] == IGNORE_INDEX).all())
    assert bool((batch["loss_mask"][pad] == 0).all())
    assert bool((batch["tokens"][pad] == cfg.pad_token_id).all())
    n_prompt = sum(t.prompt_len for t in truths_)
    if n_prompt:  # prompt tokens: loss_mask 0 but padding_mask False -> padding_mask != ~loss_mask
        assert not torch.equal(pad, batch["loss_mask"] == 0)
    assert int(((batch["loss_mask"] == 0) & ~pad).sum()) == n_prompt
    pos = batch["position_ids"]
    for t, (r, off, plen) in zip(truths_, places):
        assert pos[:, r, off].tolist() == [0, 0, 0], "position ids restart at 0 for every sample"
        if not t.grids:
            assert torch.equal(pos[:, r, off:off + plen], torch.arange(plen).expand(3, plen))

    # ---- packing metadata ----
    if thd:
        lens = [t.length for t in truths_]
        cu, cu_p = batch["cu_seqlens"], batch["cu_seqlens_padded"]
        for x in (cu, cu_p):
            assert isinstance(x, torch.Tensor) and x.dtype == torch.int32 and tuple(x.shape) == (len(truths_) + 1,)
        assert cu.tolist() == [0] + list(itertools.accumulate(lens))
        assert cu_p.tolist() == [off for _, off, _ in places] + [S]
        assert all(int(v) % cfg.divisible_by == 0 for v in cu_p)
        # the host copy (stays off the device, read by the GDN layers instead of the tensor)
        host = batch["cu_seqlens_padded_host"]
        assert type(host) is tuple and all(type(v) is int for v in host) and list(host) == [off for _, off, _ in places] + [S]
        for i, (_, off, plen) in enumerate(places):  # real tokens of sample i sit at its padded start
            assert not bool(pad[0, off:off + lens[i]].any()) and bool(pad[0, off + lens[i]:off + plen].all())
        assert type(batch["max_seqlen"]) is int
        assert batch["max_seqlen"] == max(p for _, _, p in places)
        # every position carries the index of the packed sample it belongs to, padding included
        exp_seq = torch.full(shape, -1, dtype=torch.long)
        for i, (_, off, plen) in enumerate(places):
            exp_seq[0, off:off + plen] = i
        assert torch.equal(batch["sequence_ids"], exp_seq)

    # ---- vision inputs ----
    grids = [g for t in truths_ for g in t.grids]
    if grids:
        patches = [p for t in truths_ for p in t.patches]
        assert batch["pixel_values"].dtype == patches[0].dtype
        assert torch.equal(batch["pixel_values"], torch.cat(patches, 0))
        g = batch["image_grid_thw"]
        assert not g.is_floating_point() and tuple(g.shape) == (len(grids), 3)
        assert g.tolist() == [list(x) for x in grids]
    else:
        assert batch["pixel_values"] is None and batch["image_grid_thw"] is None

    # ---- stats ----
    n_real = sum(t.length for t in truths_)
    assert batch["stats"] == {
        "samples": len(truths_),
        "tokens": n_real,
        "padding_tokens": B * S - n_real,
        "truncated_samples": n_truncated,
        "dropped_images": n_dropped,
    }
    assert int(pad.sum()) == B * S - n_real


def assert_names(exc: pytest.ExceptionInfo, index: int, key: str | None, *expectations: str):
    msg = str(exc.value)
    assert re.search(rf"\bsample {index}\b", msg), msg
    if key is not None:
        assert key in msg, msg
    for e in expectations:
        assert re.search(e, msg), (e, msg)


# ------------------------------------------------------------------------------------------------
# The references themselves, on hand-computed examples
# ------------------------------------------------------------------------------------------------
def test_reference_mrope_hand_example():
    # "a b <img 1x4x6: 2x3 merged tokens> c d" + 2 padding
    segs = [("text", 2), ("image", (1, 4, 6)), ("text", 2)]
    exp = [(0, 0, 0), (1, 1, 1),
           (2, 2, 2), (2, 2, 3), (2, 2, 4), (2, 3, 2), (2, 3, 3), (2, 3, 4),
           (5, 5, 5), (6, 6, 6), (7, 7, 7), (8, 8, 8)]
    assert ref_mrope(segs, 12) == exp
    # two frames, directly adjacent images, image first: the two frames advance the counter by
    # max(h/m, w/m) = 1, not by t = 2 (Qwen3.5's rule; this example once encoded Qwen2-VL's)
    segs = [("image", (2, 2, 2)), ("image", (1, 2, 4)), ("text", 1)]
    exp = [(0, 0, 0), (1, 0, 0), (1, 1, 1), (1, 1, 2), (3, 3, 3)]
    assert ref_mrope(segs, 5) == exp


def test_mrope_position_ids_hand_example():
    out = mrope_position_ids(10, np.array([[2, 8]]), np.array([[1, 4, 6]]), 2, total_length=12)
    assert out.tolist() == [[a[i] for a in ref_mrope([("text", 2), ("image", (1, 4, 6)), ("text", 2)], 12)]
                            for i in range(3)]


def test_mrope_multi_frame_image_advances_by_the_spatial_grid_only():
    """Qwen3.5's rule (docs/qwen35_moe_facts.md section 6, HF ``get_rope_index``): after an image
    the text continues at start + max(h/m, w/m), whatever its number of frames t -- not Qwen2-VL's
    start + max(t, h/m, w/m). Worked by hand: text a b, an image of grid (3, 2, 2) with merge 2
    (3 frames of one merged token each), text c d."""
    out = mrope_position_ids(7, np.array([[2, 5]]), np.array([[3, 2, 2]]), 2)
    assert out.tolist() == [
        [0, 1, 2, 3, 4, 3, 4],  # temporal: the frames at start + t_idx, then text at start + 1
        [0, 1, 2, 2, 2, 3, 4],  # height
        [0, 1, 2, 2, 2, 3, 4],  # width
    ]


# ------------------------------------------------------------------------------------------------
# The batch contract
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(data=batches(), d=st.sampled_from([1, 2, 4, 8]), extra=st.integers(0, 9), pad_id=st.sampled_from([0, 7]),
       data_st=st.data())
def test_bshd_contract(data, d, extra, pad_id, data_st):
    ts, samples = data
    longest = max(t.length for t in ts)
    target = (-(-longest // d) + data_st.draw(st.integers(0, 2))) * d  # >= longest, multiple of d
    cfg = CollateConfig(layout="bshd", target_seqlen=target, divisible_by=d, pad_token_id=pad_id,
                        image_token_id=IMG, spatial_merge_size=MERGE)
    check_batch(pack_or_pad_batch(samples, cfg), ts, cfg)


@SETTINGS
@given(data=batches(), d=st.sampled_from([1, 2, 3, 4, 8, 16]), pad_id=st.sampled_from([0, 7]),
       with_limit=st.booleans())
def test_thd_contract(data, d, pad_id, with_limit):
    ts, samples = data
    # THD's target_seqlen only bounds a single sample's length; giving it must change nothing here
    limit = max(t.length for t in ts) if with_limit else None
    cfg = CollateConfig(layout="thd", divisible_by=d, target_seqlen=limit, pad_token_id=pad_id, image_token_id=IMG,
                        spatial_merge_size=MERGE)
    check_batch(pack_or_pad_batch(samples, cfg), ts, cfg)


@SETTINGS
@given(data=batches(images=False), layout=st.sampled_from(["bshd", "thd"]), d=st.sampled_from([1, 4, 8]))
def test_text_only_position_ids_are_arange(data, layout, d):
    ts, samples = data
    target = -(-max(t.length for t in ts) // d) * d + d if layout == "bshd" else None
    cfg = CollateConfig(layout=layout, target_seqlen=target, divisible_by=d)  # no image_token_id needed
    b = pack_or_pad_batch(samples, cfg)
    check_batch(b, ts, cfg)
    places, _ = expected_layout(ts, cfg)
    for r, off, plen in places:
        for row in range(3):
            assert b["position_ids"][row, r, off:off + plen].tolist() == list(range(plen))


def test_padding_mask_is_not_inverse_loss_mask():
    # 3 prompt tokens, 2 answer tokens, 3 padding positions (BSHD row of 8)
    s = {"tokens": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 9, 3]}
    b = pack_or_pad_batch([s], CollateConfig(layout="bshd", target_seqlen=8))
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0]]
    assert b["padding_mask"].tolist() == [[False] * 5 + [True] * 3]
    # a sample that is all prompt: nothing to train on, but nothing is padding either
    s = {"tokens": [5, 6, 7, 8], "labels": [-100] * 4}
    b = pack_or_pad_batch([s], CollateConfig(layout="thd", divisible_by=4))
    assert b["padding_mask"].tolist() == [[False] * 4] and b["loss_mask"].sum() == 0


# ------------------------------------------------------------------------------------------------
# Truncation
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(data=batches(), layout=st.sampled_from(["bshd", "thd"]), d=st.sampled_from([1, 2, 4]), data_st=st.data())
def test_truncation(data, layout, d, data_st):
    ts, samples = data
    longest = max(t.length for t in ts)
    limit = data_st.draw(st.integers(1, longest), label="limit")
    if layout == "bshd":
        limit = max(d, limit // d * d)
    cfg = CollateConfig(layout=layout, target_seqlen=limit, divisible_by=d, truncate=True, image_token_id=IMG,
                        spatial_merge_size=MERGE)
    cut = [ref_truncate(t, limit) for t in ts]
    impossible = [i for i, (c, _, _) in enumerate(cut) if c is None]
    if impossible:  # an image at position 0 longer than the limit: nothing can be kept
        i = impossible[0]
        with pytest.raises(ValueError) as exc:
            pack_or_pad_batch(samples, cfg)
        assert_names(exc, i, ts[i].key, rf"\b{limit}\b")
        return
    b = pack_or_pad_batch(samples, cfg)
    check_batch(b, [c for c, _, _ in cut], cfg,
                n_truncated=sum(was for _, was, _ in cut), n_dropped=sum(dr for _, _, dr in cut))
    # the truncated lengths never exceed the limit
    if layout == "thd":
        assert max(np.diff(b["cu_seqlens"].numpy())) <= limit


def test_truncation_drops_crossing_image_with_its_patches():
    # text 3 | image (1,4,4) = 4 tokens at [3, 7) | text 3 ; cut at 5 crosses the image -> cut at 3
    t = build_truth([("text", 3), ("image", (1, 4, 4)), ("text", 3)], 0.0, seed=1, key="shard-0/x")
    other = build_truth([("image", (1, 2, 2)), ("text", 2)], 0.5, seed=2, key=None)
    cfg = CollateConfig(layout="thd", target_seqlen=5, truncate=True, image_token_id=IMG)
    b = pack_or_pad_batch([to_sample(other), to_sample(t)], cfg)
    assert b["stats"]["truncated_samples"] == 1 and b["stats"]["dropped_images"] == 1
    assert b["cu_seqlens"].tolist() == [0, 3, 6]
    assert b["tokens"][0, 3:].tolist() == t.tokens[:3]
    assert torch.equal(b["pixel_values"], other.patches[0])  # the dropped image's 16 patches are gone
    assert b["image_grid_thw"].tolist() == [[1, 2, 2]]


def test_truncation_cannot_cut_leading_image():
    t = build_truth([("image", (1, 4, 4)), ("text", 3)], 0.0, seed=1, key="k7")
    cfg = CollateConfig(layout="bshd", target_seqlen=2, truncate=True, image_token_id=IMG)
    with pytest.raises(ValueError) as exc:
        pack_or_pad_batch([to_sample(t)], cfg)
    assert_names(exc, 0, "k7", r"\b2\b", r"image")


# ------------------------------------------------------------------------------------------------
# Bad inputs: ValueError naming the sample (and its key) and what was expected
# ------------------------------------------------------------------------------------------------
def _good(i):
    return to_sample(build_truth([("text", 3), ("image", (1, 2, 2)), ("text", 2)], 0.5, seed=100 + i, key=None))


def _bad(kind):
    tok = [1, 2, 3, IMG, IMG, IMG, IMG, 4]
    lab = [-100] * 4 + [5, 6, 7, 8]
    pv16 = torch.randn(16, PATCH_DIM)
    grid = torch.tensor([[1, 4, 4]])
    return {
        "too_long": ({"tokens": list(range(1, 10)), "labels": list(range(1, 10))},
                     [r"\b9 tokens\b", r"target_seqlen=8", r"truncate"]),
        "empty": ({"tokens": [], "labels": []}, [r"empty|0 tokens"]),
        "empty_tensor": ({"tokens": torch.zeros(0, dtype=torch.long), "labels": torch.zeros(0, dtype=torch.long)},
                         [r"empty|0 tokens"]),
        "length_mismatch": ({"tokens": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4]},
                            [r"\b5 tokens\b", r"\b4 labels\b"]),
        "patch_count": ({"tokens": tok, "labels": lab, "pixel_values": pv16[:15], "image_grid_thw": grid},
                        [r"\b15 patches\b", r"\b16\b", r"t\*h\*w"]),
        "image_token_count": ({"tokens": tok[:3] + tok[4:], "labels": lab[1:], "pixel_values": pv16,
                               "image_grid_thw": grid}, [r"\b3 image tokens\b", r"need 4\b"]),
        "image_tokens_without_images": ({"tokens": tok, "labels": lab}, [r"\b4 image tokens\b", r"no images"]),
        "interrupted_image_run": ({"tokens": [1, IMG, IMG, 2, IMG, IMG], "labels": [1] * 6, "pixel_values": pv16,
                                   "image_grid_thw": grid}, [r"consecutive", r"\b4\b"]),
        "pixels_without_grid": ({"tokens": tok, "labels": lab, "pixel_values": pv16},
                                [r"pixel_values", r"image_grid_thw"]),
        "grid_not_n_by_3": ({"tokens": tok, "labels": lab, "pixel_values": pv16,
                             "image_grid_thw": torch.tensor([[1, 4, 4, 1]])}, [r"image_grid_thw", r"\[n_images, 3\]"]),
        "odd_grid": ({"tokens": [1, IMG, IMG, IMG, 2], "labels": [1] * 5, "pixel_values": torch.randn(12, PATCH_DIM),
                      "image_grid_thw": torch.tensor([[1, 3, 4]])}, [r"merge size 2"]),
    }[kind]


BAD_KINDS = ["too_long", "empty", "empty_tensor", "length_mismatch", "patch_count", "image_token_count",
             "image_tokens_without_images", "interrupted_image_run", "pixels_without_grid", "grid_not_n_by_3", "odd_grid"]


@pytest.mark.parametrize("layout", ["bshd", "thd"])
@pytest.mark.parametrize("where,key", [(0, None), (2, "shard-000123/sample-42"), (3, None)])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_sample_raises_naming_it(kind, where, key, layout):
    bad, expectations = _bad(kind)
    if key is not None:
        bad = dict(bad, __key__=key)
    samples = [_good(i) for i in range(4)]
    samples[where] = bad
    cfg = CollateConfig(layout=layout, target_seqlen=8, image_token_id=IMG, divisible_by=4 if layout == "bshd" else 1)
    with pytest.raises(ValueError) as exc:
        pack_or_pad_batch(samples, cfg)
    assert_names(exc, where, key, *expectations)


def test_images_need_image_token_id():
    samples = [_good(0), _good(1)]
    with pytest.raises(ValueError) as exc:
        pack_or_pad_batch(samples, CollateConfig(layout="thd"))
    assert_names(exc, 0, None, r"image_token_id")
    # empty vision inputs on a text-only sample are not images: no image_token_id needed
    text = {"tokens": [1, 2], "labels": [2, 3], "pixel_values": torch.zeros(0, PATCH_DIM),
            "image_grid_thw": torch.zeros(0, 3, dtype=torch.long)}
    b = pack_or_pad_batch([text], CollateConfig(layout="thd"))
    assert b["pixel_values"] is None and b["image_grid_thw"] is None


@SETTINGS
@given(data=batches(max_samples=3), data_st=st.data())
def test_too_long_without_truncate_raises(data, data_st):
    ts, samples = data
    lens = [t.length for t in ts]
    assume(max(lens) > 1)
    limit = data_st.draw(st.integers(1, max(lens) - 1), label="limit")
    first = next(i for i, n in enumerate(lens) if n > limit)
    for layout in ("bshd", "thd"):
        cfg = CollateConfig(layout=layout, target_seqlen=limit, image_token_id=IMG)
        with pytest.raises(ValueError) as exc:
            pack_or_pad_batch(samples, cfg)
        assert_names(exc, first, ts[first].key, rf"\b{lens[first]} tokens\b", rf"target_seqlen={limit}\b")


@pytest.mark.parametrize("target,d", [(10, 4), (12, 8), (7, 2), (6, 4)])
def test_bshd_target_not_multiple_of_divisible_by(target, d):
    with pytest.raises(ValueError) as exc:
        CollateConfig(layout="bshd", target_seqlen=target, divisible_by=d)
    msg = str(exc.value)
    assert "target_seqlen" in msg and "divisible_by" in msg and str(target) in msg and str(d) in msg, msg
    CollateConfig(layout="bshd", target_seqlen=target * d, divisible_by=d)  # a multiple is fine


@pytest.mark.parametrize(
    "kwargs,flag",
    [({"layout": "bshd"}, "target_seqlen"), ({"layout": "bshd", "target_seqlen": 8, "divisible_by": 0}, "divisible_by"),
     ({"layout": "thd", "truncate": True}, "truncate"), ({"layout": "sbhd"}, "layout")],
)
def test_bad_config_names_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        CollateConfig(**kwargs)


def test_no_samples_raises():
    with pytest.raises(ValueError):
        pack_or_pad_batch([], CollateConfig())


# ------------------------------------------------------------------------------------------------
# required_seq_multiple, against brute force
# ------------------------------------------------------------------------------------------------
def brute_force_multiple(tp: int, cp: int, sp: bool, extra: int) -> int:
    """Smallest m such that every length L that is a multiple of m can be split: L % extra == 0,
    L % (2*cp) == 0 when cp > 1, and (L // cp) % tp == 0 when sequence parallel."""

    def ok(L):
        if L % extra:
            return False
        if cp > 1 and L % (2 * cp):
            return False
        if sp and (L // cp) % tp:
            return False
        return True

    period = extra * 2 * cp * tp  # every condition is periodic with a divisor of this
    for m in itertools.count(1):
        if all(ok(m * k) for k in range(1, period + 1)):
            return m


@pytest.mark.parametrize("extra", [1, 3, 8])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_required_seq_multiple_brute_force(tp, cp, sp, extra):
    m = required_seq_multiple(tensor_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp,
                              extra_multiple=extra)
    assert m == brute_force_multiple(tp, cp, sp, extra)


def test_required_seq_multiple_feeds_collate_and_cp_split():
    """divisible_by from required_seq_multiple gives lengths the zigzag split and SP can cut."""
    tp, cp = 4, 2
    d = required_seq_multiple(tensor_parallel_size=tp, context_parallel_size=cp, sequence_parallel=True)
    samples = [{"tokens": list(range(1, n + 1)), "labels": list(range(n))} for n in (1, 5, 13)]
    b = pack_or_pad_batch(samples, CollateConfig(layout="thd", divisible_by=d))
    for L in np.diff(b["cu_seqlens_padded"].numpy()):
        assert L % (2 * cp) == 0 and (L // cp) % tp == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_required_seq_multiple_rejects_bad_sizes(bad):
    for kw in ("tensor_parallel_size", "context_parallel_size", "extra_multiple"):
        with pytest.raises(ValueError, match=kw):
            required_seq_multiple(**{kw: bad})


def test_brute_force_reference_hand_cases():
    # the brute force itself, on cases worked out by hand
    assert brute_force_multiple(1, 1, False, 1) == 1
    assert brute_force_multiple(4, 2, True, 1) == 8  # CP=2, TP=4: a multiple of TP alone (4) is not enough
    assert brute_force_multiple(2, 3, True, 1) == 6
    assert brute_force_multiple(3, 2, False, 8) == 8
    assert brute_force_multiple(3, 2, True, 1) == 12  # L % 4 and (L/2) % 3


# ------------------------------------------------------------------------- THD row multiple
@SETTINGS
@given(data=batches(), d=st.sampled_from([1, 2, 4]), k=st.sampled_from([1, 2, 3, 8, 32]))
def test_thd_row_multiple_adds_one_padding_segment(data, d, k):
    """``row_multiple``: the row is the plain THD row plus, when its length is not a multiple, one
    trailing segment of padding (its own sample boundary, no real tokens), nothing else changed."""
    ts, samples = data
    m = d * k
    kw = dict(layout="thd", divisible_by=d, image_token_id=IMG, spatial_merge_size=MERGE, pad_token_id=3)
    base = pack_or_pad_batch(samples, CollateConfig(**kw))
    rows = pack_or_pad_batch(samples, CollateConfig(**kw, row_multiple=m))
    n = base["tokens"].shape[1]
    tail = (m - n % m) % m
    assert rows["tokens"].shape == (1, n + tail) and (n + tail) % m == 0
    for key in ("tokens", "labels", "loss_mask", "padding_mask"):
        assert torch.equal(rows[key][:, :n], base[key]), key
    assert torch.equal(rows["position_ids"][:, :, :n], base["position_ids"])
    assert (rows["tokens"][0, n:] == 3).all() and (rows["labels"][0, n:] == IGNORE_INDEX).all()
    assert (rows["loss_mask"][0, n:] == 0).all() and rows["padding_mask"][0, n:].all()
    for c in range(3):  # the padding segment's positions count from 0, like any sample's
        assert rows["position_ids"][c, 0, n:].tolist() == list(range(tail))
    assert torch.equal(rows["sequence_ids"][:, :n], base["sequence_ids"])
    n_samples = base["cu_seqlens"].numel() - 1
    assert (rows["sequence_ids"][0, n:] == n_samples).all()  # the padding segment: an id of its own
    if tail:
        assert rows["cu_seqlens"].tolist() == base["cu_seqlens"].tolist() + [base["cu_seqlens"][-1].item()]
        assert rows["cu_seqlens_padded"].tolist() == base["cu_seqlens_padded"].tolist() + [n + tail]
        assert rows["max_seqlen"] == max(base["max_seqlen"], tail)
    else:
        assert rows["cu_seqlens"].tolist() == base["cu_seqlens"].tolist()
        assert rows["cu_seqlens_padded"].tolist() == base["cu_seqlens_padded"].tolist()
        assert rows["max_seqlen"] == base["max_seqlen"]
    assert list(rows["cu_seqlens_padded_host"]) == rows["cu_seqlens_padded"].tolist()
    assert rows["stats"] == dict(base["stats"], padding_tokens=base["stats"]["padding_tokens"] + tail)
    for key in ("pixel_values", "image_grid_thw"):
        assert (rows[key] is None and base[key] is None) or torch.equal(rows[key], base[key])


@pytest.mark.parametrize("kwargs, needle", [
    (dict(layout="thd", row_multiple=0), "row_multiple must be a positive int"),
    (dict(layout="bshd", target_seqlen=8, row_multiple=4), "applies to the 'thd' layout only"),
    (dict(layout="thd", divisible_by=4, row_multiple=6), "row_multiple=6 must be a multiple of divisible_by=4"),
])
def test_thd_row_multiple_bad_config(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        CollateConfig(**kwargs)
