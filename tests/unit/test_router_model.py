"""The padding-aware router inside a whole (tiny) MoE GPTModel: docs/invariants.md, end to end.

``test_router.py`` checks the router on its own against formulas; here the same invariants are
checked through megatron-core's GPTModel (our THD/CP attention, learned absolute positions, the
allgather dispatcher), fed by the real collate (``pack_or_pad_batch``) and CP split
(``split_batch_for_cp``). The reference is always the same model in one process, fp32, on the same
weights (moved between layouts with ``load_global_tensors``):

* padding / layout invariance (3.1, 3.2): three uneven prompt+answer samples as BSHD 16, BSHD 32,
  THD without padding and THD padded to multiples of 8 give the same recorded router losses, expert
  token counts and gradients, for every load-balancing type, with z-loss, and with expert bias;
* masks are about padding only (3.4), no NaN from emptiness (3.5), dense/MoE mixes (3.6);
* parallel invariance (3.3): TP=2 with SP, EP=2 (data parallel), CP=2 on BSHD and on THD.

Two objectives are differentiated: the LM loss ``sum(token_loss * loss_mask) / N_loss`` plus the
attached aux/z losses ("full"), and the aux/z losses alone ("aux": the LM part weighted 0), which
isolates the router's own gradient (much smaller than the LM one, so a router bug would hide under
rtol in "full"). ``MoEAuxLossAutoScaler``'s scale is 1, so the aux/z gradient is that of
``coeff * loss``.
"""
import math

import pytest
import torch

from megatron.mcore_ext.sharding import global_tensors, load_global_tensors, local_slices
from megatron.mcore_ext.testing import run_distributed, tiny_moe_gpt
from multimodal_dev.data.collate import CollateConfig, pack_or_pad_batch


E, K, V = 4, 2, 64
COEFF, ZCOEFF = 0.01, 1e-3
# Uneven lengths; labels -100 on the prompt and on the last token. Chosen so that the real tokens
# are spread unevenly over the ranks of every parallel split below (equal per-rank counts would hide
# a per-rank normalisation): TP+SP halves of BSHD 16: 20 | 8; CP zigzag of BSHD 16: 16 | 12;
# CP of THD 8: 13 | 15; EP/DP rows {0, 1} | {2, padding}: 21 | 7.
LENGTHS, PROMPTS = (5, 16, 7), (2, 6, 3)
N_REAL = sum(LENGTHS)
BIAS = torch.tensor([0.04, -0.03, 0.0, 0.02])  # expert bias: shifts the top-k selection

LB_NAME = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}
_Z = dict(moe_aux_loss_coeff=COEFF, moe_z_loss_coeff=ZCOEFF)
CONFIGS = {
    "aux_loss": dict(moe_router_load_balancing_type="aux_loss", **_Z),
    "seq_aux_loss": dict(moe_router_load_balancing_type="seq_aux_loss", **_Z),
    "global_aux_loss": dict(moe_router_load_balancing_type="global_aux_loss", **_Z),
    "bias_sigmoid": dict(
        moe_router_load_balancing_type="aux_loss",
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        **_Z,
    ),
}
# global_aux_loss without z-loss: under DP the z-loss is per micro-batch, the global loss is not,
# so only without z does the DP-averaged gradient have a one-process reference (the union)
GLOBAL_NOZ = dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=COEFF)
LAYOUTS = {
    "bshd16": CollateConfig(layout="bshd", target_seqlen=16),
    "bshd32": CollateConfig(layout="bshd", target_seqlen=32),  # 68 padded positions instead of 20
    "thd1": CollateConfig(layout="thd", divisible_by=1),  # no padding at all
    "thd8": CollateConfig(layout="thd", divisible_by=8),
}
OBJECTIVES = ("full", "aux")
TIGHT = dict(rtol=1e-5, atol=1e-8)  # one process, different layouts: only summation order differs
PAR = dict(rtol=1e-4, atol=1e-6)  # across ranks (the brief's fp32 tolerance)


# ------------------------------------------------------------------------------------ data
def _samples():
    g = torch.Generator().manual_seed(11)
    out = []
    for n, p in zip(LENGTHS, PROMPTS):
        tokens = torch.randint(1, V, (n,), generator=g)  # pad id 0 never occurs in real text
        labels = torch.roll(tokens, -1).clone()
        labels[:p] = -100
        labels[-1] = -100
        out.append({"tokens": tokens, "labels": labels})
    return out


