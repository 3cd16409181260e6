"""Qwen3.5-MoE language decoder on megatron-core vs HF transformers (the oracle), fp32 on CPU.

A tiny all-full-attention HF ``Qwen3_5MoeForConditionalGeneration`` with random (perturbed)
weights is converted into our GPTModel (``build_qwen35_language_model``). Checked:

* interleaved MRoPE: our frequency -> axis layout and angles equal HF's rotary embedding;
* logits with 3-D (image-like, rows not equal) position ids, BSHD, batch of 2;
* text-only logits (equal rows) against HF's default positions;
* packed THD logits (two samples in one row) against the per-sample HF logits;
* context parallelism (CP=2, zigzag) for BSHD and THD against the same HF logits, also through
  ``MultimodalModel`` (which CP-splits the batch itself);
* conversion HF -> megatron -> HF exact (fused and per-expert experts), megatron -> HF -> megatron
  exact, and HF accepts the converted dict with ``strict=True``;
* a model mixing dense and MoE layers converts both ways;
* linear-attention (Gated DeltaNet) layers raise, naming the layer indices.

The rotary config is chosen so that ``mrope_section`` limits the interleaving: head_dim 32,
partial_rotary_factor 0.625 -> rotary dim 20 -> 10 frequencies, section [5, 3, 2] ->
axes T H W T H W T H T T (index 8 is T, not W).
"""
import numpy as np
import pytest
import torch

from megatron.mcore_ext.cp_split import thd_partition_index, zigzag_index
from megatron.mcore_ext.testing import run_distributed
from multimodal_dev.data import mrope_position_ids
from multimodal_dev.models.qwen35_vl.configuration import Qwen35TextConfig
from multimodal_dev.models.qwen35_vl.convert import language_state_from_hf, language_state_to_hf
from multimodal_dev.models.qwen35_vl.rope import InterleavedMRoPE, mrope_axis_of_frequency

transformers = pytest.importorskip("transformers")

IMG, VID, VS, VE = 250, 251, 248, 249
S = 16  # per sample; divisible by 2*CP for CP=2
TEXT = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, layer_types=["full_attention"] * 2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    moe_intermediate_size=32, shared_expert_intermediate_size=48,
    num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001,
    rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False,
)
ROPE = dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.625,
            mrope_section=[5, 3, 2], mrope_interleaved=True)


def _hf_config():
    from transformers import Qwen3_5MoeConfig

    cfg = Qwen3_5MoeConfig(
        text_config=dict(**TEXT, rope_parameters=dict(ROPE)),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2,
                           out_hidden_size=64, num_position_embeddings=16),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    return cfg


@pytest.fixture(scope="module")
def hf():
    from transformers import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration(_hf_config()).eval()
    with torch.no_grad():  # norm weights start at 0, experts at N(0, 0.02): make everything matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def text_cfg(hf):
    return Qwen35TextConfig.from_hf(hf.config.text_config)


def _inputs():
    """Two samples of S tokens with one image each (3-D positions, rows differ)."""
    g = torch.Generator().manual_seed(5)
    rows, pos = [], []
    for start, grid in ((4, (1, 4, 6)), (2, (1, 4, 4))):
        n_img = grid[0] * grid[1] * grid[2] // 4
        toks = torch.randint(0, VS, (S,), generator=g)
        toks[start - 1], toks[start : start + n_img], toks[start + n_img] = VS, IMG, VE
        rows.append(toks)
        pos.append(torch.from_numpy(mrope_position_ids(S, np.array([[start, start + n_img]]), np.array([grid]))))
    return torch.stack(rows), torch.stack(pos, dim=1)  # [2, S], [3, 2, S]


@torch.no_grad()
def _hf_logits(model, tokens, position_ids=None):
    lm = model.model.language_model
    h = lm(input_ids=tokens, position_ids=position_ids, use_cache=False).last_hidden_state
    return model.lm_head(h)


