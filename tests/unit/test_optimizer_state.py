"""Loading megatron-core 0.19.2's distributed optimizer without TE/apex (issue 18, found on the
GPU machine: the off -> on resume of test_faults.py raised ``KeyError: 'step'``).

megatron's ``DistributedOptimizer`` needs CUDA to be built, but its load methods are plain Python
over the torch optimizer and a few index maps: the skeleton below gives them exactly those (one
parameter of 6 elements, one data-parallel rank) on the CPU, so megatron's own code runs here.
"""
import types

import pytest
import torch

from megatron.core.optimizer import distrib_optimizer as dopt

from megatron.mcore_ext import fallbacks

pytestmark = pytest.mark.skipif(dopt.HAVE_APEX_OR_TE, reason="the defect is in the path without TE/apex")


def _skeleton():
    model_param = torch.nn.Parameter(torch.zeros(2, 3))
    main = torch.nn.Parameter(torch.zeros(6))  # the fp32 main shard of this rank (the whole parameter)
    opt = object.__new__(dopt.DistributedOptimizer)
    opt.ddp_config = types.SimpleNamespace(use_megatron_fsdp=False)
    opt.config = types.SimpleNamespace(fp16=False, use_precision_aware_optimizer_no_fp8_or_ds_fp8=False)
    opt.grad_scaler = None
    opt.optimizer = torch.optim.Adam([main], lr=1e-3)
    opt.gbuf_ranges = [{torch.float32: [{"param_map": {model_param: {"param": dopt.Range(0, 6)}}}]}]
    opt.buffers = [types.SimpleNamespace(param_index_map={model_param: (0, 6, 0)})]
    opt.model_param_group_index_map = {model_param: (0, 0)}
    assert fallbacks.init_empty_adam_state(opt) == 1  # what load_checkpoint does first
    return opt, main


def _saved():
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(2, 3, generator=g) for k in ("param", "exp_avg", "exp_avg_sq")}
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
             "step": 3.0, "params": [0]}
    return {"optimizer": {"param_groups": [group]}, "param_state": {0: tensors},
            "param_state_sharding_type": "fully_reshardable"}, tensors


def test_megatron_alone_cannot_load_it():
    """The upstream defect this works around: when this fails, megatron-core loads its distributed
    optimizer without TE/apex by itself and ``load_distributed_optimizer_state`` can go."""
    opt, _ = _skeleton()
    sd, _ = _saved()
    with pytest.raises(KeyError, match="step"):
        opt.load_state_dict(sd)


def test_the_fallback_loads_main_parameters_moments_and_step():
    opt, main = _skeleton()
    sd, tensors = _saved()
    assert fallbacks.load_distributed_optimizer_state(opt, sd) is True
    state = opt.optimizer.state[opt.optimizer.param_groups[0]["params"][0]]
    assert torch.equal(opt.optimizer.param_groups[0]["params"][0].detach(), tensors["param"].flatten())
    assert torch.equal(state["exp_avg"], tensors["exp_avg"].flatten())
    assert torch.equal(state["exp_avg_sq"], tensors["exp_avg_sq"].flatten())
    assert float(state["step"]) == 3.0 and opt.optimizer.param_groups[0]["step"] == 3.0


def test_the_fallback_leaves_other_optimizers_to_megatron():
    plain = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    assert fallbacks.load_distributed_optimizer_state(plain, {"param_state": {}}) is False
    opt, _ = _skeleton()
    assert fallbacks.load_distributed_optimizer_state(opt, {"optimizer": {}}) is False  # no parameter state
    with pytest.raises(ValueError, match="dp_reshardable"):
        fallbacks.load_distributed_optimizer_state(opt, {"param_state": {}, "param_state_sharding_type": "dp_reshardable"})


def test_only_the_distributed_optimizer_without_te_or_apex_needs_the_fallback():
    opt, _ = _skeleton()
    assert fallbacks.needs_distributed_optimizer_fallback(opt)
    assert not fallbacks.needs_distributed_optimizer_fallback(torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))]))


def test_restore_optimizer_loads_a_chained_distributed_optimizer_from_a_plain_checkpoint():
    """``optimizer_state.restore_optimizer`` as the off -> on resume drives it: the loaded tensors
    put back at their paths of the template, the plain optimizer's step (a tensor) into every group
    of both distributed optimizers, each of them loaded through the fallback."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    from multimodal_dev.optimizer_state import restore_optimizer

    subs = [_skeleton() for _ in range(2)]
    chained = object.__new__(ChainedOptimizer)
    chained.chained_optimizers = [opt for opt, _ in subs]
    osd, paths, values = {}, [], []
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        sd, _ = _saved()
        sd["optimizer"]["param_groups"][0]["step"] = None  # the template's: filled from the checkpoint
        osd[i] = sd
        for k in ("param", "exp_avg", "exp_avg_sq"):
            paths.append((i, "param_state", 0, k))
            values.append(torch.randn(2, 3, generator=g))
    restore_optimizer(chained, (osd, paths), {"tensors": {str(j): v for j, v in enumerate(values)},
                                              "step": torch.tensor(5.0)})
    for i, (opt, main) in enumerate(subs):
        state = opt.optimizer.state[main]
        want = values[3 * i: 3 * i + 3]
        assert torch.equal(main.detach(), want[0].flatten())
        assert torch.equal(state["exp_avg"], want[1].flatten()) and torch.equal(state["exp_avg_sq"], want[2].flatten())
        assert opt.optimizer.param_groups[0]["step"] == 5.0 and float(state["step"]) == 5.0
