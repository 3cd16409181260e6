"""Context-parallel partitioning (``megatron.mcore_ext.cp_split``), property-based.

The reference is the rule itself, written as a loop over chunks: every (padded) sequence of length
L is cut into 2*cp chunks of L/(2*cp) tokens and CP rank r holds chunk r, then chunk 2*cp-1-r.
BSHD applies it to the whole sequence dimension, THD to every packed sample in turn.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron.mcore_ext.cp_split import (
    cp_partition_index,
    split_batch_for_cp,
    thd_partition_index,
    unsplit_batch_for_cp,
    zigzag_index,
)
from multimodal_dev.data.collate import CollateConfig, pack_or_pad_batch, required_seq_multiple

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
IMG = 99


def ref_rank_index(lengths: list[int], cp: int, rank: int) -> list[int]:
    """The zigzag rule as a loop over chunks, sample after sample."""
    out, offset = [], 0
    for L in lengths:
        chunk = L // (2 * cp)
        chunks = [list(range(offset + k * chunk, offset + (k + 1) * chunk)) for k in range(2 * cp)]
        out += chunks[rank] + chunks[2 * cp - 1 - rank]
        offset += L
    return out


def cu_from(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)


@st.composite
def cp_and_lengths(draw, max_samples=5, max_chunks=6, allow_empty=True):
    cp = draw(st.integers(1, 4))
    ks = draw(st.lists(st.integers(0 if allow_empty else 1, max_chunks), min_size=1, max_size=max_samples))
    if sum(ks) == 0:
        ks[0] = 1
    return cp, [k * 2 * cp for k in ks]


def check_partition(indices: list[torch.Tensor], total: int, cp: int):
    for idx in indices:
        assert idx.dtype == torch.long
        assert idx.numel() == total // cp  # equal in size
    allidx = torch.cat(indices)
    assert torch.equal(torch.sort(allidx).values, torch.arange(total))  # a permutation of range(T)


def test_reference_hand_example():
    # L = 8, cp = 2: chunks [0,1] [2,3] [4,5] [6,7]; rank 0 -> chunks 0, 3; rank 1 -> chunks 1, 2
    assert ref_rank_index([8], 2, 0) == [0, 1, 6, 7]
    assert ref_rank_index([8], 2, 1) == [2, 3, 4, 5]
    # two packed samples of 4 and 8 tokens
    assert ref_rank_index([4, 8], 2, 0) == [0, 3, 4, 5, 10, 11]
    assert ref_rank_index([4, 8], 2, 1) == [1, 2, 6, 7, 8, 9]
    assert ref_rank_index([6], 1, 0) == list(range(6))


# ------------------------------------------------------------------------------------------------
# The indices
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(cp=st.integers(1, 4), k=st.integers(1, 16))
def test_zigzag_index_bshd(cp, k):
    S = k * 2 * cp
    idx = [zigzag_index(S, cp, r) for r in range(cp)]
    check_partition(idx, S, cp)
    for r in range(cp):
        assert idx[r].tolist() == ref_rank_index([S], cp, r)


@SETTINGS
@given(cl=cp_and_lengths(), as_list=st.booleans())
def test_thd_partition_index(cl, as_list):
    cp, lengths = cl
    cu = cu_from(lengths)
    T = sum(lengths)
    idx = [thd_partition_index(cu.tolist() if as_list else cu, cp, r) for r in range(cp)]
    check_partition(idx, T, cp)
    for r in range(cp):
        assert idx[r].tolist() == ref_rank_index(lengths, cp, r)
        # each sample's share on every rank is the same size: L / cp
        per_sample = np.searchsorted(cu.numpy(), idx[r].numpy(), side="right") - 1
        counts = np.bincount(per_sample, minlength=len(lengths))
        assert counts.tolist() == [L // cp for L in lengths]


@SETTINGS
@given(cp=st.integers(2, 4), data=st.data())
def test_thd_length_not_divisible_raises_naming_sample(cp, data):
    lengths = data.draw(st.lists(st.integers(1, 6).map(lambda k: k * 2 * cp), min_size=1, max_size=4))
    bad = data.draw(st.integers(0, len(lengths) - 1))
    lengths[bad] += data.draw(st.integers(1, 2 * cp - 1))
    cu = cu_from(lengths)
    for r in range(cp):
        with pytest.raises(ValueError) as exc:
            thd_partition_index(cu, cp, r)
        msg = str(exc.value)
        assert re.search(rf"\bsample {bad}\b", msg) and str(lengths[bad]) in msg and str(2 * cp) in msg, msg
    batch = {"tokens": torch.zeros(1, sum(lengths), dtype=torch.long), "cu_seqlens_padded": cu}
    with pytest.raises(ValueError, match=rf"\bsample {bad}\b"):
        split_batch_for_cp(batch, cp, 0)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_bshd_length_not_divisible_raises(cp):
    with pytest.raises(ValueError, match=str(2 * cp)):
        zigzag_index(2 * cp * 3 + 1, cp, 0)


@pytest.mark.parametrize("cp,rank", [(0, 0), (2, 2), (2, -1), (3, 5)])
def test_bad_cp_rank_raises(cp, rank):
    with pytest.raises(ValueError):
        zigzag_index(24, cp, rank)
    with pytest.raises(ValueError):
        thd_partition_index([0, 24], cp, rank)


# ------------------------------------------------------------------------------------------------
# split_batch_for_cp / unsplit_batch_for_cp on synthetic batches
# ------------------------------------------------------------------------------------------------
def synthetic_batch(lengths: list[int], layout: str, B: int, H: int, seed: int) -> tuple[dict, list[int], int]:
    """A batch whose every per-token value is distinct, so that any misplaced token shows."""
    g = torch.Generator().manual_seed(seed)
    if layout == "bshd":
        B_, S = B, lengths[0]
    else:
        B_, S = 1, sum(lengths)
    n = B_ * S
    perm = lambda: torch.randperm(n, generator=g).view(B_, S)  # noqa: E731
    batch = {
        "tokens": perm(),
        "labels": perm() - 100,
        "loss_mask": perm().float() / n,
        "padding_mask": torch.rand(B_, S, generator=g) < 0.3,
        "position_ids": torch.randperm(3 * n, generator=g).view(3, B_, S),
        "decoder_input": torch.randn(S, B_, H, generator=g),
        "pixel_values": torch.randn(5, 4, generator=g),
        "image_grid_thw": torch.tensor([[1, 2, 2]]),
        "stats": {"samples": len(lengths)},
        "__key__": "not a tensor",
    }
    if layout == "thd":
        cu = cu_from(lengths)
        batch.update(cu_seqlens=cu.clone(), cu_seqlens_padded=cu, max_seqlen=max(lengths))
    return batch, (lengths if layout == "thd" else [S]), S


PER_TOKEN = {"tokens": -1, "labels": -1, "loss_mask": -1, "padding_mask": -1, "position_ids": -1, "decoder_input": 0}


@SETTINGS
@given(cl=cp_and_lengths(allow_empty=False), layout=st.sampled_from(["bshd", "thd"]), B=st.integers(1, 3),
       explicit_dims=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_split_and_unsplit(cl, layout, B, explicit_dims, seed):
    cp, lengths = cl
    batch, ref_lengths, S = synthetic_batch(lengths, layout, B, H=3, seed=seed)
    seq_dims = {"decoder_input": 0} if explicit_dims else None
    parts = [split_batch_for_cp(batch, cp, r, seq_dims=seq_dims) for r in range(cp)]
    for r, part in enumerate(parts):
        ref = torch.tensor(ref_rank_index(ref_lengths, cp, r), dtype=torch.long)
        assert set(part) == set(batch)
        for key, dim in PER_TOKEN.items():
            assert part[key].dtype == batch[key].dtype, key
            expected = batch[key].index_select(dim % batch[key].dim(), ref)
            assert torch.equal(part[key], expected), (key, r)
            assert part[key].shape[dim] == S // cp
        for key in set(batch) - set(PER_TOKEN):  # passed through untouched
            assert part[key] is batch[key], key
        assert torch.equal(cp_partition_index(batch, cp, r), ref)
    full = unsplit_batch_for_cp(parts, seq_dims=seq_dims)
    assert set(full) == set(batch)
    for key in batch:
        if isinstance(batch[key], torch.Tensor):
            assert full[key].dtype == batch[key].dtype and torch.equal(full[key], batch[key]), key
        else:
            assert full[key] == batch[key], key
    # explicit indices give the same as derived ones
    full2 = unsplit_batch_for_cp(parts, seq_dims=seq_dims, indices=[cp_partition_index(batch, cp, r) for r in range(cp)])
    for key in PER_TOKEN:
        assert torch.equal(full2[key], batch[key]), key


def test_split_cp1_is_identity():
    batch, _, _ = synthetic_batch([8, 4], "thd", 1, 2, seed=0)
    out = split_batch_for_cp(batch, 1, 0)
    assert all(out[k] is batch[k] for k in batch)
    back = unsplit_batch_for_cp([out])
    assert all(back[k] is batch[k] for k in batch)


@pytest.mark.parametrize("cp", [1, 2])
@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_unknown_tensor_key_raises(cp, layout):
    batch, _, S = synthetic_batch([8, 4], layout, 2, 2, seed=1)
    batch["my_new_per_token_thing"] = torch.zeros(batch["tokens"].shape)
    with pytest.raises(KeyError, match="my_new_per_token_thing"):
        split_batch_for_cp(batch, cp, 0)
    if cp > 1:  # (one part is returned as is: nothing to reassemble, nothing to skip)
        parts = [dict(batch) for _ in range(cp)]
        with pytest.raises(KeyError, match="my_new_per_token_thing"):
            unsplit_batch_for_cp(parts)
    # naming its sequence dimension makes it a per-token tensor like the others
    batch["my_new_per_token_thing"] = torch.arange(batch["tokens"].numel()).view(batch["tokens"].shape)
    out = split_batch_for_cp(batch, cp, 0, seq_dims={"my_new_per_token_thing": -1})
    assert torch.equal(out["my_new_per_token_thing"], batch["my_new_per_token_thing"].index_select(
        -1 % 2, cp_partition_index(batch, cp, 0)))


def test_mismatched_sequence_lengths_raise():
    batch, _, _ = synthetic_batch([8], "bshd", 2, 2, seed=2)
    batch["decoder_input"] = batch["decoder_input"][:4]
    with pytest.raises(ValueError, match="decoder_input|sequence length"):
        split_batch_for_cp(batch, 2, 0)


# ------------------------------------------------------------------------------------------------
# On real collated batches
# ------------------------------------------------------------------------------------------------
@st.composite
def collate_samples(draw):
    n = draw(st.integers(1, 4))
    samples = []
    for i in range(n):
        pre, post = draw(st.integers(0, 12)), draw(st.integers(0, 12))
        with_img = draw(st.booleans())
        if not with_img and pre + post == 0:
            post = 1
        h, w = draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4]))
        n_img = h * w // 4 if with_img else 0
        L = pre + n_img + post
        rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
        toks = rng.integers(1, 50, pre).tolist() + [IMG] * n_img + rng.integers(1, 50, post).tolist()
        p = draw(st.integers(0, L))
        labels = [-100] * p + rng.integers(0, 50, L - p).tolist()
        s = {"tokens": toks, "labels": labels}
        if with_img:
            s["pixel_values"] = torch.from_numpy(rng.standard_normal((h * w, 8)).astype(np.float32))
            s["image_grid_thw"] = torch.tensor([[1, h, w]])
        samples.append(s)
    return samples


@SETTINGS
@given(samples=collate_samples(), layout=st.sampled_from(["bshd", "thd"]), extra=st.sampled_from([1, 8]))
def test_split_real_collated_batch_cp2(samples, layout, extra):
    cp = 2
    d = required_seq_multiple(context_parallel_size=cp, extra_multiple=extra)
    longest = max(len(s["tokens"]) for s in samples)
    target = -(-longest // d) * d if layout == "bshd" else None
    batch = pack_or_pad_batch(samples, CollateConfig(layout=layout, target_seqlen=target, divisible_by=d,
                                                     image_token_id=IMG))
    if layout == "thd":
        ref_lengths = np.diff(batch["cu_seqlens_padded"].numpy()).tolist()
    else:
        ref_lengths = [batch["tokens"].shape[-1]]
    per_token = ["tokens", "labels", "loss_mask", "padding_mask", "position_ids"]
    if layout == "thd":
        per_token.append("sequence_ids")
    parts = [split_batch_for_cp(batch, cp, r) for r in range(cp)]
    for r, part in enumerate(parts):
        ref = torch.tensor(ref_rank_index(ref_lengths, cp, r), dtype=torch.long)
        for key in per_token:
            assert torch.equal(part[key], batch[key].index_select(batch[key].dim() - 1, ref)), key
        for key in set(batch) - set(per_token):  # cu_seqlens*, max_seqlen, vision inputs, stats
            assert part[key] is batch[key], key
    # padding, prompt and real tokens are all accounted for across the ranks
    assert sum(int(p["padding_mask"].sum()) for p in parts) == batch["stats"]["padding_tokens"]
    assert sum(int(p["loss_mask"].sum()) for p in parts) == int(batch["loss_mask"].sum())
    full = unsplit_batch_for_cp(parts)
    for key in per_token:
        assert torch.equal(full[key], batch[key]), key
    for key in set(batch) - set(per_token):
        assert full[key] is batch[key], key
    if layout == "thd":  # attention needs the global boundaries on every rank
        assert all(torch.equal(p["cu_seqlens"], batch["cu_seqlens"]) for p in parts)


# ------------------------------------------------------------------------------------------------
# Transformer Engine's own THD partition (GPU only)
# ------------------------------------------------------------------------------------------------
def test_matches_transformer_engine_thd_get_partitioned_indices():
    # TE 2.x loads its torch extension (``transformer_engine_torch``, kept inside the package's
    # wheel_lib/) when ``transformer_engine.pytorch`` is imported, not as a top-level module
    pytest.importorskip(
        "transformer_engine.pytorch",
        reason="Transformer Engine is not installed: cannot compare with tex.thd_get_partitioned_indices",
    )
    import transformer_engine_torch as tex
    if not torch.cuda.is_available():
        pytest.skip("tex.thd_get_partitioned_indices is a CUDA kernel: needs a GPU")
    rng = np.random.default_rng(0)
    for cp in (1, 2, 3, 4, 8):
        for _ in range(20):
            lengths = (rng.integers(1, 12, size=rng.integers(1, 8)) * 2 * cp).tolist()
            cu = cu_from(lengths).cuda()
            T = sum(lengths)
            for r in range(cp):
                te = tex.thd_get_partitioned_indices(cu, T, cp, r).long().cpu()
                ours = thd_partition_index(cu, cp, r).cpu()
                assert torch.equal(te, ours), (lengths, cp, r)
