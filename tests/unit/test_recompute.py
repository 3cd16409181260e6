"""Activation recomputation (``--recompute-*``, ``multimodal_dev.recompute``), fp32 on CPU.

Every comparison runs the trainer's own steps twice side by side, without and with recomputation,
from the same weights and data (``trainer_steps.record_steps``: ``build_model_and_optimizer`` +
``train_step``, one gloo rank), on ``tiny`` and ``tiny-hybrid`` (Gated DeltaNet), BSHD and THD,
with three router set-ups: the fused softmax path (aux loss + z-loss), the generic path with
sigmoid scores, expert bias and global_aux_loss (running counts over micro-batches), and
seq_aux_loss (per packed sample). Checked per iteration:

* the LM loss, the grad norm, every finalized gradient and the weights after the updates;
* the router statistics: routing diagnostics (tokens per expert, entropy, ...), the expert-bias
  token counts before finalize turns them into the update, the aux/z-loss values per layer in
  megatron's tracker -- all exactly equal.

Exact: full (uniform and block), selective core_attn, moe and gdn_norm_out -- the re-run is the
same kernels on the same inputs, and each tensor's gradient contributions arrive in the same
order. Within 1e-6 relative (global gradient norm; measured ~1e-7, i.e. fp32 rounding) for
selective layernorm and shared_experts: the forward and the loss are still exactly equal, but a
tensor with several consumers (the MoE layer's input feeds the router, the experts and the shared
experts) gets its gradient contributions summed in the autograd engine's order, which the
checkpoint node changes (float addition is not associative). A negative control proves the
comparison sees double counting: a router that also counts in the no-grad first pass shows
exactly twice the reference's expert-bias counts, dispatched tokens and z-loss values. Since "recomputed exactly" and "not recomputed at all" look
the same to that comparison, forward hooks count how often each decoder module runs: twice for
what the flags name (by megatron's meanings), once for the rest. Also: TP=2+SP and EP=2 (every rank
exact), a frozen language model (the vision tower's gradient through the re-run), and the flags'
refusals (bad combinations, unknown modules, --cuda-graph-layers).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed
from multimodal_dev import recompute
from multimodal_dev.arguments import ArgumentError, parse_args
from multimodal_dev.models.contract import RecomputeOptions, SetupError
from trainer_steps import COMMON, build, record_steps

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"
ITERS = 2  # the second iteration starts from weights the first one updated (and from its expert bias)

FULL = ["--recompute-granularity", "full", "--recompute-method"]
SEL = ["--recompute-granularity", "selective", "--recompute-modules"]
# name -> (flags per variant, exact?)
CONFIGS = {
    "full/uniform": ({"tiny": FULL + ["uniform", "--recompute-num-layers", "1"],
                      "tiny-hybrid": FULL + ["uniform", "--recompute-num-layers", "2"]}, True),
    "full/block": ({"tiny": FULL + ["block", "--recompute-num-layers", "1"],
                    "tiny-hybrid": FULL + ["block", "--recompute-num-layers", "3"]}, True),
    "selective/core_attn": ({"tiny": SEL + ["core_attn"], "tiny-hybrid": SEL + ["core_attn", "gdn_norm_out"]}, True),
    "selective/moe": ({"tiny": SEL + ["moe"], "tiny-hybrid": SEL + ["moe"]}, True),
    "selective/layernorm+shared_experts": ({"tiny": SEL + ["layernorm", "shared_experts"],
                                            "tiny-hybrid": SEL + ["layernorm", "shared_experts"]}, False),
}
ROUTERS = {
    "fast": [],  # softmax top-k, aux_loss, z-loss: PaddingAwareTopKRouter._fast_routing
    "bias+global": ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                    "--moe-router-load-balancing-type", "global_aux_loss"],
    "seq": ["--moe-router-load-balancing-type", "seq_aux_loss"],
}


def _grad_rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a) ** 0.5
    den = sum(float((a[k].double() ** 2).sum()) for k in a) ** 0.5
    return num / den


def _same_tensors(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _counts(step: dict) -> dict:
    return {"diagnostics": step["diagnostics"], "moe": step["moe"],
            "tracker": {k: v.tolist() for k, v in step["tracker"].items()},
            "bias_counts": [c.tolist() for c in step["bias_counts"]]}


def compare(base: list, configs: dict, patch=None, grad_names=False, world_size=1) -> dict:
    """On each rank: the reference run and each configuration; what differs (small, picklable);
    ``grad_names``: also the names of the parameters that got a gradient."""
    ref = record_steps(base, ITERS, world_size=world_size)
    out = {"ref": [_counts(s) for s in ref["steps"]]}
    for name, extra in configs.items():
        got = record_steps(base + extra, ITERS, patch=patch, world_size=world_size)
        out[name] = dict(
            loss=[(r["loss"], g["loss"]) for r, g in zip(ref["steps"], got["steps"])],
            grad_norm=[(r["grad_norm"], g["grad_norm"]) for r, g in zip(ref["steps"], got["steps"])],
            grads_equal=all(_same_tensors(r["grads"], g["grads"]) for r, g in zip(ref["steps"], got["steps"])),
            grad_rel=max(_grad_rel(r["grads"], g["grads"]) for r, g in zip(ref["steps"], got["steps"])),
            params_equal=_same_tensors(ref["params"], got["params"]),
            counts=[_counts(s) for s in got["steps"]],
        )
        if grad_names:
            out[name]["grad_names"] = sorted(got["steps"][0]["grads"])
    return out


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("fmt", ["bshd", "thd"])
@pytest.mark.parametrize("variant", ["tiny", "tiny-hybrid"])
def test_recomputation_gives_the_same_losses_gradients_and_router_statistics(variant, fmt, router):
    base = COMMON + ["--variant", variant] + ROUTERS[router] + (["--use-packed-sequence"] if fmt == "thd" else [])
    configs = {name: flags[variant] for name, (flags, _) in CONFIGS.items()}
    res = run_distributed(compare, 1, args=(base, configs), timeout=300)[0]
    ref = res["ref"]
    # the statistics are there to compare: tokens routed, losses recorded, bias counts when enabled
    assert all(sum(d["valid_tokens"] for d in s["diagnostics"]) > 0 for s in ref)
    assert all(any(v != 0 for vals in s["tracker"].values() for v in vals) for s in ref)
    assert all(bool(s["bias_counts"]) == (router == "bias+global") for s in ref)
    for name, (_, exact) in CONFIGS.items():
        r = res[name]
        assert all(a == b for a, b in r["loss"]), (name, r["loss"])  # the forward is the same computation
        assert r["counts"] == ref, (name, "router statistics differ", r["counts"], ref)
        if exact:
            assert r["grads_equal"] and r["params_equal"], (name, r["grad_rel"])
            assert all(a == b for a, b in r["grad_norm"]), (name, r["grad_norm"])
        else:
            assert r["grad_rel"] <= 1e-6, (name, r["grad_rel"])
            assert all(a == pytest.approx(b, rel=1e-6) for a, b in r["grad_norm"]), (name, r["grad_norm"])


def _count_in_both_passes(model) -> None:
    """Negative control: routers that also count in the no-grad first pass of recomputation."""
    from megatron.mcore_ext.router import PaddingAwareTopKRouter

    for r in model.modules():
        if isinstance(r, PaddingAwareTopKRouter):
            r._diagnostics_on = lambda: True
            bias = r._apply_expert_bias

            def counted_always(routing_map, padding_mask=None, _bias=bias):
                with torch.enable_grad():
                    return _bias(routing_map, padding_mask)

            r._apply_expert_bias = counted_always
            z_loss = r.apply_z_loss

            def z_recorded_always(logits, padding_mask=None, _z=z_loss, _r=r):
                if _r.training and not torch.is_grad_enabled():  # the first pass records too
                    with torch.enable_grad():
                        _z(logits.detach(), padding_mask)
                return _z(logits, padding_mask)

            r.apply_z_loss = z_recorded_always


def test_the_comparison_sees_double_counting():
    base = COMMON + ROUTERS["bias+global"] + ["--use-packed-sequence"]
    res = run_distributed(compare, 1, args=(base, {"full": CONFIGS["full/uniform"][0]["tiny"]}),
                          kwargs={"patch": _count_in_both_passes}, timeout=300)[0]
    for ref, got in zip(res["ref"], res["full"]["counts"]):
        assert got["bias_counts"] == [[2 * x for x in c] for c in ref["bias_counts"]]
        assert [[2 * x for x in d["tokens_per_expert"]] for d in ref["diagnostics"]] == \
               [d["tokens_per_expert"] for d in got["diagnostics"]]
        assert got["tracker"]["z_loss"] == [2 * x for x in ref["tracker"]["z_loss"]] != ref["tracker"]["z_loss"]
        lbl = "global_load_balancing_loss"  # not recorded twice (the patch leaves it alone)
        assert got["tracker"][lbl] == ref["tracker"][lbl]


# ------------------------------------------------------------------------------ it does recompute
#: the decoder-layer modules whose forward calls are counted: layer, norms, mixer, MoE parts
_KINDS = ("", "input_layernorm", "pre_mlp_layernorm", "self_attention", "self_attention.core_attention",
          "self_attention.out_norm", "mlp", "mlp.router", "mlp.experts", "mlp.shared_experts")
#: megatron's meaning of each selective module: what of a layer runs a second time in the backward
#: (moe: the MoE layer's insides, checkpointed inside MoELayer.forward, which itself runs once)
_RERUN = {"core_attn": {"self_attention.core_attention"}, "gdn_norm_out": {"self_attention.out_norm"},
          "layernorm": {"input_layernorm", "pre_mlp_layernorm"}, "shared_experts": {"mlp.shared_experts"},
          "moe": {"mlp.router", "mlp.experts", "mlp.shared_experts"}}


def _forward_calls(argv) -> dict:
    """``(layer, kind)`` -> forward calls of that decoder module during one train step."""
    calls = {}
    prefix = "language_model.decoder.layers."

    def hook_all(model):
        for name, m in model.named_modules():
            if not name.startswith(prefix):
                continue
            layer, _, kind = name[len(prefix):].partition(".")
            if kind in _KINDS:
                key = (int(layer), kind)
                m.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))

    record_steps(argv, 1, patch=hook_all)
    return calls


def _expected_reruns(flags: list, layer: int, kind: str) -> bool:
    if flags[1] == "full":
        n = int(flags[flags.index("--recompute-num-layers") + 1])
        return flags[3] == "uniform" or layer < n  # block: the first n layers of the stage
    return any(kind in _RERUN[m] for m in flags[3:])


@pytest.mark.parametrize("variant", ["tiny", "tiny-hybrid"])
def test_the_configurations_do_recompute(variant):
    """Against a comparison that cannot tell "recomputed exactly" from "not recomputed": every
    configuration of the comparison above runs exactly the modules megatron's flags name twice
    (forward, then the backward's re-run) and every other one once."""
    base = COMMON + ["--variant", variant, "--use-packed-sequence"]
    ref = run_distributed(_forward_calls, 1, args=(base,), timeout=300)[0]
    kinds = {k for _, k in ref}
    assert kinds >= set(_KINDS) - {"self_attention.out_norm", "self_attention.core_attention"}
    assert ("self_attention.out_norm" in kinds) == (variant == "tiny-hybrid")  # GDN layers
    assert "self_attention.core_attention" in kinds
    assert set(ref.values()) == {2}  # 2 micro-batches a step
    for name, (flags, _) in CONFIGS.items():
        got = run_distributed(_forward_calls, 1, args=(base + flags[variant],), timeout=300)[0]
        assert got.keys() == ref.keys(), name
        want = {key: ref[key] * (2 if _expected_reruns(flags[variant], *key) else 1) for key in ref}
        assert got == want, (name, {k: (got[k], want[k]) for k in ref if got[k] != want[k]})


@pytest.mark.parametrize("layout", ["tp2+sp", "ep2"])
def test_recomputation_under_tensor_and_expert_parallelism(layout):
    """Two ranks, tiny-hybrid, THD, expert bias + global_aux_loss: the re-run's collectives (SP
    gathers, EP all-to-all, the routers' count reductions) and megatron's RNG tracker; every rank
    exact, as on one."""
    flags, kw = {"tp2+sp": (["--tensor-model-parallel-size", "2", "--sequence-parallel"], dict(tp=2)),
                 # DP=2 too: packed rows of two lengths, which the allgather dispatcher refuses
                 "ep2": (["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"],
                         dict(ep=2))}[layout]
    base = COMMON + ["--variant", "tiny-hybrid", "--use-packed-sequence"] + ROUTERS["bias+global"] + flags
    configs = {name: CONFIGS[name][0]["tiny-hybrid"] for name in ("full/uniform", "selective/core_attn",
                                                                   "selective/moe")}
    for rank, res in enumerate(run_distributed(compare, 2, **kw, args=(base, configs),
                                               kwargs={"world_size": 2}, timeout=400)):
        assert all(sum(d["valid_tokens"] for d in s["diagnostics"]) > 0 for s in res["ref"])
        for name in configs:
            r = res[name]
            assert all(a == b for a, b in r["loss"]), (rank, name, r["loss"])
            assert r["counts"] == res["ref"], (rank, name)
            assert r["grads_equal"] and r["params_equal"], (rank, name, r["grad_rel"])


def test_recomputation_through_a_frozen_language_model():
    """--freeze-language-model: the recomputed layers hold only frozen weights (and a fixed expert
    bias); the vision tower's gradient reaches it through their re-run, the same as without."""
    base = COMMON + ["--variant", "tiny-hybrid", "--use-packed-sequence", "--freeze-language-model"] + \
        ROUTERS["bias+global"]
    configs = {name: CONFIGS[name][0]["tiny-hybrid"] for name in ("full/uniform", "selective/moe")}
    res = run_distributed(compare, 1, args=(base, configs), kwargs={"grad_names": True}, timeout=300)[0]
    for name in configs:
        r = res[name]
        assert r["grad_names"] and all(n.startswith("vision_encoder.") for n in r["grad_names"]), r["grad_names"]
        assert all(a == b for a, b in r["loss"]), (name, r["loss"])
        assert r["counts"] == res["ref"], name
        assert r["grads_equal"] and r["params_equal"], (name, r["grad_rel"])
        assert all(b > 0 for _, b in r["grad_norm"])


# ------------------------------------------------------------------------------ top-k order
def _top4_loss_and_grads(recompute_full: bool):
    from megatron.mcore_ext.testing import tiny_moe_gpt

    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if recompute_full else {}
    torch.manual_seed(3)
    model = tiny_moe_gpt(num_moe_experts=8, moe_router_topk=4, **extra)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2, 32), generator=g)
    loss = model(tokens, torch.arange(32)[None].expand(2, 32), None, labels=tokens)
    loss.sum().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_first_pass_routes_like_its_re_run_with_top_k_above_two():
    """The fused router's top-k was unsorted without gradients: with k > 2 the first pass of full
    recomputation then summed the top-k softmax in another order than its re-run (losses and
    gradients differed in the last bits). Now both, and a run without recomputation, agree."""
    plain = run_distributed(_top4_loss_and_grads, 1, args=(False,))[0]
    full = run_distributed(_top4_loss_and_grads, 1, args=(True,))[0]
    assert torch.equal(plain[0], full[0])
    assert _same_tensors(plain[1], full[1])


