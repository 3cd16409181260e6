"""megatron.mcore_ext.packed_seq: the collate's host copy of the packed boundaries reaches the
layers that need them on the host (the Gated DeltaNet layers), and the layer checks them there;
the GDN layer's fla chunk map built from them on the host.

The GPU side (no stream synchronisation at all in an fla layer's forward and backward on host
boundaries, and fla's chunk map equal to ours) is ``test_gdn_gpu.py``."""
import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron.mcore_ext.packed_seq import HostPackedSeqParams, padded_boundaries
from megatron.mcore_ext.testing import run_distributed


def _kw(cu, cu_p):
    return dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_p,
                cu_seqlens_kv_padded=cu_p, max_seqlen_q=8, max_seqlen_kv=8)


def test_padded_boundaries_take_the_host_copy_or_read_the_device_once():
    cu, cu_p = torch.tensor([0, 3, 9], dtype=torch.int32), torch.tensor([0, 4, 12], dtype=torch.int32)
    host = torch.tensor([0, 4, 12])
    d, h = padded_boundaries(HostPackedSeqParams(cu_seqlens_q_padded_cpu=host, **_kw(cu, cu_p)))
    assert d is cu_p and h.dtype == torch.int64 and h.tolist() == [0, 4, 12]
    # a plain PackedSeqParams: the same values, read from the (device) tensor
    d, h = padded_boundaries(PackedSeqParams(**_kw(cu, cu_p)))
    assert d is cu_p and h.tolist() == [0, 4, 12] and h.dtype == torch.int64
    # no padded boundaries: the real ones (megatron's _resolve_cu_seqlens makes the same choice)
    kw = dict(_kw(cu, cu_p), cu_seqlens_q_padded=None, cu_seqlens_kv_padded=None)
    d, h = padded_boundaries(HostPackedSeqParams(**kw))
    assert d is cu and h.tolist() == [0, 3, 9]
    with pytest.raises(ValueError, match="as many entries"):
        HostPackedSeqParams(cu_seqlens_q_padded_cpu=torch.tensor([0, 12]), **_kw(cu, cu_p))


def test_the_model_gets_the_collates_host_boundaries():
    from multimodal_dev.data.collate import CollateConfig, pack_or_pad_batch
    from multimodal_dev.models import packed_seq_params_from_batch

    samples = [{"tokens": list(range(1, n + 1)), "labels": list(range(2, n + 2))} for n in (5, 1, 9)]
    cfg = CollateConfig(layout="thd", target_seqlen=64, divisible_by=4)
    batch = pack_or_pad_batch(samples, cfg)
    psp = packed_seq_params_from_batch(batch)
    assert isinstance(psp, HostPackedSeqParams)
    assert psp.cu_seqlens_q_padded_cpu.tolist() == batch["cu_seqlens_padded"].tolist() == [0, 8, 12, 24]


def _tiny_gdn_layer():
    """A GDN layer of tiny-hybrid's sizes (torch kernels; 2 key / 4 value heads of 16)."""
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron.mcore_ext.gdn import KernelGatedDeltaNet
    from megatron.mcore_ext.norm import TorchNorm
    from multimodal_dev.models.qwen35_vl.configuration import Qwen35TextConfig

    text = Qwen35TextConfig(vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=32, mrope_section=[1, 1, 0],
                            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                            linear_value_head_dim=16)
    sub = GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=TorchNorm, out_proj=RowParallelLinear)
    return KernelGatedDeltaNet(text.to_transformer_config(), sub, layer_number=1, kernels="torch",
                               pg_collection=get_default_pg_collection())


def _layer_on(psp_kind: str, end: int):
    """The tiny GDN layer on one packed row, with host or plain boundaries; ``end`` != the row
    length gives wrong boundaries on purpose."""
    layer = _tiny_gdn_layer()
    lens = [5, 1, 9, 17]
    host = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist()[:-1] + [end])
    cu = host.to(torch.int32)
    kw = _kw(cu, cu)
    psp = HostPackedSeqParams(cu_seqlens_q_padded_cpu=host, **kw) if psp_kind == "host" else PackedSeqParams(**kw)
    x = torch.randn(sum(lens), 1, 64, generator=torch.Generator().manual_seed(0))
    try:
        return layer(x, None, packed_seq_params=psp)[0]
    except ValueError as e:
        return str(e)


def test_the_gdn_layer_gives_the_same_output_on_host_boundaries_and_checks_them():
    host = run_distributed(_layer_on, 1, args=("host", 32))[0]
    plain = run_distributed(_layer_on, 1, args=("plain", 32))[0]
    assert torch.equal(host, plain)
    for kind in ("host", "plain"):
        err = run_distributed(_layer_on, 1, args=(kind, 30))[0]
        assert isinstance(err, str) and "end at 30, the row has 32 tokens" in err, err


def _rule_inputs():
    layer = _tiny_gdn_layer()
    rule, seen = layer.gated_delta_rule, {}

    def recording_rule(q, k, v, **kw):
        seen.update(q=q.is_contiguous(), k=k.is_contiguous(), v=v.is_contiguous(),
                    shapes=[tuple(q.shape), tuple(k.shape), tuple(v.shape)])
        return rule(q, k, v, **kw)

    layer.gated_delta_rule = recording_rule
    x = torch.randn(32, 1, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    layer(x, None)[0].sum().backward()
    return seen


def test_the_gdn_rule_gets_contiguous_q_k_v():
    """The conv runs per section, so q, k and v reach the rule contiguous: fla's rule would copy
    strided ones (its input guard), and their gradients would be concatenated again."""
    seen = run_distributed(_rule_inputs, 1)[0]
    assert seen["shapes"] == [(1, 32, 2, 16), (1, 32, 2, 16), (1, 32, 4, 16)]
    assert seen["q"] and seen["k"] and seen["v"], seen


@pytest.mark.parametrize("bounds, chunk", [([0, 1, 64, 65, 200, 200, 207], 64), ([0, 4096], 64), ([0, 3, 9], 4),
                                           ([0], 64)])
def test_host_chunk_map_lists_each_samples_chunks_in_order(bounds, chunk):
    """The GDN layer's fla chunk map (``gdn.host_chunk_map``) against one derived token by token: the
    (sample, token offset // chunk) pairs of every token, each once, in order."""
    from megatron.mcore_ext.gdn import host_chunk_map

    want = []
    for i in range(len(bounds) - 1):
        for t in range(bounds[i + 1] - bounds[i]):
            if (i, t // chunk) not in want[-1:]:
                want.append((i, t // chunk))
    got = host_chunk_map(torch.tensor(bounds, dtype=torch.int32), chunk)
    assert got.dtype == torch.long and got.shape == (len(want), 2)
    assert [tuple(r) for r in got.tolist()] == want
    if bounds == [0, 1, 64, 65, 200, 200, 207]:  # by hand: 1, 63, 1, 135, 0 and 7 tokens
        assert want == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (5, 0)]
