"""A small ``KernelGatedDeltaNet`` (hidden 256; 4 key / 8 value heads of 64) for the GDN tests,
built inside a ``run_distributed`` worker (megatron's parallel state set up)."""
import torch


def build_gdn_layer(kernels: str, *, device: str = "cuda", bf16: bool = True):
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron.mcore_ext.gdn import GatedRMSNorm, KernelGatedDeltaNet
    from multimodal_dev.models.qwen35_vl.configuration import Qwen35TextConfig

    text = Qwen35TextConfig(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=64, shared_expert_intermediate_size=64, mrope_section=[2, 1, 1],
                            linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                            linear_value_head_dim=64)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = text.to_transformer_config(bf16=bf16, params_dtype=dtype)
    norm = ModuleSpec(module=GatedRMSNorm, params={"kernels": kernels})  # the spec's choice (models/spec.py)
    sub = GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=norm, out_proj=RowParallelLinear)
    layer = KernelGatedDeltaNet(config, sub, layer_number=1, kernels=kernels, pg_collection=get_default_pg_collection())
    return layer.to(device)