# ------------------------------------------------------------------------------ the flags
@pytest.mark.parametrize("argv, needle", [
    (["--recompute-method", "uniform"], "--recompute-method need --recompute-granularity"),
    (["--recompute-granularity", "full"], "needs --recompute-method (uniform or block) and --recompute-num-layers"),
    (["--recompute-granularity", "full", "--recompute-method", "block"], "--recompute-num-layers N"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "0"],
     "--recompute-num-layers must be >= 1"),
    (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
      "--recompute-modules", "moe"], "--recompute-modules applies to --recompute-granularity selective"),
    (["--recompute-granularity", "full", "--recompute-num-layers", "2"], "needs --recompute-method (uniform or block)"),
    (["--recompute-num-layers", "2"], "--recompute-num-layers need --recompute-granularity"),
    (["--recompute-modules", "moe"], "--recompute-modules need --recompute-granularity"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     "--recompute-method and --recompute-num-layers apply to --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-method", "uniform"],
     "--recompute-method and --recompute-num-layers apply to --recompute-granularity full"),
    (["--recompute-granularity", "selective", "--recompute-modules", "moe_act"], "TEGroupedMLP"),
])
def test_bad_recompute_flags_are_refused_naming_them(argv, needle):
    with pytest.raises(ArgumentError) as e:
        parse_args(argv, world_size=1)
    assert needle in str(e.value), str(e.value)


