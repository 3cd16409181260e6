"""The distillation loss on vocabulary-parallel logits: KD (+ the LM cross entropy) per token.

Per token, with student logits ``z`` and teacher logits ``u`` over the vocabulary V, temperature T:

    KD = T^2 * KL(p || q) = T^2 * sum_v p_v * (log p_v - log q_v),
    p = softmax(u / T)   (the teacher),   q = softmax(z / T)   (the student),
    LM = -log softmax(z)[label]          (the usual next-token cross entropy, T = 1).

Tensor parallelism: each rank holds its ``V/TP`` vocabulary slice of both logits (megatron's
``parallel_output``); the normalisers (row max, sum of exponentials), the label's logit and the
per-token sums are all-reduced over the TP group, as ``vocab_parallel_cross_entropy`` does.
Nothing of size V is ever gathered: what crosses ranks per token is O(1) for the full KD and
O(k * TP) for the top-k variant (its candidate logits).

Top-k (``--kd-top-k K``): the teacher's distribution is replaced by its K largest logits,
renormalised over them (``p~ = softmax(top-k(u) / T)``, zero elsewhere), and the loss is
``T^2 * KL(p~ || q)`` with the student's **full-vocabulary** ``q``:

    KD_k = T^2 * sum_{j in top-k(u)} p~_j * (log p~_j - log q_j).

Why this definition (rather than renormalising the student over the same K entries): it is the KL
between two distributions over the whole vocabulary (the truncated teacher and the student), so it
is >= 0 and tends to the full KD as K -> V; its gradient ``T * (q - p~)`` also pushes down the
student's mass outside the teacher's top-k, which a student renormalised over the K entries never
sees (it could put any mass there at zero loss). It needs the student's full normaliser, which the
vocabulary-parallel log-sum-exp gives anyway; only the teacher is truncated, which is where the
memory goes (a teacher's K logits and ids per token instead of V/TP logits).

The gradient w.r.t. the student's logits is formed analytically (``_KDAndLM.backward``):
``dKD/dz = T * (q - p)``, ``dLM/dz = softmax(z) - onehot(label)``; the teacher gets none. The KL is
summed elementwise as ``p * (log p - log q)``, so a student equal to its teacher gives exactly 0
(and an exactly zero gradient), not a rounding residue of ``lse * (1 - sum p)``.

Rows: both functions take ``[N, V/TP]`` rows, N tokens in any order (the trainer passes its
loss-mask tokens only: ``loss_rows``). N may be 0; every TP rank must hold the same rows.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["TeacherTargets", "teacher_targets", "kd_and_lm_loss", "loss_rows", "vocab_parallel_logsumexp"]


def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _tp(group)[0] > 1 and t.numel() > 0:
        dist.all_reduce(t, op=op, group=group)
    return t


def vocab_parallel_logsumexp(z: torch.Tensor, group) -> torch.Tensor:
    """``log sum_v exp(z_v)`` over the whole (TP-split) vocabulary. z: fp32 ``[N, V/TP]`` -> ``[N]``."""
    m = z.amax(dim=-1) if z.shape[-1] else z.new_full(z.shape[:-1], -float("inf"))
    m = _all_reduce(m, group, dist.ReduceOp.MAX)
    s = _all_reduce(torch.exp(z - m[:, None]).sum(dim=-1), group)
    return m + torch.log(s)


@dataclasses.dataclass
class TeacherTargets:
    """The teacher's side of the KD loss for N token rows (no gradient).

    Full distribution: ``logits`` fp ``[N, V/TP]`` (this rank's vocabulary slice, raw) and ``lse``
    fp32 ``[N]``, the log-sum-exp of ``logits / T`` over the whole vocabulary.
    Top-k: ``topk_logprobs`` fp32 ``[N, k]`` (``log p~``, renormalised over the k at temperature T)
    and ``topk_index`` long ``[N, k]`` (global vocabulary ids), the same on every TP rank.
    """

    temperature: float
    logits: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    topk_index: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return int((self.logits if self.logits is not None else self.topk_index).shape[0])


@torch.no_grad()
def teacher_targets(logits: torch.Tensor, temperature: float, top_k: Optional[int], tp_group) -> TeacherTargets:
    """The teacher's targets from its logits ``[N, V/TP]`` (this rank's vocabulary slice).

    ``top_k`` None: the full distribution (the logits are kept, plus their log-sum-exp at T).
    ``top_k`` K: each rank's K largest logits (fewer when its slice is smaller) are gathered over
    the TP group (``[N, K * TP]`` candidates, never the vocabulary) and the global K largest kept.
    """
    logits = logits.detach()
    if top_k is None:
        return TeacherTargets(temperature, logits=logits, lse=vocab_parallel_logsumexp(logits.float() / temperature,
                                                                                         tp_group))
    tp, rank = _tp(tp_group)
    n, v = logits.shape
    k_local = min(int(top_k), v)
    vals, idx = torch.topk(logits.float(), k_local, dim=-1)
    idx = idx + rank * v
    if tp > 1:
        vals_all = [torch.empty_like(vals) for _ in range(tp)]
        idx_all = [torch.empty_like(idx) for _ in range(tp)]
        if n > 0:
            dist.all_gather(vals_all, vals.contiguous(), group=tp_group)
            dist.all_gather(idx_all, idx.contiguous(), group=tp_group)
        vals, idx = torch.cat(vals_all, dim=-1), torch.cat(idx_all, dim=-1)
    k = min(int(top_k), vals.shape[-1])
    vals, pos = torch.topk(vals, k, dim=-1)
    idx = idx.gather(-1, pos)
    return TeacherTargets(temperature, topk_logprobs=torch.log_softmax(vals / temperature, dim=-1), topk_index=idx)


def _teacher_local_probs(t: TeacherTargets, shape, start: int, device) -> torch.Tensor:
    """p (or p~) on this rank's vocabulary slice: fp32 ``[N, V/TP]``."""
    if t.logits is not None:
        return torch.exp(t.logits.float() / t.temperature - t.lse[:, None])
    v = shape[1]
    local = t.topk_index - start
    owned = (local >= 0) & (local < v)
    p = torch.where(owned, torch.exp(t.topk_logprobs), 0.0)
    return torch.zeros(shape, dtype=torch.float32, device=device).scatter_add_(1, local.clamp(0, v - 1), p)