def _batch(layout):
    b = pack_or_pad_batch(_samples(), LAYOUTS[layout])
    b.pop("stats")
    b.pop("pixel_values")
    b.pop("image_grid_thw")
    b.pop("image_tokens")  # text only: the model counts image tokens itself (0) on row subsets too
    if "cu_seqlens_padded" in b:  # which packed sample each position is in (for seq_aux_loss)
        cu = b["cu_seqlens_padded"].long()
        b["seq_ids"] = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])[None]
    return b


def _rows(batch, rows):
    # (host ints stay: loss_tokens is a bound on the loss positions, which a row subset keeps)
    return {k: (v if not torch.is_tensor(v) else v[:, rows] if k == "position_ids" else v[rows])
            for k, v in batch.items()}


def _dp_batches():
    """EP=2 / DP=2: rank 0 gets samples 0 and 1 (21 real tokens), rank 1 sample 2 and a row that
    is nothing but padding (7 real tokens): uneven over DP, and the ranks' batch shapes match (the
    allgather dispatcher all-gathers equal shapes)."""
    a = _batch("bshd16")
    second = _rows(a, [2, 2])
    second["tokens"][1] = 0
    second["labels"][1] = -100
    second["loss_mask"][1] = 0
    second["padding_mask"][1] = True
    return [_rows(a, [0, 1]), second]


# ------------------------------------------------------------------------------------ ranks
def _routers(model):
    from megatron.mcore_ext.router import PaddingAwareTopKRouter
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in model.modules() if isinstance(m, (PaddingAwareTopKRouter, TopKRouter))]


def _initial_weights():
    return global_tensors(tiny_moe_gpt(), "data")


def _local_batch(run):
    from megatron.core import parallel_state as ps
    from megatron.mcore_ext.cp_split import split_batch_for_cp

    split = run.get("split", "none")
    if split == "dp":
        return run["dp_batches"][ps.get_data_parallel_rank()]
    batch = run["batch"]
    if split == "cp":
        return split_batch_for_cp(
            batch, ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(), seq_dims={"seq_ids": -1}
        )
    return batch  # one process, or TP with SP (GPTModel scatters tokens and padding mask itself)


def _one_run(run):
    """Build, load, forward, backward; return what the tests compare (this rank's view)."""
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker, get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron.mcore_ext.router import collect_router_diagnostics

    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)
    # a fresh tracker: clear() only zeroes values and keeps every entry ever recorded in this
    # process, so "which metrics did this run record" would be unanswerable
    destroy_moe_metrics_tracker()
    tracker = get_moe_metrics_tracker()
    split = run.get("split", "none")
    cfg = dict(run.get("cfg", {}))
    model = tiny_moe_gpt(
        sequence_parallel=(split == "tp_sp"),
        padding_aware_router=not run.get("upstream", False),
        **run.get("model_kwargs", {}),
        **cfg,
    )
    if run.get("weights") is not None:
        load_global_tensors(model, run["weights"])
    routers = _routers(model)
    bias_on = bool(cfg.get("moe_router_enable_expert_bias"))
    if bias_on:
        with torch.no_grad():
            for r in routers:
                r.expert_bias.copy_(BIAS)
    model.train()

    b = _local_batch(run)
    psp = None
    if "cu_seqlens_padded" in b:
        cu, cu_p = b["cu_seqlens"], b["cu_seqlens_padded"]
        psp = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_p,
            cu_seqlens_kv_padded=cu_p, max_seqlen_q=b["max_seqlen"], max_seqlen_kv=b["max_seqlen"],
        )
    if run.get("seq_ids") and "seq_ids" in b:  # router tokens are [s, b] = [T, 1] for THD
        for r in routers:
            r.set_sequence_ids(b["seq_ids"].reshape(-1, 1), num_sequences=b["cu_seqlens"].numel() - 1)
    token_losses = model(
        b["tokens"],
        b["position_ids"][0],  # text only: the three MRoPE rows are equal
        None,
        labels=b["labels"].clamp(min=0),
        packed_seq_params=psp,
        padding_mask=b["padding_mask"] if run.get("pass_padding", True) else None,
    )
    # this rank's share of sum(token_loss * loss_mask) / (loss tokens of the whole global batch)
    norm = run.get("norm") or max(float(b["loss_mask"].sum()), 1.0)
    lm = (token_losses * b["loss_mask"]).sum() / norm
    (lm * (1.0 if run.get("objective", "full") == "full" else 0.0)).backward()

    params = dict(model.named_parameters())
    out = {
        "lm": float(lm.detach()),
        "valid_token_losses": token_losses.detach()[~b["padding_mask"]],
        "metrics": {n: e.values.detach().clone() for n, e in tracker.metrics.items()},
        "num_routers": len(routers),
        "bias_counts": torch.stack([r.local_tokens_per_expert.clone() for r in routers]) if bias_on else None,
        "diag": collect_router_diagnostics(model),
        "grads": {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None},
        "finite": all(bool(torch.isfinite(p.grad).all()) for p in params.values() if p.grad is not None),
        "loss_tokens": float(b["loss_mask"].sum()),
        "real_tokens": int((~b["padding_mask"]).sum()),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "cp_rank": ps.get_context_parallel_rank(),
        "ep_rank": ps.get_expert_model_parallel_rank(),
    }
    if ps.get_tensor_model_parallel_world_size() * ps.get_expert_model_parallel_world_size() == 1 and run.get(
        "weights"
    ) is not None:
        out["global_grads"] = global_tensors(model, "grad")
    if run.get("ref_grads") is not None:
        out["ref_grads"] = local_slices(model, run["ref_grads"])
        out["is_expert"] = {n: ".experts." in n for n in params}
        out["sp_partial"] = {n: bool(getattr(p, "sequence_parallel", False)) for n, p in params.items()}
    return out


