"""A NaN or Inf gradient stops the run before that iteration's update
(``megatron.mcore_ext.grad_norm_check``), fp32 on CPU, qwen35_vl ``tiny``.

In-process (``trainer_steps``): one parameter's gradient is made NaN (a tensor hook) in the second
iteration; ``train_step`` raises ``NonFiniteGradError`` and every parameter, the Adam moments and
the step counter are exactly what the first iteration left (the negative control: the same run
without the hook changes the parameters in its second iteration). With DP=2 and with PP=2 a NaN
on one rank stops both, neither updating. The DDP check is off unless
``--check-grad-buckets``. Through ``pretrain_multimodal.py``: a learning rate of 1e30 makes the
second iteration's loss overflow; the run exits 1 naming iteration 2 and the non-finite gradient
norm, its metrics file holds iteration 1 only; with ``--check-grad-buckets`` megatron's DDP stops
it first, naming the bucket.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed
from trainer_steps import COMMON, build

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"


def _two_steps(argv, poison: str | None, world_size: int = 1, poison_rank: int = 0, keep_params: bool = False):
    """Two of the trainer's iterations, the second with ``poison``'s gradient made NaN on rank
    ``poison_rank`` (``"norm"``: its first norm weight); what was raised and the parameters /
    optimizer state after each iteration (``keep_params``: also the parameters at the end)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron.mcore_ext.fallbacks import fused_adam_summary
    from megatron.mcore_ext.grad_norm_check import GradNormCheckedOptimizer
    from multimodal_dev import metrics
    from multimodal_dev.data.stream import open_data
    from multimodal_dev.training import train_step

    cfg, ddp, model, optimizer, scheduler = build(argv, world_size)
    _, stream = open_data(cfg.data, model.data_spec, seed=cfg.seed, seq_multiple=cfg.layout.seq_multiple,
                          reads_data=cfg.layout.reads_data(ps.get_tensor_model_parallel_rank()),
                          dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size())
    params = dict(model.named_parameters())
    if poison == "norm":
        poison = next(n for n, p in params.items() if p.requires_grad and "norm" in n)
    if torch.distributed.get_rank() != poison_rank:
        poison = None

    def snapshot():
        state = {}
        for opt in optimizer.chained_optimizers:
            for k, v in opt.optimizer.state.items():
                for name, t in v.items():
                    state[(id(k), name)] = t.clone() if torch.is_tensor(t) else t
        return {n: p.detach().clone() for n, p in params.items()}, state

    out = dict(checked=isinstance(optimizer, GradNormCheckedOptimizer),
               ddp_checks=ddp.ddp_config.check_for_nan_in_grad, error=None)
    for it in range(2):
        if it == 1 and poison is not None:
            params[poison].register_hook(lambda g: torch.full_like(g, float("nan")))
        before = snapshot()
        try:
            out[f"grad_norm_{it}"] = float(train_step(
                cfg, get_forward_backward_func(), ddp, optimizer, scheduler,
                stream.next_iteration() if stream is not None else None, metrics.IterationStats().hook)[2])
        except Exception as e:  # noqa: BLE001 - what was raised is the result
            out["error"] = f"{type(e).__name__}: {e}"
        after = snapshot()
        out[f"params_changed_{it}"] = sorted(n for n in params if not torch.equal(before[0][n], after[0][n]))
        out[f"state_changed_{it}"] = sum(1 for k, v in after[1].items() if k not in before[1] or not (
            torch.equal(v, before[1][k]) if torch.is_tensor(v) else v == before[1][k]))
    out["lr_steps"] = scheduler.num_steps
    out["summary"] = fused_adam_summary(optimizer, 0)  # the trainer's start-up log line
    if keep_params:
        out["final"] = {n: p.detach().clone() for n, p in params.items()}
    return out


POISON = "language_model.decoder.final_layernorm.weight"
ARGV = COMMON + ["--lr-warmup-iters", "0"]  # (the last one counts) both iterations at a learning rate > 0


def test_a_nan_gradient_stops_before_the_update():
    r = run_distributed(_two_steps, 1, args=(ARGV, POISON))[0]
    assert r["checked"] and r["ddp_checks"] is False, r
    assert r["error"] is not None and r["error"].startswith("NonFiniteGradError: the gradient norm is nan"), r["error"]
    assert len(r["params_changed_0"]) > 10, r["params_changed_0"]  # the first iteration trained
    assert r["params_changed_1"] == [] and r["state_changed_1"] == 0, r  # nothing updated by the second
    assert r["lr_steps"] == 1  # the scheduler did not advance past the failed iteration


