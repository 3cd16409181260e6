"""Qwen3.5-MoE vision tower against HF ``Qwen3_5MoeVisionModel`` (random weights, CPU).

(a) parity of the merged features (``pooler_output``) in fp32 for images of different grids,
    including a two-frame entry (each frame its own attention segment), and for a batch of equal
    grids (the reshape path of the attention); bf16 agrees loosely; parameter gradients agree;
(b) the state-dict conversion is lossless both ways;
(c) ``vision_param_count`` equals the parameter count of our module and of HF's, and gives the
    published vision tower sizes (fact sheet section 9).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeVisionConfig  # noqa: E402
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeVisionModel  # noqa: E402

from multimodal_dev.models.qwen35_vl.vision import (  # noqa: E402
    HF_VISUAL_PREFIX,
    Qwen35VisionConfig,
    Qwen35VisionTower,
    vision_param_count,
    vision_state_from_hf,
    vision_state_to_hf,
)

SMALL = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=128, out_hidden_size=32,
             num_position_embeddings=64, patch_size=16, temporal_patch_size=2, in_channels=3,
             spatial_merge_size=2)


@pytest.fixture(scope="module")
def hf_and_ours():
    torch.manual_seed(0)
    hf_cfg = Qwen3_5MoeVisionConfig(**SMALL)
    hf = Qwen3_5MoeVisionModel(hf_cfg).eval()
    with torch.no_grad():  # every parameter non-trivial (LayerNorms start at 1/0)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = Qwen35VisionConfig.from_hf(hf_cfg)
    ours = Qwen35VisionTower(cfg).eval()
    ours.load_state_dict(vision_state_from_hf(hf.state_dict()), strict=True)
    return hf, ours, cfg


def _inputs(cfg, grids, seed=1):
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids)
    n = int(grid.prod(-1).sum())
    return torch.randn(n, cfg.patch_dim, generator=g), grid


@pytest.mark.parametrize(
    "grids",
    [
        [[1, 4, 6], [1, 8, 8], [2, 4, 4]],  # ragged: frames grouped by length, t=2 entry
        [[1, 4, 4], [1, 4, 4], [2, 4, 4]],  # all frames equal: one batched SDPA call
        [[1, 2, 10], [1, 12, 2]],  # grids larger than the 8x8 position table along one axis
    ],
)
def test_parity_fp32(hf_and_ours, grids):
    hf, ours, cfg = hf_and_ours
    pixel_values, grid = _inputs(cfg, grids)
    with torch.no_grad():
        ref = hf(pixel_values, grid_thw=grid).pooler_output
        out = ours(pixel_values, grid)
    assert out.shape == (pixel_values.shape[0] // 4, cfg.out_hidden_size)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_parity_bf16(hf_and_ours):
    hf, ours, cfg = hf_and_ours
    pixel_values, grid = _inputs(cfg, [[1, 4, 6], [2, 4, 4]])
    hf_bf, ours_bf = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    try:
        with torch.no_grad():
            ref = hf_bf(pixel_values.to(torch.bfloat16), grid_thw=grid).pooler_output
            out = ours_bf(pixel_values.to(torch.bfloat16), grid)
    finally:
        hf.float(), ours.float()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_gradient_parity(hf_and_ours):
    hf, ours, cfg = hf_and_ours
    pixel_values, grid = _inputs(cfg, [[1, 4, 6], [2, 4, 4]], seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(pixel_values.shape[0] // 4, cfg.out_hidden_size, generator=g)
    hf.zero_grad(), ours.zero_grad()
    (hf(pixel_values, grid_thw=grid).pooler_output * w).sum().backward()
    (ours(pixel_values, grid) * w).sum().backward()
    hf_grads = vision_state_from_hf({k: p.grad for k, p in hf.named_parameters()})
    for k, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[k], atol=1e-4, rtol=1e-4, msg=k)
    hf.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash path of the vision attention needs a CUDA GPU")
@pytest.mark.parametrize("grids", [[[1, 4, 6], [1, 8, 8], [2, 4, 4]], [[1, 4, 4], [2, 4, 4]]],
                         ids=["several_lengths", "one_length"])
def test_varlen_path_matches_grouped_path_on_gpu(hf_and_ours, monkeypatch, grids):
    """bf16 on a GPU: the frames go through one varlen flash kernel (whether their lengths differ
    or not); the same tower with that path switched off (gather / SDPA / scatter per length, or
    one dense SDPA for one length) gives the same output and gradients up to bf16 rounding, and
    both agree with HF's."""
    from megatron.mcore_ext.attention import varlen_available

    from multimodal_dev.models.qwen35_vl import vision as vision_mod

    if not varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn")
    hf, ours, cfg = hf_and_ours
    pixel_values, grid = _inputs(cfg, grids, seed=4)
    x = pixel_values.cuda().bfloat16()
    tower = Qwen35VisionTower(cfg).cuda().bfloat16()
    tower.load_state_dict(ours.state_dict())
    hf_bf = Qwen3_5MoeVisionModel(hf.config).cuda().bfloat16().eval()
    hf_bf.load_state_dict(hf.state_dict())

    calls = []
    real = vision_mod._varlen_ok

    def spy(q):
        calls.append(real(q))
        return calls[-1]

    def run(use_varlen):
        monkeypatch.setattr(vision_mod, "_varlen_ok", spy if use_varlen else (lambda q: False))
        tower.zero_grad(set_to_none=True)
        out = tower(x, grid)
        out.float().square().mean().backward()
        return out.detach().float(), {k: p.grad.float() for k, p in tower.named_parameters()}

    out_v, grads_v = run(True)
    assert calls and all(calls)  # the varlen kernel ran in every block
    out_g, grads_g = run(False)
    with torch.no_grad():
        ref = hf_bf(x, grid_thw=grid.cuda()).pooler_output.float()
    torch.testing.assert_close(out_v, out_g, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out_v, ref, atol=3e-2, rtol=3e-2)
    for k in grads_g:
        scale = float(grads_g[k].abs().max()) + 1e-6  # bf16 rounding relative to the gradient's size
        torch.testing.assert_close(grads_v[k], grads_g[k], atol=5e-2 * scale, rtol=5e-2, msg=k)


