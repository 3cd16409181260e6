"""``--cross-entropy-loss-fusion`` / ``--cross-entropy-fusion-impl`` (``multimodal_dev.lm_loss_flags``):
refused where they cannot work, and when given they reach megatron's ``TransformerConfig`` fields
(that the model's loss then goes through the fused function: ``test_lm_loss.py``); and
``--lm-head-all-positions`` reaches the builder."""
from __future__ import annotations

import pytest
import torch

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


def test_the_lm_head_runs_on_the_loss_rows_unless_told_every_position():
    """``--lm-head-all-positions`` reaches the builder (``BuildOptions.lm_head_loss_rows``) and the
    model; the default is the loss rows (mcore_ext.lm_head_rows; same loss: test_lm_head_rows.py)."""
    from multimodal_dev.arguments import parse_args

    on, off = parse_args(BASE, world_size=1), parse_args([*BASE, "--lm-head-all-positions"], world_size=1)
    assert on.build_options().lm_head_loss_rows is True and off.build_options().lm_head_loss_rows is False