def test_without_the_nan_the_second_update_happens():  # the negative control of the test above
    r = run_distributed(_two_steps, 1, args=(ARGV, None))[0]
    assert r["error"] is None, r["error"]
    assert POISON in r["params_changed_1"] and r["state_changed_1"] > 0 and r["lr_steps"] == 2


@pytest.mark.parametrize("layout, flags, kw", [
    ("dp2", [], {}),
    ("pp2", ["--pipeline-model-parallel-size", "2"], dict(pp=2)),
], ids=["dp2", "pp2"])
def test_a_nan_on_one_rank_stops_every_rank_before_the_update(layout, flags, kw):
    """The NaN on rank 0 only: DP averages it into both ranks' gradients, PP keeps it on stage 0,
    whose norm megatron reduces over the stages; either way both ranks raise, neither updates."""
    for rank, r in enumerate(run_distributed(_two_steps, 2, **kw, args=(ARGV + flags, "norm", 2, 0), timeout=300)):
        assert r["error"] is not None and r["error"].startswith("NonFiniteGradError: the gradient norm is nan"), \
            (rank, r["error"])
        assert r["params_changed_0"] and r["params_changed_1"] == [] and r["state_changed_1"] == 0, (rank, r)


def test_check_grad_buckets_turns_on_megatrons_ddp_check():
    r = run_distributed(_two_steps, 1, args=(ARGV + ["--check-grad-buckets"], POISON))[0]
    assert r["ddp_checks"] is True
    assert r["error"] is not None and "found NaN in local grad norm for bucket" in r["error"], r["error"]
    assert r["params_changed_1"] == []


DIVERGE = ["--lr", "1e30", "--lr-warmup-iters", "0", "--train-iters", "4"]  # after COMMON: these count