def _runs(runs):
    return [_one_run(r) for r in runs]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def weights():
    return run_distributed(_initial_weights, 1)[0]


def _key(cfg, layout, objective):
    return f"{cfg}/{layout}/{objective}"


@pytest.fixture(scope="module")
def one_process(weights):
    """Every one-process run, in one call: configs x layouts x objectives, the EP/DP sub-batches,
    and the upstream-router control."""
    runs, keys = [], []
    for cfg_name, cfg in CONFIGS.items():
        for layout in LAYOUTS:
            for obj in OBJECTIVES:
                keys.append(_key(cfg_name, layout, obj))
                runs.append(dict(cfg=cfg, weights=weights, batch=_batch(layout), objective=obj, seq_ids=True))
    n_loss = float(_batch("bshd16")["loss_mask"].sum())
    for i, sub in enumerate(_dp_batches()):
        for obj in OBJECTIVES:
            keys.append(_key("bias_sigmoid", f"dp_sub{i}", obj))
            runs.append(dict(cfg=CONFIGS["bias_sigmoid"], weights=weights, batch=sub, objective=obj, norm=n_loss))
    keys.append(_key("global_noz", "bshd16", "aux"))
    runs.append(dict(cfg=GLOBAL_NOZ, weights=weights, batch=_batch("bshd16"), objective="aux"))
    for layout in ("bshd16", "bshd32"):
        keys.append(_key("upstream_no_mask", layout, "full"))
        runs.append(dict(cfg=CONFIGS["aux_loss"], weights=weights, batch=_batch(layout), upstream=True, pass_padding=False))
    return dict(zip(keys, run_distributed(_runs, 1, args=(runs,))[0]))