def test_flags_reach_the_transformer_config():
    opts = parse_args(SEL[:2] + ["--recompute-modules", "moe", "core_attn", "moe"], world_size=1).build_options()
    assert opts.recompute == RecomputeOptions(granularity="selective", modules=("moe", "core_attn"))
    assert opts.config_overrides()["recompute_modules"] == ["moe", "core_attn"]
    full = parse_args(FULL + ["block", "--recompute-num-layers", "2"], world_size=1).build_options()
    assert {k: v for k, v in full.config_overrides().items() if k.startswith("recompute")} == dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
    assert not any(k.startswith("recompute") for k in parse_args([], world_size=1).build_options().config_overrides())


def test_an_unknown_module_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(SEL + ["core_attn", "attention"], world_size=1)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --recompute-modules: invalid choice: 'attention'" in err and "gdn_norm_out" in err, err


@pytest.mark.parametrize("flags", [SEL[:2], FULL + ["block", "--recompute-num-layers", "1"]])
def test_cuda_graph_layers_are_refused_with_recomputation(flags, monkeypatch):
    from multimodal_dev import arguments

    graphs = ["--cuda-graph-layers", "--use-packed-sequence", "--bf16"]
    monkeypatch.setattr(arguments, "_cuda_available", lambda: True)  # what a GPU machine would say
    parse_args(graphs, world_size=1)  # the graphs alone pass the flag checks
    with pytest.raises(ArgumentError) as e:
        parse_args(graphs + flags, world_size=1)
    assert "--recompute-granularity with --cuda-graph-layers" in str(e.value), str(e.value)
    # and the layer graphs refuse a recomputing config themselves (a model built another way)
    msg = run_distributed(_layer_graphs_refusal, 1, args=(flags[1],))[0]
    assert f"needs no activation recomputation ({flags[1]})" in msg, msg


