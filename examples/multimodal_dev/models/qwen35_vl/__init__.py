"""Qwen3.5-MoE vision-language architecture (HF ``Qwen3_5MoeForConditionalGeneration``) on megatron-core.

One role per file: ``variants.py`` (named sizes), ``configuration.py`` (HF config -> megatron
config), ``model.py`` (the language model and the registered builder), ``vision.py`` (the vision
tower), ``rope.py`` (interleaved MRoPE), ``convert.py`` / ``convert_language.py`` (HF <-> megatron
state dicts), ``hf_weights.py`` (a rank's slices of an HF checkpoint), ``hf.py`` (HF checkpoint
support: build, compare, export), ``flops.py`` (useful FLOPs per batch), ``params.py`` (parameter
counts of the published sizes). Importing the package registers the ``qwen35_vl`` architecture.
"""
from multimodal_dev.models.qwen35_vl import model  # noqa: F401  (registers the architecture)
from multimodal_dev.models.qwen35_vl import hf  # noqa: F401  (and its HF checkpoint support)
