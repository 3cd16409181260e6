"""The hybrid qwen35_vl model (Gated DeltaNet + full attention, ``tiny-hybrid``) against HF
``Qwen3_5MoeForConditionalGeneration`` with the same ``layer_types`` (HF's pure-PyTorch GDN path is
the oracle), fp32 on CPU.

HF's default init leaves most GDN heads without memory (A_log = log U(0.01, 16): the state decays
by up to e^-16 per token), which would hide a state that leaks or resets at the wrong place; here
every weight is perturbed and the decay is made moderate (A in [0.02, 0.5], random dt_bias).
Checked:

(a) logits of two image+text samples as padded BSHD rows and as one packed THD row equal HF's
    logits of each sample alone (HF's own packed forward does not reset the GDN state, so it is
    not the oracle for packing): the recurrent state and the conv window reset at every packed
    sample, and padding changes nothing;
(b) the GDN layers matter: with their out_proj zeroed the logits move far from HF's;
(c) the load-balancing loss with an attention mask, per layer, is top_k x ours (as for ``tiny``);
(d) conversion HF <-> ours is exact in both directions, every GDN tensor included, and HF loads
    our converted state dict with ``strict=True``;
(e) other layer patterns (full attention first, GDN last) build and convert.
"""
import pytest
import torch

from megatron.mcore_ext.testing import run_distributed
from multimodal_dev.models.qwen35_vl.convert import hf_to_mcore, mcore_to_hf
from multimodal_dev.models.qwen35_vl.variants import get_variant
from test_qwen35_model import BSHD_LEN, IMG, _collate, _hf_sample_inputs, _samples, _without_labels

transformers = pytest.importorskip("transformers")

VARIANT = "tiny-hybrid"
_ROPE_KEYS = ("rope_theta", "partial_rotary_factor", "mrope_section")


def hf_config(variant=VARIANT, **text_overrides):
    from transformers import Qwen3_5MoeConfig

    v = get_variant(variant)
    text = {k: val for k, val in v["text"].items() if k not in _ROPE_KEYS}
    text.update(text_overrides)
    text["rope_parameters"] = dict(rope_type="default", mrope_interleaved=True,
                                   **{k: v["text"][k] for k in _ROPE_KEYS})
    cfg = Qwen3_5MoeConfig(text_config=text, vision_config=dict(v["vision"]), tie_word_embeddings=False,
                           image_token_id=v["image_token_id"], video_token_id=v["video_token_id"],
                           vision_start_token_id=v["vision_start_token_id"],
                           vision_end_token_id=v["vision_end_token_id"])
    cfg._attn_implementation = "eager"
    return cfg


