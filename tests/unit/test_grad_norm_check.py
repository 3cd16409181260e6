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


def _two_steps(argv, poison: str | None, world_size: int = 1, poison_rank: int = 0):
    """Two of the trainer's iterations, the second with ``poison``'s gradient made NaN on rank
    ``poison_rank`` (``"norm"``: its first norm weight); what was raised and the parameters /
    optimizer state after each iteration."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

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
            train_step(cfg, get_forward_backward_func(), ddp, optimizer, scheduler,
                       stream.next_iteration() if stream is not None else None, metrics.IterationStats().hook)
        except Exception as e:  # noqa: BLE001 - what was raised is the result
            out["error"] = f"{type(e).__name__}: {e}"
        after = snapshot()
        out[f"params_changed_{it}"] = sorted(n for n in params if not torch.equal(before[0][n], after[0][n]))
        out[f"state_changed_{it}"] = sum(1 for k, v in after[1].items() if k not in before[1] or not (
            torch.equal(v, before[1][k]) if torch.is_tensor(v) else v == before[1][k]))
    out["lr_steps"] = scheduler.num_steps
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
