"""Swap implementations inside megatron-core ModuleSpec trees (instead of patching the library)."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping

__all__ = ["replace_modules", "contains_module", "local_spec", "te_spec", "LOCAL_SPEC_CONFIG"]

#: TransformerConfig settings the pure-PyTorch local spec needs wherever it runs: no fused kernels
#: that exist only with apex / TE / CUDA extensions, weights initialised on the CPU generator.
LOCAL_SPEC_CONFIG = dict(
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
    use_cpu_initialization=True,
)


def replace_modules(spec, mapping: Mapping[type, type], optional: Iterable[type] = ()):
    """Return a copy of ``spec`` with every module class in ``mapping`` replaced by its value.

    Walks ``ModuleSpec`` objects, ``functools.partial`` builders, submodule dataclasses (e.g.
    ``TransformerLayerSubmodules``, ``TransformerBlockSubmodules``), lists and tuples; classes may
    stand bare or inside specs. A class of ``mapping`` that occurs nowhere in ``spec`` is an error
    (a swap that silently does nothing is a bug), unless it is listed in ``optional``.
    """
    from megatron.core.transformer.spec_utils import ModuleSpec

    found: set[type] = set()

    def walk(obj):
        if isinstance(obj, type):
            if obj in mapping:
                found.add(obj)
            return mapping.get(obj, obj)
        if isinstance(obj, functools.partial):  # e.g. partial(MoELayer, submodules=MoESubmodules(...))
            return functools.partial(
                walk(obj.func), *walk(obj.args), **{k: walk(v) for k, v in obj.keywords.items()}
            )
        if isinstance(obj, ModuleSpec):
            return dataclasses.replace(obj, module=walk(obj.module), submodules=walk(obj.submodules))
        if dataclasses.is_dataclass(obj):
            return dataclasses.replace(obj, **{f.name: walk(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init})
        if isinstance(obj, list):
            return [walk(o) for o in obj]
        if isinstance(obj, tuple):
            return tuple(walk(o) for o in obj)
        return obj

    out = walk(spec)
    missing = set(mapping) - found - set(optional)
    if missing:
        raise ValueError(f"replace_modules: {sorted(c.__qualname__ for c in missing)} occur nowhere in the spec "
                         "(nothing to replace)")
    return out


def contains_module(spec, cls: type) -> bool:
    """Whether ``cls`` (or a subclass) occurs anywhere in a spec tree."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    def walk(obj):
        if isinstance(obj, type):
            return issubclass(obj, cls)
        if isinstance(obj, functools.partial):
            return walk(obj.func) or any(walk(a) for a in obj.args) or any(walk(v) for v in obj.keywords.values())
        if isinstance(obj, ModuleSpec):
            return walk(obj.module) or walk(obj.submodules)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return any(walk(getattr(obj, f.name)) for f in dataclasses.fields(obj))
        if isinstance(obj, (list, tuple)):
            return any(walk(o) for o in obj)
        return False

    return walk(spec)


def local_spec(spec):
    """Our pure-PyTorch pieces in a megatron-core local spec: SP-capable norms, THD/CP attention,
    and self-attention that rotates packed (THD) queries and keys in one pass (``packed_rope``).
    A stage without full-attention layers (a pipeline stage of Gated DeltaNet layers) has no
    attention to swap."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron.mcore_ext.attention import TorchDotProductAttention
    from megatron.mcore_ext.norm import TorchNorm
    from megatron.mcore_ext.packed_rope import PackedRopeSelfAttention

    mapping = {
        WrappedTorchNorm: TorchNorm,
        DotProductAttention: TorchDotProductAttention,
        SelfAttention: PackedRopeSelfAttention,
    }
    optional = {DotProductAttention, SelfAttention}
    try:
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        mapping[FusedLayerNorm] = TorchNorm
        optional.add(FusedLayerNorm)  # only where apex would be used for LayerNorm
    except Exception:  # not importable without apex in some builds: nothing to replace then
        pass
    return replace_modules(spec, mapping, optional=optional)


def te_spec(spec):
    """Our packed-row pieces in a megatron-core Transformer Engine spec: TE's core attention given
    the padded sample boundaries, so it writes every packed position (``te_attention``: TE leaves
    the padding between samples unwritten, which poisons the gradients), and self-attention that
    rotates packed queries and keys in one pass (``packed_rope``: megatron's THD RoPE reads every
    sample boundary to the host, in every layer). TE's fused norm+linear layers, linears and
    attention kernels stay as megatron builds them. Imports TE: call it only when TE is usable."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention
    from megatron.core.transformer.attention import SelfAttention

    from megatron.mcore_ext.packed_rope import PackedRopeSelfAttention
    from megatron.mcore_ext.te_attention import WholeRowTEDotProductAttention

    mapping = {TEDotProductAttention: WholeRowTEDotProductAttention, SelfAttention: PackedRopeSelfAttention}
    return replace_modules(spec, mapping, optional=set(mapping))  # a stage of GDN layers has no attention
