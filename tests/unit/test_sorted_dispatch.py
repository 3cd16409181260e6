"""The sync-free allgather dispatcher (``megatron.mcore_ext.sorted_dispatch``) computes what
megatron-core's ``MoEAllGatherTokenDispatcher`` computes -- the MoE layer's output and every
gradient, with padded tokens in the batch -- without an op whose output shape or value the host
must read; and nothing the grouped GEMM leaves in the buffer's unused rows reaches a result."""
from __future__ import annotations

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed

# ops that make the host wait for the device: a scalar read (.item(), int(), .tolist()) or an
# output whose size depends on the data
HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _layer_and_reference():
    from megatron.core.transformer.moe.moe_layer import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from megatron.mcore_ext.sorted_dispatch import GroupedMoELayer, SortedAllGatherTokenDispatcher
    from multimodal_dev.models import BuildOptions
    from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant
    from multimodal_dev.models.qwen35_vl.model import build_qwen35_language_model

    text, _, _ = configs_for_variant("tiny")
    lm = build_qwen35_language_model(text, BuildOptions(pre_process=True, post_process=True))
    layers = [m for m in lm.modules() if isinstance(m, GroupedMoELayer)]
    assert len(layers) == text.num_hidden_layers  # the spec put ours in every MoE layer
    assert all(isinstance(m.token_dispatcher, SortedAllGatherTokenDispatcher) for m in layers)
    layer = layers[0].cpu()  # the CPU reference kernel (on a GPU machine the model is built on the GPU)
    ours = layer.token_dispatcher
    ref = MoEAllGatherTokenDispatcher(
        layer.num_local_experts, layer.local_expert_indices, config=layer.config,
        pg_collection=get_default_pg_collection(),
    )
    return layer, ours, ref


def _run_layer(layer, dispatcher, hidden, padding_mask, weights, log=None):
    layer.token_dispatcher = dispatcher
    for p in layer.parameters():
        p.grad = None
    h = hidden.clone().requires_grad_(True)
    if log is not None:
        with log:
            out, _ = layer(h, padding_mask=padding_mask)
            (out * weights).sum().backward()
    else:
        out, _ = layer(h, padding_mask=padding_mask)
        (out * weights).sum().backward()
    grads = {k: p.grad.clone() for k, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), h.grad.clone(), grads


def _poison(experts):
    """Wrap the experts so that the buffer's unused rows come back as NaN, forward and backward."""
    forward = experts.forward

    def poisoned(x, tokens_per_expert, probs):
        n = int(torch.as_tensor(tokens_per_expert).sum())
        if x.requires_grad:
            x.register_hook(lambda g: torch.cat([g[:n], torch.full_like(g[n:], float("nan"))]))
        out, bias = forward(x, tokens_per_expert, probs)
        return torch.cat([out[:n], torch.full_like(out[n:], float("nan"))]), bias

    experts.forward = poisoned
    return lambda: setattr(experts, "forward", forward)


def _compare(seed: int):
    import torch.distributed as dist

    layer, ours, ref = _layer_and_reference()
    rank = dist.get_rank() if dist.is_initialized() else 0
    g = torch.Generator().manual_seed(seed + rank)
    s, b, H = 12, 2, layer.config.hidden_size
    hidden = torch.randn(s, b, H, generator=g)
    padding_mask = torch.zeros(b, s, dtype=torch.bool)
    padding_mask[0, 9:] = True  # the collate's padding at the end of a row
    padding_mask[1, 5:] = True
    weights = torch.randn(s, b, H, generator=g)

    ref_log, our_log = _OpLog(), _OpLog()
    want = _run_layer(layer, ref, hidden, padding_mask, weights, log=ref_log)
    got = _run_layer(layer, ours, hidden, padding_mask, weights, log=our_log)
    assert ours._sorted, "the sorted path did not run"
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == want[2].keys() and any("local_experts" in k for k in got[2])
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-5, atol=1e-6, msg=k)
    assert float(got[1][5:, 1].abs().max()) > 0  # padded tokens still get the attention-side grad
    # the detector sees megatron's host reads; ours has none, forward or backward
    assert ref_log.ops & HOST_READS, sorted(ref_log.ops)
    assert not our_log.ops & HOST_READS, sorted(our_log.ops & HOST_READS)

    # whatever the grouped GEMM leaves in the unused rows (NaN here) reaches nothing
    restore = _poison(layer.experts)
    try:
        poisoned = _run_layer(layer, ours, hidden, padding_mask, weights)
    finally:
        restore()
    torch.testing.assert_close(poisoned[0], got[0], rtol=0, atol=0)
    torch.testing.assert_close(poisoned[1], got[1], rtol=0, atol=0)
    for k in got[2]:
        torch.testing.assert_close(poisoned[2][k], got[2][k], rtol=0, atol=0, msg=k)

    # experts that cannot take the grouped path: megatron's permutation again, same numbers
    layer.experts._grouped_ok = lambda x: False
    fallback = _run_layer(layer, ours, hidden, padding_mask, weights)
    assert not ours._sorted
    torch.testing.assert_close(fallback[0], want[0], rtol=1e-5, atol=1e-6)
    return True


