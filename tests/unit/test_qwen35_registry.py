"""The model registry and the --transformer-impl choice for qwen35_vl."""
import importlib.util

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed
from multimodal_dev.models import available_architectures, build_model
from multimodal_dev.models.contract import resolve_transformer_impl, transformer_impl_choice

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None


def test_registry_lists_qwen35_and_rejects_unknown():
    assert "qwen35_vl" in available_architectures()
    with pytest.raises(ValueError, match="--model-arch 'nope' is unknown"):
        build_model("nope", "tiny")


def test_transformer_impl_resolution():
    assert resolve_transformer_impl("local") == "local"
    assert resolve_transformer_impl("auto") == "local"  # measured faster than TE (docs/performance.md)
    impl, why = transformer_impl_choice("auto")
    assert impl == "local" and ("measured faster" in why if HAVE_TE else "not importable" in why), why
    assert transformer_impl_choice("local") == ("local", "transformer impl: local (asked for)")
    with pytest.raises(ValueError, match="must be auto, local or transformer_engine"):
        resolve_transformer_impl("fast")
    if not HAVE_TE:
        with pytest.raises(ValueError, match="Transformer Engine is not importable"):
            resolve_transformer_impl("transformer_engine")


def _tiny_image_text():
    from multimodal_dev.data import CollateConfig, pack_or_pad_batch

    g = torch.Generator().manual_seed(0)
    toks = [1, 2, 3, 248] + [250] * 6 + [249, 4, 5, 6]
    s = {"tokens": torch.tensor(toks), "labels": torch.tensor(toks[1:] + [-100]),
         "pixel_values": torch.randn(24, 96, generator=g), "image_grid_thw": torch.tensor([[1, 4, 6]])}
    out = {}
    for layout in ("bshd", "thd"):
        cfg = CollateConfig(layout=layout, target_seqlen=16 if layout == "bshd" else None, divisible_by=4,
                            image_token_id=250)
        text_only = {"tokens": torch.tensor([7, 8, 9, 10, 11]), "labels": torch.tensor([8, 9, 10, 11, -100])}
        b = pack_or_pad_batch([s, text_only], cfg)
        m = build_model("qwen35_vl", "tiny")
        torch.manual_seed(0)
        losses = m(b)
        (losses * b["loss_mask"]).sum().backward()
        out[layout] = (losses.detach(), b["padding_mask"], all(p.grad is not None for p in m.parameters()))
    return out


def test_tiny_builds_and_trains_a_step_in_both_layouts():
    out = run_distributed(_tiny_image_text, 1)[0]
    for layout, (losses, pad, all_grads) in out.items():
        assert torch.isfinite(losses).all(), layout
        assert all_grads, f"{layout}: some parameter got no gradient"