def _run(args, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    metrics = tmp_path / "metrics.jsonl"
    p = subprocess.run([sys.executable, str(ENTRY), *COMMON, *DIVERGE, *args, "--metrics-file", str(metrics)],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return p, records


@pytest.mark.parametrize("flags, needle", [
    ([], "NonFiniteGradError: iteration 2: the gradient norm is"),
    (["--check-grad-buckets"], "found NaN in local grad norm for bucket #0"),
], ids=["grad-norm", "ddp-buckets"])
def test_a_diverged_run_stops_naming_the_iteration(tmp_path, flags, needle):
    p, records = _run(flags, tmp_path)
    assert p.returncode == 1, p.stderr[-2000:]
    assert needle in p.stderr, p.stderr[-2000:]
    assert [r["iteration"] for r in records if r["split"] == "train"] == [1]


# ------------------------------------------------------------------------------------------------
# The device path: megatron with TE keeps the norm a device tensor; then the update is skipped
# by torch's fused Adam(W) itself (``found_inf``) and the norm is read only after the update was
# launched. On CPU, megatron's norm is a float (its fallback calls .item()), so these runs hand the
# same value back as a tensor (what the TE path returns), stand in for TE's multi_tensor_scale_tensor
# (which tells the trainer that the norm stays on the device, so that it defers megatron's per-token
# gradient scaling into the fused kernel as with TE) and, in the --host-grad-norm-check reference
# runs, clip nothing (--clip-grad 0: megatron's tensor clipping would call TE's kernel).
DEVICE_ARGV = ARGV + ["--clip-grad", "0"]
STAND_IN = str(ROOT / "tests" / "plugins" / "group_step_adam.py")


def _install_stand_in():
    """What the plugin does: megatron then builds a FusedAdam-style optimizer. Executed on every call
    (not ``registry.load_plugin``, which imports a file once): the callers restore megatron's Adam
    afterwards, in a pool process that runs them again."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("group_step_adam_in_test", STAND_IN)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def _two_steps_device_norm(argv, poison, fused_adam_stand_in: bool = False, keep_params: bool = False,
                           world_size: int = 1):
    """``_two_steps`` with the norm returned as a tensor; also each inner Adam step's ``found_inf``
    (None: not given) and ``grad_scale``, megatron's gradient norm (of the gradients as they are),
    the factors megatron's ``finalize_model_grads`` gave ``scale_gradients`` and how often megatron's
    own buffer scaling ran."""
    import megatron.core.optimizer as mo
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import clip_grads

    from megatron.mcore_ext.ddp import BatchedGradDDP

    saved = (mo.ChainedOptimizer.get_grad_norm, mo.Adam, mo.USING_PYTORCH_OPTIMIZER, torch.optim.AdamW.step,
             clip_grads.multi_tensor_scale_tensor_impl, DistributedDataParallel.scale_gradients,
             BatchedGradDDP.scale_gradients)
    updates, scales, norms, factors, buffer_scalings = [], [], [], [], []

    def recording_scale(self, factor):
        factors.append(float(factor))
        return saved[6](self, factor)

    def counting_buffer_scale(self, factor):
        buffer_scalings.append(float(factor))
        return saved[5](self, factor)

    def tensor_norm(self):
        value = saved[0](self)
        norms.append(value)
        return None if value is None else torch.tensor(float(value))

    def recording_step(self, *a, **k):
        flag, scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        updates.append(None if flag is None else float(flag))
        scales.append(None if scale is None else float(scale))
        return saved[3](self, *a, **k)

    mo.ChainedOptimizer.get_grad_norm = tensor_norm
    torch.optim.AdamW.step = recording_step
    clip_grads.multi_tensor_scale_tensor_impl = "TE's multi_tensor_scale_tensor (a stand-in)"
    DistributedDataParallel.scale_gradients = counting_buffer_scale
    BatchedGradDDP.scale_gradients = recording_scale
    try:
        if fused_adam_stand_in:
            _install_stand_in()
        out = _two_steps(argv, poison, world_size=world_size, keep_params=keep_params)
        from megatron.core import parallel_state as ps  # noqa: F401 - the build above initialised it
        out.update(updates=updates, scales=scales, norms=norms, factors=factors, buffer_scalings=buffer_scalings)
        return out
    finally:
        (mo.ChainedOptimizer.get_grad_norm, mo.Adam, mo.USING_PYTORCH_OPTIMIZER, torch.optim.AdamW.step,
         clip_grads.multi_tensor_scale_tensor_impl, DistributedDataParallel.scale_gradients,
         BatchedGradDDP.scale_gradients) = saved


def _adam_class(argv, fused_adam_stand_in: bool):
    import megatron.core.optimizer as mo

    saved = (mo.Adam, mo.USING_PYTORCH_OPTIMIZER)
    try:
        if fused_adam_stand_in:
            _install_stand_in()
        _, _, _, optimizer, _ = build(argv)
        return [type(o.optimizer).__name__ for o in optimizer.chained_optimizers]
    finally:
        mo.Adam, mo.USING_PYTORCH_OPTIMIZER = saved


def test_a_device_norm_skips_the_update_on_the_device_and_is_read_after_it():
    r = run_distributed(_two_steps_device_norm, 1, args=(DEVICE_ARGV, POISON))[0]
    assert r["error"] is not None and r["error"].startswith("NonFiniteGradError: the gradient norm is nan"), r["error"]
    assert "skipped on the device" in r["error"], r["error"]
    # the second update was launched (so the norm had not been read before it) with found_inf set
    assert r["updates"] == [0.0, 1.0], r["updates"]
    assert len(r["params_changed_0"]) > 10 and r["params_changed_1"] == [] and r["state_changed_1"] == 0, r
    assert r["lr_steps"] == 1


def test_a_device_norm_without_the_nan_updates_with_found_inf_zero():  # the negative control
    r = run_distributed(_two_steps_device_norm, 1, args=(DEVICE_ARGV, None))[0]
    assert r["error"] is None and r["updates"] == [0.0, 0.0], r
    assert POISON in r["params_changed_1"] and r["state_changed_1"] > 0 and r["lr_steps"] == 2


def test_host_grad_norm_check_reads_the_device_norm_before_the_update():
    r = run_distributed(_two_steps_device_norm, 1, args=(DEVICE_ARGV + ["--host-grad-norm-check"], POISON))[0]
    assert r["error"] is not None and "the norm was read before it" in r["error"], r["error"]
    assert r["updates"] == [None], r["updates"]  # the second update never started
    assert r["params_changed_1"] == [] and r["state_changed_1"] == 0


def test_a_fused_adam_is_replaced_by_torch_fused_adamw_that_skips_on_the_device():
    """megatron builds TE's FusedAdam whenever TE is importable (here the FusedAdam-style CPU stand-in,
    tests/plugins/group_step_adam.py); the plain optimizer gets torch's fused AdamW instead, which
    skips the poisoned update itself; --host-grad-norm-check keeps megatron's choice."""
    assert run_distributed(_adam_class, 1, args=(DEVICE_ARGV, True))[0] == ["AdamW"]
    assert run_distributed(_adam_class, 1, args=(DEVICE_ARGV + ["--host-grad-norm-check"], True))[0] == \
        ["GroupStepAdam"]
    assert run_distributed(_adam_class, 1, args=(DEVICE_ARGV, False))[0] == ["AdamW"]
    r = run_distributed(_two_steps_device_norm, 1, args=(DEVICE_ARGV, POISON, True))[0]
    assert "skipped on the device" in (r["error"] or ""), r["error"]
    assert r["updates"] == [0.0, 1.0] and r["params_changed_1"] == [] and r["state_changed_1"] == 0, r


@pytest.mark.parametrize("clip, world_size, flags, kw", [
    (0.05, 1, [], {}), (0.0, 1, [], {}), (0.05, 2, [], {}),
    (0.05, 2, ["--pipeline-model-parallel-size", "2"], dict(pp=2)),
], ids=["clip", "no-clip", "dp2", "pp2"])
def test_a_device_norm_clips_and_scales_per_token_inside_torch_fused_adamw(clip, world_size, flags, kw):
    """With the norm on the device, megatron's per-token division of the gradients and the clipping
    are both the fused AdamW's ``grad_scale`` (no pass of their own over the gradients). Against
    megatron's own step (``--host-grad-norm-check``: its ``scale_gradients`` over the buffers, its
    clipping of its norm): the same gradient norms, ``grad_scale = max((norm + 1e-6) / clip, 1) *
    tokens`` with megatron's norm and megatron's ``1 / tokens`` (> tokens: the clipping was active),
    and the same parameters after two steps (rounding apart: the kernel divides where megatron
    multiplies). megatron's buffer scaling never ran. Under DP=2 and PP=2 (the token count reduced
    over DP, broadcast from the last stage) on every rank."""
    argv = ARGV + ["--clip-grad", str(clip)] + flags
    for dev, host in zip(
            run_distributed(_two_steps_device_norm, world_size, **kw, args=(argv, None, False, True, world_size)),
            run_distributed(_two_steps, world_size, **kw, args=(argv + ["--host-grad-norm-check"], None, world_size),
                            kwargs=dict(keep_params=True))):
        _same_step_as_megatron(dev, host, clip)
    if clip and world_size == 1:  # the control: clipping changes the parameters
        unclipped = run_distributed(_two_steps, 1, args=(ARGV + ["--clip-grad", "0"], None),
                                    kwargs=dict(keep_params=True))[0]
        assert any(not torch.allclose(unclipped["final"][n], p, rtol=1e-5, atol=1e-7) for n, p in host["final"].items())


def _same_step_as_megatron(dev, host, clip):
    assert dev["error"] is None and host["error"] is None, (dev["error"], host["error"])
    assert "clipping is done inside the fused AdamW kernel" in dev["summary"], dev["summary"]
    assert "and megatron's division of the gradients by the token count too" in dev["summary"], dev["summary"]
    assert "inside the fused AdamW" not in host["summary"], host["summary"]
    assert dev["updates"] == [0.0, 0.0] and len(dev["factors"]) == 2 and dev["buffer_scalings"] == [], dev
    assert len(dev["scales"]) == 2, dev["scales"]  # one optimizer, two steps: one grad_scale each
    for it, (scale, factor) in enumerate(zip(dev["scales"], dev["factors"])):
        norm = host[f"grad_norm_{it}"]
        assert dev[f"grad_norm_{it}"] == pytest.approx(norm, rel=1e-6)
        clip_scale = max((norm + 1e-6) / clip, 1.0) if clip else 1.0
        assert clip_scale > 1 or not clip
        assert scale == pytest.approx(clip_scale / factor, rel=1e-5), (scale, clip_scale, factor)
    for n, p in host["final"].items():
        torch.testing.assert_close(dev["final"][n], p, rtol=1e-5, atol=1e-7, msg=n)