CPU_REFERENCE = pytest.mark.skipif(
    not hasattr(torch, "_grouped_mm"),
    reason="compares on the CPU reference kernel of torch._grouped_mm, which this torch lacks (the ranks are "
    "CPU ranks on every machine; test_sorted_dispatch_gpu_bf16_no_sync covers the GPU)",
)


@CPU_REFERENCE
def test_sorted_dispatch_equals_megatron_allgather():
    assert run_distributed(_compare, world_size=1, args=(0,)) == [True]


@CPU_REFERENCE
def test_sorted_dispatch_equals_megatron_allgather_ep2():
    """EP=2: each rank gathers every rank's tokens and runs its half of the experts; tokens routed
    only to the other rank's experts leave unused slots here."""
    assert run_distributed(_compare, world_size=2, ep=2, args=(1,)) == [True, True]


def test_padded_buffer_fallback_slices_unused_rows():
    """``GroupedGemmSequentialMLP``'s non-grouped path takes a padded buffer: the rows after the
    last expert's are left out of megatron's loop and come back as zeros."""
    assert run_distributed(_fallback, world_size=1) == [True]


def _fallback():
    from megatron.core.transformer.moe.experts import SequentialMLP

    layer, _, _ = _layer_and_reference()
    mod = layer.experts
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([2, 0, 3, 1, 0, 0, 2, 1])
    n = int(counts.sum())
    x = torch.randn(n + 5, layer.config.hidden_size, generator=g)
    probs = torch.rand(n + 5, generator=g)
    want, _ = SequentialMLP.forward(mod, x[:n], counts, probs[:n])
    mod._grouped_ok = lambda x: False
    got, _ = mod(x, counts, probs)
    assert got.shape[0] == n + 5
    torch.testing.assert_close(got[:n], want)
    assert float(got[n:].abs().max()) == 0.0
    return True


def _gpu_dispatch_and_experts():
    """On the GPU in bf16: the dispatcher and the grouped experts, with no synchronising call
    (CUDA's sync debug mode raises on one), against megatron's dispatcher."""
    layer, ours, ref = _layer_and_reference()
    layer.cuda().to(torch.bfloat16)
    T, E, k = 96, layer.config.num_moe_experts, layer.config.moe_router_topk
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(T, 1, layer.config.hidden_size, device="cuda", generator=g).bfloat16()
    logits = torch.randn(T, E, device="cuda", generator=g)
    top = logits.topk(k, dim=1).indices
    routing_map = torch.zeros(T, E, dtype=torch.bool, device="cuda").scatter_(1, top, True)
    routing_map[T - 17:] = False  # padded tokens: the padding-aware router empties their rows
    probs = torch.where(routing_map, torch.softmax(logits, -1), 0)
    weights = torch.randn(T, 1, layer.config.hidden_size, device="cuda", generator=g).bfloat16()

    def run(dispatcher, strict):
        layer.token_dispatcher = dispatcher
        for p in layer.parameters():
            p.grad = None
        h = hidden.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if strict else "default")
        try:
            x, p = dispatcher.dispatch_preprocess(h, routing_map, probs)
            x, p = dispatcher.token_dispatch(x, p)
            out, _ = layer.routed_experts_compute(x, p)
            out = dispatcher.combine_postprocess(dispatcher.token_combine(out))
            (out.float() * weights.float()).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        grads = {n: q.grad.float() for n, q in layer.experts.named_parameters() if q.grad is not None}
        return out.float(), h.grad.float(), grads

    run(ours, strict=False)  # warm-up: kernels and the allocator
    got = run(ours, strict=True)
    assert ours._sorted
    want = run(ref, strict=False)
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], want[1], rtol=2e-2, atol=2e-2)
    assert got[2].keys() == want[2].keys() and got[2]
    for n in want[2]:
        torch.testing.assert_close(got[2][n], want[2][n], rtol=2e-2, atol=2e-2, msg=n)
    with pytest.raises(RuntimeError, match="synchroniz"):  # the detector catches megatron's reads
        run(ref, strict=True)
    return True


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9 or not hasattr(torch, "_grouped_mm"),
    reason="the grouped experts' CUDA kernel needs a Hopper-or-newer GPU (and torch._grouped_mm)",
)
def test_sorted_dispatch_gpu_bf16_no_sync():
    assert run_distributed(_gpu_dispatch_and_experts, world_size=1, gpu=True) == [True]