# ------------------------------------------------------------------------------------ 3.1 + 3.2
def _assert_same(res, ref, what, tol=TIGHT):
    for name in list(LB_NAME.values()) + ["z_loss"]:
        assert (name in res["metrics"]) == (name in ref["metrics"]), f"{what}: metric {name} recorded in one run only"
        if name in ref["metrics"]:
            torch.testing.assert_close(res["metrics"][name], ref["metrics"][name], **tol, msg=lambda m: f"{what} {name}: {m}")
    assert [d["tokens_per_expert"] for d in res["diag"]] == [d["tokens_per_expert"] for d in ref["diag"]], what
    assert [d["valid_tokens"] for d in res["diag"]] == [d["valid_tokens"] for d in ref["diag"]], what
    for d, d_ref in zip(res["diag"], ref["diag"]):
        assert d["entropy"] == pytest.approx(d_ref["entropy"], rel=1e-5), what
    if ref["bias_counts"] is not None:
        torch.testing.assert_close(res["bias_counts"], ref["bias_counts"], rtol=0, atol=0, msg=lambda m: f"{what} expert-bias counts: {m}")
    assert res["grads"].keys() == ref["grads"].keys()
    for n, g in ref["grads"].items():
        torch.testing.assert_close(res["grads"][n], g, **tol, msg=lambda m, n=n: f"{what} grad {n}: {m}")


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_padding_and_layout_invariance(one_process, cfg):
    """BSHD 16 / BSHD 32 / THD unpadded / THD padded to 8: same losses, counts, gradients."""
    lb = LB_NAME[CONFIGS[cfg]["moe_router_load_balancing_type"]]
    for obj in OBJECTIVES:
        ref = one_process[_key(cfg, "thd1", obj)]  # the one layout without any padding
        assert ref["finite"] and ref["real_tokens"] == N_REAL
        # both MoE layers record the load-balancing loss and the z-loss, non-trivially
        assert ref["metrics"][lb].shape == (2,) and bool((ref["metrics"][lb] > 0).all())
        assert bool((ref["metrics"]["z_loss"] > 0).all())
        router_grads = [g for n, g in ref["grads"].items() if n.endswith("router.weight")]
        assert len(router_grads) == 2 and all(g.abs().sum() > 0 for g in router_grads)
        for layout in ("bshd16", "bshd32", "thd8"):
            res = one_process[_key(cfg, layout, obj)]
            assert res["finite"]
            torch.testing.assert_close(res["valid_token_losses"], ref["valid_token_losses"], **TIGHT)
            assert res["lm"] == pytest.approx(ref["lm"], rel=1e-6)
            _assert_same(res, ref, f"{cfg} {obj} {layout} vs thd1")
    if cfg == "bias_sigmoid":  # the expert bias took part in routing, and both count paths agree
        res = one_process[_key(cfg, "thd1", "full")]
        assert res["bias_counts"].sum(-1).tolist() == [K * N_REAL] * 2
        assert res["bias_counts"].tolist() == [d["tokens_per_expert"] for d in res["diag"]]


def test_upstream_router_without_padding_mask_is_not_padding_invariant(one_process):
    """Control: megatron-core's own router without a padding mask: more padding changes the recorded
    aux loss and z-loss (so the comparisons above can fail)."""
    a = one_process[_key("upstream_no_mask", "bshd16", "full")]["metrics"]["load_balancing_loss"]
    b = one_process[_key("upstream_no_mask", "bshd32", "full")]["metrics"]["load_balancing_loss"]
    ours = one_process[_key("aux_loss", "bshd16", "full")]["metrics"]["load_balancing_loss"]
    # (a near-balanced random router keeps the loss near 1: the change is ~0.7%, 100x the tolerance)
    rel = ((a - b).abs() / a.abs()).max()
    assert rel > 1e-3, f"upstream aux loss unexpectedly padding-invariant: {a.tolist()} vs {b.tolist()}"
    assert not torch.allclose(a, ours, **TIGHT)  # and on BSHD 16 it is not the masked value either
    za = one_process[_key("upstream_no_mask", "bshd16", "full")]["metrics"]["z_loss"]
    zb = one_process[_key("upstream_no_mask", "bshd32", "full")]["metrics"]["z_loss"]
    assert ((za - zb).abs() / za).max() > 1e-3, (za.tolist(), zb.tolist())


# ------------------------------------------------------------------------------------ 3.4
def test_routing_counts_prompt_tokens_not_just_loss_tokens(one_process):
    for cfg in CONFIGS:
        for layout in LAYOUTS:
            res = one_process[_key(cfg, layout, "full")]
            n_loss = res["loss_tokens"]
            assert res["real_tokens"] == N_REAL and n_loss < N_REAL  # prompts exist
            for d in res["diag"]:
                assert sum(d["tokens_per_expert"]) == K * N_REAL, (cfg, layout, d)
                assert sum(d["tokens_per_expert"]) != K * n_loss
                assert d["valid_tokens"] == N_REAL
            if res["bias_counts"] is not None:
                assert res["bias_counts"].sum(-1).tolist() == [K * N_REAL] * 2


