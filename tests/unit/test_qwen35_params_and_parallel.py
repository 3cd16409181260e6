"""qwen35_vl: parameter counts of the published sizes, and whole-model parallel invariance.

(a) ``count_parameters`` (our MultimodalModel built on the meta device, Gated DeltaNet layers
    included) against HF ``Qwen3_5MoeForConditionalGeneration`` built on meta from the same values
    (``layer_types`` with linear_attention, GDN fields; MTP is not part of that class): exactly equal
    totals, vision towers and linear-attention mixers, and equal to docs/qwen35_moe_facts.md section
    9.1. 35B-A3B and 122B-A10B build every decoder layer; 397B-A17B builds one layer per layer kind
    (``representative_layers=True``: a GDN + MoE and a full-attention + MoE layer, counted 45 and 15
    times). That this scaling is exact is checked on 35B-A3B and 122B-A10B, whose full and
    representative builds must agree on every key.
(b) the ``proxy`` variant has 1-2 B parameters.
(c) ``build_model("qwen35_vl", "tiny")`` (vision tower + megatron decoder through MultimodalModel)
    on a collated image+text BSHD batch, aux loss 0.01 and z-loss 1e-3: TP=2 with sequence
    parallelism and EP=2 (DP=2, one sample per rank) give the one-process per-token losses and
    gradients (router weights first, then every parameter).
    Weights move between layouts with ``megatron.mcore_ext.testing.load_global_tensors``; the check
    ``_check_weights_moved`` guards what this test found: megatron hands SwiGLU ``linear_fc1``
    weights (experts, shared experts) out as a ``ShardedTensorFactory``, which those helpers used to
    skip silently, leaving the sharded model's fc1 weights at their random init (TP=2 losses off
    by ~5%). testing.py now places both shards of such factories.
"""
import pytest
import torch

from megatron.mcore_ext.sharding import global_tensors, load_global_tensors, local_slices
from megatron.mcore_ext.testing import run_distributed
from multimodal_dev.data import CollateConfig, pack_or_pad_batch


PUBLISHED = ("35B-A3B", "122B-A10B", "397B-A17B")
FULL_BUILD = ("35B-A3B", "122B-A10B")  # every layer built; 397B-A17B: one representative layer
# docs/qwen35_moe_facts.md section 9.1 (HF modules, MTP excluded)
FACTS = {
    "35B-A3B": dict(total=35_107_181_936, vision=446_571_248, language=34_660_610_688,
                    linear_attention=1_011_553_920, full_attention=272_634_880,
                    routed_experts=32_212_254_720, active_language=3_454_988_928,
                    all_full_attention_total=34_913_532_656),
    "122B-A10B": dict(total=122_562_817_776, vision=451_290_864, language=122_111_526_912,
                      linear_attention=3_186_828_288, full_attention=943_724_544,
                      routed_experts=115_964_116_992, active_language=9_771_288_576,
                      all_full_attention_total=122_207_163_120),
    "397B-A17B": dict(total=396_802_360_816, vision=456_010_480, language=396_346_350_336,
                      linear_attention=5_310_639_360, full_attention=1_572_871_680,
                      routed_experts=386_547_056_640, active_language=17_349_040_896,
                      all_full_attention_total=396_210_336_496),
}


# ------------------------------------------------------------------------------------ (a), (b)
def _count_all():
    """In one rank (parallel sizes 1): every count the tests need, with build times."""
    import time

    from multimodal_dev.models.qwen35_vl.params import count_parameters

    out = {}
    for variant in PUBLISHED + ("proxy", "proxy-hybrid"):
        for rep in (False, True):
            if not rep and variant not in FULL_BUILD:
                continue
            t0 = time.perf_counter()
            counts = count_parameters(variant, representative_layers=rep)
            out[(variant, rep)] = (counts, time.perf_counter() - t0)
    return out


@pytest.fixture(scope="module")
def ours():
    return run_distributed(_count_all, 1)[0]


