"""MultimodalModel plumbing (architecture-agnostic): image scatter, CP split, SP scatter of the mask.

A toy vision encoder (a linear map of each 2x2 patch group) in front of the tiny MoE GPTModel.
Sharded runs (CP=2 BSHD and THD, TP=2 with sequence parallelism) must give the one-process
per-token losses; the padding-aware router raises if the mask reaching it has the wrong layout,
so a passing SP/CP run also checks that the mask was split and scattered like the embeddings.
"""
import pytest
import torch

from megatron.mcore_ext.cp_split import cp_partition_index
from megatron.mcore_ext.sharding import global_tensors, load_global_tensors
from megatron.mcore_ext.testing import run_distributed, tiny_moe_gpt
from multimodal_dev.data import CollateConfig, pack_or_pad_batch

V, IMG, PATCH, H = 64, 63, 12, 32


class ToyVision(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.proj = torch.nn.Linear(4 * PATCH, H)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(H, 4 * PATCH, generator=g) * 0.1)
            self.proj.bias.zero_()

    def forward(self, pixel_values, grid):
        return self.proj(pixel_values.reshape(-1, 4 * PATCH))


def _samples():
    g = torch.Generator().manual_seed(3)
    out = []
    for n_text, grid in ((9, (1, 2, 4)), (13, None), (5, (1, 4, 4))):
        toks = torch.randint(0, IMG, (n_text,), generator=g).tolist()
        sample = {}
        if grid:
            n_img = grid[0] * grid[1] * grid[2] // 4
            toks = toks[:3] + [IMG] * n_img + toks[3:]
            sample["pixel_values"] = torch.randn(grid[0] * grid[1] * grid[2], PATCH, generator=g)
            sample["image_grid_thw"] = torch.tensor([grid])
        labels = torch.tensor(toks[1:] + [0])
        labels[:4] = -100  # a prompt
        labels[-1] = -100
        sample.update(tokens=torch.tensor(toks), labels=labels)
        out.append(sample)
    return out


def _batch(layout):
    cfg = CollateConfig(layout=layout, target_seqlen=24 if layout == "bshd" else None, divisible_by=4, image_token_id=IMG)
    return pack_or_pad_batch(_samples(), cfg)


def _model(sp=False):
    from multimodal_dev.models import MultimodalModel

    lm = tiny_moe_gpt(vocab_size=V, sequence_parallel=sp, scatter_embedding_sequence_parallel=False,
                      moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3)
    return MultimodalModel(lm, ToyVision(), image_token_id=IMG)


def _run(layout, weights=None, sp=False):
    from megatron.core import parallel_state as ps

    model = _model(sp)
    if weights is None:
        weights = global_tensors(model.language_model)
    else:
        load_global_tensors(model.language_model, weights)
    batch = _batch(layout)
    losses = model(batch)
    cp, r = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    idx = cp_partition_index(batch, cp, r)
    return weights, losses.detach(), idx


@pytest.mark.parametrize("layout", ["bshd", "thd"])
def test_cp2_and_tp2_sp_match_one_process(layout):
    weights, ref, _ = run_distributed(_run, 1, args=(layout,))[0]
    for res in run_distributed(_run, 2, cp=2, args=(layout, weights)):
        _, losses, idx = res
        torch.testing.assert_close(losses, ref[:, idx], rtol=1e-5, atol=1e-5)
    for res in run_distributed(_run, 2, tp=2, args=(layout, weights, True)):
        torch.testing.assert_close(res[1], ref, rtol=1e-5, atol=1e-5)


def test_bshd_and_thd_give_the_same_token_losses():
    _, bshd, _ = run_distributed(_run, 1, args=("bshd",))[0]
    weights = run_distributed(_run, 1, args=("bshd",))[0][0]
    _, thd, _ = run_distributed(_run, 1, args=("thd", weights))[0]
    b, t = _batch("bshd"), _batch("thd")
    torch.testing.assert_close(thd[~t["padding_mask"]], bshd[~b["padding_mask"]], rtol=1e-5, atol=1e-5)


def _mismatch():
    model = _model()
    batch = _batch("bshd")
    batch["tokens"][1, 0] = IMG  # one image token too many: a batch edited after the collate,
    del batch["image_tokens"]  # so without the collate's count (the model counts on the device)
    model(batch)


def test_image_token_count_mismatch_is_a_clear_error():
    with pytest.raises(Exception, match="produced 6 image embeddings but the text has 7 image tokens"):
        run_distributed(_mismatch, 1)


def _count_from_collate():
    model = _model()
    batch = _batch("bshd")
    assert batch["image_tokens"] == 6
    batch["image_tokens"] = 7  # the collate's host count is what the model compares (no device read)
    model(batch)


def test_the_model_checks_the_vision_output_against_the_collates_count():
    with pytest.raises(Exception, match="produced 6 image embeddings but the text has 7 image tokens"):
        run_distributed(_count_from_collate, 1)