# ------------------------------------------------------------------------------------ 3.5
def _all_padding_batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, V, (2, 16), generator=g)
    return {
        "tokens": tokens,
        "labels": torch.full((2, 16), -100),
        "loss_mask": torch.zeros(2, 16),
        "position_ids": torch.arange(16).expand(3, 2, 16).clone(),
        "padding_mask": torch.ones(2, 16, dtype=torch.bool),
    }


def test_all_padding_micro_batch_is_finite_and_zero(weights):
    runs = [dict(cfg=cfg, weights=weights, batch=_all_padding_batch()) for cfg in CONFIGS.values()]
    results = run_distributed(_runs, 1, args=(runs,))[0]
    for cfg, res in zip(CONFIGS, results):
        lb = LB_NAME[CONFIGS[cfg]["moe_router_load_balancing_type"]]
        assert res["finite"], cfg
        assert res["metrics"][lb].tolist() == [0.0, 0.0], cfg
        assert res["metrics"]["z_loss"].tolist() == [0.0, 0.0], cfg
        for d in res["diag"]:
            assert d["tokens_per_expert"] == [0] * E and d["valid_tokens"] == 0, (cfg, d)
            assert d["entropy"] == 0.0 and d["load_balance"] == 1.0 and d["max_min_ratio"] == 1.0
        if res["bias_counts"] is not None:
            assert int(torch.count_nonzero(res["bias_counts"])) == 0
        router = {n: g for n, g in res["grads"].items() if n.endswith("router.weight")}
        assert len(router) == 2 and all(int(torch.count_nonzero(g)) == 0 for g in router.values()), cfg
        # nothing is valid, so nothing may carry gradient anywhere in the model
        nonzero = [n for n, g in res["grads"].items() if int(torch.count_nonzero(g))]
        assert not nonzero, f"{cfg}: gradient from padding in {nonzero}"


# ------------------------------------------------------------------------------------ 3.6
def _dense_and_mixed(batch):
    mixed = _one_run(dict(cfg=CONFIGS["aux_loss"], batch=batch, model_kwargs=dict(num_layers=2, moe_layer_freq=[1, 0])))
    dense = _one_run(dict(batch=batch, model_kwargs=dict(num_moe_experts=None)))
    return mixed, dense


def test_dense_layers_have_no_router_statistics():
    mixed, dense = run_distributed(_dense_and_mixed, 1, args=(_batch("bshd16"),))[0]
    assert mixed["num_routers"] == 1
    assert [d["layer"] for d in mixed["diag"]] == [1]
    assert sum(mixed["diag"][0]["tokens_per_expert"]) == K * N_REAL
    for name in ("load_balancing_loss", "z_loss"):
        v = mixed["metrics"][name]
        assert v.shape == (2,) and float(v[0]) > 0 and float(v[1]) == 0.0, (name, v)
    assert mixed["finite"] and dense["finite"]
    assert dense["num_routers"] == 0 and dense["diag"] == [] and dense["metrics"] == {}
    assert dense["grads"] and math.isfinite(dense["lm"])


# ------------------------------------------------------------------------------------ 3.3
PARALLEL = {
    # name: (run_distributed layout, how the batch is split, collated layout, (config, objective)s)
    "tp2_sp": (dict(tp=2), "tp_sp", "bshd16", [("bias_sigmoid", "full"), ("bias_sigmoid", "aux"), ("seq_aux_loss", "aux")]),
    "ep2": (dict(ep=2), "dp", "bshd16", [("bias_sigmoid", "full"), ("bias_sigmoid", "aux"), ("global_noz", "aux")]),
    "cp2_bshd": (dict(cp=2), "cp", "bshd16", [(c, o) for c in ("bias_sigmoid", "seq_aux_loss") for o in OBJECTIVES]),
    "cp2_thd": (
        dict(cp=2), "cp", "thd8",
        [(c, o) for c in ("bias_sigmoid", "seq_aux_loss") for o in OBJECTIVES] + [("global_aux_loss", "aux")],
    ),
}


PAR_CONFIGS = {**CONFIGS, "global_noz": GLOBAL_NOZ}


def _sum_grads(results, name):
    return sum(r["grads"][name] for r in results)


