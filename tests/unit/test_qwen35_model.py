"""The whole qwen35_vl model (vision tower + MoE decoder in ``MultimodalModel``) against HF
``Qwen3_5MoeForConditionalGeneration`` (the oracle), fp32 on CPU.

The HF model is built from the ``tiny`` variant's values (which are the fact sheet's section 10
config, checked below), every weight is perturbed, and the state dict is converted with
``hf_to_mcore`` into ``build_model("qwen35_vl", "tiny")`` (``strict=True``). Checked:

(a) logits of two image+text samples (one image / two images), collated by ``pack_or_pad_batch``
    as padded BSHD and as packed THD, equal HF's per-sample logits (HF run with
    ``mm_token_type_ids``); the per-token LM losses equal the cross entropy of HF's logits;
(b) the collate's MRoPE position ids equal HF's ``get_rope_index`` (per sample, and on a
    right-padded batch at the real tokens);
(c) the load-balancing loss on a padded batch, per layer: HF's own ``load_balancing_loss_func``
    on one layer's router logits with the attention mask == top_k x our recorded
    ``load_balancing_loss`` of that layer (fact sheet section 4.1: HF's f_i counts each token k
    times and divides by T, megatron's Switch f_i divides by k*T; P_i is the same mean softmax);
(d) conversion round trips are exact: HF -> ours -> HF and ours -> HF -> ours (keys and tensors).
"""
import pytest
import torch

from megatron.mcore_ext.testing import run_distributed
from multimodal_dev.data import CollateConfig, pack_or_pad_batch
from multimodal_dev.models.qwen35_vl.convert import configs_from_hf, hf_to_mcore, mcore_to_hf
from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant
from multimodal_dev.models.qwen35_vl.variants import get_variant

transformers = pytest.importorskip("transformers")

PAD = 0
BSHD_LEN = 20  # both samples are padded (14 and 18 tokens)
THD_MULTIPLE = 4  # 14 -> 16, 18 -> 20 in the packed row

# Fact sheet section 10, verbatim values (the verified tiny config).
FACTS_TEXT = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, layer_types=["full_attention", "full_attention"],
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    moe_intermediate_size=32, shared_expert_intermediate_size=48,
    num_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001,
    rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False,
)
FACTS_ROPE = dict(rope_type="default", rope_theta=10000000.0, partial_rotary_factor=0.25,
                  mrope_section=[2, 1, 1], mrope_interleaved=True)
FACTS_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3,
                    patch_size=4, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64,
                    num_position_embeddings=16)
FACTS_TOKENS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=248, vision_end_token_id=249)
_ROPE_KEYS = ("rope_theta", "partial_rotary_factor", "mrope_section")


def _hf_config_from_variant():
    """HF ``Qwen3_5MoeConfig`` built from variants.py's ``tiny`` (not from the literals above)."""
    from transformers import Qwen3_5MoeConfig

    v = get_variant("tiny")
    text = {k: val for k, val in v["text"].items() if k not in _ROPE_KEYS}
    text["rope_parameters"] = dict(rope_type="default", mrope_interleaved=True,
                                   **{k: v["text"][k] for k in _ROPE_KEYS})
    cfg = Qwen3_5MoeConfig(text_config=text, vision_config=dict(v["vision"]), tie_word_embeddings=False,
                           **{k: v[k] for k in FACTS_TOKENS})
    cfg._attn_implementation = "eager"
    return cfg


IMG, VS, VE = FACTS_TOKENS["image_token_id"], FACTS_TOKENS["vision_start_token_id"], FACTS_TOKENS["vision_end_token_id"]
PATCH_DIM = 3 * 2 * 4 * 4  # C * T * P * P = 96


