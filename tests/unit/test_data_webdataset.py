"""The webdataset provider on shards written by scripts/make_shapes_dataset.py: reads every sample
once per epoch, disjoint and complete DP split (by shard, and by sample when shards are few), exact
resume without decoding skipped images, bad shards/samples skipped, counted and logged, the
--max-bad-samples limit, and collated batches that satisfy the contract."""
from __future__ import annotations

import io
import json
import logging
import os
import runpy
import shutil
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_batch_checks import check_batch
from multimodal_dev.data import webdataset as providers_mod
from multimodal_dev.data.image import preprocess_image
from multimodal_dev.data.providers import DataConfig, build_provider
from multimodal_dev.data.stream import MicroBatchStream

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "multimodal_dev", "scripts", "make_shapes_dataset.py")
N, SHARD = 120, 30  # 4 shards


def _make(out, monkeypatch=None, n=N, shard=SHARD, seed=5):
    argv = [SCRIPT, "--out", str(out), "--num-samples", str(n), "--shard-size", str(shard), "--seed", str(seed)]
    old = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        sys.argv = old


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    _make(out)
    return out


def _cfg(path, **kw):
    return DataConfig(provider="webdataset", data_path=[str(p) for p in (path if isinstance(path, list) else [path])],
                      seed=11, **kw)


def _one_epoch(it, epoch=0):
    """Samples of ``epoch`` (the iterator must be at its start); the first of the next is dropped."""
    out = []
    while True:
        s = next(it)
        if s["__epoch__"] != epoch:
            return out
        out.append(s)


def _tar_members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


ALL_KEYS = {f"{i:08d}" for i in range(N)}


def test_generator_is_deterministic_and_writes_meta(shards, tmp_path):
    _make(tmp_path)
    names = sorted(os.listdir(shards))
    assert names == ["meta.json"] + [f"shapes-{i:06d}.tar" for i in range(4)]
    for n in names:
        assert (shards / n).read_bytes() == (tmp_path / n).read_bytes()
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["count"] == N and {"circle", "red", "left"} <= set(meta["vocabulary"])
    members = _tar_members(shards / "shapes-000000.tar")
    assert len(members) == 2 * SHARD and "00000000.png" in members and "00000000.json" in members


def test_shapes_answers_are_read_off_the_image(shards):
    """The answers are learnable: the colour named for a single shape is the image's most common
    non-background colour (checked from the pixels, independently of the generator)."""
    from multimodal_dev.data.shapes import COLOURS

    checked = 0
    members = _tar_members(shards / "shapes-000001.tar")
    for name, data in members.items():
        if not name.endswith(".json"):
            continue
        d = json.loads(data)
        if len(d["objects"]) != 1:
            continue
        arr = np.asarray(Image.open(io.BytesIO(members[name[:-5] + ".png"])).convert("RGB")).reshape(-1, 3).astype(int)
        dist = {c: np.abs(arr - np.array(rgb)).sum(1) for c, rgb in COLOURS.items()}
        votes = {c: int((v < 60).sum()) for c, v in dist.items()}
        colour = max(votes, key=votes.get)
        assert colour == d["objects"][0]["colour"]
        for q, a in zip(d["conversation"][::2], d["conversation"][1::2]):
            if q["content"].endswith(("What colour is the shape?", "What color is the shape?")):
                assert a["content"] == colour
            if q["content"].endswith("How many shapes are there?"):
                assert a["content"] == "one"
        checked += 1
    assert checked >= 5


def test_reads_everything_each_epoch(shards):
    p = build_provider(_cfg(shards))
    it = p.samples(0, 1)
    e0 = _one_epoch(it, 0)
    assert sorted(s["__key__"] for s in e0) == sorted(ALL_KEYS)
    e1 = [next(it) for _ in range(N - 2)]  # one was consumed by _one_epoch
    assert all(s["__epoch__"] == 1 for s in e1)
    assert [s["__key__"] for s in e0[1:N - 1]] != [s["__key__"] for s in e1]  # reshuffled
    assert it.stats["samples_read"] == N + N - 1 and it.stats["skipped_samples"] == 0


def test_sample_content_matches_the_files(shards):
    p = build_provider(_cfg(shards))
    s = next(p.samples(0, 1))
    members = _tar_members(s["__shard__"])
    conv = json.loads(members[s["__key__"] + ".json"])["conversation"]
    text = p.tokenizer.decode(s["tokens"].tolist())
    for turn in conv:
        assert turn["content"].replace("<image>", "").strip() in text
    img = Image.open(io.BytesIO(members[s["__key__"] + ".png"]))
    pv, grid = preprocess_image(img, **p.image_kwargs)
    assert torch.equal(s["pixel_values"], pv) and torch.equal(s["image_grid_thw"], grid)
    assert grid.tolist() == [[1, 8, 8]] and (s["tokens"] == 250).sum() == 16  # 32 px, patch 4, merge 2


