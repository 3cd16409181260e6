"""GPU: flash-linear-attention's kernels against our pure-PyTorch ones (``mcore_ext.gdn_kernels``)
in the same ``KernelGatedDeltaNet`` layer with the same weights, bf16: outputs and gradients (input
and every parameter) agree within bf16 tolerance, on a packed row of samples of lengths that are
not multiples of fla's chunk (the state resets per sample) and on a padded batch of two rows."""
import pytest
import torch

from megatron.mcore_ext.gdn import fla_usable
from megatron.mcore_ext.testing import run_distributed

WHY = fla_usable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"fla's kernels cannot run here: {WHY}")


def _layer(kernels, state=None):
    from gdn_layer import build_gdn_layer

    layer = build_gdn_layer(kernels)
    if state is not None:
        layer.load_state_dict(state)
    else:
        g = torch.Generator(device="cpu").manual_seed(3)
        with torch.no_grad():  # heads with memory: moderate decay
            layer.A_log.copy_(torch.empty(layer.A_log.shape).uniform_(0.02, 0.5, generator=g).log())
            layer.dt_bias.copy_(torch.randn(layer.dt_bias.shape, generator=g) * 0.5)
    assert layer.kernels.name == kernels
    return layer


def _run(layer, x, psp, upstream):
    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    out, _ = layer(x, None, packed_seq_params=psp)
    (out.float() * upstream).sum().backward()
    return out.detach().float(), x.grad.float(), {n: p.grad.float() for n, p in layer.named_parameters()}


def _compare():
    from megatron.core.packed_seq_params import PackedSeqParams

    fla = _layer("fla")
    ours = _layer("torch", state=fla.state_dict())
    g = torch.Generator(device="cpu").manual_seed(5)
    lens = [1, 63, 64, 65, 200, 7]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    T = int(cu[-1])
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                          cu_seqlens_kv_padded=cu, max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    report = {}
    for name, shape, p in (("thd", (T, 1, 256), psp), ("bshd", (150, 2, 256), None)):
        x = (torch.randn(shape, generator=g) * 0.5).to("cuda", torch.bfloat16)
        up = torch.randn(shape, generator=g).cuda()
        a, b = _run(fla, x, p, up), _run(ours, x, p, up)

        def rel(u, v):
            return float((u - v).norm() / v.norm().clamp_min(1e-12))

        report[name] = {"out": rel(a[0], b[0]), "grad_in": rel(a[1], b[1]),
                        **{f"grad {n}": rel(a[2][n], b[2][n]) for n in a[2]}}
    return report


def test_fla_matches_the_torch_kernels_forward_and_backward():
    report = run_distributed(_compare, 1, gpu=True)[0]
    for layout, errs in report.items():
        print(layout, {k: f"{v:.2e}" for k, v in errs.items()})
        for k, v in errs.items():  # bf16 inputs and weights, fp32 accumulation on both sides
            assert v < 3e-2, (layout, k, v)


def _no_sync_steps():
    """The fla layer on a HostPackedSeqParams row, forward and backward, under CUDA's sync debug
    mode set to error: any device-to-host read or stream synchronisation raises. Also: the chunk
    map built on the host equals the one fla builds from the device boundaries, and the outputs
    equal those with a plain PackedSeqParams (fla then builds the map itself, with a sync)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from fla.ops.utils.index import prepare_chunk_indices

    from megatron.mcore_ext.packed_seq import HostPackedSeqParams

    layer = _layer("fla")
    lens = [1, 63, 64, 65, 200, 7, 130]
    host = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)
    cu = host.to("cuda", torch.int32)
    T = int(host[-1])
    kw = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
              max_seqlen_q=max(lens), max_seqlen_kv=max(lens))
    g = torch.Generator(device="cpu").manual_seed(7)
    x = (torch.randn((T, 1, 256), generator=g) * 0.5).to("cuda", torch.bfloat16)
    up = torch.randn((T, 1, 256), generator=g).cuda()
    plain = _run(layer, x, PackedSeqParams(**kw), up)
    psp = HostPackedSeqParams(cu_seqlens_q_padded_cpu=host, **kw)
    _run(layer, x, psp, up)  # first use: Triton compiles and autotunes (these sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        hosted = _run(layer, x, psp, up)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    same_map = torch.equal(psp.derived["fla_chunk_indices"].cpu(), prepare_chunk_indices(cu, 64).cpu())
    diff = max([float((a - b).abs().max()) for a, b in zip(plain[:2], hosted[:2])] +
               [float((plain[2][n] - hosted[2][n]).abs().max()) for n in plain[2]])
    return {"same_map": same_map, "max_diff": diff}


def test_fla_layer_on_host_boundaries_makes_no_host_sync():
    r = run_distributed(_no_sync_steps, 1, gpu=True)[0]
    print(r)
    assert r["same_map"], r
    assert r["max_diff"] == 0.0, r  # the same kernels on the same chunk map