class _KDAndLM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_raw, labels, targets: TeacherTargets, tp_group):
        tp, rank = _tp(tp_group)
        n, v = z_raw.shape
        start = rank * v
        T = float(targets.temperature)
        z = z_raw.float()
        lse1 = vocab_parallel_logsumexp(z, tp_group)
        # the cross entropy: lse - z[label] (the label's logit from the rank that holds it)
        local = labels - start
        inside = (local >= 0) & (local < v)
        z_label = torch.where(inside, z.gather(1, local.clamp(0, v - 1)[:, None]).squeeze(1), 0.0)
        ce = lse1 - _all_reduce(z_label, tp_group)
        zT = z / T if T != 1.0 else z
        lseT = lse1 if T == 1.0 else vocab_parallel_logsumexp(zT, tp_group)
        if targets.logits is not None:
            logp = targets.logits.float() / T - targets.lse[:, None]
            part = (torch.exp(logp) * (logp - (zT - lseT[:, None]))).sum(dim=-1)
        else:
            li = targets.topk_index - start
            owned = (li >= 0) & (li < v)
            log_q = zT.gather(1, li.clamp(0, v - 1)) - lseT[:, None]
            logp = targets.topk_logprobs
            part = torch.where(owned, torch.exp(logp) * (logp - log_q), 0.0).sum(dim=-1)
        kd = _all_reduce(part, tp_group) * (T * T)
        ctx.save_for_backward(z_raw, labels, lse1, lseT)
        ctx.targets, ctx.start = targets, start
        return kd, ce

    @staticmethod
    def backward(ctx, dkd, dce):
        z_raw, labels, lse1, lseT = ctx.saved_tensors
        t, start = ctx.targets, ctx.start
        n, v = z_raw.shape
        T = float(t.temperature)
        z = z_raw.float()
        grad = torch.zeros((n, v), dtype=torch.float32, device=z.device)
        if dce is not None:
            q1 = torch.exp(z - lse1[:, None])
            local = labels - start
            inside = (local >= 0) & (local < v)
            q1.scatter_add_(1, local.clamp(0, v - 1)[:, None], -inside.to(q1.dtype)[:, None])
            grad += q1 * dce.float()[:, None]
        if dkd is not None:
            qT = torch.exp((z / T if T != 1.0 else z) - lseT[:, None])
            p = _teacher_local_probs(t, (n, v), start, z.device)
            grad += (qT - p) * (dkd.float() * T)[:, None]
        return grad.to(z_raw.dtype), None, None, None


def kd_and_lm_loss(student_logits: torch.Tensor, targets: TeacherTargets, labels: torch.Tensor,
                   tp_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(KD, LM)`` losses, fp32 ``[N]`` each (module docstring), differentiable in the
    student's logits.

    student_logits: ``[N, V/TP]`` this rank's vocabulary slice (any float dtype; computed in fp32);
    targets: ``teacher_targets`` of the same N rows (its temperature is the KD's);
    labels: long ``[N]`` global vocabulary ids (valid ids: pass loss tokens only).
    """
    if student_logits.dim() != 2 or labels.shape != student_logits.shape[:1]:
        raise ValueError(f"kd_and_lm_loss: logits {tuple(student_logits.shape)} must be [N, V/TP] and labels "
                         f"{tuple(labels.shape)} [N]")
    if targets.rows != student_logits.shape[0]:
        raise ValueError(f"kd_and_lm_loss: the teacher's targets have {targets.rows} rows, the student's logits "
                         f"{student_logits.shape[0]}: they must be the same tokens")
    if targets.logits is not None and targets.logits.shape != student_logits.shape:
        raise ValueError(f"kd_and_lm_loss: teacher logits {tuple(targets.logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ: teacher and student must share the vocabulary")
    return _KDAndLM.apply(student_logits, labels.long(), targets, tp_group)


def loss_rows(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the ``[s, b, ...]`` logits (flattened to ``[s * b, ...]``) that carry a loss.

    loss_mask: ``[b, s]`` (this CP rank's part). Returns ``(rows long [N], weights fp32 [N])``: the
    flat indices ``s_idx * b + b_idx`` where the mask is non-zero, and the mask's values there.
    Padding and prompt tokens (mask 0) are not rows: the KD never sees them."""
    flat = loss_mask.transpose(0, 1).reshape(-1).float()
    rows = torch.nonzero(flat, as_tuple=False).squeeze(1)
    return rows, flat.index_select(0, rows)
