"""``--freeze-vision-model``, ``--freeze-projector``, ``--freeze-language-model``: train only part of the model.

The parts are the architecture's (``MultimodalModel.parameter_parts``: "vision" = the vision
encoder without its projector, "projector" = the module that maps vision features into the
language model's hidden size, "language" = the language model); this module knows none of them.
``freeze`` runs after the model is built and before megatron-core's DDP wrap, which is what makes
freezing cheap and exact: DDP allocates gradient buffers for ``requires_grad`` parameters only and
``get_megatron_optimizer`` skips the others, so a frozen parameter gets no gradient buffer, no
optimizer state, and no update (bit-identical however long the run). A router whose parameters
are all frozen keeps its expert bias too (``MultimodalModel.freeze``: megatron's
``frozen_expert_bias``).

Refused (``SetupError``, naming the flag): freezing a part the model does not have on any rank
(an architecture without a projector, a text-only model), freezing everything ("nothing left to
train"), and a layout in which some rank holds only frozen parameters (a pipeline stage of a
frozen language model): megatron-core would build it an optimizer without parameter groups, and
the trainer reads the learning rate from the first group on every rank.

Checkpoints: a frozen run saves every weight (frozen ones included) and the optimizer state of the
trained ones. A resume may freeze more than the run that saved (the checkpoint's state of the newly
frozen parameters is not read) but not less: the checkpoint has no optimizer state for a part it
did not train (``checkpoint_checks.check_frozen_parts`` refuses it before the model is built).
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from multimodal_dev.models.contract import SetupError

__all__ = ["FLAGS", "add_arguments", "parts_from_flags", "freeze"]

#: part -> the flag that freezes it (the parts' order is the flags' order)
FLAGS = {"vision": "--freeze-vision-model", "projector": "--freeze-projector", "language": "--freeze-language-model"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("freezing (frozen parameters get no gradient buffer, no optimizer state, no update)")
    g.add_argument("--freeze-vision-model", action="store_true",
                   help="do not train the vision encoder (its projector is --freeze-projector)")
    g.add_argument("--freeze-projector", action="store_true",
                   help="do not train the projector from vision features to the language model's hidden size "
                        "(qwen35_vl: the 2x2 patch merger)")
    g.add_argument("--freeze-language-model", action="store_true",
                   help="do not train the language model (its routers' expert bias stays fixed too)")


def parts_from_flags(a: argparse.Namespace) -> tuple[str, ...]:
    """The frozen parts, in ``FLAGS`` order."""
    return tuple(part for part, flag in FLAGS.items() if getattr(a, flag[2:].replace("-", "_")))


def _flags(parts) -> str:
    return " ".join(FLAGS[p] for p in parts)


def freeze(model, parts: tuple[str, ...]) -> str:
    """Freeze ``parts`` of ``model`` (collective over the world: every rank calls it once, before
    the DDP wrap); returns the log line (this rank's trainable and frozen parameter counts)."""
    by_part = model.parameter_parts()
    unknown = [p for p in parts if p not in by_part]
    if unknown:
        raise SetupError(f"{_flags(unknown)}: this architecture has no such part (its parts: {sorted(by_part)})")
    names = list(FLAGS)
    # per part: parameters anywhere (sum); then trainable parameters after freezing (sum and min)
    held = [sum(p.numel() for p in by_part.get(n, [])) for n in names]
    if parts:
        model.freeze(parts)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in model.parameters()) - trainable
    sums = torch.tensor(held + [trainable], dtype=torch.float64)
    low = torch.tensor([trainable], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
    missing = [n for n, total in zip(names, sums.tolist()) if n in parts and total == 0]
    if missing:
        raise SetupError(f"{_flags(missing)}: the model has no {' or '.join(missing)} parameters to freeze "
                         f"(parts with parameters: {[n for n, t in zip(names, sums.tolist()) if t > 0]})")
    if sums[-1] == 0:
        raise SetupError(f"{_flags(parts)}: nothing left to train (every parameter of the model is frozen)")
    if low[0] == 0:
        raise SetupError(f"{_flags(parts)}: some rank holds only frozen parameters (e.g. a pipeline stage of a "
                         f"frozen language model; this rank holds {trainable} trainable): every rank needs something "
                         "to train; freeze less or use another layout")
    what = f" ({_flags(parts)})" if parts else ""
    return f"parameters on this rank: {trainable / 1e6:.3f}M trainable, {n_frozen / 1e6:.3f}M frozen{what}"
