"""The LM head on the loss rows only (``megatron.mcore_ext.lm_head_rows``): Qwen3.5 tiny's masked
training loss and every gradient equal megatron-core's LM head on every position -- with the
collate's exact count, a larger bound (a cut batch), no loss position at all, the chunked loss,
and under tensor + sequence parallelism -- the output layer sees only
the bound's rows, positions without loss get 0, a bound below the mask's count makes the loss NaN,
and without a count the model keeps megatron's path and says why, once."""
from __future__ import annotations

import logging

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed


def _batch(s=12):
    """Qwen3.5 tiny's text config and 2 x ``s`` tokens: ids, labels, MRoPE positions, a loss mask
    with a prompt in each row (and the second row's last third without loss) and loss weights."""
    from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant

    text, _, _ = configs_for_variant("tiny")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, text.vocab_size, (2, s), generator=g)
    labels = torch.randint(0, text.vocab_size, (2, s), generator=g)
    pos = torch.arange(s)[None, None].expand(3, 2, s)
    mask = torch.ones(2, s)
    mask[0, :5] = 0
    mask[1, :2] = 0
    mask[1, 2 * s // 3:] = 0
    return text, tokens, labels, pos, mask, torch.rand(2, s, generator=g)


def _model(text, **options):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from multimodal_dev.models import BuildOptions
    from multimodal_dev.models.qwen35_vl.model import build_qwen35_language_model

    torch.manual_seed(11)
    model_parallel_cuda_manual_seed(11)
    return build_qwen35_language_model(text, BuildOptions(pre_process=True, post_process=True, **options)).cpu()


def _step(model, tokens, labels, pos, mask, weights, bound=None, **inputs):
    """The masked, weighted loss and every gradient; ``bound``: the host count handed to the model
    (None: megatron's LM head on every position). Also the rows the output layer saw."""
    seen = []
    hook = model.output_layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0] * a[0].shape[1]))
    model.zero_grad(set_to_none=True)
    extra = {} if bound is None else dict(loss_mask=mask, output_processor_context={"loss_rows": bound})
    try:
        loss = model(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels, **extra, **inputs)
    finally:
        hook.remove()
    (loss * mask * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, seen


def _equal(got, want, mask):
    torch.testing.assert_close(got[0] * mask, want[0] * mask, rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys() and "output_layer.weight" in got[1]
    for n in want[1]:
        torch.testing.assert_close(got[1][n], want[1][n], rtol=1e-4, atol=1e-6, msg=n)


def _one_rank_case():
    text, tokens, labels, pos, mask, weights = _batch()
    s = tokens.shape[1]
    model = _model(text)
    want = _step(model, tokens, labels, pos, mask, weights)
    assert want[2] == [2 * s]  # megatron's head: every position
    n = int(mask.sum())
    got = _step(model, tokens, labels, pos, mask, weights, bound=n)
    assert got[2] == [n], "the output layer ran on other rows than the loss rows"
    assert bool((got[0][mask == 0] == 0).all()) and bool((got[0][mask != 0] != 0).all())
    _equal(got, want, mask)
    # a larger bound (a batch cut after the collate keeps its count): dummy rows, same result
    got = _step(model, tokens, labels, pos, mask, weights, bound=n + 5)
    assert got[2] == [n + 5]
    _equal(got, want, mask)
    # the bound is clipped to the positions there are
    assert _step(model, tokens, labels, pos, mask, weights, bound=10 * s)[2] == [2 * s]
    # no position with loss: one dummy row, an all-zero loss, the gradients of megatron's head (zero)
    zero = torch.zeros_like(mask)
    want0 = _step(model, tokens, labels, pos, zero, weights)
    got0 = _step(model, tokens, labels, pos, zero, weights, bound=0)
    assert got0[2] == [1] and bool((got0[0] == 0).all())
    _equal(got0, want0, zero)
    # a bound below the mask's count: the loss is NaN, not a loss with positions left out
    short = _step(model, tokens, labels, pos, mask, weights, bound=n - 1)
    assert bool(short[0].isnan().all())
    return True


def test_loss_rows_give_megatrons_loss_and_gradients():
    assert run_distributed(_one_rank_case, world_size=1) == [True]


def _chunked_case():
    import megatron.mcore_ext.lm_loss as lm_loss_mod

    text, tokens, labels, pos, mask, weights = _batch()
    model = _model(text)
    want = _step(model, tokens, labels, pos, mask, weights)
    calls = []
    real = lm_loss_mod.chunked_lm_loss

    def spy(h, *a, **k):
        calls.append(h.shape[0] * h.shape[1])
        return real(h, *a, **k)

    lm_loss_mod.chunked_lm_loss = spy
    try:
        model.chunked_lm_loss = True
        got = _step(model, tokens, labels, pos, mask, weights, bound=int(mask.sum()))
    finally:
        lm_loss_mod.chunked_lm_loss = real
    assert calls == [int(mask.sum())], "the chunked loss did not run on the loss rows"
    _equal(got, want, mask)
    return True


def test_chunked_loss_on_the_loss_rows():
    assert run_distributed(_chunked_case, world_size=1) == [True]


def _tp_case(chunked: bool):
    """TP=2 + SP, each rank holding V/2 rows of the head and half the positions: the rows come from
    the gathered sequence, each rank hands the layer half of them (the bound rounded up to a
    multiple of 2) and the reduce-scatters bring the gradients back to each rank's positions;
    ``chunked``: the same rows through the chunked loss, which gathers them itself."""
    from megatron.core import tensor_parallel

    text, tokens, labels, pos, mask, weights = _batch()
    mask[0, 5] = 0  # an odd count: the SP rows are rounded up
    n = int(mask.sum())
    model = _model(text, sequence_parallel=True)

    def step(bound=None):  # the embeddings scattered as MultimodalModel does (the model's own are not)
        emb = tensor_parallel.scatter_to_sequence_parallel_region(model.embedding(input_ids=tokens, position_ids=pos))
        return _step(model, tokens, labels, pos, mask, weights, bound=bound, decoder_input=emb)

    want = step()  # megatron's head
    model.chunked_lm_loss = chunked
    got = step(bound=n)
    assert got[2] == ([] if chunked else [(n + 1) // 2]), got[2]  # the chunked loss hands the layer nothing
    _equal(got, want, mask)
    return True


@pytest.mark.parametrize("chunked", [False, True], ids=["head", "chunked"])
def test_loss_rows_under_tensor_and_sequence_parallelism(chunked):
    # (TP without SP: megatron-core refuses MoE training under TP without SP, so only SP is a layout)
    assert run_distributed(_tp_case, world_size=2, tp=2, args=(chunked,)) == [True, True]


def _fallback_case():
    """Where the rows path cannot run the model keeps megatron's head and says why; where it runs
    it says so; each model once."""
    text = _batch()[0]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("multimodal_dev.models.qwen35_vl.model")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    mask = torch.ones(2, 4)
    try:
        model = _model(text)
        uncounted = model._loss_rows_bound(dict(loss_mask=mask))
        again = model._loss_rows_bound(dict(loss_mask=mask, output_processor_context={"other": 1}))
        counted = model._loss_rows_bound(dict(loss_mask=mask, output_processor_context={"loss_rows": 8}))
        other = _model(text)
        first = other._loss_rows_bound(dict(loss_mask=mask, output_processor_context={"loss_rows": 5}))
        other._loss_rows_bound(dict(loss_mask=mask, output_processor_context={"loss_rows": 6}))
        other.lm_head_loss_rows = False  # --lm-head-all-positions: megatron's head, nothing to say
        off = other._loss_rows_bound(dict(loss_mask=mask, output_processor_context={"loss_rows": 8}))
    finally:
        log.removeHandler(handler)
    said = [r.getMessage() for r in records]
    assert (uncounted, again, counted, first, off) == (None, None, 8, 5, None)
    assert len(said) == 2, said
    assert "on every position" in said[0] and "'loss_tokens'" in said[0], said
    assert "with loss only" in said[1] and "at most 5 of 8" in said[1], said
    return True


def test_the_log_says_once_which_head_runs_and_without_a_count_why_megatrons():
    assert run_distributed(_fallback_case, world_size=1) == [True]


def _gpu_case():
    """On the GPU, bf16 with TE's fused cross entropy where TE is there: the rows path gives the
    full head's masked loss and gradients, and its forward and backward make the host wait for nothing."""
    text, tokens, labels, pos, mask, weights = (t.cuda() if torch.is_tensor(t) else t for t in _batch(64))
    fusion = None
    try:
        import transformer_engine  # noqa: F401

        fusion = "te"
    except ImportError:
        pass
    model = _model(text, bf16=True, cross_entropy_fusion=fusion).cuda()
    want = _step(model, tokens, labels, pos, mask, weights)
    n = int(mask.sum())
    from megatron.mcore_ext.lm_head_rows import loss_rows_lm_loss

    def plain_ce(y, logits):  # [1, rows], [rows, 1, V]: a stand-in without host reads (megatron's and
        # TE's cross entropies read the device themselves), so that the check is of the rows path
        return torch.nn.functional.cross_entropy(logits[:, 0].float(), y[0], reduction="none")[None]

    hidden = torch.randn(tokens.shape[1], 2, text.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for debug in (0, "error"):  # once, so that no first-use work runs under the check, then checked
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(debug)
        try:
            rows = loss_rows_lm_loss(hidden, labels, mask, n, output_layer=model.output_layer, output_weight=None,
                                     compute_language_model_loss=plain_ce)
            (rows * weights).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    got = _step(model, tokens, labels, pos, mask, weights, bound=n)
    assert got[2] == [n]
    torch.testing.assert_close(got[0] * mask, want[0] * mask, rtol=2e-2, atol=2e-2)
    for name in want[1]:  # bf16: the GEMMs of n rows and of every row may round differently
        err = float((got[1][name] - want[1][name]).float().norm() / want[1][name].float().norm().clamp_min(1e-30))
        assert err <= 2e-2, (name, err)
    return True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 / TE / host-sync check of the rows path is "
                    "for the GPU machine (scripts/gpu/hybrid_checks.sh units)")
def test_loss_rows_on_the_gpu():
    assert run_distributed(_gpu_case, world_size=1, gpu=True) == [True]