# ---------------------------------------------------------------------------------------------
# megatron side (runs inside run_distributed ranks)
# ---------------------------------------------------------------------------------------------
def _build(text_cfg, mg_sd):
    from multimodal_dev.models.qwen35_vl.model import build_qwen35_language_model

    model = build_qwen35_language_model(text_cfg, parallel_output=False)
    init_sd = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(mg_sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing
    return model.eval(), init_sd


def _packed(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor(cu, dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=S, max_seqlen_kv=S)


def _one_process(text_cfg, mg_sd, tokens, pos):
    from megatron.mcore_ext.norm import TorchNorm

    model, init_sd = _build(text_cfg, mg_sd)
    attn = model.decoder.layers[0].self_attention
    assert isinstance(attn.q_layernorm, TorchNorm) and attn.q_layernorm.zero_centered_gamma
    out = {"init_sd": init_sd}
    with torch.no_grad():
        out["mrope"] = model(input_ids=tokens, position_ids=pos, attention_mask=None)
        text_pos = torch.arange(S).view(1, 1, S).expand(3, tokens.shape[0], S)
        out["text"] = model(input_ids=tokens, position_ids=text_pos, attention_mask=None)
        out["thd"] = model(input_ids=tokens.reshape(1, -1), position_ids=pos.reshape(3, 1, -1),
                           attention_mask=None, packed_seq_params=_packed([0, S, 2 * S]))
    return out


def _cp_rank(text_cfg, mg_sd, tokens, pos):
    from megatron.core import parallel_state as ps

    cp, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    model, _ = _build(text_cfg, mg_sd)
    with torch.no_grad():
        zi = zigzag_index(S, cp, r)
        bshd = model(input_ids=tokens[:, zi], position_ids=pos[:, :, zi], attention_mask=None)
        ti = thd_partition_index([0, S, 2 * S], cp, r)
        thd = model(input_ids=tokens.reshape(1, -1)[:, ti], position_ids=pos.reshape(3, 1, -1)[:, :, ti],
                    attention_mask=None, packed_seq_params=_packed([0, S, 2 * S]))
        # the same through MultimodalModel (it CP-splits the batch and passes [3, b, s] positions)
        from multimodal_dev.models import MultimodalModel

        mm = MultimodalModel(model, vision_encoder=None, image_token_id=None, mrope=True)
        cu = torch.tensor([0, S, 2 * S], dtype=torch.int32)
        torch.testing.assert_close(mm({"tokens": tokens, "position_ids": pos}), bshd, rtol=0, atol=0)
        mm_thd = mm({"tokens": tokens.reshape(1, -1), "position_ids": pos.reshape(3, 1, -1),
                     "cu_seqlens": cu, "cu_seqlens_padded": cu, "max_seqlen": S})
        torch.testing.assert_close(mm_thd, thd, rtol=0, atol=0)
    return zi, bshd, ti, thd


@pytest.fixture(scope="module")
def converted(hf, text_cfg):
    return language_state_from_hf(hf.state_dict(), text_cfg)


@pytest.fixture(scope="module")
def reference(hf):
    tokens, pos = _inputs()
    return tokens, pos, _hf_logits(hf, tokens, pos)


@pytest.fixture(scope="module")
def one_process(text_cfg, converted, reference):
    tokens, pos, _ = reference
    return run_distributed(_one_process, 1, args=(text_cfg, converted, tokens, pos))[0]


# ---------------------------------------------------------------------------------------------
def test_mrope_layout_matches_hf(hf, reference):
    # the fact sheet's verified layout for the published section
    axis = mrope_axis_of_frequency(32, [11, 11, 10])
    assert "".join("THW"[a] for a in axis.tolist()) == "THWTHWTHWTHWTHWTHWTHWTHWTHWTHWTH"
    assert "".join("THW"[a] for a in mrope_axis_of_frequency(10, [5, 3, 2]).tolist()) == "THWTHWTHTT"
    # our angles give HF's cos/sin (HF: [3, b, s] -> [b, s, rd]; ours: [s, b, 1, rd])
    _, pos, _ = reference
    rope = InterleavedMRoPE(kv_channels=32, rotary_percent=0.625, rotary_base=10000.0, mrope_section=[5, 3, 2])
    freqs = rope(pos)
    assert freqs.shape == (S, 2, 1, 20)
    cos, sin = hf.model.language_model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    torch.testing.assert_close(freqs.squeeze(2).transpose(0, 1).cos(), cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(freqs.squeeze(2).transpose(0, 1).sin(), sin, rtol=0, atol=1e-6)


def test_position_ids_are_3d(reference):
    _, pos, _ = reference
    # sample 0 is the fact sheet's verified example (section 6), extended by two text tokens
    assert pos[0, 0, :14].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9, 10]
    assert pos[1, 0, :14].tolist() == [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9, 10]
    assert pos[2, 0, :14].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9, 10]
    assert not torch.equal(pos[0], pos[1]) and not torch.equal(pos[1], pos[2])


def test_logits_match_hf_mrope(one_process, reference):
    ref = reference[2]
    assert one_process["mrope"].shape == ref.shape == (2, S, 256)
    torch.testing.assert_close(one_process["mrope"], ref, rtol=0, atol=1e-4)


def test_logits_match_hf_text_only(hf, one_process, reference):
    tokens = reference[0]
    ref = _hf_logits(hf, tokens)  # HF's default: arange positions on all rows
    torch.testing.assert_close(one_process["text"], ref, rtol=0, atol=1e-4)
    # and the 3-D positions really change the result
    assert (one_process["text"] - reference[2]).abs().max() > 1e-3


def test_logits_match_hf_packed_thd(one_process, reference):
    ref = reference[2].reshape(1, 2 * S, -1)
    torch.testing.assert_close(one_process["thd"], ref, rtol=0, atol=1e-4)


def test_logits_match_hf_context_parallel(text_cfg, converted, reference):
    tokens, pos, ref = reference
    results = run_distributed(_cp_rank, 2, cp=2, args=(text_cfg, converted, tokens, pos))
    bshd = torch.empty_like(ref)
    thd = torch.empty_like(ref).reshape(1, 2 * S, -1)
    for zi, b, ti, t in results:
        bshd[:, zi] = b
        thd[:, ti] = t
    torch.testing.assert_close(bshd, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(thd, ref.reshape(1, 2 * S, -1), rtol=0, atol=1e-4)


def test_round_trip_hf_megatron_hf(hf, text_cfg, converted):
    hf_sd = hf.state_dict()
    lm_keys = {k for k in hf_sd if k.startswith("model.language_model.") or k == "lm_head.weight"}
    no_cfg = language_state_from_hf(hf_sd)  # sizes read off the tensors
    assert no_cfg.keys() == converted.keys() and all(torch.equal(no_cfg[k], converted[k]) for k in converted)
    for fused in (True, False):
        back = language_state_to_hf(converted, text_cfg, fused_experts=fused)
        again = language_state_from_hf(back, text_cfg)
        assert again.keys() == converted.keys()
        assert all(torch.equal(again[k], converted[k]) for k in converted)
        if fused:
            assert set(back) == lm_keys
            assert all(torch.equal(back[k], hf_sd[k]) for k in lm_keys)
    # HF takes the converted dict as its own (with the untouched vision weights)
    from transformers import Qwen3_5MoeForConditionalGeneration

    full = {k: v for k, v in hf_sd.items() if k not in lm_keys}
    full.update(language_state_to_hf(converted, text_cfg))
    hf2 = Qwen3_5MoeForConditionalGeneration(_hf_config()).eval()
    hf2.load_state_dict(full, strict=True)


def _init_state(text_cfg):
    from multimodal_dev.models.qwen35_vl.model import build_qwen35_language_model

    sd = build_qwen35_language_model(text_cfg).state_dict()
    return {k: v for k, v in sd.items() if not k.endswith("_extra_state")}


def test_round_trip_megatron_hf_megatron(text_cfg, one_process):
    init_sd = one_process["init_sd"]  # the megatron model's own random init
    for cfg in (text_cfg, None):
        again = language_state_from_hf(language_state_to_hf(init_sd, cfg), cfg)
        assert again.keys() == init_sd.keys()
        assert all(torch.equal(again[k], init_sd[k]) for k in init_sd)


def test_round_trip_dense_and_moe_layers():
    cfg = Qwen35TextConfig(**dict(TEXT, num_hidden_layers=3, layer_types=["full_attention"] * 3),
                           moe_layer_pattern=[0, 1, 0], intermediate_size=40,
                           partial_rotary_factor=0.625, mrope_section=[5, 3, 2])
    sd = run_distributed(_init_state, 1, args=(cfg,))[0]
    assert sd["decoder.layers.0.mlp.linear_fc1.weight"].shape == (80, 64)
    assert "decoder.layers.1.mlp.router.weight" in sd and "decoder.layers.2.mlp.router.weight" not in sd
    hf_sd = language_state_to_hf(sd, cfg)
    assert hf_sd["model.language_model.layers.2.mlp.gate_proj.weight"].shape == (40, 64)
    for c in (cfg, None):
        again = language_state_from_hf(language_state_to_hf(sd, c), c)
        assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)


def test_qkv_layout_is_megatrons_grouped_order(hf, text_cfg, converted):
    # per query group: [q heads of the group | their gates | k | v]
    a = hf.state_dict()
    p = "model.language_model.layers.0.self_attn."
    qkv = converted["decoder.layers.0.self_attention.linear_qkv.weight"].view(2, 6, 32, 64)
    qg = a[p + "q_proj.weight"].view(4, 2, 32, 64)
    assert torch.equal(qkv[1, 0], qg[2, 0]) and torch.equal(qkv[1, 1], qg[3, 0])  # q heads 2, 3
    assert torch.equal(qkv[1, 2], qg[2, 1]) and torch.equal(qkv[1, 3], qg[3, 1])  # their gates
    assert torch.equal(qkv[1, 4], a[p + "k_proj.weight"].view(2, 32, 64)[1])
    assert torch.equal(qkv[1, 5], a[p + "v_proj.weight"].view(2, 32, 64)[1])


def test_config_mapping_and_linear_attention_layers():
    cfg = Qwen35TextConfig(**TEXT, rope_theta=1e7, partial_rotary_factor=0.625, mrope_section=[5, 3, 2])
    tc = cfg.to_transformer_config(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                   context_parallel_size=1, expert_model_parallel_size=1,
                                   expert_tensor_parallel_size=1)
    assert tc.normalization == "RMSNorm" and tc.layernorm_zero_centered_gamma and tc.qk_layernorm
    assert tc.attention_output_gate and tc.kv_channels == 32 and tc.num_query_groups == 2
    assert tc.moe_shared_expert_gate and tc.moe_shared_expert_intermediate_size == 48
    assert tc.moe_router_topk == 2 and tc.moe_router_score_function == "softmax" and not tc.moe_router_pre_softmax
    assert tc.gated_linear_unit and not tc.add_bias_linear and tc.mrope_section == [5, 3, 2]
    kw = cfg.gpt_model_kwargs()
    assert kw["rotary_percent"] == 0.625 and kw["rotary_base"] == 1e7 and kw["position_embedding_type"] == "mrope"
    assert not kw["share_embeddings_and_output_weights"]

    # linear_attention layers (Gated DeltaNet, once refused here) map onto megatron's per-layer pattern
    mixed = dict(TEXT, num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)
    mixed_cfg = Qwen35TextConfig(**mixed, partial_rotary_factor=0.625, mrope_section=[5, 3, 2])
    mc = mixed_cfg.to_transformer_config(1, 1, 1, 1, 1)
    assert mc.experimental_attention_variant == "gated_delta_net" and mc.linear_attention_freq == [1, 0, 1, 0]
    assert (mc.linear_num_key_heads, mc.linear_num_value_heads, mc.linear_key_head_dim) == (2, 4, 16)
    with pytest.raises(KeyError, match="layers.0.linear_attn.in_proj_qkv.weight"):
        language_state_from_hf({"model.language_model.embed_tokens.weight": torch.zeros(1),
                                "model.language_model.layers.0.input_layernorm.weight": torch.zeros(1),
                                "model.language_model.layers.0.post_attention_layernorm.weight": torch.zeros(1)},
                               mixed_cfg)
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen35TextConfig(**TEXT, partial_rotary_factor=0.25, mrope_section=[5, 3, 2])


def test_top1_routing_is_refused_when_the_config_is_converted():
    """HF gives the one chosen expert weight 1 (top-k renormalised over k = 1); megatron-core 0.19.2
    demands moe_router_pre_softmax for top-1, which weighs it by its probability p. The two models
    would differ, so num_experts_per_tok=1 is refused where the config is read, naming the setting."""
    with pytest.raises(ValueError, match=r"num_experts_per_tok=1.*weight 1.*pre_softmax"):
        Qwen35TextConfig(**dict(TEXT, num_experts_per_tok=1), partial_rotary_factor=0.625, mrope_section=[5, 3, 2])