def perturbed_hf(cfg, seed=0):
    """An HF model whose every weight is perturbed and whose GDN heads have memory."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3_5MoeForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.02, 0.5, generator=g).log())
            elif name.endswith("linear_attn.dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _megatron_side(hf_sd, bshd, thd):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from multimodal_dev.models import build_model

    model = build_model("qwen35_vl", VARIANT)
    init_sd = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}
    model.load_state_dict(hf_to_mcore(hf_sd), strict=True)
    kinds = [type(layer.self_attention).__name__ for layer in model.decoder_layers()]
    out = {"init_sd": init_sd, "kinds": kinds}
    model.eval()
    with torch.no_grad():
        out["logits_bshd"] = model(_without_labels(bshd))
        out["logits_thd"] = model(_without_labels(thd))
        saved = []
        for layer in model.decoder_layers():
            if kinds[len(saved)] == "KernelGatedDeltaNet":
                saved.append(layer.self_attention.out_proj.weight.clone())
                layer.self_attention.out_proj.weight.zero_()
            else:
                saved.append(None)
        out["logits_no_gdn"] = model(_without_labels(thd))
        for layer, w in zip(model.decoder_layers(), saved):
            if w is not None:
                layer.self_attention.out_proj.weight.copy_(w)
    model.train()
    model(bshd)
    out["lbl"] = get_moe_metrics_tracker().metrics["load_balancing_loss"].values.detach().clone()
    return out


@pytest.fixture(scope="module")
def hf():
    return perturbed_hf(hf_config())


@pytest.fixture(scope="module")
def samples():
    return _samples()


@pytest.fixture(scope="module")
def batches(samples):
    return _collate(samples, "bshd"), _collate(samples, "thd")


@pytest.fixture(scope="module")
def hf_per_sample(hf, samples):
    with torch.no_grad():
        return [hf(**_hf_sample_inputs(s)).logits[0] for s in samples]


@pytest.fixture(scope="module")
def ours(hf, batches):
    return run_distributed(_megatron_side, 1, args=(hf.state_dict(), *batches))[0]


def test_the_variant_is_hybrid(hf, ours):
    types = hf.config.text_config.layer_types
    assert types == ["linear_attention"] * 3 + ["full_attention"]
    assert ours["kinds"] == ["KernelGatedDeltaNet"] * 3 + ["PackedRopeSelfAttention"]
    # the GDN heads have memory: the mean per-token decay exp(g) is well above 0 at HF's inputs
    a = hf.model.language_model.layers[0].linear_attn
    with torch.no_grad():
        assert float((-a.A_log.exp() * torch.nn.functional.softplus(a.dt_bias)).exp().mean()) > 0.3


def test_logits_match_hf_per_sample_bshd_and_thd(ours, samples, batches, hf_per_sample):
    _, thd = batches
    for i, (s, ref) in enumerate(zip(samples, hf_per_sample)):
        n = len(s["tokens"])
        torch.testing.assert_close(ours["logits_bshd"][i, :n], ref, rtol=0, atol=1e-4, msg=f"BSHD sample {i}")
        off = int(thd["cu_seqlens_padded"][i])
        torch.testing.assert_close(ours["logits_thd"][0, off:off + n], ref, rtol=0, atol=1e-4, msg=f"THD sample {i}")


def test_the_gdn_layers_carry_the_result(ours, batches, hf_per_sample):
    _, thd = batches
    off, n = int(thd["cu_seqlens_padded"][1]), len(hf_per_sample[1])
    assert (ours["logits_no_gdn"][0, off:off + n] - hf_per_sample[1]).abs().max() > 1e-2


def test_aux_loss_per_layer_is_topk_times_hf(hf, batches, ours):
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

    bshd, _ = batches
    tc = hf.config.text_config
    k, E = tc.num_experts_per_tok, tc.num_experts
    ids, am = bshd["tokens"], (~bshd["padding_mask"]).long()
    assert (am.sum(1) < BSHD_LEN).all()  # both rows are padded
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=am, pixel_values=bshd["pixel_values"],
                 image_grid_thw=bshd["image_grid_thw"], mm_token_type_ids=(ids == IMG).int(),
                 output_router_logits=True)
    assert len(out.router_logits) == 4 and ours["lbl"].shape == (4,)
    for layer, logits in enumerate(out.router_logits):
        torch.testing.assert_close(load_balancing_loss_func((logits,), E, k, am), k * ours["lbl"][layer],
                                   rtol=1e-6, atol=0, msg=f"layer {layer}")


def test_conversion_is_exact_both_ways(hf, ours):
    from transformers import Qwen3_5MoeForConditionalGeneration

    hf_sd = hf.state_dict()
    gdn_keys = [k for k in hf_sd if ".linear_attn." in k]
    assert len(gdn_keys) == 3 * 9  # in_proj_qkv/z/b/a, conv1d, dt_bias, A_log, norm, out_proj per GDN layer
    back = mcore_to_hf(hf_to_mcore(hf_sd))
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], v) for k, v in hf_sd.items())
    init = {k: v for k, v in ours["init_sd"].items() if not k.endswith("_extra_state")}
    again = hf_to_mcore(mcore_to_hf(init))
    assert set(again) == set(init) and all(torch.equal(again[k], v) for k, v in init.items())
    fresh = Qwen3_5MoeForConditionalGeneration(hf_config())
    fresh.load_state_dict(mcore_to_hf(ours["init_sd"]), strict=True)


def _other_pattern_round_trip(pattern):
    import dataclasses

    from multimodal_dev.models import BuildOptions
    from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant
    from multimodal_dev.models.qwen35_vl.model import build_from_configs

    text, vision, tokens = configs_for_variant(VARIANT)
    model = build_from_configs(dataclasses.replace(text, layer_types=pattern), vision, tokens, BuildOptions())
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    again = hf_to_mcore(mcore_to_hf(sd))
    return ([type(layer.self_attention).__name__ for layer in model.decoder_layers()],
            set(again) == set(sd) and all(torch.equal(again[k], v) for k, v in sd.items()))


def test_any_layer_pattern_builds_and_converts():
    pattern = ["full_attention", "linear_attention", "full_attention", "linear_attention"]
    kinds, exact = run_distributed(_other_pattern_round_trip, 1, args=(pattern,))[0]
    assert kinds == ["PackedRopeSelfAttention", "KernelGatedDeltaNet"] * 2 and exact


def _norm_keys_per_layer():
    import dataclasses

    from multimodal_dev.models import BuildOptions
    from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant
    from multimodal_dev.models.qwen35_vl.model import build_from_configs

    text, vision, tokens = configs_for_variant(VARIANT)
    text = dataclasses.replace(text, layer_types=["linear_attention", "full_attention"] * 2,
                               moe_layer_pattern=[1, 0, 0, 1], intermediate_size=64)
    model = build_from_configs(text, vision, tokens, BuildOptions())
    # the key each tensor is stored under (the layer's keys map renames ``ShardedTensor.key``)
    return [sorted(t.key for t in layer.sharded_state_dict(prefix="").values() if "norm" in t.key
                   and "_extra_state" not in t.key) for layer in model.decoder_layers()]


def test_the_local_backend_stores_each_norm_where_the_te_backend_keeps_it():
    """A checkpoint moves between ``--transformer-impl local`` and ``transformer_engine`` only when
    both store a layer's norms under one key. Where megatron's TE spec keeps them (its source,
    ``gpt_layer_specs.get_gpt_layer_with_transformer_engine_submodules``, and our GDN layer's TE
    branch, ``models/spec._gdn_attention``): the input norm fused into the first linear of the token
    mixer (attention's ``linear_qkv``, Gated DeltaNet's ``in_proj``), the pre-MLP norm fused into a
    dense MLP's ``linear_fc1``, and a MoE layer's pre-MLP norm on its own (``pre_mlp_layernorm``).
    Megatron's local spec maps the input norm to ``linear_qkv`` in every layer and the pre-MLP norm
    to ``linear_fc1`` in MoE layers too, which a TE run cannot find (seen on the GPU: the resume
    across backends failed with a missing key)."""
    keys = run_distributed(_norm_keys_per_layer, 1)[0]
    qk = ["self_attention.k_layernorm.weight", "self_attention.q_layernorm.weight"]
    gdn_out = "self_attention.out_norm.weight"  # GDN's gated output norm: a module of its own in both
    assert keys == [
        ["pre_mlp_layernorm.weight", "self_attention.in_proj.layer_norm_weight", gdn_out],  # GDN, MoE
        ["mlp.linear_fc1.layer_norm_weight", qk[0], "self_attention.linear_qkv.layer_norm_weight", qk[1]],  # attention, dense
        ["mlp.linear_fc1.layer_norm_weight", "self_attention.in_proj.layer_norm_weight", gdn_out],  # GDN, dense
        ["pre_mlp_layernorm.weight", qk[0], "self_attention.linear_qkv.layer_norm_weight", qk[1]],  # attention, MoE
    ]