def _layer_graphs_refusal(granularity: str) -> str:
    from megatron.mcore_ext.layer_graphs import check_layer_graphs_supported

    try:
        check_layer_graphs_supported(SimpleNamespace(recompute_granularity=granularity, bf16=True))
    except ValueError as e:
        return str(e)
    return ""


def test_pipeline_packed_seq_aux_loss_with_a_re_run_router_is_refused():
    model = SimpleNamespace(config=SimpleNamespace(moe_router_load_balancing_type="seq_aux_loss", num_moe_experts=8))
    full = RecomputeOptions(granularity="full", method="uniform", num_layers=1)
    with pytest.raises(SetupError, match="later micro-batch's packed-sample ids"):
        recompute.check_applies(model, full, packed=True, pipeline_parallel=2)
    recompute.check_applies(model, full, packed=False, pipeline_parallel=2)  # BSHD: ids from the batch columns
    recompute.check_applies(model, full, packed=True, pipeline_parallel=1)  # no 1F1B interleaving


def _build_error(argv):
    try:
        build(argv)
    except (SetupError, ValueError) as e:
        return str(e)
    return None


def test_modules_that_would_do_nothing_are_refused():
    dense = ["--plugin", str(ROOT / "tests" / "plugins" / "dense_vlm.py"), "--model-arch", "dense_vlm_test",
             "--variant", "small"]
    assert COMMON[:2] == ["--variant", "tiny"]
    msgs = [run_distributed(_build_error, 1, args=(argv,))[0] for argv in (
        COMMON + SEL + ["mlp"],  # every layer of tiny is a MoE layer
        COMMON + SEL + ["gdn_norm_out"],  # no Gated DeltaNet layer (megatron-core's own refusal)
        COMMON[2:] + dense + SEL + ["mlp", "core_attn", "layernorm"],  # the dense model has them all
        COMMON[2:] + dense + SEL + ["shared_experts"],  # no MoE layer, no shared experts
    )]
    assert msgs[0] is not None and "--recompute-modules mlp: affects no layer" in msgs[0], msgs[0]
    assert msgs[1] is not None and "gdn_norm_out" in msgs[1] and "gated_delta_net" in msgs[1], msgs[1]
    assert msgs[2] is None, msgs[2]
    assert msgs[3] is not None and "--recompute-modules shared_experts: affects no layer" in msgs[3], msgs[3]


# ------------------------------------------------------------------------------ end to end
def test_entry_point_metrics_are_the_same_with_recomputation(tmp_path):
    """Through ``pretrain_multimodal.py``: tiny-hybrid, THD, expert bias; every per-iteration
    metric but the timings is the same without and with (exact) recomputation."""
    args = COMMON + ["--variant", "tiny-hybrid", "--use-packed-sequence", "--train-iters", "2"] + ROUTERS["bias+global"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    runs = {}
    for name, extra in (("plain", []), ("recompute", SEL + ["moe", "core_attn", "gdn_norm_out"])):
        path = tmp_path / f"{name}.jsonl"
        r = subprocess.run([sys.executable, str(ENTRY), *args, *extra, "--metrics-file", str(path)],
                           capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = [json.loads(line) for line in path.read_text().splitlines()]
    timing = ("tokens_per_sec", "iteration_time_s")
    strip = [[{k: v for k, v in rec.items() if k not in timing} for rec in recs] for recs in runs.values()]
    assert len(strip[0]) == 2 and strip[0] == strip[1]
