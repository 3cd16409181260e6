"""Shared check for the data tests: a collated batch against the samples it was made from
(docs/batch.md), derived from the samples' lengths, never from the batch's own labels."""
from __future__ import annotations

import torch


def check_batch(batch, samples, layout, divisible_by=1, target_seqlen=None, pad_id=0):
    lengths = [int(s["tokens"].numel()) for s in samples]
    all_tokens = torch.cat([s["tokens"] for s in samples])
    all_labels = torch.cat([s["labels"] for s in samples])
    pm = batch["padding_mask"]
    assert pm.dtype == torch.bool
    if layout == "thd":
        padded = [(n + divisible_by - 1) // divisible_by * divisible_by for n in lengths]
        assert batch["tokens"].shape == (1, sum(padded))
        starts, off = [], 0
        for n, p in zip(lengths, padded):
            starts.append(off)
            off += p
        expect_pm = torch.ones(sum(padded), dtype=torch.bool)
        for st, n in zip(starts, lengths):
            expect_pm[st : st + n] = False
        assert torch.equal(pm[0], expect_pm)
        assert batch["cu_seqlens"].tolist() == [0] + list(torch.tensor(lengths).cumsum(0).tolist())
        assert batch["cu_seqlens_padded"].tolist() == [0] + list(torch.tensor(padded).cumsum(0).tolist())
        assert batch["max_seqlen"] == max(padded)
        for st in starts:  # MRoPE ids restart at every packed sample
            assert batch["position_ids"][:, 0, st].tolist() == [0, 0, 0]
        flat_pm = pm[0]
    else:
        assert batch["tokens"].shape == (len(samples), target_seqlen)
        for r, n in enumerate(lengths):
            assert not pm[r, :n].any() and pm[r, n:].all()
            assert batch["position_ids"][:, r, 0].tolist() == [0, 0, 0]
        flat_pm = pm.reshape(-1)
    tokens, labels = batch["tokens"].reshape(-1), batch["labels"].reshape(-1)
    assert torch.equal(tokens[~flat_pm], all_tokens)
    assert torch.equal(labels[~flat_pm], all_labels)
    assert (tokens[flat_pm] == pad_id).all() and (labels[flat_pm] == -100).all()
    assert torch.equal(batch["loss_mask"].reshape(-1), (labels != -100).float())
    # prompt tokens are real: loss_mask 0 but padding_mask False somewhere (not ~loss_mask)
    assert ((batch["loss_mask"].reshape(-1) == 0) & ~flat_pm).any()
    imgs = [s for s in samples if s["pixel_values"] is not None]
    if imgs:
        assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in imgs]))
        assert torch.equal(batch["image_grid_thw"], torch.cat([s["image_grid_thw"] for s in imgs]))
    else:
        assert batch["pixel_values"] is None
