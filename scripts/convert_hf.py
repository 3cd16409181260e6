#!/usr/bin/env python
"""HF checkpoints <-> multimodal_dev checkpoints (``multimodal_dev.hf_convert``).

Import (one process, or torchrun in the layout you like: every rank reads only its slices)::

    python scripts/convert_hf.py import --hf-checkpoint /models/Qwen3.5-35B-A3B --save ckpt/q35 \
        [pretrain_multimodal.py layout flags, e.g. --tensor-model-parallel-size 2 --sequence-parallel]

writes a weights-only ``dist_checkpointing`` checkpoint; ``pretrain_multimodal.py --load ckpt/q35
--hf-checkpoint /models/Qwen3.5-35B-A3B`` (or the matching ``--variant``) then reshards it into any
TP/EP/PP/CP layout and starts at iteration 0 with a fresh optimizer. (``--hf-checkpoint`` alone
does the same without the intermediate checkpoint.)

Export (one process; the whole model in host memory)::

    python scripts/convert_hf.py export --load ckpt/q35-sft --out hf/q35-sft [--tokenizer-from DIR]
        [--max-shard-size 5GB] [--dtype bf16|fp32]

writes safetensors shards, ``model.safetensors.index.json``, ``config.json`` and the tokenizer files,
loadable with ``Qwen3_5MoeForConditionalGeneration.from_pretrained``.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "examples"), ROOT]


def _size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    for u, n in units.items():
        if text.upper().endswith(u):
            return int(float(text[: -len(u)]) * n)
    return int(text)


def main(argv=None) -> int:
    from multimodal_dev.startup import quiet_imports

    quiet_imports()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("import", help="HF checkpoint -> weights-only checkpoint (pretrain_multimodal.py flags follow)",
                   add_help=False)
    e = sub.add_parser("export", help="checkpoint -> HF checkpoint directory")
    e.add_argument("--load", required=True, help="checkpoint directory (its newest complete checkpoint is exported)")
    e.add_argument("--out", required=True, help="new HF checkpoint directory")
    e.add_argument("--tokenizer-from", default=None, help="copy tokenizer files from here (default: the run's "
                                                          "--hf-checkpoint directory)")
    e.add_argument("--max-shard-size", default="5GB", type=_size)
    e.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the checkpoint's")
    args, rest = p.parse_known_args(argv)

    from multimodal_dev.arguments import ArgumentError, parse_args
    from multimodal_dev.models.contract import SetupError

    try:
        if args.command == "import":
            cfg = parse_args(rest)
            if not cfg.model.hf_checkpoint or not cfg.checkpoint.save:
                raise ArgumentError("import needs --hf-checkpoint DIR and --save CKPT")
            from multimodal_dev.hf_convert import import_hf

            print(f"convert_hf.py: wrote {import_hf(cfg)}", file=sys.stderr)
        else:
            if rest:
                p.error(f"export takes no other flags: {rest}")
            import torch

            from multimodal_dev.hf_convert import export_hf

            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
            out = export_hf(args.load, args.out, tokenizer_from=args.tokenizer_from,
                            max_shard_bytes=args.max_shard_size, dtype=dtype)
            print(f"convert_hf.py: wrote {out}", file=sys.stderr)
    except (ArgumentError, SetupError) as err:
        print(f"convert_hf.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        from multimodal_dev.training import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
