"""``--cuda-graph-layers`` (megatron/mcore_ext/layer_graphs.py).

On a GPU: the trainer with the decoder layers replayed from CUDA graphs trains like the eager
trainer on the same padded THD rows (rows of multiples of 256 tokens, samples of 64, given to both): the first iteration's forward is the same computation (same
weights, same kernels), so its losses and every expert's token count are equal; later iterations
follow within bf16 tolerance; and the graphs were really captured and replayed (the metrics say
how often). Several micro-batches per step and rows of several lengths exercise capture, replay of
an earlier length, and accumulation into the gradient buffers and the router statistics.

On CPU: installing the graphs changes nothing (every call runs eagerly, and says why).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"
COMMON = ["--variant", "tiny", "--dataset-provider", "mock", "--micro-batch-size", "2", "--global-batch-size", "8",
          "--seq-length", "512", "--layout-independent-init", "--lr", "2e-3", "--lr-warmup-iters", "1",
          "--no-progress-bar", "--moe-z-loss-coeff", "1e-3", "--seed", "1234", "--use-packed-sequence",
          "--thd-row-multiple", "256", "--thd-sample-multiple", "64", "--train-iters", "6"]


def _run(args, tmp_path, name):
    env = dict(os.environ, OMP_NUM_THREADS="4")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    metrics = tmp_path / f"{name}.jsonl"
    r = subprocess.run([sys.executable, str(ENTRY), *args, "--metrics-file", str(metrics)], capture_output=True,
                       text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("router", [[], ["--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid"]],
                         ids=["softmax", "expert_bias"])
def test_graphed_layers_train_like_eager(tmp_path, router):
    eager = _run(COMMON + ["--bf16", *router], tmp_path, "eager")
    graphed = _run(COMMON + ["--bf16", "--cuda-graph-layers", *router], tmp_path, "graphed")
    assert len(eager) == len(graphed) == 6
    # the graphs were used: captured once per (layer, row length), replayed from then on
    g = graphed[-1]["cuda_graphs"]
    assert g["captures"] >= 2 and g["replays"] > g["captures"], g
    assert "cuda_graphs" not in eager[-1]
    first_e, first_g = eager[0], graphed[0]
    for k in ("lm_loss", "load_balancing_loss", "z_loss"):
        assert abs(first_e[k] - first_g[k]) <= 1e-6 * abs(first_e[k]), (k, first_e[k], first_g[k])
    assert first_e["expert_tokens"] == first_g["expert_tokens"]
    assert first_e["padding_tokens"] == first_g["padding_tokens"] > 0
    for a, b in zip(eager, graphed):
        assert abs(a["lm_loss"] - b["lm_loss"]) <= 2e-3 * a["lm_loss"], (a["iteration"], a["lm_loss"], b["lm_loss"])
        assert abs(a["load_balancing_loss"] - b["load_balancing_loss"]) <= 5e-3 * a["load_balancing_loss"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 2e-2 * a["grad_norm"], (a["iteration"], a["grad_norm"],
                                                                                b["grad_norm"])
        # every real token routed to top-k experts, none of the padding: the same totals as eager
        assert [sum(x) for x in a["expert_tokens"]] == [sum(x) for x in b["expert_tokens"]]


def test_the_eager_and_graphed_runs_above_collate_the_same_rows(monkeypatch):
    """The GPU comparisons hold only if both runs see the same padded rows: --cuda-graph-layers
    pads each packed sample to 64 tokens by default (the Gated DeltaNet graphs need it), so the
    eager run is given that padding explicitly. Parsed here on CPU (--bf16 asks for a GPU: the
    check is told there is one; nothing runs)."""
    from multimodal_dev.arguments import parse_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for extra in ([], ["--variant", "tiny-hybrid"]):
        eager = parse_args(COMMON + ["--bf16", *extra], world_size=1).data
        graphed = parse_args(COMMON + ["--bf16", "--cuda-graph-layers", *extra], world_size=1).data
        assert eager == graphed, (eager, graphed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="on CPU --cuda-graph-layers fails earlier: needs a GPU")
def test_graphs_need_bf16():
    from multimodal_dev.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError, match="--cuda-graph-layers needs --bf16"):
        parse_args(["--cuda-graph-layers", "--use-packed-sequence"], world_size=1)
    data = parse_args(["--cuda-graph-layers", "--use-packed-sequence", "--bf16"], world_size=1).data
    assert (data.row_multiple, data.sample_multiple) == (1024, 64)


def _fla_usable():
    if not torch.cuda.is_available():
        return "no GPU"
    from megatron.mcore_ext.gdn import fla_usable

    return fla_usable()


@pytest.mark.skipif(_fla_usable() is not None, reason=f"graphed Gated DeltaNet layers need fla's kernels: {_fla_usable()}")
def test_graphed_hybrid_layers_train_like_eager(tmp_path):
    """tiny-hybrid (3 Gated DeltaNet + 1 attention layer): the GDN layers are graphed too (fla's
    chunk map a graph input, every sample a multiple of 64 tokens), and train like eager."""
    common = COMMON + ["--bf16", "--variant", "tiny-hybrid"]
    eager = _run(common, tmp_path, "eager")
    graphed = _run(common + ["--cuda-graph-layers"], tmp_path, "graphed")
    g = graphed[-1]["cuda_graphs"]
    assert g["captures"] >= 4 and g["replays"] > g["captures"], g
    first_e, first_g = eager[0], graphed[0]
    for k in ("lm_loss", "load_balancing_loss"):
        assert abs(first_e[k] - first_g[k]) <= 1e-6 * abs(first_e[k]), (k, first_e[k], first_g[k])
    assert first_e["expert_tokens"] == first_g["expert_tokens"]
    for a, b in zip(eager, graphed):
        assert abs(a["lm_loss"] - b["lm_loss"]) <= 2e-3 * a["lm_loss"], (a["iteration"], a["lm_loss"], b["lm_loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 2e-2 * a["grad_norm"], (a["iteration"], a["grad_norm"])


def test_gated_deltanet_layers_are_graphed_with_fla_and_64_token_samples_only():
    """What LayerGraphs refuses for GDN layers, by name: the torch kernels (their packed path
    reads the boundaries on the host), and samples not padded to fla's 64-token chunk."""
    from megatron.mcore_ext.testing import run_distributed

    assert run_distributed(_gdn_refusals, 1)[0] == ["torch kernels", "multiple of 64"]


