"""GroupedGemmSequentialMLP (two torch._grouped_mm calls) computes what megatron's SequentialMLP
loop computes: outputs and every expert's weight gradient, including experts with no tokens."""
from __future__ import annotations

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed


def _compare(seed: int):
    import torch
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron.mcore_ext.experts import GroupedGemmSequentialMLP
    from multimodal_dev.models import BuildOptions
    from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant
    from multimodal_dev.models.qwen35_vl.model import build_qwen35_language_model

    text, _, _ = configs_for_variant("tiny")
    lm = build_qwen35_language_model(text, BuildOptions(pre_process=True, post_process=True))
    experts = [m for m in lm.modules() if isinstance(m, GroupedGemmSequentialMLP)]
    assert len(experts) == text.num_hidden_layers  # the spec put ours in every MoE layer
    mod = experts[0]
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([5, 0, 3, 7, 0, 1, 4, 2])  # two experts get nothing
    n = int(counts.sum())
    x = torch.randn(n, text.hidden_size, generator=g)
    probs = torch.rand(n, generator=g)
    assert mod._grouped_ok(x)

    def run(fwd):
        for p in mod.parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        out, bias = fwd(mod, xi, counts, probs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {k: p.grad.clone() for k, p in mod.named_parameters()}
        return out.detach(), xi.grad.clone(), grads

    ref = run(SequentialMLP.forward)
    got = run(GroupedGemmSequentialMLP.forward)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert ref[2].keys() == got[2].keys()
    for k in ref[2]:
        torch.testing.assert_close(got[2][k], ref[2][k], rtol=1e-5, atol=1e-6, msg=k)
    # experts 1 and 4 got no tokens: zero grads, not garbage
    assert float(got[2]["local_experts.1.linear_fc1.weight"].abs().max()) == 0.0
    return True


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_experts_equal_sequential_mlp():
    assert run_distributed(_compare, world_size=1, args=(0,)) == [True]