def _hf_counts(variant):
    """(total, vision, language-model-only) of HF's model built on meta from the variant's values."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from multimodal_dev.models.qwen35_vl.variants import get_variant

    v = get_variant(variant)
    text = dict(v["text"])
    rope = dict(
        rope_type="default",
        rope_theta=text.pop("rope_theta"),
        partial_rotary_factor=text.pop("partial_rotary_factor"),
        mrope_section=text.pop("mrope_section"),
        mrope_interleaved=True,
    )
    cfg = Qwen3_5MoeConfig(
        text_config=dict(text, rope_parameters=rope),
        vision_config=dict(v["vision"]),
        image_token_id=v["image_token_id"],
        video_token_id=v["video_token_id"],
        vision_start_token_id=v["vision_start_token_id"],
        vision_end_token_id=v["vision_end_token_id"],
        tie_word_embeddings=False,
    )
    assert cfg.text_config.layer_types == v["text"]["layer_types"]
    assert cfg.text_config.linear_num_value_heads == v["text"]["linear_num_value_heads"]
    with torch.device("meta"):
        model = Qwen3_5MoeForConditionalGeneration(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not any("mtp" in n for n in names)
    n_linear = sum(t == "linear_attention" for t in cfg.text_config.layer_types)
    assert sum(n.endswith("linear_attn.A_log") for n in names) == n_linear > 0
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    linear = sum(p.numel() for n, p in model.named_parameters() if ".linear_attn." in n)
    return dict(total=count(model), vision=count(model.model.visual), linear_attention=linear)


@pytest.mark.parametrize("variant", PUBLISHED)
def test_published_counts_match_hf_and_fact_sheet(ours, variant):
    pytest.importorskip("transformers")
    rep = variant not in FULL_BUILD
    counts, seconds = ours[(variant, rep)]
    hf = _hf_counts(variant)
    print(f"\n{variant}: ours total {counts['total']:,} (built in {seconds:.1f}s, {counts['layers_built']} "
          f"layers), HF total {hf['total']:,}; vision {counts['vision']:,} / HF {hf['vision']:,}; "
          f"linear attention {counts['linear_attention']:,} / HF {hf['linear_attention']:,}; "
          f"active language {counts['active_language']:,}; active {counts['active']:,}")
    assert counts["total"] == hf["total"]
    assert counts["vision"] == hf["vision"]
    assert counts["linear_attention"] == hf["linear_attention"]
    for key, value in FACTS[variant].items():
        assert counts[key] == value, f"{variant} {key}: {counts[key]:,} != fact sheet {value:,}"
    # internal consistency
    assert counts["total"] == counts["language"] + counts["vision"]
    assert counts["language"] == (
        counts["embedding"] + counts["output_layer"] + counts["final_norm"] + counts["layer_norms"]
        + counts["full_attention"] + counts["linear_attention"] + counts["routed_experts"]
        + counts["routers"] + counts["shared_experts"] + counts["dense_mlps"]
    )
    assert counts["num_linear_attention_layers"] + counts["num_full_attention_layers"] == counts["num_layers"]


@pytest.mark.parametrize("variant", FULL_BUILD)
def test_one_layer_build_scales_exactly(ours, variant):
    """The representative-layer build (used for 397B-A17B) gives the full build's numbers."""
    full, t_full = ours[(variant, False)]
    rep, t_rep = ours[(variant, True)]
    print(f"\n{variant}: full build {t_full:.1f}s ({full['layers_built']} layers), "
          f"one-layer build {t_rep:.1f}s ({rep['layers_built']} layer)")
    assert full["layers_built"] == full["num_layers"] and rep["layers_built"] == 2  # a GDN and a full-attention layer
    assert {k: v for k, v in full.items() if k != "layers_built"} == {
        k: v for k, v in rep.items() if k != "layers_built"
    }


def test_proxy_hybrid_counts_match_hf(ours):
    pytest.importorskip("transformers")
    counts, _ = ours[("proxy-hybrid", True)]
    hf = _hf_counts("proxy-hybrid")
    assert counts["num_linear_attention_layers"] == 9 and counts["num_full_attention_layers"] == 3
    assert counts["total"] == hf["total"] and counts["vision"] == hf["vision"]
    assert counts["linear_attention"] == hf["linear_attention"] > 0


def test_proxy_is_one_to_two_billion(ours):
    counts, _ = ours[("proxy", True)]
    print(f"\nproxy: total {counts['total']:,}, active {counts['active']:,}")
    assert 1e9 <= counts["total"] <= 2e9
    assert counts["linear_attention"] == 0 and counts["total"] == counts["all_full_attention_total"]


# ------------------------------------------------------------------------------------ (c)
IMG = 250  # the tiny variant's image token id
COEFF, ZCOEFF = 0.01, 1e-3
SEQ = 24
PAR = dict(rtol=1e-4, atol=1e-6)


