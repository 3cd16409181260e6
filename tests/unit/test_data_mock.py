"""The mock provider: deterministic per (seed, index), disjoint DP ranks, exact resume, sensible
samples, and batches that satisfy the batch contract."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from data_batch_checks import check_batch
from multimodal_dev.data.collate import CollateConfig
from multimodal_dev.data.providers import DataConfig, available_providers, build_provider, get_provider, register_provider
from multimodal_dev.data.stream import MicroBatchStream


def _same(a, b):
    if a["__key__"] != b["__key__"] or not torch.equal(a["tokens"], b["tokens"]) or not torch.equal(a["labels"], b["labels"]):
        return False
    if (a["pixel_values"] is None) != (b["pixel_values"] is None):
        return False
    return a["pixel_values"] is None or (
        torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def provider():
    return build_provider(DataConfig(provider="mock", seed=3))


def test_registry():
    assert {"mock", "webdataset"} <= set(available_providers())
    with pytest.raises(ValueError, match="'nope' is unknown; available: .*mock"):
        get_provider("nope")

    @register_provider("test-only-provider")
    class P:  # noqa: D401
        pass

    assert get_provider("test-only-provider") is P


def test_deterministic_and_seed_dependent(provider):
    a = _take(build_provider(DataConfig(provider="mock", seed=3)).samples(0, 1), 20)
    b = _take(provider.samples(0, 1), 20)
    c = _take(build_provider(DataConfig(provider="mock", seed=4)).samples(0, 1), 20)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert sum(_same(x, y) for x, y in zip(a, c)) == 0


def test_samples_look_right(provider):
    ss = _take(provider.samples(0, 1), 200)
    lengths = [s["tokens"].numel() for s in ss]
    assert min(lengths) >= 18 and max(lengths) <= 200
    assert max(lengths) - min(lengths) > 100  # varied
    n_img = [0 if s["image_grid_thw"] is None else s["image_grid_thw"].shape[0] for s in ss]
    assert 60 <= sum(n > 0 for n in n_img) <= 140 and set(n_img) <= {0, 1, 2} and 2 in n_img
    for s in ss:
        t, lab = s["tokens"], s["labels"]
        trained = lab != -100
        assert trained.any() and lab[-1] == -100
        assert torch.equal(lab[:-1][trained[:-1]], t[1:][trained[:-1]])
        if s["image_grid_thw"] is not None:
            g = s["image_grid_thw"]
            assert (t == 250).sum().item() == int((g.prod(1) // 4).sum())
            assert s["pixel_values"].shape == (int(g.prod(1).sum()), 96)
            assert 4 <= g[:, 1].min() and g[:, 1:].max() <= 8  # 16..32 px at patch 4


def test_dp_ranks_are_disjoint_and_interleave(provider):
    single = _take(provider.samples(0, 1), 30)
    r0 = _take(provider.samples(0, 3), 10)
    r1 = _take(provider.samples(1, 3), 10)
    r2 = _take(provider.samples(2, 3), 10)
    for k in range(10):
        assert _same(r0[k], single[3 * k]) and _same(r1[k], single[3 * k + 1]) and _same(r2[k], single[3 * k + 2])
    keys = [s["__key__"] for s in r0 + r1 + r2]
    assert len(set(keys)) == 30


@pytest.mark.parametrize("k", [0, 1, 7])
def test_resume_samples(provider, k):
    it = provider.samples(1, 2)
    _take(it, k)
    state = json.loads(json.dumps(it.state_dict()))  # survives a JSON round trip (checkpoints)
    expect = _take(it, 5)
    fresh = build_provider(DataConfig(provider="mock", seed=3))
    got = _take(fresh.samples(1, 2, state=state), 5)
    assert all(_same(x, y) for x, y in zip(expect, got))
    it2 = fresh.samples(1, 2)
    it2.load_state_dict(state)
    assert all(_same(x, y) for x, y in zip(expect, _take(it2, 5)))
    assert it2.stats["samples_read"] == k + 5


def test_resume_rejects_other_settings(provider):
    state = provider.samples(0, 2).state_dict()
    with pytest.raises(ValueError, match="dp_size: saved 2, now 4"):
        provider.samples(0, 4, state=state)
    with pytest.raises(ValueError, match="seed"):
        build_provider(DataConfig(provider="mock", seed=9)).samples(0, 2, state=state)


def test_max_sample_tokens():
    p = build_provider(DataConfig(provider="mock", seed=1, max_sample_tokens=50))
    ss = _take(p.samples(0, 1), 100)
    assert max(s["tokens"].numel() for s in ss) <= 50


@pytest.mark.parametrize("layout", ["thd", "bshd"])
def test_batches_contract_and_resume(provider, layout):
    """The one batching path on mock data (global order): DP rank 1 of 2 collates its block of
    each global batch; a resumed stream continues exactly, also with another micro-batch size."""
    mbs, n_mb = 3, 2
    if layout == "thd":
        cfg = provider.collate_config(layout="thd", divisible_by=4)
        limit = None
    else:
        cfg = provider.collate_config(layout="bshd", target_seqlen=128, divisible_by=4)
        limit = 128  # the stream keeps samples within target_seqlen
    bi = MicroBatchStream(provider, cfg, micro_batch_size=mbs, num_microbatches=n_mb, dp_rank=1, dp_size=2)
    ref = provider.samples(0, 1, max_tokens=limit)  # the global order
    for _ in range(2):
        everyone = _take(ref, 2 * mbs * n_mb)
        mine = everyone[mbs * n_mb:]
        for i, b in enumerate(bi.next_iteration()):
            check_batch(b, mine[i * mbs:(i + 1) * mbs], layout, divisible_by=4, target_seqlen=128)
    state = bi.state_dict()
    after = [b for _ in range(2) for b in bi.next_iteration()]
    resumed = MicroBatchStream(provider, cfg, micro_batch_size=mbs, num_microbatches=n_mb, dp_rank=1, dp_size=2,
                               state=state)
    for x, y in zip(after, [b for _ in range(2) for b in resumed.next_iteration()]):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"])
        assert torch.equal(x["position_ids"], y["position_ids"])
    assert resumed.stats["micro_batches"] == 2 * n_mb and resumed.stats["samples_read"] == 4 * 2 * mbs * n_mb
    # another micro-batch size continues at the same sample position
    other = MicroBatchStream(provider, cfg, micro_batch_size=2 * mbs, num_microbatches=1, dp_rank=1, dp_size=2,
                             state=state)
    first = other.next_iteration()[0]  # the samples of the two micro-batches of `after`'s first iteration
    joined = torch.cat([after[0]["tokens"], after[1]["tokens"]], dim=-1 if layout == "thd" else 0)
    assert torch.equal(first["tokens"], joined)


def test_batches_check_collate_ids(provider):
    with pytest.raises(ValueError, match="image_token_id"):
        MicroBatchStream(provider, CollateConfig(layout="thd", image_token_id=7), micro_batch_size=2,
                         num_microbatches=1)
    with pytest.raises(ValueError, match="dp_rank"):
        provider.samples(2, 2)
