"""qwen35_vl tiny (and tiny-hybrid) under CP=2 (BSHD zigzag and THD) against one process, through MultimodalModel:
per-token losses, router losses (partials summed over CP), expert counts and gradients (summed
over CP ranks, which is what DDP's average times megatron's CP loss scaling amounts to)."""
import pytest
import torch

from megatron.mcore_ext.cp_split import cp_partition_index
from megatron.mcore_ext.testing import run_distributed
from test_qwen35_invariance import IMG, _samples


def _run(layout, variant="tiny"):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron.mcore_ext.router import collect_router_diagnostics
    from multimodal_dev.data import CollateConfig, pack_or_pad_batch
    from multimodal_dev.models import BuildOptions, MoEOptions, build_model

    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
    torch.manual_seed(0)  # identical initial weights on every rank and layout
    model = build_model("qwen35_vl", variant, BuildOptions(moe=MoEOptions(aux_loss_coeff=0.01, z_loss_coeff=1e-3)))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.train()
    cfg = (CollateConfig(layout="bshd", target_seqlen=32, divisible_by=4, image_token_id=IMG) if layout == "bshd"
           else CollateConfig(layout="thd", divisible_by=4, image_token_id=IMG))
    batch = pack_or_pad_batch(_samples(), cfg)
    cp, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    idx = cp_partition_index(batch, cp, r)
    losses = model(batch)  # [b, s_local]
    mask = batch["loss_mask"][..., idx]
    ((losses * mask).sum() / batch["loss_mask"].sum()).backward()
    return {
        "idx": idx,
        "losses": losses.detach(),
        "metrics": {k: e.values.clone() for k, e in get_moe_metrics_tracker().metrics.items()},
        "counts": [d["tokens_per_expert"] for d in collect_router_diagnostics(model)],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    }


@pytest.mark.parametrize("variant", ["tiny", "tiny-hybrid"])
@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_cp2_matches_one_process(layout, variant):
    """tiny-hybrid: the Gated DeltaNet layers' all-to-all (context to head parallel) composes
    with the zigzag / per-sample CP split: each head sees its whole sequence in order."""
    ref = run_distributed(_run, 1, args=(layout, variant))[0]
    res = run_distributed(_run, 2, cp=2, args=(layout, variant))
    for r in res:
        torch.testing.assert_close(r["losses"], ref["losses"][..., r["idx"]], rtol=1e-5, atol=1e-5)
        assert r["counts"] == ref["counts"]  # diagnostics are reduced over CP already
    for k, v in ref["metrics"].items():
        torch.testing.assert_close(sum(r["metrics"][k] for r in res), v, rtol=1e-5, atol=1e-7)
    for n, g in ref["grads"].items():
        torch.testing.assert_close(sum(r["grads"][n] for r in res), g, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=n: f"{layout} grad {n}: {m}")
