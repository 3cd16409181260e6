"""The chunked LM-head cross entropy (``megatron.mcore_ext.lm_loss``) gives megatron-core's loss and
gradients -- its output layer + ``vocab_parallel_cross_entropy`` -- on one rank and under tensor
parallelism (with and without sequence parallelism), whatever the chunking; and the Qwen3.5 model
takes it for training losses only. Also: with ``--cross-entropy-loss-fusion``'s option the model's
loss goes through megatron-core's fused cross entropy (``native`` on CPU, ``te`` on the GPU machine),
with the unfused loss and gradients."""
from __future__ import annotations

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed

S, B, H, V = 10, 3, 16, 40


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 0] = V + 3  # out of the vocabulary: megatron counts a zero target logit
    dloss = torch.rand(B, S, generator=g, dtype=torch.float64)
    return hidden, weight, labels, dloss


def _reference(hidden, weight, labels, dloss):
    """The loss and its gradients written out from the formula, in float64."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logits = torch.einsum("sbh,vh->bsv", h, w)
    lse = torch.logsumexp(logits, -1)
    inside = labels < V
    target = torch.where(inside, logits.gather(-1, labels.clamp(max=V - 1)[..., None])[..., 0], 0.0)
    loss = lse - target
    (loss * dloss).sum().backward()
    return loss.detach(), h.grad, w.grad


def test_chunked_loss_matches_formula_for_any_chunking():
    from megatron.mcore_ext.lm_loss import chunked_lm_loss

    hidden, weight, labels, dloss = _data()
    want = _reference(hidden, weight, labels, dloss)
    for chunk in (1, 4, 7, S * B, 1000):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss = chunked_lm_loss(h, w, labels, chunk_tokens=chunk)
        assert loss.shape == (B, S) and loss.dtype == torch.float32
        (loss.double() * dloss).sum().backward()
        torch.testing.assert_close(loss.double(), want[0], rtol=1e-6, atol=1e-6, msg=f"chunk {chunk}")
        torch.testing.assert_close(h.grad, want[1], rtol=1e-6, atol=1e-6, msg=f"chunk {chunk}")
        torch.testing.assert_close(w.grad, want[2], rtol=1e-6, atol=1e-6, msg=f"chunk {chunk}")


def _tp_case(sequence_parallel: bool):
    """Each TP rank holds V/TP weight rows (and S/TP positions under SP): its loss equals the
    whole-vocabulary loss; its input gradient (gathered back under SP) and its weight rows'
    gradient equal the reference slices."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron.mcore_ext.lm_loss import chunked_lm_loss

    hidden, weight, labels, dloss = _data(1)
    want = _reference(hidden, weight, labels, dloss)
    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    rows = slice(r * V // tp, (r + 1) * V // tp)
    h_full = hidden.float()
    h_in = h_full.chunk(tp, dim=0)[r].clone() if sequence_parallel else h_full.clone()
    h_in.requires_grad_(True)
    w = weight.float()[rows].clone().requires_grad_(True)
    loss = chunked_lm_loss(h_in, w, labels, tp_group=ps.get_tensor_model_parallel_group(),
                           sequence_parallel=sequence_parallel, chunk_tokens=7)
    (loss * dloss.float()).sum().backward()
    torch.testing.assert_close(loss.double(), want[0], rtol=1e-5, atol=1e-5)
    want_h = want[1].chunk(tp, dim=0)[r] if sequence_parallel else want[1]
    torch.testing.assert_close(h_in.grad.double(), want_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), want[2][rows], rtol=1e-5, atol=1e-5)
    assert dist.get_world_size() == tp
    return True


def test_chunked_loss_tensor_parallel():
    assert run_distributed(_tp_case, world_size=2, tp=2, args=(False,)) == [True, True]


def test_chunked_loss_tensor_and_sequence_parallel():
    assert run_distributed(_tp_case, world_size=2, tp=2, args=(True,)) == [True, True]


def _tiny_batch(s=12):
    """Qwen3.5 tiny's text config and a batch of 2 x ``s`` tokens: ids, labels, MRoPE positions and
    per-token loss weights."""
    from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant

    text, _, _ = configs_for_variant("tiny")
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, text.vocab_size, (2, s), generator=g)
    labels = torch.randint(0, text.vocab_size, (2, s), generator=g)
    pos = torch.arange(s)[None, None].expand(3, 2, s)
    return text, tokens, labels, pos, torch.rand(2, s, generator=g)


