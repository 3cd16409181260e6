"""The language half of the HF <-> ``MultimodalModel`` conversion (TP = 1): HF
``model.language_model.*`` + ``lm_head.weight`` <-> the local-spec ``Qwen35GPTModel``'s keys
(listed below). Pure re-layouts, exact inverses; ``convert.py`` combines this with the vision half.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Optional

import torch

from multimodal_dev.models.qwen35_vl.configuration import Qwen35TextConfig

__all__ = ["language_state_from_hf", "language_state_to_hf", "HF_LM_PREFIX", "HF_HEAD"]

HF_LM_PREFIX = "model.language_model."
HF_HEAD = "lm_head.weight"


# ------------------------------------------------------------------------------------------------
# The language half (TP = 1). Megatron keys are those of the local-spec Qwen35GPTModel:
#   embedding.word_embeddings.weight
#   decoder.layers.{L}.input_layernorm.weight
#   decoder.layers.{L}.self_attention.linear_qkv.weight        rows per query group g:
#                                                              [q heads of g | gate heads of g | k_g | v_g]
#   decoder.layers.{L}.self_attention.q_layernorm.weight / k_layernorm.weight
#   decoder.layers.{L}.self_attention.linear_proj.weight
#   decoder.layers.{L}.self_attention.in_proj.weight / conv1d.weight / dt_bias / A_log /
#                     out_norm.weight / out_proj.weight           (Gated DeltaNet layers)
#   decoder.layers.{L}.pre_mlp_layernorm.weight
#   decoder.layers.{L}.mlp.router.weight
#   decoder.layers.{L}.mlp.experts.local_experts.{e}.linear_fc1.weight  [gate; up]
#   decoder.layers.{L}.mlp.experts.local_experts.{e}.linear_fc2.weight
#   decoder.layers.{L}.mlp.shared_experts.linear_fc1.weight / linear_fc2.weight / gate_weight
#   decoder.layers.{L}.mlp.linear_fc1.weight / linear_fc2.weight     (dense layers)
#   decoder.final_layernorm.weight
#   output_layer.weight
# ------------------------------------------------------------------------------------------------


def _qkv_from_hf(q_proj: torch.Tensor, k_proj: torch.Tensor, v_proj: torch.Tensor, cfg: Qwen35TextConfig):
    nh, ng, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hidden = q_proj.shape[-1]
    qg = q_proj.view(nh, 2, hd, hidden)  # per head [q_h ; gate_h]
    r = nh // ng
    q = qg[:, 0].reshape(ng, r * hd, hidden)
    gate = qg[:, 1].reshape(ng, r * hd, hidden)
    k = k_proj.view(ng, hd, hidden)
    v = v_proj.view(ng, hd, hidden)
    return torch.cat([q, gate, k, v], dim=1).reshape(ng * (2 * r + 2) * hd, hidden)


def _qkv_to_hf(qkv: torch.Tensor, cfg: Qwen35TextConfig):
    nh, ng, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hidden = qkv.shape[-1]
    r = nh // ng
    grouped = qkv.view(ng, (2 * r + 2) * hd, hidden)
    q, gate, k, v = torch.split(grouped, [r * hd, r * hd, hd, hd], dim=1)
    q_proj = torch.stack([q.reshape(nh, hd, hidden), gate.reshape(nh, hd, hidden)], dim=1)
    return q_proj.reshape(2 * nh * hd, hidden), k.reshape(ng * hd, hidden), v.reshape(ng * hd, hidden)


def _strip_hf_prefix(hf_sd: Mapping[str, torch.Tensor]) -> tuple[dict, Optional[torch.Tensor]]:
    lm, head = {}, None
    for k, v in hf_sd.items():
        if k.startswith(HF_LM_PREFIX):
            lm[k[len(HF_LM_PREFIX) :]] = v
        elif k == HF_HEAD:
            head = v
    return lm, head


@dataclasses.dataclass
class _Dims:
    """What the conversion needs; from a ``Qwen35TextConfig`` or read off the tensors."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    num_experts: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    moe_layer_pattern: list
    tie_word_embeddings: bool
    linear_attention_layers: list


