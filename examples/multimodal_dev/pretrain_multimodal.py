"""Train a mixture-of-experts vision-language model on megatron-core.

    python -m multimodal_dev.pretrain_multimodal --variant tiny --dataset-provider mock --train-iters 20
    torchrun --nproc-per-node 2 -m multimodal_dev.pretrain_multimodal --expert-model-parallel-size 2 ...

Flags: ``python -m multimodal_dev.pretrain_multimodal --help``. Architecture-agnostic: the model
comes from the registry (``--model-arch``), the data from a provider (``--dataset-provider``).
Launch scripts for one node, several nodes and SLURM: ``examples/multimodal_dev/scripts/``.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file: make `multimodal_dev` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multimodal_dev.startup import quiet_imports  # noqa: E402

quiet_imports()  # before megatron is imported: one line of ours instead of its warnings

from multimodal_dev.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
