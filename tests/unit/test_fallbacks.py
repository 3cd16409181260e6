"""The foreach stand-ins compute what megatron-core's apex-free fallbacks compute."""
import torch

from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale

from megatron.mcore_ext.fallbacks import foreach_l2_norm, foreach_scale


def test_l2_norm_equals_megatron_local_fallback():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g) for s in ((3, 4), (7,), (2, 2, 5), (1,))]
    ours, _ = foreach_l2_norm(0, torch.zeros(1, dtype=torch.int), [ts], False)
    want = torch.sqrt(sum((t.double() ** 2).sum() for t in ts)).float()  # independent: the definition
    torch.testing.assert_close(ours, want.reshape(1))
    import megatron.core.utils as mu

    orig = mu.torch.tensor
    try:  # megatron's version writes its result to "cuda"; compare its value on CPU
        mu.torch.tensor = lambda data, **kw: orig(data, **{k: v for k, v in kw.items() if k != "device"})
        ref, _ = local_multi_tensor_l2_norm(0, None, [ts], False)
    finally:
        mu.torch.tensor = orig
    torch.testing.assert_close(ours, ref)


def test_scale_in_place_and_into_other_tensors():
    g = torch.Generator().manual_seed(1)
    src = [torch.randn(5, generator=g), torch.randn(2, 3, generator=g)]
    dst = [torch.empty_like(t) for t in src]
    foreach_scale(0, None, [src, dst], 0.25)
    ref = [torch.empty_like(t) for t in src]
    local_multi_tensor_scale(0, None, [src, ref], 0.25)
    for a, b, s in zip(dst, ref, src):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, s * 0.25)
    same = [t.clone() for t in src]
    foreach_scale(0, None, [same, same], 2.0)
    for a, s in zip(same, src):
        torch.testing.assert_close(a, s * 2.0)


def test_copy_this_to_that_casts_like_megatron_loop():
    from megatron.core.optimizer.optimizer import _multi_tensor_copy_this_to_that as megatron_copy

    from megatron.mcore_ext.fallbacks import foreach_copy_this_to_that

    g = torch.Generator().manual_seed(2)
    main = [torch.randn(s, generator=g) for s in ((4, 3), (5,), (1, 1, 7))]  # fp32 main params
    if megatron_copy is foreach_copy_this_to_that:  # applied by an earlier test in this process
        ref = [t.to(torch.bfloat16) for t in main]
    else:
        ref = [torch.empty(t.shape, dtype=torch.bfloat16) for t in main]
        megatron_copy(main, ref, None)  # its bf16 path: a copy_ per tensor
    ours = [torch.zeros(t.shape, dtype=torch.bfloat16) for t in main]
    foreach_copy_this_to_that(main, ours, None)
    for a, b, m in zip(ours, ref, main):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a.float(), m, rtol=1e-2, atol=1e-2)
    flag = torch.ones(1, dtype=torch.int)
    foreach_copy_this_to_that(main, ours, flag)
    assert int(flag) == 0
    try:
        foreach_copy_this_to_that(main, ours[:2], None)
    except ValueError as e:
        assert "3 sources for 2 destinations" in str(e)
    else:
        raise AssertionError("a length mismatch must raise")


def _dtensor_to_local():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from megatron.core.utils import to_local_if_dtensor
    from megatron.mcore_ext.fallbacks import fast_to_local_if_dtensor

    mesh = init_device_mesh("cpu", (1,))
    full = torch.arange(6.0).reshape(2, 3).requires_grad_()
    d = distribute_tensor(full, mesh, [Shard(0)])
    ours, ref = fast_to_local_if_dtensor(d), to_local_if_dtensor(d)
    return type(ours).__name__, ours.detach(), ref.detach(), ours.requires_grad == ref.requires_grad


def test_fast_to_local_if_dtensor_is_megatrons_function():
    """The clip_grads stand-in returns plain tensors themselves and converts DTensors exactly as
    megatron's ``to_local_if_dtensor`` does (which ``apply()`` swaps into ``clip_grads``)."""
    from megatron.core.optimizer import clip_grads

    from megatron.mcore_ext import fallbacks
    from megatron.mcore_ext.testing import run_distributed

    t, p = torch.zeros(3), torch.nn.Parameter(torch.ones(2))
    assert fallbacks.fast_to_local_if_dtensor(t) is t and fallbacks.fast_to_local_if_dtensor(p) is p
    name, ours, ref, same_grad_flag = run_distributed(_dtensor_to_local, 1)[0]
    assert name == "Tensor" and same_grad_flag
    assert torch.equal(ours, ref) and torch.equal(ours, torch.arange(6.0).reshape(2, 3))
    fallbacks.apply()
    assert clip_grads.to_local_if_dtensor is fallbacks.fast_to_local_if_dtensor