@pytest.mark.parametrize("par", list(PARALLEL))
def test_parallel_invariance(one_process, weights, par):
    """TP=2+SP, EP=2 (DP=2), CP=2 (BSHD zigzag, THD per-sample zigzag) against one process.

    TP x CP ranks share sequences: their recorded partial losses, expert-bias counts, LM partial
    objectives and (partial) gradients add up to the one-process values. EP=2 ranks are data
    parallel: each records its own micro-batch's aux/z loss (reference: that sub-batch in one
    process); gradients add up over DP (non-expert params; expert params are whole on their EP
    rank). global_aux_loss is the global batch's loss: partials add up over DP, and the gradient
    DDP would average over DP is the one-process gradient of the union.
    """
    layout, split, batch_layout, cases = PARALLEL[par]
    batch = _batch(batch_layout)
    runs, refs = [], []
    for cfg, obj in cases:
        full = one_process[_key(cfg, batch_layout, obj)]
        subs = None
        ref_grads = full["global_grads"]
        if split == "dp" and cfg != "global_noz":
            subs = [one_process[_key(cfg, f"dp_sub{i}", obj)] for i in range(2)]
            ref_grads = {k: subs[0]["global_grads"][k] + subs[1]["global_grads"][k] for k in ref_grads}
        runs.append(dict(
            cfg=PAR_CONFIGS[cfg], weights=weights, batch=batch, split=split,
            dp_batches=_dp_batches() if split == "dp" else None,
            objective=obj, seq_ids=True, norm=float(batch["loss_mask"].sum()), ref_grads=ref_grads,
        ))
        refs.append((cfg, obj, full, subs))
    per_rank = run_distributed(_runs, 2, **layout, args=(runs,))
    rank_key = {"tp_sp": "tp_rank", "cp": "cp_rank", "dp": "ep_rank"}[split]
    assert [per_rank[r][0][rank_key] for r in range(2)] == [0, 1]  # the layout really is split
    for i, (cfg, obj, full, subs) in enumerate(refs):
        results = [per_rank[r][i] for r in range(2)]
        what = f"{par} {cfg} {obj}"
        assert all(r["finite"] for r in results), what
        lb = LB_NAME[PAR_CONFIGS[cfg]["moe_router_load_balancing_type"]]
        names = (lb, "z_loss") if PAR_CONFIGS[cfg].get("moe_z_loss_coeff") else (lb,)
        for name in names:
            if subs is not None:  # DP: each rank's own micro-batch
                for r, sub in zip(results, subs):
                    torch.testing.assert_close(r["metrics"][name], sub["metrics"][name], **PAR, msg=lambda m: f"{what} {name}: {m}")
            else:  # shares of one loss
                got = sum(r["metrics"][name] for r in results)
                torch.testing.assert_close(got, full["metrics"][name], **PAR, msg=lambda m: f"{what} {name}: {m}")
                assert all(bool((r["metrics"][name] > 0).any()) for r in results)  # both ranks contribute
        # LM objective: partials add up to the one-process objective (TP ranks each see it whole)
        lm = results[0]["lm"] if split == "tp_sp" else sum(r["lm"] for r in results)
        assert lm == pytest.approx(full["lm"], rel=1e-5), what
        # expert token counts: expert-bias counts summed over ranks, diagnostics reduced globally
        if full["bias_counts"] is not None:
            torch.testing.assert_close(sum(r["bias_counts"] for r in results), full["bias_counts"], rtol=0, atol=0)
            assert all(r["bias_counts"].sum() < full["bias_counts"].sum() for r in results)  # really split
        for r in results:
            assert [d["tokens_per_expert"] for d in r["diag"]] == [d["tokens_per_expert"] for d in full["diag"]], what
            assert [d["valid_tokens"] for d in r["diag"]] == [N_REAL, N_REAL]
        # gradients: router weights first (the subject), then every parameter
        ddp_avg = 0.5 if cfg == "global_noz" else 1.0
        for r in results:
            pnames = sorted(r["grads"], key=lambda n: not n.endswith("router.weight"))
            assert pnames[0].endswith("router.weight") and pnames[1].endswith("router.weight")
            for n in pnames:
                g, expected = r["grads"][n], r["ref_grads"][n]
                if split in ("cp", "dp") and not (split == "dp" and r["is_expert"][n]):
                    g = _sum_grads(results, n)  # CP: every param; DP: non-expert params
                elif split == "tp_sp" and r["sp_partial"][n]:
                    g = _sum_grads(results, n)
                torch.testing.assert_close(g * ddp_avg, expected, **PAR, msg=lambda m, n=n: f"{what} grad {n}: {m}")