@pytest.mark.parametrize("dp_size, n_shards", [(2, 4), (3, 4), (4, 3)])  # (4, 3): split by sample
def test_dp_split_disjoint_and_complete(shards, tmp_path, dp_size, n_shards):
    paths = sorted(str(shards / f) for f in os.listdir(shards) if f.endswith(".tar"))[:n_shards]
    keys = {f"{i:08d}" for i in range(n_shards * SHARD)}
    p = build_provider(_cfg(paths))
    per_rank = [[s["__key__"] for s in _one_epoch(p.samples(r, dp_size))] for r in range(dp_size)]
    union = set().union(*map(set, per_rank))
    assert sum(map(len, per_rank)) == len(keys) == len(union)  # disjoint
    assert union == keys  # complete
    sizes = [len(k) for k in per_rank]
    if dp_size > n_shards:  # split by sample over the epoch: balanced to one sample
        assert max(sizes) - min(sizes) <= 1, sizes
    assert min(sizes) > 0


def _equal(a, b):
    assert a["__key__"] == b["__key__"] and a["__epoch__"] == b["__epoch__"]
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])


@pytest.mark.parametrize("dp_size, k", [(1, 0), (1, 37), (2, 29), (2, 61), (4, 20), (4, 5)])
def test_resume_is_exact_and_decodes_nothing_skipped(shards, monkeypatch, dp_size, k):
    # dp_size 4 over 3 shards: split by sample (30 per shard, not a multiple of 4)
    paths = [str(shards)] if dp_size != 4 else sorted(str(shards / f) for f in os.listdir(shards) if f.endswith(".tar"))[:3]
    p = build_provider(_cfg(paths))
    rank = dp_size - 1
    it = p.samples(rank, dp_size)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    expect = [next(it) for _ in range(30)]  # crosses shard and (for k > 30) epoch boundaries

    calls = []
    real = providers_mod.decode_image
    monkeypatch.setattr(providers_mod, "decode_image", lambda data, name: calls.append(name) or real(data, name))
    resumed = build_provider(_cfg(paths)).samples(rank, dp_size, state=state)
    first = next(resumed)
    assert len(calls) == 1, f"resuming decoded {calls}"  # only the sample it returns
    _equal(first, expect[0])
    for a in expect[1:]:
        _equal(next(resumed), a)
    assert resumed.stats == it.stats


def test_resume_rejects_other_shards(shards):
    it = build_provider(_cfg(shards)).samples(0, 1)
    next(it)
    one = str(shards / "shapes-000000.tar")
    with pytest.raises(ValueError, match="saved with 4 shards"):
        build_provider(_cfg(one)).samples(0, 1, state=it.state_dict())


# ---- bad data -------------------------------------------------------------------------------------
def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _conv(n_images=1):
    return json.dumps({"conversation": [{"role": "user", "content": "<image>" * n_images + "hi"},
                                        {"role": "assistant", "content": "ok"}]}).encode()


BAD_KEYS = {"badpng", "badjson", "nojson", "mismatch", "toolong"}


