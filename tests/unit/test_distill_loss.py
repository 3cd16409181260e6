"""The distillation loss (``multimodal_dev.distill.loss``) against a hand-written fp64 reference.

Random student and teacher logits over a vocabulary of 24, 9 tokens. The reference is written
here from the definitions, in float64, over the whole vocabulary in one process:

    KD   = T^2 * sum_v p_v (log p_v - log q_v),  p = softmax(u / T), q = softmax(z / T)
    KD_k = T^2 * sum_{j in top-k(u)} p~_j (log p~_j - log q_j),  p~ = softmax(top-k(u) / T)
           (the teacher renormalised over its k largest logits; q the student's full softmax)
    LM   = cross entropy of softmax(z) at the label

and its gradient w.r.t. the student's logits comes from autograd of the weighted sum. The code
under test runs in fp32 with the vocabulary split over TP = 2 gloo ranks (each rank its 12
columns; the gradients are put back together) and in one process; temperatures 1 and 2; top-k
with k below and above a rank's slice (5 and 15) and k = V (which must equal the full KD).
Also: a student equal to its teacher gives exactly 0 and an exactly zero gradient; no collective
carries more than k values per token (never the vocabulary); zero rows work under TP; the
trainer's loss function (``step.loss_func``) takes the loss-mask tokens only (NaN logits at
padding / prompt positions change nothing and get a zero gradient).
"""
from __future__ import annotations

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed
from multimodal_dev.distill.loss import kd_and_lm_loss, loss_rows, teacher_targets

V, N = 24, 9
CASES = [(1.0, None), (2.0, None), (1.0, 5), (2.0, 5), (2.0, 15), (1.0, V)]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    u = torch.randn(N, V, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, V, (N,), generator=g)
    w_kd = torch.rand(N, generator=g, dtype=torch.float64)
    w_lm = torch.rand(N, generator=g, dtype=torch.float64)
    return z, u, labels, w_kd, w_lm