def _gdn_refusals():
    import dataclasses

    from gdn_layer import build_gdn_layer

    from megatron.mcore_ext.layer_graphs import LayerGraphs

    gdn = build_gdn_layer("torch", device="cpu", bf16=False)
    layer = torch.nn.ModuleDict({"self_attention": gdn})
    got = []
    try:
        LayerGraphs([layer], sample_multiple=64)
    except ValueError as e:
        got.append("torch kernels" if "torch kernels" in str(e) else str(e))
    gdn.kernels = dataclasses.replace(gdn.kernels, name="fla")  # past the first check, to reach the second
    try:
        LayerGraphs([layer], sample_multiple=32)
    except ValueError as e:
        got.append("multiple of 64" if "multiple of 64 tokens" in str(e) and "--thd-sample-multiple 32" in str(e)
                   else str(e))
    assert "forward" not in layer.__dict__  # refused before any forward was replaced
    return got


def test_installed_graphs_change_nothing_on_cpu():
    """On CPU every layer call runs eagerly (and is counted with its reason): outputs and gradients
    are the model's own."""
    if torch.cuda.is_available():
        pytest.skip("the CPU fallback; on a GPU the graphed path is tested above")
    from megatron.mcore_ext.testing import run_distributed

    out = run_distributed(_cpu_fallback, 1)
    assert out[0]["same_out"] and out[0]["same_grads"], out[0]
    assert out[0]["eager"] == {"input not a CUDA tensor that requires grad": 2 * out[0]["layers"]}, out[0]
    assert out[0]["restored"]


