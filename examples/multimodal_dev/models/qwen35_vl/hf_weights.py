"""A published Qwen3.5-VL (MoE) HF checkpoint as the starting point of a run, in any TP/EP/PP layout.

``build_from_hf_dir(directory, options)`` builds the model from ``config.json`` (any Qwen3.5-MoE
configuration, not only the named variants) and fills each rank's parameters from the safetensors
shards (``hf_checkpoint.load_sharded``) through ``Qwen35HFWeights.resolve``: one global tensor of
megatron's sharded state dict (key, index, shape) -> the HF tensors it is made of, read in slices.

What a rank reads (the rules below, the same re-layouts as ``convert_language`` at TP = 1):

=====================================  ============================================================
global tensor (megatron sharded key)   read from the HF shards
=====================================  ============================================================
embedding / output_layer               the rank's vocabulary rows of ``embed_tokens`` / ``lm_head``
linear_proj, out_proj, expert and      the rank's columns (row-parallel), or the rank's rows of
shared-expert fc1/fc2                  each stacked part ([gate; up])
routed experts                         only the rank's experts (``experts.gate_up_proj[e]`` ...)
GDN in_proj.{query,key,value,z,...}    the rank's rows of ``in_proj_qkv`` / ``in_proj_z`` / ...
linear_qkv (full attention)            q/k/v whole (small: (2 nh + 2 ng) * hd x hidden), then cut
norms, router, gates, vision tower     whole, one tensor at a time (the vision tower is not sharded:
                                       the first pipeline stage reads it)
=====================================  ============================================================

A pipeline stage holds only its layers and reads only theirs; the vision tower is read by the
stages that hold it. ``_extra_state`` / buffers (the routers' expert bias) keep their built values.
"""
from __future__ import annotations

import re
import torch

from multimodal_dev.hf_checkpoint import HFCheckpointError, SafetensorsReader
from multimodal_dev.models.qwen35_vl.configuration import TOKEN_FIELDS, Qwen35TextConfig, configs_from_hf
from multimodal_dev.models.qwen35_vl.convert_language import HF_HEAD, HF_LM_PREFIX, _qkv_from_hf
from multimodal_dev.models.qwen35_vl.vision import _HF_PATCH_B, _HF_PATCH_W, _OUR_PATCH_B, _OUR_PATCH_W, HF_VISUAL_PREFIX

__all__ = ["Qwen35HFWeights", "configs_from_hf_dict", "HF_MODEL_TYPES"]

HF_MODEL_TYPES = ("qwen3_5_moe",)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_GDN_IN = {"query": ("in_proj_qkv", 0), "key": ("in_proj_qkv", 1), "value": ("in_proj_qkv", 2),
           "z": ("in_proj_z", None), "beta": ("in_proj_b", None), "alpha": ("in_proj_a", None)}


def configs_from_hf_dict(config: dict):
    """(text config, vision config, token ids) of an HF ``config.json``."""
    if config.get("model_type") not in HF_MODEL_TYPES:
        raise HFCheckpointError(f"config.json has model_type {config.get('model_type')!r}, expected one of "
                                f"{list(HF_MODEL_TYPES)} (Qwen3.5-VL MoE)")
    text, vision = configs_from_hf(config)
    missing = [k for k in TOKEN_FIELDS if k not in config]
    if missing:
        raise HFCheckpointError(f"config.json has no {missing} (the image and vision start/end token ids)")
    return text, vision, {k: int(config[k]) for k in TOKEN_FIELDS}


def _rows(s: slice, offset: int) -> slice:
    return slice(s.start + offset, s.stop + offset)