def _samples():
    """Two samples with images (grids (1,4,4) and (1,4,8): 4 and 8 image tokens), uneven lengths."""
    g = torch.Generator().manual_seed(5)
    out = []
    for n_text, grid in ((9, (1, 4, 4)), (13, (1, 4, 8))):
        toks = torch.randint(1, 248, (n_text,), generator=g).tolist()  # no special ids (248-251)
        n_patches = grid[0] * grid[1] * grid[2]
        toks = toks[:2] + [IMG] * (n_patches // 4) + toks[2:]
        tokens = torch.tensor(toks)
        labels = torch.roll(tokens, -1).clone()
        labels[:3] = -100  # a prompt
        labels[tokens == IMG] = -100
        labels[-1] = -100
        out.append(dict(
            tokens=tokens,
            labels=labels,
            pixel_values=torch.randn(n_patches, 3 * 2 * 4 * 4, generator=g),  # [t*h*w, C*T*P*P]
            image_grid_thw=torch.tensor([grid]),
        ))
    return out


def _batch(which=None):
    samples = _samples() if which is None else [_samples()[which]]
    b = pack_or_pad_batch(samples, CollateConfig(layout="bshd", target_seqlen=SEQ, divisible_by=2, image_token_id=IMG))
    b.pop("stats")
    return b


def _run(weights, vision_state, which, sp, ref_grads=None, variant="tiny"):
    """Build the tiny qwen35_vl model under this rank's layout, forward the batch (both samples, or
    sample ``which``; ``which="dp"``: this rank's data-parallel sample), backward
    ``sum(token_loss * loss_mask)`` (the aux and z losses attach themselves, scale 1)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from multimodal_dev.models import BuildOptions, MoEOptions, build_model

    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
    model = build_model("qwen35_vl", variant, BuildOptions(sequence_parallel=sp, moe=MoEOptions(aux_loss_coeff=COEFF, z_loss_coeff=ZCOEFF)))
    lm, vision = model.language_model, model.vision_encoder
    if weights is None:  # the reference: perturb everything (zero-centred norms start at 0)
        g = torch.Generator().manual_seed(17)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        weights = global_tensors(lm)
        vision_state = {k: v.detach().clone() for k, v in vision.state_dict().items()}
    else:  # sharded decoder: megatron's sharded-state-dict slices; vision tower: replicated
        load_global_tensors(lm, weights)
        vision.load_state_dict(vision_state)
    if which == "dp":
        which = ps.get_data_parallel_rank()
    model.train()
    batch = _batch(which)
    losses = model(batch)
    (losses * batch["loss_mask"]).sum().backward()
    named = dict(lm.named_parameters())
    unsharded = ps.get_tensor_model_parallel_world_size() * ps.get_expert_model_parallel_world_size() == 1
    return dict(
        weights=weights,
        vision_state=vision_state,
        losses=losses.detach(),
        grads={n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None},
        vision_grads={n: p.grad.detach().clone() for n, p in vision.named_parameters()},
        global_grads=global_tensors(lm, "grad") if unsharded else None,
        ref_grads=local_slices(lm, ref_grads) if ref_grads is not None else None,
        loaded=global_tensors(lm),  # this rank's slices of the weights it holds (NaN elsewhere)
        tp_rank=ps.get_tensor_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        is_expert={n: ".experts." in n for n in named},
        sp_partial={n: bool(getattr(p, "sequence_parallel", False)) for n, p in named.items()},
    )


def _references(variant):
    full = _run(None, None, None, False, variant=variant)
    subs = [_run(full["weights"], full["vision_state"], i, False, variant=variant) for i in range(2)]
    return full, subs


@pytest.fixture(scope="module", params=["tiny", "tiny-hybrid"])
def reference(request):
    """One process: the whole batch, and each sample alone (the EP/DP references); the variant
    (all full attention, or hybrid with Gated DeltaNet layers) rides along."""
    return (*run_distributed(_references, 1, args=(request.param,))[0], request.param)


def _check_weights_moved(results, weights):
    """Every parameter got a reference slice, and the ranks' loaded weights are exactly the global
    ones and together cover all of them (SwiGLU ``linear_fc1`` included: megatron hands those out
    as a ShardedTensorFactory of two shards)."""
    for r in results:
        assert set(r["ref_grads"]) == set(r["grads"]) == set(r["is_expert"])
        assert any(".linear_fc1." in n for n in r["ref_grads"])
    for key, w in weights.items():
        covered = torch.zeros(w.shape, dtype=torch.bool)
        for r in results:
            got = r["loaded"][key]
            held = ~torch.isnan(got)
            assert torch.equal(got[held], w[held]), key
            covered |= held
        assert bool(covered.all()), f"{key}: not every element is held by some rank"


def _tol(variant, ref, name=""):
    """tiny: PAR. The hybrid's gradients are up to ~20 large and go through the chunked delta rule:
    fp32 summation order differs between layouts by ~1e-5 of a tensor's scale, so the absolute part
    of the tolerance follows the scale; a layout bug shows as errors of the order of the gradient
    itself. The GDN decay parameters' gradients (``A_log``, ``dt_bias``: one value per head, a sum
    of signed terms over every token, which cancel) carry more: up to 2e-4 of their scale on one CPU
    host, 4e-4 on another (AMD EPYC, torch 2.14.1: TP=2+SP, layer 0's ``A_log``), so 1e-3 there."""
    if variant == "tiny":
        return PAR
    share = 1e-3 if name.endswith(("A_log", "dt_bias")) else 2e-4
    return dict(rtol=1e-4, atol=share * float(ref.abs().max()))


def _router_first(names):
    return sorted(names, key=lambda n: (not n.endswith("router.weight"), n))


def test_tp2_sequence_parallel_matches_one_process(reference):
    """TP=2 + SP, both ranks see the whole batch: same per-token losses; SP-partial grads (norms,
    routers: attr ``sequence_parallel``) add up over TP, the others are this rank's slice of the
    reference; the replicated vision tower gets the whole reference gradient on every rank (the
    SP scatter's backward all-gathers the embeddings' gradient)."""
    full, _, variant = reference
    results = run_distributed(
        _run, 2, tp=2, args=(full["weights"], full["vision_state"], None, True, full["global_grads"], variant)
    )
    assert [r["tp_rank"] for r in results] == [0, 1]
    _check_weights_moved(results, full["weights"])
    for r in results:
        torch.testing.assert_close(r["losses"], full["losses"], **PAR)
        names = _router_first(r["grads"])
        assert sum(n.endswith("router.weight") for n in names) == (4 if variant == "tiny-hybrid" else 2)
        for n in names:
            g = sum(x["grads"][n] for x in results) if r["sp_partial"][n] else r["grads"][n]
            torch.testing.assert_close(g, r["ref_grads"][n], **_tol(variant, r["ref_grads"][n], n),
                                       msg=lambda m, n=n: f"TP2+SP grad {n}: {m}")
        for n, g in r["vision_grads"].items():
            torch.testing.assert_close(g, full["vision_grads"][n], **_tol(variant, full["vision_grads"][n], n),
                                       msg=lambda m, n=n: f"TP2+SP vision grad {n}: {m}")
    assert all(r["sp_partial"][n] for n in results[0]["grads"] if n.endswith("router.weight"))


def test_ep2_data_parallel_matches_one_process(reference):
    """EP=2 with DP=2, one sample per rank: each rank's per-token losses are the one-process losses
    of its sample; non-expert grads (vision tower included) add up over DP to the sum of the two
    one-process runs; expert grads are whole on their EP rank (the allgather dispatcher brings both
    ranks' tokens to them)."""
    full, subs, variant = reference
    ref_grads = {k: subs[0]["global_grads"][k] + subs[1]["global_grads"][k] for k in subs[0]["global_grads"]}
    results = run_distributed(
        _run, 2, ep=2, args=(full["weights"], full["vision_state"], "dp", False, ref_grads, variant)
    )
    assert [r["ep_rank"] for r in results] == [0, 1]
    _check_weights_moved(results, full["weights"])
    for r, sub in zip(results, subs):
        torch.testing.assert_close(r["losses"], sub["losses"], **PAR)
    # the single-sample runs are the rows of the two-sample run (padding-aware everything)
    for i, sub in enumerate(subs):
        m = ~_batch(i)["padding_mask"]
        torch.testing.assert_close(sub["losses"][m], full["losses"][i : i + 1][m], **PAR)
    for r in results:
        names = _router_first(r["grads"])
        assert sum(n.endswith("router.weight") for n in names) == (4 if variant == "tiny-hybrid" else 2)
        for n in names:
            g = r["grads"][n] if r["is_expert"][n] else sum(x["grads"][n] for x in results)
            torch.testing.assert_close(g, r["ref_grads"][n], **_tol(variant, r["ref_grads"][n], n),
                                       msg=lambda m, n=n: f"EP2 grad {n}: {m}")
    for n in results[0]["vision_grads"]:
        g = results[0]["vision_grads"][n] + results[1]["vision_grads"][n]
        expected = subs[0]["vision_grads"][n] + subs[1]["vision_grads"][n]
        torch.testing.assert_close(g, expected, **_tol(variant, expected, n), msg=lambda m, n=n: f"EP2 vision grad {n}: {m}")