def _reference(z, u, labels, w_kd, w_lm, T, k):
    z = z.clone().requires_grad_(True)
    log_q = torch.log_softmax(z / T, dim=-1)
    if k is None:
        log_p = torch.log_softmax(u / T, dim=-1)
        kd = T * T * (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        top, idx = torch.topk(u, k, dim=-1)
        log_p = torch.log_softmax(top / T, dim=-1)
        kd = T * T * (log_p.exp() * (log_p - log_q.gather(1, idx))).sum(-1)
    lm = torch.nn.functional.cross_entropy(z, labels, reduction="none")
    (grad,) = torch.autograd.grad((w_kd * kd).sum() + (w_lm * lm).sum(), z)
    return kd.detach(), lm.detach(), grad


def _ours(z, u, labels, w_kd, w_lm, T, k, group=None, rank=0, tp=1):
    """One rank's view: its vocabulary slice of both logits, fp32."""
    v = V // tp
    cols = slice(rank * v, (rank + 1) * v)
    zs = z[:, cols].float().clone().requires_grad_(True)
    targets = teacher_targets(u[:, cols].float(), T, k, group)
    kd, lm = kd_and_lm_loss(zs, targets, labels, group)
    ((w_kd.float() * kd).sum() + (w_lm.float() * lm).sum()).backward()
    return kd.detach(), lm.detach(), zs.grad


def _tp_body(cases):
    """On each of the TP = 2 ranks: every case, plus the collectives' sizes, a student equal to its
    teacher, and zero rows."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    sizes = []
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def reduce(t, *a, **kw):
        sizes.append(t.numel())
        return real_reduce(t, *a, **kw)

    def gather(out, t, *a, **kw):
        sizes.append(t.numel())
        return real_gather(out, t, *a, **kw)

    data = _data()
    out = {"cases": {}}
    dist.all_reduce, dist.all_gather = reduce, gather
    try:
        for T, k in cases:
            sizes.clear()
            out["cases"][(T, k)] = (*_ours(*data, T, k, group, rank, tp=2), max(sizes))
        z, _, labels, w_kd, w_lm = data
        out["same"] = [_ours(z, z, labels, w_kd, torch.zeros_like(w_lm), T, None, group, rank, tp=2)
                       for T in (1.0, 2.0)]
        empty = torch.zeros(0, V // 2, requires_grad=True)
        t = teacher_targets(torch.zeros(0, V // 2), 1.0, 3, group)
        kd, lm = kd_and_lm_loss(empty, t, torch.zeros(0, dtype=torch.long), group)
        (kd.sum() + lm.sum()).backward()
        out["empty"] = (tuple(kd.shape), tuple(empty.grad.shape))
    finally:
        dist.all_reduce, dist.all_gather = real_reduce, real_gather
    return out


@pytest.fixture(scope="module")
def tp2():
    return run_distributed(_tp_body, 2, tp=2, args=(CASES,))


@pytest.mark.parametrize("T, k", CASES)
def test_matches_the_fp64_reference_with_the_vocabulary_split_over_tp2(tp2, T, k):
    ref_kd, ref_lm, ref_grad = _reference(*_data(), T, k)
    (kd0, lm0, g0, _), (kd1, lm1, g1, _) = (r["cases"][(T, k)] for r in tp2)
    for kd, lm in ((kd0, lm0), (kd1, lm1)):  # every TP rank holds the whole per-token loss
        torch.testing.assert_close(kd.double(), ref_kd, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm.double(), ref_lm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([g0, g1], dim=1).double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert (ref_kd > 0.05).all()  # the distributions differ: the comparison is not of zeros


@pytest.mark.parametrize("T, k", CASES)
def test_matches_the_fp64_reference_in_one_process(T, k):
    ref_kd, ref_lm, ref_grad = _reference(*_data(1), T, k)
    kd, lm, grad = _ours(*_data(1), T, k)
    torch.testing.assert_close(kd.double(), ref_kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lm.double(), ref_lm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def test_top_k_of_the_whole_vocabulary_is_the_full_kd_and_a_smaller_k_is_not():
    full, all_k, five = (_ours(*_data(2), 2.0, k)[0] for k in (None, V, 5))
    torch.testing.assert_close(all_k, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(five, full, rtol=1e-3, atol=1e-3)


def test_no_collective_carries_the_vocabulary(tp2):
    """Full KD: per-token scalars only (N values a call); top-k: the k candidates per token of each
    rank (N * min(k, V/TP) values), never the V/TP logits of a token."""
    for (T, k), r in tp2[0]["cases"].items():
        expected = N if k is None else N * min(k, V // 2)
        assert r[3] == expected, ((T, k), r[3], expected)


def test_a_student_equal_to_its_teacher_gives_exactly_zero_loss_and_gradient(tp2):
    for rank in tp2:
        for kd, _, grad in rank["same"]:  # T = 1 and 2; the LM weight is 0
            assert torch.equal(kd, torch.zeros_like(kd))
            assert torch.equal(grad, torch.zeros_like(grad))


def test_zero_rows_work_under_tp(tp2):
    assert [r["empty"] for r in tp2] == [((0,), (0, V // 2))] * 2


def test_loss_rows_are_the_loss_mask_tokens_in_logits_order():
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.5]])  # [b=2, s=3]
    rows, weights = loss_rows(mask)
    # logits [s, b, V] flattened: row = s_idx * b + b_idx
    # (s, b) = (0, 1), (1, 0), (2, 0), (2, 1): the non-zero entries mask[b, s]
    assert rows.tolist() == [0 * 2 + 1, 1 * 2 + 0, 2 * 2 + 0, 2 * 2 + 1]
    assert weights.tolist() == [1.0, 1.0, 1.0, 0.5]


def _loss_func_with_nan_outside_the_mask():
    """``step.loss_func`` on [s, b, V] logits whose loss-mask-0 tokens (padding, prompt) are NaN."""
    from multimodal_dev.distill.step import loss_func

    g = torch.Generator().manual_seed(3)
    s, b = 5, 2
    z = torch.randn(s, b, V, generator=g, dtype=torch.float64)
    u = torch.randn(s, b, V, generator=g, dtype=torch.float64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0]])  # [b, s]
    labels = torch.randint(0, V, (b, s), generator=g)
    labels[mask == 0] = -100
    rows, _ = loss_rows(mask)
    targets = teacher_targets(u.float().reshape(-1, V).index_select(0, rows), 2.0, None, None)
    student = z.float().clone()
    student[(mask == 0).t()] = float("nan")
    student.requires_grad_(True)
    total, count, report = loss_func(mask, labels, targets, 0.3, student)
    total.backward()
    keep = (mask != 0).t()  # [s, b]
    ref_kd, ref_lm, _ = _reference_rows(z[keep], u[keep], labels.t()[keep])
    return dict(total=float(total), count=int(count), report={k: v.tolist() for k, v in report.items()},
                want=float(0.3 * ref_kd.sum() + 0.7 * ref_lm.sum()), want_kd=float(ref_kd.sum()),
                want_lm=float(ref_lm.sum()), grad_outside=student.grad[~keep], grad_inside=student.grad[keep])


def _reference_rows(z, u, labels, T=2.0):
    n = z.shape[0]
    ones = torch.ones(n, dtype=torch.float64)
    return _reference(z, u, labels, ones, ones, T, None)


def test_the_loss_function_sees_only_loss_mask_tokens():
    r = run_distributed(_loss_func_with_nan_outside_the_mask, 1)[0]
    assert r["count"] == 5
    assert r["total"] == pytest.approx(r["want"], rel=1e-5)
    assert r["report"]["kd loss"] == pytest.approx([r["want_kd"], 5.0], rel=1e-5)
    assert r["report"]["lm loss"] == pytest.approx([r["want_lm"], 5.0], rel=1e-5)
    assert torch.equal(r["grad_outside"], torch.zeros_like(r["grad_outside"]))  # NaN there never reached the loss
    assert torch.isfinite(r["grad_inside"]).all() and r["grad_inside"].abs().sum() > 0