class Qwen35HFWeights:
    """``resolve(global_key, index, global_shape)`` for ``hf_checkpoint.load_sharded``."""

    def __init__(self, reader: SafetensorsReader, text: Qwen35TextConfig):
        self.r, self.cfg = reader, text
        kd = text.linear_num_key_heads * text.linear_key_head_dim
        vd = text.linear_num_value_heads * text.linear_value_head_dim
        self._qkv_offsets = (0, kd, 2 * kd)  # in_proj_qkv / conv1d rows: [q | k | v]
        self._qkv_sizes = (kd, kd, vd)

    # -------------------------------------------------------------------------------- helpers
    def _lm(self, name: str) -> str:
        return HF_LM_PREFIX + name

    def _stacked(self, names: list[str], lead: tuple, rows: slice, rest: tuple) -> torch.Tensor:
        """Rows ``rows`` of the concatenation (along the first dim after ``lead``) of ``names``."""
        pieces, start = [], 0
        for n in names:
            size = self.r.shape(n)[len(lead)]
            lo, hi = max(rows.start, start), min(rows.stop, start + size)
            if lo < hi:
                pieces.append(self.r.read(n, (*lead, slice(lo - start, hi - start), *rest)))
            start += size
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=len(lead) if lead else 0)

    def _vocab_rows(self, name: str, index: tuple, global_shape: tuple) -> torch.Tensor:
        rows, rest = index[0], index[1:]
        have = self.r.shape(name)[0]
        if have > global_shape[0]:
            raise HFCheckpointError(f"{name} has {have} vocabulary rows, the model {global_shape[0]}")
        if rows.stop <= have:
            return self.r.read(name, index)
        # rows past the checkpoint's vocabulary (megatron's padding) are zero
        lo, hi = rows.start, min(rows.stop, have)
        width = self.r.shape(name)[1:]
        pad = torch.zeros((rows.stop - max(lo, hi), *width))[(slice(None), *rest)]
        if lo >= hi:
            return pad
        part = self.r.read(name, (slice(lo, hi), *rest))
        return torch.cat([part, pad.to(part.dtype)])

    def _experts(self, p: str, fc: str, e: int, rows: slice, rest: tuple) -> torch.Tensor:
        fused = self._lm(f"{p}experts.{'gate_up_proj' if fc == 'fc1' else 'down_proj'}")
        if fused in self.r:
            return self.r.read(fused, (e, rows, *rest))
        if fc == "fc1":
            return self._stacked([self._lm(f"{p}experts.{e}.gate_proj.weight"),
                                  self._lm(f"{p}experts.{e}.up_proj.weight")], (), rows, rest)
        return self.r.read(self._lm(f"{p}experts.{e}.down_proj.weight"), (rows, *rest))

    def _vision_tensor(self, key: str, index: tuple) -> torch.Tensor:
        """One vision tensor: the same name under ``model.visual.``, but the Conv3d patch kernel
        ``(C_out, C, T, P, P)``, which ours holds flattened ``(C_out, C*T*P*P)``."""
        if key == _OUR_PATCH_W:
            w = self.r.read(HF_VISUAL_PREFIX + _HF_PATCH_W)
            return w.reshape(w.shape[0], -1)[index]
        return self.r.read(HF_VISUAL_PREFIX + (_HF_PATCH_B if key == _OUR_PATCH_B else key), index)

    # -------------------------------------------------------------------------------- resolve
    def resolve(self, key: str, index: tuple, global_shape: tuple) -> torch.Tensor:
        if key.startswith("vision_encoder."):
            return self._vision_tensor(key[len("vision_encoder."):], index)
        if not key.startswith("language_model."):
            raise HFCheckpointError(f"no rule for {key!r}")
        k = key[len("language_model."):]
        if k == "embedding.word_embeddings.weight":
            return self._vocab_rows(self._lm("embed_tokens.weight"), index, global_shape)
        if k == "output_layer.weight":
            name = HF_HEAD if HF_HEAD in self.r else self._lm("embed_tokens.weight")  # tied: the embedding
            return self._vocab_rows(name, index, global_shape)
        if k == "decoder.final_layernorm.weight":
            return self.r.read(self._lm("norm.weight"), index)
        m = _LAYER.match(k)
        if m is None:
            raise HFCheckpointError(f"no rule for {key!r}")
        return self._layer(int(m.group(1)), m.group(2), index, key)

    def _layer(self, L: int, k: str, index: tuple, key: str) -> torch.Tensor:
        h = f"layers.{L}."
        read = lambda name, idx=index: self.r.read(self._lm(h + name), idx)  # noqa: E731
        if k in ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight",
                 "self_attention.in_proj.layer_norm_weight"):
            return read("input_layernorm.weight")
        if k in ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"):
            return read("post_attention_layernorm.weight")
        if k.startswith("self_attention."):
            return self._attention(h, k[len("self_attention."):], index, read, key)
        if k == "mlp.router.weight":
            return read("mlp.gate.weight")
        m = re.match(r"^mlp\.experts\.experts\.linear_(fc1|fc2)\.weight$", k)
        if m:
            e, rows, rest = index[0], index[1], index[2:]
            return self._experts(h + "mlp.", m.group(1), e, rows, rest)
        m = re.match(r"^mlp\.experts\.local_experts\.(\d+)\.linear_(fc1|fc2)\.weight$", k)
        if m:  # megatron's SequentialMLP keys (one global key per expert)
            return self._experts(h + "mlp.", m.group(2), int(m.group(1)), index[0], index[1:])
        for ours, hf in (("mlp.shared_experts.", "mlp.shared_expert."), ("mlp.", "mlp.")):
            if k == ours + "linear_fc1.weight":
                return self._stacked([self._lm(h + hf + "gate_proj.weight"), self._lm(h + hf + "up_proj.weight")],
                                     (), index[0], index[1:])
            if k == ours + "linear_fc2.weight":
                return read(hf + "down_proj.weight")
        if k == "mlp.shared_experts.gate_weight":
            return read("mlp.shared_expert_gate.weight")
        raise HFCheckpointError(f"no rule for {key!r}")

    def _attention(self, h: str, k: str, index: tuple, read, key: str) -> torch.Tensor:
        a, g = "self_attn.", "linear_attn."
        if k == "linear_qkv.weight":
            q, kk, v = (self.r.read(self._lm(h + a + n)) for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight"))
            return _qkv_from_hf(q, kk, v, self.cfg)[index]
        simple = {"q_layernorm.weight": a + "q_norm.weight", "k_layernorm.weight": a + "k_norm.weight",
                  "linear_proj.weight": a + "o_proj.weight", "dt_bias": g + "dt_bias", "A_log": g + "A_log",
                  "out_norm.weight": g + "norm.weight", "out_proj.weight": g + "out_proj.weight"}
        if k in simple:
            return read(simple[k])
        m = re.match(r"^(in_proj|conv1d)\.weight\.(query|key|value|z|beta|alpha)$", k)
        if m:
            which, part = m.groups()
            name, slot = _GDN_IN[part] if which == "in_proj" else ("conv1d", ("query", "key", "value").index(part))
            offset = self._qkv_offsets[slot] if slot is not None else 0
            return read(g + name + ".weight", (_rows(index[0], offset), *index[1:]))
        raise HFCheckpointError(f"no rule for {key!r}")
