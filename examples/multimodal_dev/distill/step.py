"""The student's side of ``--distill``: its ``forward_step``, the combined loss, the metrics.

``forward_step`` is ``multimodal_dev.forward_step.forward_step`` with two differences: the student
returns its vocabulary-parallel logits (``model(..., return_logits=True)``, ``[s_local, b, V/TP]``)
and the teacher's targets for the same micro-batch come with the loss function. ``loss_func``
then returns, in megatron's per-token form (``calculate_per_token_loss``), the sum over this
micro-batch's loss-mask tokens of

    alpha * KD + (1 - alpha) * LM            (``loss.kd_and_lm_loss``, per token)

and the number of those tokens: megatron-core's schedule adds the counts over micro-batches and
``finalize_model_grads`` divides every gradient by the count summed over DP x CP, so the KD is
weighted per token exactly like the LM loss. The student's MoE load-balancing and z-losses are
added by its routers as in every run (``megatron.mcore_ext.router``: padding masked, the usual
coefficients); the teacher's routers add nothing (``distill.teacher``).

``record`` adds the ``distill/*`` keys to an iteration's metrics record (``docs/metrics.md``).
"""
from __future__ import annotations

import functools

import torch

from multimodal_dev.distill.loss import kd_and_lm_loss, loss_rows

__all__ = ["local_inputs", "forward_step", "loss_func", "record", "KEYS"]

#: the record's distillation keys (JSONL and TensorBoard)
KEYS = ("distill/kd_loss", "distill/lm_loss", "distill/moe_lb_loss", "distill/teacher_moe_lb_loss",
        "distill/total_loss")


def local_inputs(data_iterator, use_padding_mask: bool, batch_hook=None):
    """``(batch, cp_index, loss_mask [b, s_local], labels [b, s_local])`` of the next micro-batch,
    read and split as ``forward_step.forward_step`` does."""
    from multimodal_dev.forward_step import local_batch, local_tokens

    batch, index = local_batch(data_iterator, use_padding_mask=use_padding_mask, batch_hook=batch_hook)
    loss_mask, labels = local_tokens(batch["loss_mask"], index), local_tokens(batch["labels"], index)
    return batch, index, loss_mask, labels


def loss_func(loss_mask: torch.Tensor, labels: torch.Tensor, targets, alpha: float, logits: torch.Tensor):
    """``(alpha * KD sum + (1 - alpha) * LM sum, loss tokens, report)`` of one micro-batch.

    loss_mask / labels: ``[b, s]``; logits: the student's ``[s, b, V/TP]``; targets: the teacher's
    ``TeacherTargets`` of the same loss-mask tokens. ``report``: ``"lm loss"`` and ``"kd loss"``,
    each ``[sum, count]`` (``metrics.reduce_lm_loss`` reduces them over micro-batches and ranks)."""
    from megatron.core import parallel_state as ps

    s, b, v = logits.shape
    if tuple(loss_mask.shape) != (b, s):
        raise ValueError(f"student logits {tuple(logits.shape)} ([s, b, V/TP]) and loss mask {tuple(loss_mask.shape)} "
                         "([b, s]) do not cover the same tokens")
    rows, weights = loss_rows(loss_mask)
    z = logits.reshape(s * b, v).index_select(0, rows)
    lab = labels.transpose(0, 1).reshape(-1).index_select(0, rows).clamp(min=0)
    kd, lm = kd_and_lm_loss(z, targets, lab, ps.get_tensor_model_parallel_group())
    kd_sum, lm_sum, count = (kd * weights).sum(), (lm * weights).sum(), weights.sum()
    total = alpha * kd_sum + (1.0 - alpha) * lm_sum
    report = {"lm loss": torch.stack([lm_sum.detach(), count]), "kd loss": torch.stack([kd_sum.detach(), count])}
    return total, count.to(torch.int), report


def forward_step(data_iterator, model, *, teacher, alpha: float, use_padding_mask: bool = True, batch_hook=None):
    """Megatron ``forward_step_func`` of the student: the teacher's targets (``teacher.targets_for``)
    and the student's logits for one micro-batch, and the loss function that combines them."""
    batch, index, loss_mask, labels = local_inputs(data_iterator, use_padding_mask, batch_hook)
    targets = teacher.targets_for(batch, index, loss_mask)
    output = model(batch, cp_index=index, return_logits=True)
    return output, functools.partial(loss_func, loss_mask, labels, targets, alpha)


def _lb_term(config, moe: dict) -> tuple[float, float]:
    """The load-balancing and z-loss terms as the total adds them: each coefficient times the sum
    over the MoE layers of the per-layer loss (``moe`` holds the mean over layers, ``metrics.moe_losses``)."""
    from multimodal_dev.metrics import num_moe_layers

    n = num_moe_layers(config)
    aux = float(config.moe_aux_loss_coeff or 0.0) * n * moe["load_balancing_loss"]
    z = float(config.moe_z_loss_coeff or 0.0) * n * moe["z_loss"]
    return aux, z


def record(teacher, losses, rec: dict, config, num_microbatches: int) -> dict:
    """The ``distill/*`` keys of an iteration (``{}`` without a teacher). Collective.

    losses: the schedule's per-micro-batch reports; rec: the iteration's record (``lm_loss``,
    ``load_balancing_loss``, ``z_loss``: the student's); config: the student's TransformerConfig."""
    if teacher is None:
        return {}
    from multimodal_dev import metrics

    kd_sum, count = metrics.reduce_lm_loss(losses, key="kd loss")
    kd, lm = kd_sum / max(count, 1.0), rec["lm_loss"]
    lb, z = _lb_term(config, rec)
    teacher_lb, _ = _lb_term(teacher.config, teacher.moe_losses(num_microbatches))
    alpha = teacher.args.alpha
    return {"distill/kd_loss": kd, "distill/lm_loss": lm, "distill/moe_lb_loss": lb,
            "distill/teacher_moe_lb_loss": teacher_lb, "distill/total_loss": alpha * kd + (1 - alpha) * lm + lb + z}
