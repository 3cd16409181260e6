"""The distillation flags: ``--distill`` with its teacher and the KD settings -> ``DistillArgs``.

Defined and checked here (``add_arguments``, ``args_from_flags``), called by ``arguments`` as it
does for ``evaluation`` and ``recompute``. Every check that needs no model happens here, before
any process group exists; what needs the teacher (its vocabulary, its sizes under the layout) is
checked when it is built (``distill.teacher``), as a ``SetupError`` naming the flag.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

from multimodal_dev.argument_error import ArgumentError

__all__ = ["DistillArgs", "add_arguments", "args_from_flags", "DEFAULT_ALPHA"]

DEFAULT_ALPHA = 0.5
_TEACHER_FLAGS = ("teacher_hf_checkpoint", "teacher_load", "teacher_model_arch", "teacher_variant",
                  "kd_alpha", "kd_temperature", "kd_top_k")


@dataclasses.dataclass(frozen=True)
class DistillArgs:
    """The run's ``distill`` section (``arguments.RunConfig``); ``enabled`` False: no teacher."""

    enabled: bool = False
    teacher_hf_checkpoint: Optional[str] = None  # an HF checkpoint directory (sizes from its config.json)
    teacher_load: Optional[str] = None  # a checkpoint directory of this trainer (weights-only or a run's)
    teacher_arch: Optional[str] = None  # None: the checkpoint's (--teacher-load) / the HF reader's
    teacher_variant: Optional[str] = None  # None: the checkpoint's (--teacher-load) / config.json's
    alpha: float = DEFAULT_ALPHA  # total = alpha * KD + (1 - alpha) * LM + student MoE losses
    temperature: float = 1.0
    top_k: Optional[int] = None  # None: the teacher's full distribution


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("knowledge distillation (multimodal_dev/distill; docs/distillation.md)")
    g.add_argument("--distill", action="store_true",
                   help="train against a frozen teacher: total = alpha * KD + (1 - alpha) * LM + the student's "
                        "load-balancing and z-losses")
    g.add_argument("--teacher-hf-checkpoint", default=None, metavar="DIR",
                   help="the teacher: an HF checkpoint directory (config.json + safetensors), same vocabulary")
    g.add_argument("--teacher-load", default=None, metavar="CKPT",
                   help="the teacher: a checkpoint directory of this trainer (--save of a run, or convert_hf.py "
                        "import); its architecture and variant are read from it unless given")
    g.add_argument("--teacher-model-arch", default=None,
                   help="the teacher's architecture (default: the checkpoint's; with --teacher-hf-checkpoint the "
                        "reader of its model_type)")
    g.add_argument("--teacher-variant", default=None,
                   help="the teacher's size (default: the checkpoint's, or config.json's); may differ from the "
                        "student's in layers, hidden size and experts")
    g.add_argument("--kd-alpha", type=float, default=None,
                   help=f"weight of the KD loss, 1 - it of the LM loss (default {DEFAULT_ALPHA})")
    g.add_argument("--kd-temperature", type=float, default=None,
                   help="softmax temperature T of both distributions; the KD is scaled by T^2 (default 1)")
    g.add_argument("--kd-top-k", type=int, default=None, metavar="K",
                   help="keep only the teacher's K largest logits per token, renormalised (less memory; "
                        "default: its full distribution)")


def args_from_flags(a: argparse.Namespace) -> DistillArgs:
    """The checked flags (``ArgumentError`` names the flag and what was expected)."""
    given = [f for f in _TEACHER_FLAGS if getattr(a, f) is not None]
    if not a.distill:
        if given:
            raise ArgumentError(f"--{given[0].replace('_', '-')} needs --distill")
        return DistillArgs()
    if bool(a.teacher_hf_checkpoint) == bool(a.teacher_load):
        raise ArgumentError("--distill needs exactly one teacher: --teacher-hf-checkpoint DIR or --teacher-load CKPT"
                            + (" (both were given)" if a.teacher_hf_checkpoint else ""))
    alpha = DEFAULT_ALPHA if a.kd_alpha is None else a.kd_alpha
    if not 0.0 <= alpha <= 1.0:
        raise ArgumentError(f"--kd-alpha must be in [0, 1] (the KD's share of KD + LM), got {alpha}")
    temperature = 1.0 if a.kd_temperature is None else a.kd_temperature
    if not temperature > 0.0:
        raise ArgumentError(f"--kd-temperature must be > 0, got {temperature}")
    if a.kd_top_k is not None and a.kd_top_k < 1:
        raise ArgumentError(f"--kd-top-k must be >= 1 (the teacher's logits kept per token), got {a.kd_top_k}")
    if a.chunked_lm_loss:
        raise ArgumentError("--chunked-lm-loss with --distill: the KD needs the student's [tokens, vocab/TP] logits, "
                            "which --chunked-lm-loss exists to avoid; leave it out")
    if a.cuda_graph_layers:
        raise ArgumentError("--cuda-graph-layers with --distill is not supported yet (distillation is validated "
                            "with eager decoder layers only); leave it out")
    return DistillArgs(enabled=True, teacher_hf_checkpoint=a.teacher_hf_checkpoint, teacher_load=a.teacher_load,
                       teacher_arch=a.teacher_model_arch, teacher_variant=a.teacher_variant, alpha=alpha,
                       temperature=temperature, top_k=a.kd_top_k)
