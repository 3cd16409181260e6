"""Swap implementations inside megatron-core ModuleSpec trees (instead of patching the library)."""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping

__all__ = ["replace_modules", "contains_module", "local_spec", "te_spec", "te_norm_keys", "LOCAL_SPEC_CONFIG"]

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


def te_norm_keys(layer) -> dict:
    """The norms' part of a local layer's ``sharded_state_dict_keys_map`` (``layer``: its
    ``TransformerLayerSubmodules``): each norm stored under the key megatron's TE spec gives it, so
    that one checkpoint resumes on either backend. TE fuses a norm into the column-parallel linear
    after it -- the input norm into attention's ``linear_qkv`` or Gated DeltaNet's ``in_proj``, the
    pre-MLP norm into a dense MLP's ``linear_fc1`` -- and keeps a MoE layer's pre-MLP norm as a
    module of its own (``gpt_layer_specs.get_gpt_layer_with_transformer_engine_submodules``).
    Megatron's local spec maps the input norm to ``linear_qkv`` in every layer (a Gated DeltaNet
    layer has none) and the pre-MLP norm to ``linear_fc1`` in MoE layers too (which have none)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    def submodules(spec):  # a ModuleSpec's, or a builder's (megatron's MLP: partial(MLP.as_mlp_submodule, ...))
        if isinstance(spec, functools.partial):
            return spec.keywords.get("submodules")
        return getattr(spec, "submodules", None)

    keys = {}
    mixer = submodules(layer.self_attention)
    first = next((n for n in ("linear_qkv", "in_proj") if hasattr(mixer, n)), None)
    if first is not None:
        keys["input_layernorm."] = f"self_attention.{first}.layer_norm_"
    if not contains_module(layer.mlp, MoELayer) and hasattr(submodules(layer.mlp), "linear_fc1"):
        keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return keys


def _with_te_norm_keys(spec):
    """``spec`` (a block's or a layer's) with every transformer layer's norm keys from ``te_norm_keys``."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    if isinstance(spec, TransformerLayerSubmodules):
        kept = {k: v for k, v in spec.sharded_state_dict_keys_map.items()
                if k not in ("input_layernorm.", "pre_mlp_layernorm.")}
        return dataclasses.replace(spec, sharded_state_dict_keys_map={**kept, **te_norm_keys(spec)})
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=_with_te_norm_keys(spec.submodules))
    if hasattr(spec, "layer_specs"):  # TransformerBlockSubmodules
        return dataclasses.replace(spec, layer_specs=[_with_te_norm_keys(layer) for layer in spec.layer_specs])
    return spec


def local_spec(spec):
    """Our pure-PyTorch pieces in a megatron-core local spec: SP-capable norms, THD/CP attention,
    and self-attention that rotates packed (THD) queries and keys in one pass (``packed_rope``).
    A stage without full-attention layers (a pipeline stage of Gated DeltaNet layers) has no
    attention to swap. The norms are stored where the TE spec keeps them (``te_norm_keys``), so a
    checkpoint of either backend resumes in the other."""
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
    return _with_te_norm_keys(replace_modules(spec, mapping, optional=optional))


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
