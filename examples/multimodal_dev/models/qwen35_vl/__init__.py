"""Qwen3.5-MoE vision-language architecture (HF `Qwen3_5MoeForConditionalGeneration`) on megatron-core."""
