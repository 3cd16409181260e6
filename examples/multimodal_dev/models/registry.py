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

__all__ = ["Architecture", "HFSupport", "register_architecture", "register_hf_support", "get_architecture",
           "available_architectures", "build_model", "build_model_from_hf", "load_plugin"]


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One registry record: the builder and, optionally, its named variants."""

    name: str
    build: Callable[[str, BuildOptions], MultimodalModel]
    variants: Optional[Callable[[], Sequence[str]]] = None
    hf: Optional["HFSupport"] = None


@dataclasses.dataclass(frozen=True)
class HFSupport:
    """An architecture's HF checkpoints (``--hf-checkpoint DIR``).

    model_types: the ``config.json`` ``model_type`` values it reads.
    build(directory, options, load_weights): the model from ``config.json``, its local parameters
        filled from the safetensors shards when ``load_weights`` (else left as built: a resumed run
        takes them from its checkpoint).
    variant_differences(variant, config): what a named variant and ``config.json`` disagree on
        (``[]``: the same model), for ``--variant`` given beside ``--hf-checkpoint``.
    state_to_hf(model, config): a whole (one-process) model's HF state dict (export).
    config_for_variant(variant): the ``config.json`` of a named variant (export of a run that did
        not start from an HF checkpoint).
    """

    model_types: tuple[str, ...]
    build: Callable[[str, BuildOptions, bool], MultimodalModel]
    variant_differences: Callable[[str, dict], list[str]]
    state_to_hf: Callable[[MultimodalModel, dict], dict]
    config_for_variant: Callable[[str], dict]


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


def register_hf_support(name: str, support: HFSupport) -> None:
    """Give the registered architecture ``name`` its HF checkpoint support."""
    if name not in _REGISTRY:
        raise ValueError(f"register_hf_support: no architecture '{name}' registered")
    _REGISTRY[name] = dataclasses.replace(_REGISTRY[name], hf=support)


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


def build_model_from_hf(directory: str, options: Optional[BuildOptions] = None, *, arch: Optional[str] = None,
                        variant: Optional[str] = None, load_weights: bool = True) -> MultimodalModel:
    """The model of the HF checkpoint ``directory`` (``--hf-checkpoint``): the architecture whose
    ``HFSupport`` reads its ``model_type`` (``arch``, when given, must be it), sizes from its
    ``config.json``; ``variant``, when given, must describe the same model. Errors are
    ``SetupError`` naming the flag."""
    from multimodal_dev.hf_checkpoint import read_hf_config
    from multimodal_dev.models.contract import SetupError

    _load_builtin_architectures()
    config = read_hf_config(directory)
    model_type = config.get("model_type")
    readers = [a for a in _REGISTRY.values() if a.hf is not None and model_type in a.hf.model_types]
    if not readers:
        raise SetupError(f"--hf-checkpoint {directory}: no architecture reads model_type {model_type!r} "
                         f"(readable: {sorted(t for a in _REGISTRY.values() if a.hf for t in a.hf.model_types)})")
    found = readers[0]
    if arch is not None and arch != found.name:
        raise SetupError(f"--model-arch {arch} disagrees with --hf-checkpoint {directory} (model_type {model_type!r} "
                         f"is architecture '{found.name}')")
    if variant is not None:
        diff = found.hf.variant_differences(variant, config)
        if diff:
            raise SetupError(f"--variant {variant} disagrees with --hf-checkpoint {directory}/config.json: "
                             + "; ".join(diff[:12]) + (f" (and {len(diff) - 12} more)" if len(diff) > 12 else "")
                             + ". Leave --variant out: the sizes come from config.json")
    model = found.hf.build(directory, options if options is not None else BuildOptions(), load_weights)
    if not isinstance(model, MultimodalModel):
        raise TypeError(f"the HF builder of '{found.name}' returned {type(model).__name__}, expected a MultimodalModel")
    return model
