"""The grouped experts read their stacked weights in place: each expert's ``linear_fc1`` /
``linear_fc2`` weight is a view of one ``[E, out, in]`` block (``expert_weights.share_storage``), so the
forward's stack is a strided view, not a copy; when something gives a weight its own memory again
(megatron's distributed optimizer does), the forward copies as before, with the same values and
the same gradients into ``main_grad``. And inside a CUDA graph capture the stacked gradient is added
to the fp32 buffers without the separate cast, with bit-equal results."""
from __future__ import annotations

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed


def _experts_module():
    from megatron.mcore_ext.experts import GroupedGemmSequentialMLP
    from multimodal_dev.models import BuildOptions
    from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant
    from multimodal_dev.models.qwen35_vl.model import build_qwen35_language_model

    text, _, _ = configs_for_variant("tiny")
    lm = build_qwen35_language_model(text, BuildOptions(pre_process=True, post_process=True))
    return [m for m in lm.modules() if isinstance(m, GroupedGemmSequentialMLP)][0]


def _storage_and_fallback():
    import torch

    from megatron.mcore_ext import expert_weights as ew

    mod = _experts_module()
    for name in ("linear_fc1", "linear_fc2"):
        ws = [getattr(e, name).weight for e in mod.local_experts]
        assert len(ws) > 1
        # one storage, expert order, no gap
        assert len({w.untyped_storage().data_ptr() for w in ws}) == 1, name
        view = ew.stacked_view(ws)
        assert view is not None and view.data_ptr() == ws[0].data_ptr(), name
        assert torch.equal(view, torch.stack([w.detach() for w in ws]))
        # an optimizer's in-place write into one expert is what the next forward reads
        with torch.no_grad():
            ws[3].add_(1.0)
        assert torch.equal(view[3], ws[3].detach())

        # no gradient wanted (evaluation, frozen experts): read in place as well
        with torch.no_grad():
            assert ew.stacked(ws, skip_param_grad_hooks=True).data_ptr() == ws[0].data_ptr()
        for w in ws:
            w.requires_grad_(False)
        assert ew.stacked(ws).data_ptr() == ws[0].data_ptr()
        for w in ws:
            w.requires_grad_(True)
        # without main_grad (plain autograd) a copy whose gradient reaches each weight's .grad
        stacked = ew.stacked(ws)
        assert stacked.data_ptr() != ws[0].data_ptr() and stacked.requires_grad

        # the main_grad path: a view forward, every expert's gradient into its main_grad
        for w in ws:
            w.main_grad = torch.zeros_like(w, dtype=torch.float32)
            w.grad_added_to_main_grad = False
        scale = torch.randn((len(ws),) + tuple(ws[0].shape))
        stacked = ew.stacked(ws, skip_param_grad_hooks=True)
        assert stacked.data_ptr() == ws[0].data_ptr(), "the forward copied the weights"
        (stacked * scale).sum().backward()
        for i, w in enumerate(ws):
            assert torch.equal(w.main_grad, scale[i]), (name, i)
            assert w.grad is None and w.grad_added_to_main_grad

        # one weight re-homed (as megatron's distributed optimizer does to every parameter): the
        # layout check refuses the view, the forward stacks a copy, same values, same gradients
        ws[2].data = ws[2].data.clone()
        assert ew.stacked_view(ws) is None
        for w in ws:
            w.main_grad.zero_()
        stacked = ew.stacked(ws, skip_param_grad_hooks=True)
        assert stacked.data_ptr() != ws[0].data_ptr()
        assert torch.equal(stacked, torch.stack([w.detach() for w in ws]))
        (stacked * scale).sum().backward()
        for i, w in enumerate(ws):
            assert torch.equal(w.main_grad, scale[i]), (name, i)
    return True


