#!/usr/bin/env python
"""Write the coloured-shapes WebDataset (``multimodal_dev.data.shapes``): shards + meta.json.

    python examples/multimodal_dev/scripts/make_shapes_dataset.py --out /data/shapes \
        --num-samples 2000 --shard-size 500 --image-size 32 --seed 0

Same arguments, same bytes. 32 px images suit the ``tiny`` variant (patch 4, merge 2: 16 image
tokens); use 64 or more for the real patch size 16.
"""
from __future__ import annotations

import argparse
import time

from multimodal_dev.data.shapes import write_shapes_dataset


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=500, help="samples per tar shard")
    p.add_argument("--image-size", type=int, default=32, help="square image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    meta = write_shapes_dataset(a.out, a.num_samples, a.shard_size, a.image_size, a.seed)
    print(f"wrote {meta['count']} samples in {len(meta['shards'])} shards to {a.out} "
          f"in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