def test_bad_inputs_name_the_problem(hf_and_ours):
    _, ours, cfg = hf_and_ours
    pixel_values, grid = _inputs(cfg, [[1, 4, 4]])
    with pytest.raises(ValueError, match="describes 32"):
        ours(pixel_values, torch.tensor([[2, 4, 4]]))
    with pytest.raises(ValueError, match="divisible by spatial_merge_size"):
        ours(pixel_values[:15], torch.tensor([[1, 3, 5]]))


def test_state_dict_round_trip(hf_and_ours):
    hf, ours, cfg = hf_and_ours
    sd = hf.state_dict()
    for back in (vision_state_to_hf(vision_state_from_hf(sd)),
                 vision_state_to_hf(vision_state_from_hf(sd), cfg=cfg)):
        assert list(back) == list(sd)
        for k in sd:
            assert back[k].shape == sd[k].shape and back[k].dtype == sd[k].dtype, k
            assert torch.equal(back[k], sd[k]), k
    # ours -> HF -> ours, and the full-checkpoint prefix (other keys ignored)
    our_sd = ours.state_dict()
    full = {**vision_state_to_hf(our_sd, cfg=cfg, prefix=HF_VISUAL_PREFIX),
            "model.language_model.embed_tokens.weight": torch.zeros(2, 2)}
    again = vision_state_from_hf(full, prefix=HF_VISUAL_PREFIX)
    assert list(again) == list(our_sd)
    assert all(torch.equal(again[k], our_sd[k]) for k in our_sd)
    with pytest.raises(KeyError, match="unexpected key"):
        vision_state_from_hf({**sd, "blocks.0.attn.bogus": torch.zeros(1)})


def test_param_count(hf_and_ours):
    hf, ours, cfg = hf_and_ours
    n = vision_param_count(cfg)
    assert n == sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("out_hidden, expected", [(2048, 446_571_248), (3072, 451_290_864),
                                                  (4096, 456_010_480)])
def test_param_count_published(out_hidden, expected):
    # HF defaults: depth 27, hidden 1152, 16 heads, intermediate 4304, 48x48 position grid
    cfg = Qwen35VisionConfig.from_hf(Qwen3_5MoeVisionConfig(out_hidden_size=out_hidden))
    assert vision_param_count(cfg) == expected
