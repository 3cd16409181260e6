#!/usr/bin/env python
"""Throughput of ``pack_or_pad_batch`` (BSHD and THD) on one CPU thread.

A realistic micro-batch: ``--samples`` samples with lengths uniform in [200, 4000] tokens, a quarter
of them with one image (grid (1, 32, 32) -> 256 image tokens, 1024 float32 patches of 1536 values),
each with a prompt (labels -100) and an answer. Everything is generated before the timed region;
only the collate call is timed. Reported: real (non-padding) tokens per second, median and best
over ``--repeats`` runs. Goal: >= 1,000,000 tokens/s per layout.

    .venv/bin/python scripts/bench/collate.py --repeats 20 --samples 64 --seed 0
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from multimodal_dev.data.collate import CollateConfig, pack_or_pad_batch

GOAL_TOKENS_PER_S = 1_000_000
IMAGE_TOKEN_ID = 151655
VOCAB = 151_000
GRID = (1, 32, 32)
PATCH_DIM = 1536
MERGE = 2
MIN_LEN, MAX_LEN = 200, 4000
BSHD_TARGET = 4096
THD_DIVISIBLE_BY = 8


def make_samples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    t, h, w = GRID
    n_img_tok = t * h * w // MERGE**2
    with_image = set(rng.choice(n, size=n // 4, replace=False).tolist())
    samples = []
    for i in range(n):
        length = int(rng.integers(MIN_LEN, MAX_LEN + 1))
        if i in with_image:
            length = max(length, n_img_tok + 64)  # the image (256 tokens) plus some text
        tokens = rng.integers(0, VOCAB, size=length, dtype=np.int64)
        prompt_len = int(rng.integers(1, length))  # at least one prompt and one answer token
        s = {"__key__": f"bench/{i:05d}"}
        if i in with_image:
            start = int(rng.integers(0, max(1, min(prompt_len, length - n_img_tok))))  # the image is in the prompt
            tokens[start : start + n_img_tok] = IMAGE_TOKEN_ID
            prompt_len = max(prompt_len, start + n_img_tok)
            s["pixel_values"] = torch.from_numpy(rng.standard_normal((t * h * w, PATCH_DIM), dtype=np.float32))
            s["image_grid_thw"] = torch.tensor([GRID])
        labels = np.roll(tokens, -1)
        labels[:prompt_len] = -100
        labels[labels == IMAGE_TOKEN_ID] = -100
        s["tokens"] = torch.from_numpy(tokens)
        s["labels"] = torch.from_numpy(labels)
        samples.append(s)
    return samples


def bench(samples: list[dict], cfg: CollateConfig, repeats: int) -> tuple[list[float], dict]:
    batch = pack_or_pad_batch(samples, cfg)  # warm-up (and the stats)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch = pack_or_pad_batch(samples, cfg)
        times.append(time.perf_counter() - t0)
    return times, batch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per layout (after one warm-up)")
    ap.add_argument("--samples", type=int, default=64, help="samples per batch")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    samples = make_samples(args.samples, args.seed)
    n_tokens = sum(int(s["tokens"].numel()) for s in samples)
    n_images = sum("pixel_values" in s for s in samples)
    pv_mb = sum(s["pixel_values"].nbytes for s in samples if "pixel_values" in s) / 2**20
    print(
        f"collate benchmark: {args.samples} samples, {n_tokens:,} tokens, {n_images} images "
        f"(grid {GRID}, {pv_mb:.0f} MiB of float32 pixel values), torch threads {torch.get_num_threads()}, "
        f"{args.repeats} repeats, seed {args.seed}"
    )
    print(f"goal: >= {GOAL_TOKENS_PER_S:,} tokens/s (real tokens, one thread)")
    configs = {
        f"BSHD target_seqlen={BSHD_TARGET}": CollateConfig(
            layout="bshd", target_seqlen=BSHD_TARGET, divisible_by=THD_DIVISIBLE_BY, image_token_id=IMAGE_TOKEN_ID,
            spatial_merge_size=MERGE,
        ),
        f"THD divisible_by={THD_DIVISIBLE_BY}": CollateConfig(
            layout="thd", divisible_by=THD_DIVISIBLE_BY, image_token_id=IMAGE_TOKEN_ID, spatial_merge_size=MERGE,
        ),
    }
    ok = True
    for name, cfg in configs.items():
        times, batch = bench(samples, cfg, args.repeats)
        med, best = statistics.median(times), min(times)
        tps_med, tps_best = n_tokens / med, n_tokens / best
        positions = batch["tokens"].numel()
        met = tps_med >= GOAL_TOKENS_PER_S
        ok &= met
        print(
            f"  {name:26s} median {med * 1e3:7.2f} ms  best {best * 1e3:7.2f} ms  |  "
            f"tokens/s median {tps_med:12,.0f}  best {tps_best:12,.0f}  |  "
            f"{positions:,} positions ({batch['stats']['padding_tokens']:,} padding)  "
            f"[{'meets' if met else 'BELOW'} goal]"
        )
    # For context: the part of each call that is a plain copy of the pixel values (torch.cat).
    pv = [s["pixel_values"] for s in samples if "pixel_values" in s]
    if pv:
        cat_times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            torch.cat(pv, 0)
            cat_times.append(time.perf_counter() - t0)
        print(f"  of which pixel_values concatenation ({pv_mb:.0f} MiB): median {statistics.median(cat_times) * 1e3:.2f} ms")
    print("result: " + ("goal met" if ok else "goal NOT met") + " (median tokens/s of every layout vs goal)")


if __name__ == "__main__":
    main()
