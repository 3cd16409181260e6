"""Qwen3.5-MoE vision-language architecture (HF ``Qwen3_5MoeForConditionalGeneration``) on megatron-core.

One role per file: ``variants.py`` (named sizes), ``configuration.py`` (HF config -> megatron
config), ``model.py`` (the language model and the registered builder), ``vision.py`` (the vision
tower), ``rope.py`` (interleaved MRoPE), ``convert.py`` (HF <-> megatron state dicts),
``flops.py`` (useful FLOPs per batch), ``params.py`` (parameter counts of the published sizes).
Importing the package registers the ``qwen35_vl`` architecture.
"""
from multimodal_dev.models.qwen35_vl import model  # noqa: F401  (registers the architecture)
