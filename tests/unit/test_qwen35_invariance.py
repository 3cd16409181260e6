"""qwen35_vl tiny, one process: padding and layout invariance of the whole model (docs/invariants.md, 1-2).

The same image+text samples as BSHD (padded), THD without padding and THD padded to a multiple of
8 give the same masked LM loss, the same recorded router losses (aux and z) and expert counts, and
the same gradients for every parameter (vision tower included).
"""
import pytest
import torch

from megatron.mcore_ext.testing import run_distributed

IMG = 250


def _samples():
    g = torch.Generator().manual_seed(5)
    a_tok = [1, 2, 3, 248] + [IMG] * 6 + [249, 4, 5, 6, 7]
    b_tok = [9, 8, 248] + [IMG] * 4 + [249, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    c_tok = [21, 22, 23, 24, 25]
    out = []
    for toks, grids in ((a_tok, [[1, 4, 6]]), (b_tok, [[1, 4, 4]]), (c_tok, None)):
        labels = torch.tensor(toks[1:] + [-100])
        labels[:3] = -100  # prompt
        labels[torch.tensor(toks) == IMG] = -100
        s = {"tokens": torch.tensor(toks), "labels": labels}
        if grids:
            n = sum(t * h * w for t, h, w in grids)
            s.update(pixel_values=torch.randn(n, 96, generator=g), image_grid_thw=torch.tensor(grids))
        out.append(s)
    return out


def _run_layouts(variant="tiny"):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron.mcore_ext.router import collect_router_diagnostics
    from multimodal_dev.data import CollateConfig, pack_or_pad_batch
    from multimodal_dev.models import BuildOptions, MoEOptions, build_model

    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
    model = build_model("qwen35_vl", variant, BuildOptions(moe=MoEOptions(aux_loss_coeff=0.01, z_loss_coeff=1e-3)))
    with torch.no_grad():  # non-trivial norms (zero-centred weights start at 0)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.train()
    configs = {
        "bshd32": CollateConfig(layout="bshd", target_seqlen=32, image_token_id=IMG),
        "thd": CollateConfig(layout="thd", image_token_id=IMG),
        "thd8": CollateConfig(layout="thd", divisible_by=8, image_token_id=IMG),
    }
    out = {}
    for name, cfg in configs.items():
        batch = pack_or_pad_batch(_samples(), cfg)
        model.zero_grad(set_to_none=True)
        get_moe_metrics_tracker().clear()
        losses = model(batch)
        mask = batch["loss_mask"]
        lm = (losses * mask).sum() / mask.sum()
        lm.backward()
        metrics = {k: e.values.clone() for k, e in get_moe_metrics_tracker().metrics.items()}
        out[name] = {
            "lm": float(lm.detach()),
            "metrics": metrics,
            "diag": collect_router_diagnostics(model),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            "padding": int(batch["padding_mask"].sum()),
        }
    return out


@pytest.mark.parametrize("variant", ["tiny", "tiny-hybrid"])
def test_padding_and_layout_invariance_whole_model(variant):
    """tiny-hybrid: Gated DeltaNet layers see neither the BSHD padding tails nor, packed, the
    other samples (their state and conv window reset at every sample)."""
    out = run_distributed(_run_layouts, 1, args=(variant,))[0]
    ref = out["thd"]
    assert ref["padding"] == 0 and out["bshd32"]["padding"] > 40 and out["thd8"]["padding"] > 0
    assert set(ref["metrics"]) == {"load_balancing_loss", "z_loss"}
    for name in ("bshd32", "thd8"):
        o = out[name]
        assert abs(o["lm"] - ref["lm"]) < 1e-5 * abs(ref["lm"]), name
        for k, v in ref["metrics"].items():
            torch.testing.assert_close(o["metrics"][k], v, rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{name} {k}: {m}")
        assert [d["tokens_per_expert"] for d in o["diag"]] == [d["tokens_per_expert"] for d in ref["diag"]]
        assert set(o["grads"]) == set(ref["grads"])
        for n, g in ref["grads"].items():
            torch.testing.assert_close(o["grads"][n], g, rtol=1e-4, atol=1e-7, msg=lambda m, n=n: f"{name} grad {n}: {m}")
    # every parameter, vision tower included, got a gradient
    assert any(n.startswith("vision_encoder.") for n in ref["grads"])
