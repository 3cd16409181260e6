"""Model registry: an architecture plugs in with ``@register_architecture("name")``.

A builder takes ``(variant: str, *, pre_process: bool, post_process: bool, **overrides)`` and
returns a ``MultimodalModel``. The entry point and forward_step look architectures up here and
never name one.
"""
from __future__ import annotations

from collections.abc import Callable

from multimodal_dev.models.base import MultimodalModel, packed_seq_params_from_batch  # noqa: F401

_REGISTRY: dict[str, Callable[..., MultimodalModel]] = {}


def register_architecture(name: str):
    def deco(builder):
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"model architecture '{name}' is already registered")
        _REGISTRY[name] = builder
        return builder

    return deco


def available_architectures() -> list[str]:
    _load_builtin_architectures()
    return sorted(_REGISTRY)


def _load_builtin_architectures() -> None:
    # importing an architecture package registers it
    import multimodal_dev.models.qwen35_vl.model  # noqa: F401


def build_model(arch: str, variant: str, **kwargs) -> MultimodalModel:
    _load_builtin_architectures()
    if arch not in _REGISTRY:
        raise ValueError(f"--model-arch '{arch}' is unknown; available: {available_architectures()}")
    return _REGISTRY[arch](variant, **kwargs)