def _cpu_fallback():
    from megatron.mcore_ext.layer_graphs import LayerGraphs
    from megatron.mcore_ext.testing import tiny_moe_gpt

    torch.manual_seed(0)
    model = tiny_moe_gpt()
    layers = list(model.decoder.layers)
    T = 12
    tokens = torch.randint(0, model.vocab_size, (2, T))
    pos = torch.arange(T)[None].expand(2, T)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(tokens, pos, None)
        out.float().square().mean().backward()
        return out.detach().clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_out, ref_grads = run()
    graphs = LayerGraphs(layers, warmup_calls=0)
    out1, grads1 = run()
    out2, grads2 = run()
    stats = dict(graphs.stats["eager"])
    graphs.remove()
    restored = all("forward" not in layer.__dict__ for layer in layers)
    same_out = torch.equal(ref_out, out1) and torch.equal(ref_out, out2)
    same_grads = len(ref_grads) > 0 and all(torch.equal(a, b) and torch.equal(a, c)
                                            for a, b, c in zip(ref_grads, grads1, grads2))
    return dict(same_out=same_out, same_grads=same_grads, eager=stats, layers=len(layers), restored=restored)


def test_layout_problems_name_each_setting():
    """The one rule behind the flag check and the built-model check."""
    from megatron.mcore_ext.layer_graphs import layout_problems

    ok = dict(tp=1, cp=1, ep=1, pp=1, cuda=True, half=True)
    assert layout_problems(**ok) == []
    assert layout_problems(**dict(ok, ep=2, pp=4)) == [
        "needs one GPU per model replica; got --expert-model-parallel-size 2, --pipeline-model-parallel-size 4 "
        "(data parallelism is allowed)"]
    assert [p.split(" (")[0] for p in layout_problems(**dict(ok, cuda=False, half=False))] == [
        "needs a GPU", "needs --bf16"]


def test_fla_boundary_memo_is_off_while_capturing(monkeypatch):
    """fla memoises boundary-derived tensors by the boundary tensor's identity; the warm-up and the
    capture share that tensor, so the memo must be off for both (else the graphs would replay the
    capture row's chunk offsets). fla's own module switch, set and restored; untouched without GDN."""
    import sys
    import types

    from megatron.mcore_ext.layer_graphs import _fla_tensor_cache_off

    fake = types.ModuleType("fla.utils")
    fake.FLA_DISABLE_TENSOR_CACHE = False
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.utils", fake)
    sys.modules["fla"].utils = fake
    with _fla_tensor_cache_off(True):
        assert fake.FLA_DISABLE_TENSOR_CACHE is True
    assert fake.FLA_DISABLE_TENSOR_CACHE is False
    with pytest.raises(RuntimeError):
        with _fla_tensor_cache_off(True):
            raise RuntimeError("a failed capture")
    assert fake.FLA_DISABLE_TENSOR_CACHE is False
    with _fla_tensor_cache_off(False):
        assert fake.FLA_DISABLE_TENSOR_CACHE is False


def test_boundary_inputs_are_padded_to_max_segments_with_empty_segments():
    """What every graphed layer of a micro-batch takes as its boundary inputs (computed once per
    micro-batch): real and padded cu_seqlens, int32, ``max_segments + 1`` entries, the last one
    repeated (empty trailing segments); no GDN inputs for an attention-only model."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron.mcore_ext.layer_graphs import LayerGraphs

    graphs = LayerGraphs([torch.nn.Linear(2, 2)], max_segments=5)
    cu = torch.tensor([0, 3, 7], dtype=torch.int64)
    cu_p = torch.tensor([0, 4, 8], dtype=torch.int64)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_p,
                          cu_seqlens_kv_padded=cu_p)
    got_cu, got_cu_p, host_p, chunks = graphs._boundary_inputs(psp)
    assert got_cu.dtype == got_cu_p.dtype == torch.int32
    assert got_cu.tolist() == [0, 3, 7, 7, 7, 7] and got_cu_p.tolist() == [0, 4, 8, 8, 8, 8]
    assert host_p is None and chunks is None
    graphs.remove()
