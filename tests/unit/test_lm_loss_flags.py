"""``--cross-entropy-loss-fusion`` / ``--cross-entropy-fusion-impl`` (``multimodal_dev.lm_loss_flags``):
refused where they cannot work, and when given, megatron-core's fused cross entropy is the one the
Qwen3.5 model's training loss goes through, with megatron's unfused loss and gradients."""
from __future__ import annotations

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed

BASE = ["--variant", "tiny", "--train-iters", "2"]


def _flags(**kw):
    import argparse

    a = dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native", chunked_lm_loss=False, bf16=True,
             distill=False)
    return argparse.Namespace(**{**a, **kw})


@pytest.mark.parametrize("kw, says", [
    (dict(chunked_lm_loss=True), "--chunked-lm-loss with --cross-entropy-loss-fusion"),
    (dict(bf16=False), "--cross-entropy-fusion-impl native casts the logits' gradient to bf16"),
    (dict(distill=True), "--cross-entropy-loss-fusion with --distill"),
])
def test_a_fusion_that_cannot_work_is_refused_naming_the_flags(kw, says):
    from multimodal_dev.argument_error import ArgumentError
    from multimodal_dev.lm_loss_flags import fusion_from_flags

    with pytest.raises(ArgumentError) as e:
        fusion_from_flags(_flags(**kw))
    assert str(e.value).startswith(says), str(e.value)


def test_the_te_fusion_needs_transformer_engine():
    from multimodal_dev.argument_error import ArgumentError
    from multimodal_dev.lm_loss_flags import fusion_from_flags
    from multimodal_dev.models.contract import te_importable

    if te_importable():
        assert fusion_from_flags(_flags(cross_entropy_fusion_impl="te", bf16=False)) == "te"
    else:
        with pytest.raises(ArgumentError, match="--cross-entropy-fusion-impl te: Transformer Engine is not importable"):
            fusion_from_flags(_flags(cross_entropy_fusion_impl="te"))


def test_the_flags_reach_megatrons_config_fields():
    """Parsed (on CPU, where --bf16 is refused, the native fusion is refused for it: the check runs
    in parse_args), then the run config's build options -> TransformerConfig fields."""
    import dataclasses

    from multimodal_dev.argument_error import ArgumentError
    from multimodal_dev.arguments import parse_args
    from multimodal_dev.lm_loss_flags import fusion_from_flags

    off = parse_args(BASE, world_size=1)
    assert off.model.cross_entropy_fusion is None and fusion_from_flags(_flags(cross_entropy_loss_fusion=False)) is None
    assert "cross_entropy_loss_fusion" not in off.build_options().config_overrides()
    if not torch.cuda.is_available():
        with pytest.raises(ArgumentError, match="needs --bf16"):
            parse_args([*BASE, "--cross-entropy-loss-fusion"], world_size=1)
    on = dataclasses.replace(off, model=dataclasses.replace(off.model, cross_entropy_fusion="native"))
    o = on.build_options().config_overrides()
    assert o["cross_entropy_loss_fusion"] is True and o["cross_entropy_fusion_impl"] == "native"


def _model_case():
    """Qwen3.5 tiny, built twice from one seed, without and with the native fusion: the fused path
    runs (and only with the option), the loss equals megatron's unfused one, and every gradient
    too up to the bf16 rounding of the logits' gradient that megatron's fused backward does."""
    import megatron.core.models.common.language_module.language_module as lm_mod
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from multimodal_dev.models import BuildOptions
    from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant
    from multimodal_dev.models.qwen35_vl.model import build_qwen35_language_model

    text, _, _ = configs_for_variant("tiny")
    g = torch.Generator().manual_seed(5)
    s = 12
    tokens = torch.randint(0, text.vocab_size, (2, s), generator=g)
    labels = torch.randint(0, text.vocab_size, (2, s), generator=g)
    pos = torch.arange(s)[None, None].expand(3, 2, s)
    weights = torch.rand(2, s, generator=g)
    calls = []
    real = lm_mod.fused_vocab_parallel_cross_entropy

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    def run(fusion):
        torch.manual_seed(7)
        model_parallel_cuda_manual_seed(7)
        opts = BuildOptions(pre_process=True, post_process=True, cross_entropy_fusion=fusion)
        model = build_qwen35_language_model(text, opts).cpu()
        assert model.config.cross_entropy_loss_fusion is (fusion is not None)
        loss = model(input_ids=tokens, position_ids=pos, attention_mask=None, labels=labels)
        (loss * weights).sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    lm_mod.fused_vocab_parallel_cross_entropy = spy
    try:
        want = run(None)
        assert not calls
        got = run("native")
        assert calls == [1], "the fused cross entropy did not run"
    finally:
        lm_mod.fused_vocab_parallel_cross_entropy = real
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert got[1].keys() == want[1].keys() and "output_layer.weight" in got[1]
    worst = 0.0
    for n in want[1]:  # the logits' gradient rounded to bf16 (8 bits: <= 2^-9 relative per entry) and carried back
        err = float((got[1][n] - want[1][n]).norm() / want[1][n].norm().clamp_min(1e-30))
        worst = max(worst, err)
        assert err <= 1e-2, (n, err)
    assert worst > 0.0  # the fused backward's bf16 rounding is there: the fused path did run the backward too
    return True


def test_qwen35_training_loss_goes_through_megatrons_fused_cross_entropy():
    assert run_distributed(_model_case, world_size=1) == [True]