def _samples():
    """Sample 0: the fact sheet's example (3 text, <vs>, 6 image tokens of grid 1x4x6, <ve>, 3 text).
    Sample 1: two images (grids 1x4x4 -> 4 tokens, 1x2x4 -> 2 tokens) between text, 18 tokens."""
    g = torch.Generator().manual_seed(7)

    def text(n):
        return torch.randint(1, VS, (n,), generator=g).tolist()

    def img(grid):
        return [VS] + [IMG] * (grid[0] * grid[1] * grid[2] // 4) + [VE]

    layouts = [
        ([1, 2, 3] + img((1, 4, 6)) + [4, 5, 6], [(1, 4, 6)]),
        (text(2) + img((1, 4, 4)) + text(3) + img((1, 2, 4)) + text(3), [(1, 4, 4), (1, 2, 4)]),
    ]
    out = []
    for toks, grids in layouts:
        toks = torch.tensor(toks)
        labels = torch.cat([toks[1:], torch.tensor([-100])])
        labels[(toks == IMG) | (labels == IMG)] = -100  # no loss on / towards image placeholders
        n_patch = sum(t * h * w for t, h, w in grids)
        out.append(dict(tokens=toks, labels=labels, image_grid_thw=torch.tensor(grids),
                        pixel_values=torch.randn(n_patch, PATCH_DIM, generator=g)))
    return out


def _collate(samples, layout):
    cfg = CollateConfig(layout=layout, target_seqlen=BSHD_LEN if layout == "bshd" else None,
                        divisible_by=1 if layout == "bshd" else THD_MULTIPLE, pad_token_id=PAD,
                        image_token_id=IMG, spatial_merge_size=2)
    return pack_or_pad_batch(samples, cfg)


def _hf_sample_inputs(s):
    ids = s["tokens"][None]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=s["pixel_values"],
                image_grid_thw=s["image_grid_thw"], mm_token_type_ids=(ids == IMG).int())


# ---------------------------------------------------------------------------------------------
# megatron side: everything in one rank call (starting ranks costs seconds)
# ---------------------------------------------------------------------------------------------
def _without_labels(batch):
    return {k: v for k, v in batch.items() if k not in ("labels", "loss_mask")}


def _megatron_side(hf_sd, bshd, thd):
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from multimodal_dev.models import build_model

    model = build_model("qwen35_vl", "tiny")
    own = model.state_dict()
    init_sd = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in own.items()}
    out = {"init_sd": init_sd, "extra_keys": sorted(k for k in own if k.endswith("_extra_state"))}

    # strict loading, without and with the model's own extra states
    model.load_state_dict(hf_to_mcore(hf_sd), strict=True)
    templated = hf_to_mcore(hf_sd, template=model.state_dict())
    assert list(templated) == list(model.state_dict())
    model.load_state_dict(templated, strict=True)
    loaded = model.state_dict()
    out["loaded_sd"] = {k: v.clone() for k, v in loaded.items() if isinstance(v, torch.Tensor)}

    model.eval()
    with torch.no_grad():
        out["logits_bshd"] = model(_without_labels(bshd))
        out["logits_thd"] = model(_without_labels(thd))

    # aux loss: training mode with grads enabled (the router only records then), labels given
    model.train()
    tracker = get_moe_metrics_tracker()
    assert "load_balancing_loss" not in tracker.metrics
    losses = model(bshd)
    out["losses_bshd"] = losses.detach()
    out["lbl"] = tracker.metrics["load_balancing_loss"].values.detach().clone()
    out["topk"] = model.language_model.config.moe_router_topk
    out["num_experts"] = model.language_model.config.num_moe_experts
    out["aux_coeff"] = model.language_model.config.moe_aux_loss_coeff
    return out


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    from transformers import Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration(_hf_config_from_variant()).eval()
    with torch.no_grad():  # norm weights start at 0 (scale 1), experts at N(0, 0.02): perturb all
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


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
    bshd, thd = batches
    return run_distributed(_megatron_side, 1, args=(hf.state_dict(), bshd, thd))[0]


# ---------------------------------------------------------------------------------------------
def test_tiny_variant_is_the_fact_sheet_config(hf):
    text, vision, tokens = configs_for_variant("tiny")
    assert tokens == FACTS_TOKENS
    tc = hf.config.text_config
    for k, v in FACTS_TEXT.items():
        if k == "max_position_embeddings":  # not in the variant (32768 default); unused by 'default' RoPE
            continue
        assert getattr(tc, k) == v, k
    for k, v in FACTS_ROPE.items():
        assert tc.rope_parameters[k] == v, k
    for k, v in FACTS_VISION.items():
        assert getattr(hf.config.vision_config, k) == v, k
    # and our configs read back from HF's equal the variant's
    t2, v2 = configs_from_hf(hf.config)
    assert (t2.hidden_size, t2.num_experts, t2.num_experts_per_tok, t2.mrope_section, t2.rope_theta) == (
        text.hidden_size, text.num_experts, text.num_experts_per_tok, text.mrope_section, text.rope_theta)
    assert v2 == vision


