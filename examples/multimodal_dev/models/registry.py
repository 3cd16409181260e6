"""Model registry: an architecture plugs in with ``@register_architecture("name")``.

A builder is ``builder(variant: str, options: BuildOptions) -> MultimodalModel`` (``models.contract``);
the entry point, the trainer and forward_step look architectures up here and never name one.

Where architectures come from: every sub-package of ``multimodal_dev.models`` is imported on first
use (importing an architecture package registers it), and ``load_plugin(module_or_file)`` imports
any other module that registers one (``pretrain_multimodal.py --plugin ...``), e.g. an
architecture that lives in a test directory.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import Optional

from multimodal_dev.models.base import MultimodalModel
from multimodal_dev.models.contract import BuildOptions, DataSpec

__all__ = ["Architecture", "register_architecture", "get_architecture", "available_architectures", "build_model",
           "load_plugin"]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One registry record: the builder and, optionally, its named variants."""

    name: str
    build: Callable[[str, BuildOptions], MultimodalModel]
    variants: Optional[Callable[[], Sequence[str]]] = None


_REGISTRY: dict[str, Architecture] = {}
_builtins_loaded = False


def register_architecture(name: str, *, variants: Optional[Callable[[], Sequence[str]]] = None):
    """Decorator for a builder ``(variant, options) -> MultimodalModel``."""

    def deco(builder):
        old = _REGISTRY.get(name)
        if old is not None and old.build is not builder:
            raise ValueError(f"model architecture '{name}' is already registered (by {old.build.__module__})")
        _REGISTRY[name] = Architecture(name, builder, variants)
        return builder

    return deco


def _load_builtin_architectures() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    import multimodal_dev.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.ispkg:  # each architecture is a sub-package that registers itself on import
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _builtins_loaded = True


def load_plugin(module_or_file: str) -> None:
    """Import a module (dotted name, or a path to a ``.py`` file) that registers architectures
    and/or data providers."""
    if module_or_file.endswith(".py") or os.path.sep in module_or_file:
        path = os.path.abspath(module_or_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--plugin {module_or_file!r}: no such file")
        name = "mmdev_plugin_" + os.path.splitext(os.path.basename(path))[0]
        if name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        importlib.import_module(module_or_file)


def available_architectures() -> list[str]:
    _load_builtin_architectures()
    return sorted(_REGISTRY)


def get_architecture(name: str) -> Architecture:
    _load_builtin_architectures()
    if name not in _REGISTRY:
        raise ValueError(f"--model-arch '{name}' is unknown; available: {available_architectures()} "
                         "(an architecture outside multimodal_dev.models registers itself through --plugin)")
    return _REGISTRY[name]


def build_model(arch: str, variant: str, options: Optional[BuildOptions] = None) -> MultimodalModel:
    """Build ``arch``/``variant`` under the initialised megatron parallel state; with
    ``options.layout_independent_init`` every sharded global weight is then re-drawn from a
    generator seeded by its name (``mcore_ext.sharding.layout_independent_init``)."""
    model = get_architecture(arch).build(variant, options if options is not None else BuildOptions())
    if not isinstance(model, MultimodalModel):
        raise TypeError(f"the builder of '{arch}' returned {type(model).__name__}, expected a MultimodalModel")
    if not isinstance(model.data_spec, DataSpec):
        raise TypeError(f"the builder of '{arch}' gave no DataSpec (model.data_spec is {model.data_spec!r})")
    if options is not None and options.layout_independent_init:
        from megatron.mcore_ext.sharding import layout_independent_init

        # the vision encoder is replicated (not sharded): its builder seeds it on its own
        layout_independent_init(model, options.seed, include=lambda n: not n.startswith("vision_encoder."))
    return model
