"""Knowledge distillation (``--distill``, docs/distillation.md): a frozen teacher in the same
process and layout as the student, and ``total = alpha * KD + (1 - alpha) * LM`` + the student's
MoE load-balancing and z-losses.

* ``args``: the flags -> ``DistillArgs`` (the run's ``distill`` section);
* ``loss``: the KD and LM losses on vocabulary-parallel logits (full or top-k teacher);
* ``teacher``: build, load, freeze and run the teacher (its router statistics apart);
* ``step``: the student's ``forward_step`` / loss function, and the ``distill/*`` metrics.

The trainer calls the two functions below (each a no-op without ``--distill``) and
``Teacher.prepare_step`` for the forward step of each iteration.
"""
from __future__ import annotations

__all__ = ["build_teacher", "record"]


def build_teacher(cfg, student):
    """The frozen ``Teacher`` of ``cfg.distill`` (collective), or None without ``--distill``."""
    if not cfg.distill.enabled:
        return None
    from multimodal_dev.distill.teacher import Teacher

    return Teacher.build(cfg, student)


def record(teacher, losses, rec: dict, config, num_microbatches: int) -> dict:
    """The iteration's ``distill/*`` metrics (``step.record``), ``{}`` without a teacher. Collective."""
    if teacher is None:
        return {}
    from multimodal_dev.distill.step import record as distill_record

    return distill_record(teacher, losses, rec, config, num_microbatches)