def test_logits_match_hf_bshd_and_thd(ours, samples, batches, hf_per_sample):
    bshd, thd = batches
    lb, lt = ours["logits_bshd"], ours["logits_thd"]
    assert lb.shape == (2, BSHD_LEN, 256)
    assert lt.shape == (1, int(thd["cu_seqlens_padded"][-1]), 256)
    assert thd["cu_seqlens"].tolist() == [0, 14, 32] and thd["cu_seqlens_padded"].tolist() == [0, 16, 36]
    for i, (s, ref) in enumerate(zip(samples, hf_per_sample)):
        n = len(s["tokens"])
        assert ref.shape == (n, 256)
        torch.testing.assert_close(lb[i, :n], ref, rtol=0, atol=1e-4, msg=f"BSHD sample {i}")
        off = int(thd["cu_seqlens_padded"][i])
        torch.testing.assert_close(lt[0, off:off + n], ref, rtol=0, atol=1e-4, msg=f"THD sample {i}")

def test_parity_is_sensitive_to_the_images(hf, samples, hf_per_sample):
    # non-vacuous: other pixel values change HF's logits from the first image token on (so the
    # parity above covers the vision tower and the image-token scatter), and not before it
    s = dict(samples[0], pixel_values=samples[0]["pixel_values"].flip(0))
    with torch.no_grad():
        other = hf(**_hf_sample_inputs(s)).logits[0]
    first = int((s["tokens"] == IMG).nonzero()[0])
    torch.testing.assert_close(other[:first], hf_per_sample[0][:first], rtol=0, atol=1e-6)
    assert (other[first:] - hf_per_sample[0][first:]).abs().max() > 1e-3


def test_lm_losses_match_hf_cross_entropy(ours, samples, batches, hf_per_sample):
    bshd, _ = batches
    losses = ours["losses_bshd"]
    assert losses.shape == (2, BSHD_LEN)
    for i, (s, ref) in enumerate(zip(samples, hf_per_sample)):
        n = len(s["tokens"])
        keep = s["labels"] != -100
        ce = torch.nn.functional.cross_entropy(ref[keep], s["labels"][keep], reduction="none")
        torch.testing.assert_close(losses[i, :n][keep], ce, rtol=0, atol=1e-4)
        assert torch.equal(bshd["loss_mask"][i, :n].bool(), keep)


def test_position_ids_match_hf_get_rope_index(hf, samples, batches):
    bshd, thd = batches
    for i, s in enumerate(samples):
        inp = _hf_sample_inputs(s)
        pos, _ = hf.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"],
                                         image_grid_thw=inp["image_grid_thw"],
                                         attention_mask=inp["attention_mask"])
        n = len(s["tokens"])
        assert pos.shape == (3, 1, n)
        assert torch.equal(bshd["position_ids"][:, i, :n], pos[:, 0]), i
        off = int(thd["cu_seqlens_padded"][i])
        assert torch.equal(thd["position_ids"][:, 0, off:off + n], pos[:, 0]), i
    # the fact sheet's verified example (section 6)
    assert bshd["position_ids"][:, 0, :14].tolist() == [
        [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9, 10],
        [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9, 10],
        [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9, 10],
    ]
    # on the right-padded batch HF gives the real tokens the same ids (its pads get 0, ours continue)
    ids, am = bshd["tokens"], (~bshd["padding_mask"]).long()
    pos, _ = hf.model.get_rope_index(ids, (ids == IMG).int(), image_grid_thw=bshd["image_grid_thw"],
                                     attention_mask=am)
    real = am.bool()
    assert torch.equal(pos[:, real], bshd["position_ids"][:, real])
    assert (pos[:, ~real] == 0).all()


