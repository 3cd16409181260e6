"""Under megatron's DDP, GroupedGemmSequentialMLP adds the stacked expert gradient to the
experts' ``main_grad`` buffers itself (one foreach call) and DDP's per-parameter hooks skip their
``add_``: the gradient buffers end up exactly as with DDP adding each expert's ``.grad``, over
two accumulated micro-batches (the second one adds to the first's sums).

Runs the real trainer pieces (``training.initialize`` + ``build_model_and_optimizer``, tiny, fp32,
CPU) in a subprocess: as shipped (the trainer turns on ``skip_param_grad_hooks``: the experts get
no ``.grad`` and no per-parameter hook runs for them), with the stack hook but per-expert ``.grad``s
("hooked"), and with plain ``torch.stack`` (DDP adds every ``.grad``); all with ``BatchedGradDDP``
(one foreach add of the pending ``.grad`` s per backward), against megatron's own DDP and plain
stack ("megatron"): the buffers must be bit-equal.
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

SCRIPT = r"""
import json, sys, torch
from megatron.mcore_ext import experts as ex, expert_weights as ew
mode = sys.argv[1]
if mode == "megatron":  # the reference: plain stack, megatron's DDP with its per-parameter hooks
    from megatron.core.distributed import DistributedDataParallel
    from megatron.mcore_ext import ddp as mddp
    class MegatronDDP(DistributedDataParallel):  # megatron's hooks, all of them run
        def hook_optional(self, param):
            return False
    MegatronDDP.__name__ = "DistributedDataParallel"
    mddp.BatchedGradDDP = MegatronDDP
    ew.stacked = lambda weights, skip=False: torch.stack(weights)
elif mode == "plain":
    ew.stacked = lambda weights, skip=False: torch.stack(weights)   # autograd + DDP's per-parameter add_
elif mode == "hooked":  # the stack hook adds into main_grad, the per-expert .grad still flow
    ex.GroupedGemmSequentialMLP.skip_param_grad_hooks = property(lambda self: False, lambda self, v: None)
from multimodal_dev import training
from multimodal_dev.arguments import parse_args
from multimodal_dev.forward_step import forward_step
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from multimodal_dev.data import CollateConfig, pack_or_pad_batch
from test_qwen35_invariance import IMG, _samples

args = parse_args(["--variant", "tiny", "--micro-batch-size", "1", "--global-batch-size", "2",
                   "--seq-length", "64", "--layout-independent-init", "--seed", "3"], world_size=1)
training.initialize(args)
ddp, model, optimizer, scheduler, _ = training.build_model_and_optimizer(args)
batch = pack_or_pad_batch(_samples(), CollateConfig(layout="thd", divisible_by=4, image_token_id=IMG))
hook_calls = {}
for n, p in ddp.module.named_parameters():
    p.register_post_accumulate_grad_hook(lambda p, n=n: hook_calls.__setitem__(n, hook_calls.get(n, 0) + 1))
ddp.zero_grad_buffer()
fb = get_forward_backward_func()
fb(forward_step_func=forward_step, data_iterator=iter([batch, batch]), model=[ddp], num_microbatches=2,
   seq_length=64, micro_batch_size=1, decoder_seq_length=None, forward_only=False)
out = {"flags": {}, "main_grad": {}, "hook_calls": hook_calls, "ddp": type(ddp).__name__}
for n, p in ddp.module.named_parameters():
    out["main_grad"][n] = p.main_grad.double().flatten().tolist()
    out["flags"][n] = bool(getattr(p, "grad_added_to_main_grad", False))
print("RESULT" + json.dumps(out))
"""


def _run(mode: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "examples"), str(ROOT / "tests" / "unit"),
                                           os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_main_grad_fusion_equals_per_parameter_accumulation():
    fused, hooked, plain, ref = _run("fused"), _run("hooked"), _run("plain"), _run("megatron")
    assert {r["ddp"] for r in (fused, hooked, plain)} == {"BatchedGradDDP"}
    assert ref["ddp"] == "DistributedDataParallel"
    expert_w = [n for n in fused["flags"] if ".local_experts." in n]
    assert expert_w, "no grouped experts in the tiny model"
    for run in (fused, hooked):
        # the fused path ran for every expert weight (and only there); without it DDP added each .grad
        assert all(run["flags"][n] for n in expert_w)
        assert not any(v for n, v in run["flags"].items() if n not in expert_w)
    assert not any(plain["flags"].values()) and not any(ref["flags"].values())
    # per-parameter gradient hooks: every parameter, twice (two micro-batches), except the experts
    # when their hooks are skipped
    for run in (hooked, plain, ref):
        assert all(run["hook_calls"].get(n) == 2 for n in run["flags"]), run["hook_calls"]
    assert not any(n in fused["hook_calls"] for n in expert_w)
    assert all(fused["hook_calls"].get(n) == 2 for n in fused["flags"] if n not in expert_w)
    for run in (fused, hooked, plain):
        assert run["main_grad"].keys() == ref["main_grad"].keys()
        for n, g in ref["main_grad"].items():
            # the same additions into the same fp32 buffers: bit-equal, not merely close
            assert run["main_grad"][n] == g, f"main_grad {n} differs from megatron's DDP"
    # and the experts did receive gradient (the comparison is not of zeros)
    assert any(max(abs(v) for v in fused["main_grad"][n]) > 0 for n in expert_w)