def _spy(module, name, calls):
    """Replace ``module.name`` by a wrapper that counts its calls into ``calls``; returns the original."""
    real = getattr(module, name)

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    setattr(module, name, spy)
    return real


def _model_case():
    """Qwen3.5 tiny: the training loss and every gradient equal megatron's output layer + vocab
    cross entropy; the logits path (no labels) is untouched."""
    import megatron.mcore_ext.lm_loss as lm_loss_mod
    from multimodal_dev.models import BuildOptions
    from multimodal_dev.models.qwen35_vl.model import build_qwen35_language_model

    text, tokens, labels, pos, weights = _tiny_batch()
    s = tokens.shape[1]
    model = build_qwen35_language_model(text, BuildOptions(pre_process=True, post_process=True)).cpu()
    calls = []
    real = _spy(lm_loss_mod, "chunked_lm_loss", calls)

    def run(chunked):
        model.chunked_lm_loss = chunked
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels)
        (loss * weights).sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        want = run(False)
        assert not calls
        got = run(True)
        assert calls, "the chunked loss did not run"
        logits = model(input_ids=tokens, position_ids=pos, attention_mask=None)
    finally:
        lm_loss_mod.chunked_lm_loss = real
    assert logits.shape == (2, s, text.vocab_size) and len(calls) == 1  # no labels: logits, as ever
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == want[1].keys() and "output_layer.weight" in got[1]
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-4, atol=1e-6, msg=n)
    return True


def test_qwen35_training_loss_goes_through_the_chunked_head():
    assert run_distributed(_model_case, world_size=1) == [True]


def _fused_case(impl: str = "native"):
    """Qwen3.5 tiny (fp32), built twice from one seed, without and with megatron-core's fused cross
    entropy ``impl`` (``BuildOptions.cross_entropy_fusion``, from ``--cross-entropy-loss-fusion
    --cross-entropy-fusion-impl``): the fused function runs (and only with the option), the loss
    equals the unfused one, every gradient too -- up to the bf16 rounding of the logits' gradient
    that ``native``'s backward does; ``te`` (Transformer Engine's Triton kernel, on the GPU) keeps
    the logits' dtype."""
    import megatron.core.models.common.language_module.language_module as lm_mod
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from multimodal_dev.models import BuildOptions
    from multimodal_dev.models.qwen35_vl.model import build_qwen35_language_model

    text, tokens, labels, pos, weights = _tiny_batch()
    dev = "cuda" if impl == "te" else "cpu"
    tokens, labels, pos, weights = (t.to(dev) for t in (tokens, labels, pos, weights))

    def run(fusion):
        torch.manual_seed(7)
        model_parallel_cuda_manual_seed(7)
        opts = BuildOptions(pre_process=True, post_process=True, cross_entropy_fusion=fusion)
        model = build_qwen35_language_model(text, opts).to(dev)
        assert model.config.cross_entropy_loss_fusion is (fusion is not None)
        loss = model(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels)
        (loss * weights).sum().backward()
        return loss.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    name = {"native": "fused_vocab_parallel_cross_entropy", "te": "te_parallel_cross_entropy"}[impl]
    real = _spy(lm_mod, name, calls)
    try:
        want = run(None)
        assert not calls
        got = run(impl)
        assert calls == [1], "the fused cross entropy did not run"
    finally:
        setattr(lm_mod, name, real)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5 if impl == "te" else 1e-6, atol=1e-5 if impl == "te" else 1e-6)
    assert got[1].keys() == want[1].keys() and "output_layer.weight" in got[1]
    worst = 0.0
    for n in want[1]:  # native: the logits' gradient rounded to bf16 (<= 2^-9 relative per entry) and carried back
        err = float((got[1][n] - want[1][n]).norm() / want[1][n].norm().clamp_min(1e-30))
        worst = max(worst, err)
        assert err <= (1e-3 if impl == "te" else 1e-2), (n, err)
    if impl == "native":
        assert worst > 0.0  # the fused backward's bf16 rounding is there: its backward ran too (seen: 2.2e-3)
    return True


def test_qwen35_training_loss_goes_through_megatrons_fused_cross_entropy():
    assert run_distributed(_fused_case, world_size=1) == [True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine's fused cross entropy is a GPU "
                    "(Triton) kernel: GPU machine only")
def test_qwen35_training_loss_goes_through_tes_fused_cross_entropy():
    pytest.importorskip("transformer_engine", reason="Transformer Engine is not installed (an optional accelerator)")
    assert run_distributed(_fused_case, world_size=1, gpu=True, args=("te",)) == [True]