def test_aux_loss_per_layer_is_topk_times_hf(hf, batches, ours):
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func

    bshd, _ = batches
    k, E = ours["topk"], ours["num_experts"]
    assert (k, E) == (hf.config.text_config.num_experts_per_tok, hf.config.text_config.num_experts) == (2, 8)
    assert ours["aux_coeff"] == hf.config.text_config.router_aux_loss_coef > 0
    # HF on the same right-padded batch, padding marked by attention_mask
    ids, am = bshd["tokens"], (~bshd["padding_mask"]).long()
    assert (am.sum(1) < BSHD_LEN).all()  # both rows are padded
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=am, pixel_values=bshd["pixel_values"],
                 image_grid_thw=bshd["image_grid_thw"], mm_token_type_ids=(ids == IMG).int(),
                 output_router_logits=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (2 * BSHD_LEN, E)
    ours_lbl = ours["lbl"]
    assert ours_lbl.shape == (2,) and (ours_lbl > 0).all()
    for layer, logits in enumerate(out.router_logits):
        hf_l = load_balancing_loss_func((logits,), E, k, am)
        torch.testing.assert_close(hf_l, k * ours_lbl[layer], rtol=1e-6, atol=0, msg=f"layer {layer}")
        # non-vacuous: without the mask HF counts the pads and gets another value
        assert (load_balancing_loss_func((logits,), E, k, None) - hf_l).abs() > 1e-4
    # HF's reported aux loss is the joint one over both layers, not the mean of the per-layer values
    joint = load_balancing_loss_func(out.router_logits, E, k, am)
    torch.testing.assert_close(out.aux_loss, joint, rtol=1e-6, atol=0)


def test_round_trip_hf_ours_hf(hf, ours):
    hf_sd = hf.state_dict()
    back = mcore_to_hf(hf_to_mcore(hf_sd))
    assert set(back) == set(hf_sd) and len(back) == len(hf_sd) == 66
    for key, v in hf_sd.items():
        assert back[key].dtype == v.dtype and torch.equal(back[key], v), key
    # what the model holds after loading is exactly the conversion
    conv = hf_to_mcore(hf_sd)
    loaded = ours["loaded_sd"]
    assert set(loaded) == set(conv)
    assert all(torch.equal(loaded[k], conv[k]) for k in conv)
    # mtp.* keys (published checkpoints) are ignored like HF does; unknown keys are refused
    assert hf_to_mcore({**hf_sd, "mtp.fc.weight": torch.zeros(1)}).keys() == conv.keys()
    with pytest.raises(KeyError, match="neither language, vision nor mtp"):
        hf_to_mcore({**hf_sd, "model.bogus.weight": torch.zeros(1)})


def test_round_trip_ours_hf_ours(ours):
    from transformers import Qwen3_5MoeForConditionalGeneration

    init_sd = ours["init_sd"]  # our model's own random init, with its _extra_state entries
    assert ours["extra_keys"] and all(init_sd[k] is None for k in ours["extra_keys"])
    text, vision, _ = configs_for_variant("tiny")
    tensors = {k: v for k, v in init_sd.items() if not k.endswith("_extra_state")}
    for tc, vc in ((text, vision), (None, None)):
        for fused in (True, False):
            hf_sd = mcore_to_hf(init_sd, tc, vc, fused_experts=fused)
            again = hf_to_mcore(hf_sd, tc)
            assert set(again) == set(tensors)
            assert all(torch.equal(again[k], tensors[k]) for k in tensors)
            with_extra = hf_to_mcore(hf_sd, tc, template=init_sd)
            assert list(with_extra) == list(init_sd)
            assert all(with_extra[k] is None if v is None else torch.equal(with_extra[k], v)
                       for k, v in init_sd.items())
    # HF accepts the converted dict as its own
    hf2 = Qwen3_5MoeForConditionalGeneration(_hf_config_from_variant())
    hf2.load_state_dict(mcore_to_hf(init_sd, text, vision), strict=True)
    with pytest.raises(KeyError, match="outside"):
        mcore_to_hf({**init_sd, "bogus.weight": torch.zeros(1)})
