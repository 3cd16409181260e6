"""multimodal_dev: a Megatron-Core example for mixture-of-experts vision-language models."""