def _moved_keeps_the_block():
    import torch

    from megatron.mcore_ext import expert_weights as ew

    mod = _experts_module()
    ws = [e.linear_fc1.weight for e in mod.local_experts]
    values = torch.stack([w.detach() for w in ws])
    mod.double()  # as .cuda() / .to() / .bfloat16(): a new tensor for every parameter, then re-formed
    ws = [e.linear_fc1.weight for e in mod.local_experts]
    view = ew.stacked_view(ws)
    assert view is not None and view.dtype == torch.float64 and view.data_ptr() == ws[0].data_ptr()
    assert torch.equal(view, values.double())
    assert ew.stacked_view([e.linear_fc2.weight for e in mod.local_experts]) is not None
    return True


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_moving_or_casting_the_experts_keeps_their_weights_in_one_block():
    assert run_distributed(_moved_keeps_the_block, world_size=1) == [True]


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_expert_weights_are_views_of_one_block_and_fall_back_to_a_copy():
    assert run_distributed(_storage_and_fallback, world_size=1) == [True]


def test_share_storage_skips_unequal_and_meta_weights():
    from megatron.mcore_ext import expert_weights as ew

    ws = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 2))]
    ptrs = [w.data_ptr() for w in ws]
    ew.share_storage(ws)
    assert [w.data_ptr() for w in ws] == ptrs and ew.stacked_view(ws) is None
    meta = [torch.nn.Parameter(torch.empty(4, 3, device="meta")) for _ in range(3)]
    ew.share_storage(meta)
    assert all(w.is_meta for w in meta)
    # views into a buffer of someone else's (megatron DDP's, distributed optimizer) are left there
    foreign = torch.zeros(100)
    owned = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    for i, w in enumerate(owned):
        w.data = foreign[40 - 12 * i:52 - 12 * i].view(4, 3)  # reverse order, as DDP lays them out
    ptrs = [w.data_ptr() for w in owned]
    ew.share_storage(owned)
    assert [w.data_ptr() for w in owned] == ptrs
    same = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    values = [w.detach().clone() for w in same]
    ew.share_storage(same)
    assert all(torch.equal(w, v) for w, v in zip(same, values))
    assert ew.stacked_view(same) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graph capture)")
def test_main_grad_add_under_capture_equals_the_cast_then_add():
    from megatron.mcore_ext import expert_weights as ew

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (6, 96, 64)
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    start = torch.randn(shape, device="cuda", generator=g)

    def weights():
        ws = [torch.nn.Parameter(torch.empty(shape[1:], device="cuda", dtype=torch.bfloat16)) for _ in range(shape[0])]
        for w, s in zip(ws, start):
            w.main_grad = s.clone()
        return ws

    eager = weights()
    ew.add_to_main_grads(eager, grad)
    graphed = weights()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        ew.add_to_main_grads(graphed, grad)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    for a, b, s in zip(eager, graphed, start):
        assert not torch.equal(a.main_grad, s)  # it did add
        assert torch.equal(a.main_grad, b.main_grad)


@pytest.mark.parametrize("form", ["eager", "graph_form"])
def test_main_grad_add_keeps_the_gradient_and_adds_it_exactly(form):
    """bf16 weights with fp32 ``main_grad`` (a GPU run's dtypes) on the hooked path (gradient
    reduction overlapped): the stack hook adds each expert's gradient into its buffer -- cast
    first, or (``graph_form``, as in a CUDA graph's warm-up and capture) converted in each add, the
    same sums either way -- and hands autograd the gradient it got, dtype and all."""
    import contextlib

    from megatron.mcore_ext import expert_weights as ew

    g = torch.Generator().manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(5, 3, generator=g).bfloat16()) for _ in range(4)]
    start = [torch.randn(5, 3, generator=g) for _ in ws]
    for w, s in zip(ws, start):
        w.main_grad = s.clone()
        w.grad_added_to_main_grad = False
    scale = torch.randn(4, 5, 3, generator=g).bfloat16()
    with ew.graph_form() if form == "graph_form" else contextlib.nullcontext():
        stacked = ew.stacked(ws)  # no skip: autograd still gives each weight its .grad
        (stacked * scale).float().sum().backward()
    for i, (w, s) in enumerate(zip(ws, start)):
        assert w.grad.dtype == torch.bfloat16 and torch.equal(w.grad, scale[i])
        assert torch.equal(w.main_grad, s + scale[i].float()), i
        assert w.grad_added_to_main_grad