@pytest.fixture()
def bad_dir(shards, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    for i in range(3):
        shutil.copy(shards / f"shapes-{i:06d}.tar", d)
    # shard 3 truncated in the middle of its data: its intact prefix is still read
    data = (shards / "shapes-000003.tar").read_bytes()
    (d / "shapes-000003.tar").write_bytes(data[: len(data) // 2 + 700])
    (d / "shapes-000004.tar").write_bytes(b"this is not a tar file " * 100)  # garbage
    with tarfile.open(d / "shapes-000005.tar", "w") as t:
        _add(t, "good1.png", _png(1))
        _add(t, "good1.json", _conv())
        _add(t, "badpng.png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
        _add(t, "badpng.json", _conv())
        _add(t, "badjson.png", _png(2))
        _add(t, "badjson.json", b"{'conversation': [")
        _add(t, "nojson.png", _png(3))
        _add(t, "mismatch.0.png", _png(4))
        _add(t, "mismatch.json", _conv(2))
        _add(t, "toolong.png", _png(5))
        _add(t, "toolong.json", json.dumps({"conversation": [
            {"role": "user", "content": "<image>" + " word" * 300}, {"role": "assistant", "content": "ok"}]}).encode())
        _add(t, "good2.0.png", _png(6))
        _add(t, "good2.1.png", _png(7))
        _add(t, "good2.json", _conv(2))
    return d


def test_bad_data_is_skipped_counted_and_logged(bad_dir, caplog):
    p = build_provider(_cfg(bad_dir, max_sample_tokens=200))
    caplog.set_level(logging.WARNING, logger="multimodal_dev.data.providers")
    it = p.samples(0, 1)
    e0 = _one_epoch(it)
    keys = [s["__key__"] for s in e0]
    assert len(keys) == len(set(keys))
    assert not BAD_KEYS & set(keys)
    assert {"good1", "good2"} <= set(keys)
    intact = {f"{i:08d}" for i in range(90)}
    prefix = set(keys) - intact - {"good1", "good2"}
    assert intact <= set(keys)
    assert 0 < len(prefix) < SHARD and prefix <= {f"{i:08d}" for i in range(90, 120)}
    good2 = next(s for s in e0 if s["__key__"] == "good2")
    assert good2["image_grid_thw"].tolist() == [[1, 8, 8]] * 2

    st = it.stats
    assert st["skipped_shards"] >= 2  # garbage + truncated (the next epoch may have met one again)
    assert st["skipped_samples"] >= 5  # the five bad samples (+ a half-written one of the cut shard, if any)
    assert st["bad_items"] in (7, 8)  # distinct
    log = caplog.text
    for key in BAD_KEYS:
        assert f"sample '{key}' of shard {bad_dir / 'shapes-000005.tar'}" in log, key
    assert f"shard {bad_dir / 'shapes-000004.tar'}" in log and "cannot open as a tar file" in log
    assert f"shard {bad_dir / 'shapes-000003.tar'}" in log
    assert "badpng.png" in log and "bad JSON" in log and "no .json part" in log and "2 <image> markers" in log
    assert "more than 200" in log


def test_bad_limit_raises_naming_the_flag(bad_dir):
    # shards and samples in order (no shuffle): the cut shard 3 (1-2 bad items: itself and maybe a
    # half-written sample), the garbage shard 4, then shard 5's 'badpng' and 'badjson'; the 4th
    # distinct bad item is one of those two
    p = build_provider(_cfg(bad_dir, max_bad_samples=3, shuffle=False))
    it = p.samples(0, 1)
    with pytest.raises(RuntimeError, match=r"more than --max-bad-samples=3") as e:
        for _ in range(300):
            next(it)
    msg = str(e.value)
    assert (f"sample 'badpng' of shard {bad_dir / 'shapes-000005.tar'}" in msg
            or f"sample 'badjson' of shard {bad_dir / 'shapes-000005.tar'}" in msg), msg
    assert msg.startswith("4 distinct bad")
    assert it.stats["samples_read"] >= 90


def test_bad_items_count_once_across_epochs(bad_dir):
    # 7 or 8 distinct bad items, met again every epoch: a limit of 8 must hold over several epochs
    it = build_provider(_cfg(bad_dir, max_bad_samples=8)).samples(0, 1)
    for _ in range(400):
        next(it)
    assert it.stats["epoch"] >= 3 and it.stats["skipped_shards"] >= 6
    it = build_provider(_cfg(bad_dir, max_bad_samples=-1)).samples(0, 1)
    for _ in range(150):
        next(it)


def test_all_bad_raises_instead_of_spinning(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"garbage" * 50)
    p = build_provider(_cfg(tmp_path, max_bad_samples=-1))
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(p.samples(0, 1))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/shards"):
        build_provider(_cfg(tmp_path / "nowhere" / "shards"))
    with pytest.raises(FileNotFoundError, match=r"x-\*\.tar"):
        build_provider(_cfg(str(tmp_path / "x-*.tar")))


@pytest.mark.parametrize("layout", ["thd", "bshd"])
def test_batches_contract(shards, layout):
    """The one batching path (MicroBatchStream) on webdataset: each DP rank collates its own
    samples, in their order, and resumes exactly."""
    p = build_provider(_cfg(shards))
    if layout == "thd":
        cfg, limit = p.collate_config(layout="thd", divisible_by=8), None
    else:
        cfg, limit = p.collate_config(layout="bshd", target_seqlen=96, divisible_by=8), 96
    bi = MicroBatchStream(p, cfg, micro_batch_size=4, num_microbatches=5, dp_rank=1, dp_size=2)
    ref = p.samples(1, 2, max_tokens=limit)
    for b in bi.next_iteration():
        check_batch(b, [next(ref) for _ in range(4)], layout, divisible_by=8, target_seqlen=96)
    assert bi.stats["micro_batches"] == 5 and bi.stats["samples_read"] == 20
    if layout == "bshd":
        assert bi.stats["skipped_samples"] == ref.stats["skipped_samples"]
    state = bi.state_dict()
    nxt = bi.next_iteration()[0]
    again = MicroBatchStream(p, cfg, micro_batch_size=4, num_microbatches=5, dp_rank=1, dp_size=2,
                             state=state).next_iteration()[0]
    assert torch.equal(nxt["tokens"], again["tokens"]) and torch.equal(nxt["pixel_values"], again["pixel_values"])
