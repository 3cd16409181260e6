"""metrics.moe_losses: an all-dense decoder (MoE configured, no MoE layer) logs 0, never NaN."""
import math

from megatron.mcore_ext.testing import run_distributed


def _moe_losses_of_all_dense_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from multimodal_dev.metrics import moe_losses

    # qwen35_vl with moe_layer_pattern [0, 0]: experts configured, every layer a dense MLP
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                               num_moe_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2, moe_layer_freq=[0, 0],
                               moe_aux_loss_coeff=1e-3, moe_z_loss_coeff=1e-3, add_bias_linear=False)
    return moe_losses(config, num_microbatches=2)


def test_all_dense_model_logs_zero_moe_losses_not_nan():
    out = run_distributed(_moe_losses_of_all_dense_config, 1)[0]
    assert out == {"load_balancing_loss": 0.0, "z_loss": 0.0}
    assert all(math.isfinite(v) for v in out.values())