def _layer_ids(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _dims_from_hf(lm: Mapping[str, torch.Tensor], head) -> _Dims:
    layers = _layer_ids(lm, r"^layers\.(\d+)\.")
    lin = _layer_ids(lm, r"^layers\.(\d+)\.linear_attn\.")
    full = [L for L in layers if L not in lin]
    if not full:
        raise ValueError("HF state dict: no full-attention layer to read the attention shapes from")
    a = f"layers.{full[0]}.self_attn."
    hd = lm[a + "q_norm.weight"].shape[0]
    moe = [1 if f"layers.{L}.mlp.gate.weight" in lm else 0 for L in layers]
    E = I = Is = 0
    if any(moe):
        p = f"layers.{layers[moe.index(1)]}.mlp."
        E = lm[p + "gate.weight"].shape[0]
        I = (lm[p + "experts.down_proj"].shape[-1] if p + "experts.down_proj" in lm
             else lm[p + "experts.0.down_proj.weight"].shape[-1])
        Is = lm[p + "shared_expert.down_proj.weight"].shape[-1]
    return _Dims(
        num_attention_heads=lm[a + "q_proj.weight"].shape[0] // (2 * hd),
        num_key_value_heads=lm[a + "k_proj.weight"].shape[0] // hd,
        head_dim=hd,
        num_hidden_layers=len(layers),
        num_experts=E,
        moe_intermediate_size=I,
        shared_expert_intermediate_size=Is,
        moe_layer_pattern=moe,
        tie_word_embeddings=head is None,
        linear_attention_layers=lin,
    )


def _dims_from_megatron(sd: Mapping[str, torch.Tensor]) -> _Dims:
    layers = _layer_ids(sd, r"^decoder\.layers\.(\d+)\.")
    if not layers:
        raise ValueError("megatron state dict: no decoder layers")
    lin = [L for L in layers if f"decoder.layers.{L}.self_attention.in_proj.weight" in sd]
    full = [L for L in layers if L not in lin]
    if not full:
        raise ValueError("megatron state dict: no full-attention layer to read the attention shapes from")
    a = f"decoder.layers.{full[0]}.self_attention."
    hd = sd[a + "q_layernorm.weight"].shape[0]
    nh = sd[a + "linear_proj.weight"].shape[1] // hd
    ng = (sd[a + "linear_qkv.weight"].shape[0] // hd - 2 * nh) // 2
    moe = [1 if f"decoder.layers.{L}.mlp.router.weight" in sd else 0 for L in layers]
    E = I = Is = 0
    if any(moe):
        p = f"decoder.layers.{layers[moe.index(1)]}.mlp."
        E = sd[p + "router.weight"].shape[0]
        I = sd[p + "experts.local_experts.0.linear_fc2.weight"].shape[-1]
        Is = sd[p + "shared_experts.linear_fc2.weight"].shape[-1]
    return _Dims(nh, ng, hd, len(layers), E, I, Is, moe, "output_layer.weight" not in sd, lin)


# Gated DeltaNet: megatron's fused in_proj is [q | k | v | z | beta | alpha] (GatedDeltaNet's
# in_proj_split_names); HF keeps in_proj_qkv ([q | k | v], the conv1d's channels), in_proj_z,
# in_proj_b and in_proj_a apart. Every other GDN tensor is the same tensor under another name
# (out_norm has a plain gamma on our side too: mcore_ext.gdn).
_GDN_SAME = (("conv1d.weight", "conv1d.weight"), ("dt_bias", "dt_bias"), ("A_log", "A_log"),
             ("norm.weight", "out_norm.weight"), ("out_proj.weight", "out_proj.weight"))


def _gdn_from_hf(take, h: str, m: str, out: dict) -> None:
    a = h + "linear_attn."
    out[m + "self_attention.in_proj.weight"] = torch.cat(
        [take(a + "in_proj_qkv.weight"), take(a + "in_proj_z.weight"), take(a + "in_proj_b.weight"),
         take(a + "in_proj_a.weight")])
    for hf, ours in _GDN_SAME:
        out[m + "self_attention." + ours] = take(a + hf)


def _gdn_to_hf(take, m: str, h: str, out: dict) -> None:
    g = m + "self_attention."
    conv_rows = take(g + "conv1d.weight").shape[0]  # 2 * key_dim + value_dim
    value_dim, heads = take(g + "out_proj.weight").shape[1], take(g + "A_log").shape[0]
    qkv, z, b, a_ = torch.split(take(g + "in_proj.weight"), [conv_rows, value_dim, heads, heads])
    a = h + "linear_attn."
    out.update({a + "in_proj_qkv.weight": qkv, a + "in_proj_z.weight": z, a + "in_proj_b.weight": b,
                a + "in_proj_a.weight": a_})
    for hf, ours in _GDN_SAME:
        out[a + hf] = take(g + ours)


class _KeyTaker:
    """``take(k)`` reads key ``k`` of a state dict being converted and remembers it;
    ``check_all_used()`` then fails on every key no conversion rule consumed. ``prefix`` is
    prepended to the keys named in errors (the part of the HF key already stripped)."""

    def __init__(self, sd: Mapping[str, torch.Tensor], what: str, keys_name: str, prefix: str = ""):
        self.sd, self.what, self.keys_name, self.prefix = sd, what, keys_name, prefix
        self.used: set[str] = set()

    def __call__(self, k: str) -> torch.Tensor:
        if k not in self.sd:
            raise KeyError(f"{self.what} has no '{self.prefix}{k}'")
        self.used.add(k)
        return self.sd[k]

    def check_all_used(self) -> None:
        left = sorted(set(self.sd) - self.used)
        if left:
            raise KeyError(f"{self.keys_name} not converted: {[self.prefix + k for k in left[:10]]} "
                           f"({len(left)} in all)")


def _as_dims(cfg: Optional[Qwen35TextConfig]) -> Optional[_Dims]:
    if cfg is None:
        return None
    return _Dims(
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers,
        cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size,
        list(cfg.moe_layer_pattern), bool(cfg.tie_word_embeddings), cfg.linear_attention_layers,
    )


def language_state_from_hf(
    hf_sd: Mapping[str, torch.Tensor], cfg: Optional[Qwen35TextConfig] = None
) -> dict[str, torch.Tensor]:
    """HF ``Qwen3_5MoeForConditionalGeneration`` state dict -> our GPTModel's (TP = 1).

    Without ``cfg`` the sizes are read off the tensors (and tying from the absence of
    ``lm_head.weight``).

    Keys outside ``model.language_model.*`` and ``lm_head.weight`` (vision, ``mtp.*``) are ignored.
    Experts may be fused (``experts.gate_up_proj`` / ``experts.down_proj``) or per expert
    (``experts.{e}.{gate,up,down}_proj.weight``). Every HF language key must be consumed.
    """
    lm, head = _strip_hf_prefix(hf_sd)
    cfg = _as_dims(cfg) or _dims_from_hf(lm, head)
    take = _KeyTaker(lm, "HF state dict", "HF language keys", prefix=HF_LM_PREFIX)

    out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": take("embed_tokens.weight")}
    E = cfg.num_experts
    for L in range(cfg.num_hidden_layers):
        h, m = f"layers.{L}.", f"decoder.layers.{L}."
        out[m + "input_layernorm.weight"] = take(h + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = take(h + "post_attention_layernorm.weight")
        if L in cfg.linear_attention_layers:
            _gdn_from_hf(take, h, m, out)
        else:
            a = h + "self_attn."
            out[m + "self_attention.linear_qkv.weight"] = _qkv_from_hf(
                take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight"), cfg
            )
            out[m + "self_attention.q_layernorm.weight"] = take(a + "q_norm.weight")
            out[m + "self_attention.k_layernorm.weight"] = take(a + "k_norm.weight")
            out[m + "self_attention.linear_proj.weight"] = take(a + "o_proj.weight")
        if cfg.moe_layer_pattern[L]:
            p = h + "mlp."
            out[m + "mlp.router.weight"] = take(p + "gate.weight")
            if p + "experts.gate_up_proj" in lm:
                gate_up, down = take(p + "experts.gate_up_proj"), take(p + "experts.down_proj")
                fc1 = [gate_up[e] for e in range(E)]
                fc2 = [down[e] for e in range(E)]
            else:
                fc1 = [
                    torch.cat([take(f"{p}experts.{e}.gate_proj.weight"), take(f"{p}experts.{e}.up_proj.weight")])
                    for e in range(E)
                ]
                fc2 = [take(f"{p}experts.{e}.down_proj.weight") for e in range(E)]
            for e in range(E):
                out[f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1[e]
                out[f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2[e]
            s = p + "shared_expert."
            out[m + "mlp.shared_experts.linear_fc1.weight"] = torch.cat(
                [take(s + "gate_proj.weight"), take(s + "up_proj.weight")]
            )
            out[m + "mlp.shared_experts.linear_fc2.weight"] = take(s + "down_proj.weight")
            out[m + "mlp.shared_experts.gate_weight"] = take(p + "shared_expert_gate.weight")
        else:
            p = h + "mlp."
            out[m + "mlp.linear_fc1.weight"] = torch.cat([take(p + "gate_proj.weight"), take(p + "up_proj.weight")])
            out[m + "mlp.linear_fc2.weight"] = take(p + "down_proj.weight")
    out["decoder.final_layernorm.weight"] = take("norm.weight")
    if not cfg.tie_word_embeddings:
        if head is None:
            raise KeyError("HF state dict has no 'lm_head.weight' (tie_word_embeddings=False)")
        out["output_layer.weight"] = head
    take.check_all_used()
    return out


def language_state_to_hf(
    sd: Mapping[str, torch.Tensor], cfg: Optional[Qwen35TextConfig] = None, fused_experts: bool = True
) -> dict[str, torch.Tensor]:
    """Our GPTModel's state dict (TP = 1) -> HF keys (inverse of ``language_state_from_hf``).

    Without ``cfg`` the sizes are read off the tensors.

    Megatron's non-parameter entries (``_extra_state``) are ignored. ``fused_experts``: write
    ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]`` (HF 5.23's module layout),
    else per-expert ``experts.{e}.{gate,up,down}_proj.weight``.
    """
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    cfg = _as_dims(cfg) or _dims_from_megatron(sd)
    P = HF_LM_PREFIX
    take = _KeyTaker(sd, "megatron state dict", "megatron keys")

    out: dict[str, torch.Tensor] = {P + "embed_tokens.weight": take("embedding.word_embeddings.weight")}
    E, I, Is = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    for L in range(cfg.num_hidden_layers):
        h, m = f"{P}layers.{L}.", f"decoder.layers.{L}."
        out[h + "input_layernorm.weight"] = take(m + "input_layernorm.weight")
        out[h + "post_attention_layernorm.weight"] = take(m + "pre_mlp_layernorm.weight")
        if L in cfg.linear_attention_layers:
            _gdn_to_hf(take, m, h, out)
        else:
            a = h + "self_attn."
            q, k, v = _qkv_to_hf(take(m + "self_attention.linear_qkv.weight"), cfg)
            out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = q, k, v
            out[a + "q_norm.weight"] = take(m + "self_attention.q_layernorm.weight")
            out[a + "k_norm.weight"] = take(m + "self_attention.k_layernorm.weight")
            out[a + "o_proj.weight"] = take(m + "self_attention.linear_proj.weight")
        p = h + "mlp."
        if cfg.moe_layer_pattern[L]:
            out[p + "gate.weight"] = take(m + "mlp.router.weight")
            fc1 = [take(f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight") for e in range(E)]
            fc2 = [take(f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight") for e in range(E)]
            if fused_experts:
                out[p + "experts.gate_up_proj"] = torch.stack(fc1)
                out[p + "experts.down_proj"] = torch.stack(fc2)
            else:
                for e in range(E):
                    out[f"{p}experts.{e}.gate_proj.weight"] = fc1[e][:I]
                    out[f"{p}experts.{e}.up_proj.weight"] = fc1[e][I:]
                    out[f"{p}experts.{e}.down_proj.weight"] = fc2[e]
            sfc1 = take(m + "mlp.shared_experts.linear_fc1.weight")
            out[p + "shared_expert.gate_proj.weight"] = sfc1[:Is]
            out[p + "shared_expert.up_proj.weight"] = sfc1[Is:]
            out[p + "shared_expert.down_proj.weight"] = take(m + "mlp.shared_experts.linear_fc2.weight")
            out[p + "shared_expert_gate.weight"] = take(m + "mlp.shared_experts.gate_weight")
        else:
            fc1 = take(m + "mlp.linear_fc1.weight")
            n = fc1.shape[0] // 2
            out[p + "gate_proj.weight"], out[p + "up_proj.weight"] = fc1[:n], fc1[n:]
            out[p + "down_proj.weight"] = take(m + "mlp.linear_fc2.weight")
    out[P + "norm.weight"] = take("decoder.final_layernorm.weight")
    if "output_layer.weight" in sd:
        out["lm_head.weight"] = take("output_layer.weight")
    elif not cfg.tie_word_embeddings:
        raise KeyError("megatron state dict has no 'output_layer.weight' (tie_word_embeddings=False)")
    take.check_all_used()
    return out
