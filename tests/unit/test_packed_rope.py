"""THD RoPE in one pass (megatron.mcore_ext.packed_rope) equals megatron-core's per-sample THD RoPE.

The same tiny qwen35_vl model and packed image+text batch run twice: once through our path
(``PackedRopeSelfAttention`` hands the per-token angles to the core attention) and once with that
path switched off, so megatron's ``_apply_rotary_pos_emb_thd`` (a host read of ``cu_seqlens`` and a
loop over the packed samples) does the rotation. Losses and every gradient agree, and a spy on
megatron's function shows which path ran (so the comparison cannot pass by running one path twice).
"""
import pytest
import torch

from megatron.mcore_ext.testing import run_distributed
from test_qwen35_invariance import IMG, _samples


def _run(use_ours: bool):
    import megatron.core.models.common.embeddings.rope_utils as rope_utils
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron.mcore_ext.packed_rope import PackedRopeSelfAttention, takes_local_thd_angles
    from multimodal_dev.data import CollateConfig, pack_or_pad_batch
    from multimodal_dev.models import BuildOptions, MoEOptions, build_model

    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
    torch.manual_seed(0)
    model = build_model("qwen35_vl", "tiny", BuildOptions(moe=MoEOptions(aux_loss_coeff=0.01)))
    assert takes_local_thd_angles(model.language_model)
    model.train()
    batch = pack_or_pad_batch(_samples(), CollateConfig(layout="thd", divisible_by=4, image_token_id=IMG))
    assert batch["cu_seqlens"].numel() >= 4  # three packed samples: the per-sample loop matters

    calls = []
    orig_thd = rope_utils._apply_rotary_pos_emb_thd

    def spy(*a, **k):
        calls.append(1)
        return orig_thd(*a, **k)

    rope_utils._apply_rotary_pos_emb_thd = spy
    orig_applies = PackedRopeSelfAttention._packed_rope_applies
    if not use_ours:
        PackedRopeSelfAttention._packed_rope_applies = lambda self, *a: False
    try:
        losses = model(batch)
        (losses * batch["loss_mask"]).sum().backward()
    finally:
        rope_utils._apply_rotary_pos_emb_thd = orig_thd
        PackedRopeSelfAttention._packed_rope_applies = orig_applies
    return {
        "megatron_thd_rope_calls": len(calls),
        "losses": losses.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    }


def test_packed_rope_equals_megatron_thd_rope():
    ours = run_distributed(_run, 1, args=(True,))[0]
    ref = run_distributed(_run, 1, args=(False,))[0]
    layers = 2  # tiny: q and k in each layer
    assert ours["megatron_thd_rope_calls"] == 0
    assert ref["megatron_thd_rope_calls"] == 2 * layers
    torch.testing.assert_close(ours["losses"], ref["losses"], rtol=1e-6, atol=1e-6)
    assert ours["grads"].keys() == ref["grads"].keys()
    for n, g in ref["grads"].items():
        torch.testing.assert_close(ours["grads"][n], g, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"grad {n}: {m}")


def test_other_specs_keep_megatron_layout():
    """A module with megatron's own SelfAttention (or none) keeps the global THD angle layout."""
    from megatron.core.transformer.attention import SelfAttention

    from megatron.mcore_ext.packed_rope import takes_local_thd_angles

    assert not takes_local_thd_angles(torch.nn.Linear(2, 2))
    plain = SelfAttention.__new__(SelfAttention)
    torch.nn.Module.__init__(plain)
    assert not takes_local_thd_angles(torch.nn.Sequential(plain))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot,mscale", [(16, 1.0), (64, 1.0), (16, 0.7)], ids=["partial", "full", "mscale"])
def test_fused_rotation_is_bit_equal_to_megatron(dtype, interleaved, rot, mscale):
    """``apply_packed_rope`` (tables + ``_Rope``) against megatron's ``_apply_rotary_pos_emb_bshd``:
    the same products and sums in the same dtype, so values and input gradients are bit-equal."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron.mcore_ext import packed_rope

    g = torch.Generator().manual_seed(3)
    T, H, D = 37, 3, 64
    freqs = torch.rand(T, 1, 1, rot, generator=g) * 50  # angles per token, fp32 as the model makes them
    t = torch.randn(T, H, D, generator=g).to(dtype)
    up = torch.randn(T, H, D, generator=g).to(dtype)
    ta, tb = t.clone().requires_grad_(), t.clone().requires_grad_()
    ours = packed_rope.apply_packed_rope(ta, freqs, interleaved, mscale)
    ref = _apply_rotary_pos_emb_bshd(tb.unsqueeze(1), freqs, rotary_interleaved=interleaved, mscale=mscale).squeeze(1)
    assert torch.equal(ours, ref)
    (ours * up).sum().backward()
    (ref * up).sum().backward()
    assert torch.equal(ta.grad, tb.grad)
    # the second call with the same angles (the next layer, or the key) reuses the tables
    tables = packed_rope._TABLES["entry"][2]
    packed_rope.apply_packed_rope(t, freqs, interleaved, mscale)
    assert packed_rope._TABLES["entry"][2] is tables
    freqs.mul_(1.0)  # an in-place change (version bump): rebuilt, not reused stale
    packed_rope.apply_packed_rope(t, freqs, interleaved, mscale)
    assert packed_rope._TABLES["entry"][2] is not tables
