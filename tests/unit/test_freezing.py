"""Freezing parts of the model (``--freeze-vision-model``, ``--freeze-projector``,
``--freeze-language-model``; ``multimodal_dev.freezing``), fp32 on CPU, qwen35_vl ``tiny``.

The expected frozen set is derived from the module tree, not from the code under test: the vision
tower's parameters minus its 2x2 patch merger (``vision_encoder.merger.*``), the merger, and the
language model (``language_model.*``). Checked after 5 of the trainer's steps (in-process,
``trainer_steps``): frozen parameters have ``requires_grad`` False, no gradient buffer
(``main_grad``) and no optimizer state, and are bit-identical to their initial values, while every
other part trains; a frozen language model keeps its expert bias (an unfrozen control run moves
it). Refused by name: freezing everything, freezing a part the model lacks. Checkpoints (through
``pretrain_multimodal.py``): a frozen run saves and resumes exactly (format-2 optimizer state of
the trained parameters only); a resume may freeze more, not less.
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
from multimodal_dev.arguments import parse_args
from multimodal_dev.models.contract import SetupError
from trainer_steps import COMMON, build, record_steps

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"
BIAS = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"]


def _part(name: str) -> str:
    if name.startswith("vision_encoder.merger."):
        return "projector"
    if name.startswith("vision_encoder."):
        return "vision"
    assert name.startswith("language_model."), name
    return "language"


def _summary(argv, iterations=5):
    """What the test looks at, per parameter name (small enough to send back)."""
    r = record_steps(argv, iterations)
    return dict(
        unchanged={n: torch.equal(r["initial_params"][n], p) for n, p in r["params"].items()},
        requires_grad=r["requires_grad"], grad_buffer=r["grad_buffer"], optimizer_state=r["optimizer_state"],
        expert_bias=[b.tolist() for b in r["expert_bias"]],
        bias_counts=[[c.sum().item() for c in s["bias_counts"]] for s in r["steps"]],
        grad_norm=[s["grad_norm"] for s in r["steps"]],
    )


@pytest.mark.parametrize("flags, frozen, extra", [
    (["--freeze-vision-model"], {"vision"}, []),
    (["--freeze-projector"], {"projector"}, []),
    (["--freeze-vision-model", "--freeze-projector"], {"vision", "projector"}, []),
    (["--freeze-language-model"], {"language"}, BIAS),
])
def test_frozen_parameters_have_no_buffer_no_state_and_do_not_change(flags, frozen, extra):
    s = run_distributed(_summary, 1, args=(COMMON + extra + flags,), timeout=300)[0]
    names = list(s["requires_grad"])
    assert {_part(n) for n in names} == {"vision", "projector", "language"}
    assert set(s["optimizer_state"]) <= set(names)  # the optimizer holds the model's parameters themselves (fp32)
    for n in names:
        is_frozen = _part(n) in frozen
        assert s["requires_grad"][n] is not is_frozen, n
        assert s["grad_buffer"][n] is not is_frozen, n  # megatron's DDP: main_grad for trainable ones only
        if is_frozen:
            assert n not in s["optimizer_state"], n
            assert s["unchanged"][n], f"frozen {n} changed"
        else:
            state = set(s["optimizer_state"].get(n, ()))
            assert {"exp_avg", "exp_avg_sq"} <= state, (n, sorted(state))  # torch's Adam may also keep "step"
    for part in {"vision", "projector", "language"} - frozen:  # the rest trains
        moved = [not s["unchanged"][n] for n in names if _part(n) == part]
        assert sum(moved) >= 0.9 * len(moved), (part, sum(moved), len(moved))
    assert all(g > 0 for g in s["grad_norm"])


def test_a_frozen_language_model_keeps_its_expert_bias():
    frozen, control = (run_distributed(_summary, 1, args=(COMMON + BIAS + flags,), timeout=300)[0]
                       for flags in (["--freeze-language-model"], []))
    assert frozen["expert_bias"] and len(frozen["expert_bias"]) == len(control["expert_bias"])
    assert all(all(x == 0.0 for x in b) for b in frozen["expert_bias"]), frozen["expert_bias"]
    assert all(any(x != 0.0 for x in b) for b in control["expert_bias"]), control["expert_bias"]
    # the routers still count (and finalize still zeroes the counts): only the update is skipped
    assert all(c > 0 for step in frozen["bias_counts"] for c in step)


def _setup_error(argv, world_size=1):
    try:
        build(argv, world_size)
    except SetupError as e:
        return str(e)
    return None


def test_a_pipeline_stage_with_nothing_to_train_is_refused():
    """PP=2 of tiny: stage 1 holds only language-model layers; every rank refuses (collective)."""
    argv = COMMON + ["--pipeline-model-parallel-size", "2", "--freeze-language-model"]
    msgs = run_distributed(_setup_error, 2, pp=2, args=(argv, 2), timeout=300)
    assert all(m is not None and "--freeze-language-model: some rank holds only frozen parameters" in m
               for m in msgs), msgs
    assert "this rank holds 0 trainable" in msgs[1] and "this rank holds 0 trainable" not in msgs[0], msgs
    # freezing the vision tower there leaves both stages something to train
    vision_only = COMMON + ["--pipeline-model-parallel-size", "2", "--freeze-vision-model"]
    assert run_distributed(_setup_error, 2, pp=2, args=(vision_only, 2), timeout=300) == [None] * 2


def test_freezing_everything_or_a_missing_part_is_refused():
    dense = [a for a in COMMON if a not in ("--variant", "tiny")] + [
        "--plugin", str(ROOT / "tests" / "plugins" / "dense_vlm.py"), "--model-arch", "dense_vlm_test",
        "--variant", "small"]
    everything, no_projector, dense_vision = (run_distributed(_setup_error, 1, args=(argv,))[0] for argv in (
        COMMON + ["--freeze-vision-model", "--freeze-projector", "--freeze-language-model"],
        dense + ["--freeze-projector"],
        dense + ["--freeze-vision-model"],
    ))
    assert everything is not None and "nothing left to train" in everything, everything
    assert no_projector is not None and "--freeze-projector: the model has no projector" in no_projector, no_projector
    assert dense_vision is None  # its vision encoder is there to freeze


def test_the_flags_name_the_parts():
    assert parse_args([], world_size=1).model.freeze == ()
    cfg = parse_args(["--freeze-language-model", "--freeze-vision-model"], world_size=1)
    assert cfg.model.freeze == ("vision", "language")
    assert cfg.to_dict()["model"]["freeze"] == ("vision", "language")  # saved with every checkpoint


# ------------------------------------------------------------------------------ checkpoints
def _saved(freeze):
    return {"model": {"freeze": freeze}} if freeze is not KeyError else {"model": {}}


def test_a_resume_may_freeze_more_not_less(caplog):
    from multimodal_dev.checkpoint_checks import CheckpointError, check_frozen_parts

    with pytest.raises(CheckpointError) as e:  # the checkpoint has no optimizer state for the vision model
        check_frozen_parts(_saved(["vision", "projector"]), _saved(("projector",)), "CK")
    assert str(e.value).startswith("--load CK was written with --freeze-vision-model: it holds no optimizer state")
    assert "--freeze-projector" not in str(e.value)  # still frozen: not what is refused
    with pytest.raises(CheckpointError, match="written with --freeze-language-model"):
        check_frozen_parts(_saved(["language"]), _saved(()), "CK")
    caplog.set_level("INFO", logger="multimodal_dev.checkpoint_checks")
    for was, now in ((["vision"], ("vision",)), ((), ()), (KeyError, ())):
        check_frozen_parts(_saved(was), _saved(now), "CK")  # the same parts (KeyError: a checkpoint from before)
    assert not caplog.records
    check_frozen_parts(_saved(KeyError), _saved(("vision", "language")), "CK")
    assert [r.getMessage() for r in caplog.records] == [
        "--load CK: --freeze-vision-model --freeze-language-model now frozen; the checkpoint's optimizer state "
        "for it is not read"]


def _run(args, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(ENTRY), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_a_frozen_run_saves_and_resumes_exactly_and_may_freeze_more_not_less(tmp_path):
    run = COMMON + ["--train-iters", "4", "--freeze-vision-model"]
    ck = str(tmp_path / "ckpt")
    r = _run(run + ["--metrics-file", str(tmp_path / "whole.jsonl")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "M frozen (--freeze-vision-model)" in r.stderr + r.stdout
    r = _run(run + ["--exit-after-iters", "2", "--save", ck, "--save-interval", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(run + ["--load", ck, "--metrics-file", str(tmp_path / "resumed.jsonl")])
    assert r.returncode == 0, r.stderr[-3000:]
    keys = ("lm_loss", "load_balancing_loss", "z_loss", "grad_norm", "lr", "expert_tokens")
    whole, resumed = _metrics(tmp_path / "whole.jsonl"), _metrics(tmp_path / "resumed.jsonl")
    assert [m["iteration"] for m in resumed] == [3, 4]
    assert [{k: m[k] for k in keys} for m in whole[2:]] == [{k: m[k] for k in keys} for m in resumed]

    # training the vision model now: the checkpoint has no optimizer state for it
    r = _run([a for a in run if a != "--freeze-vision-model"] + ["--load", ck])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "was written with --freeze-vision-model: it holds no optimizer state" in r.stderr, r.stderr[-3000:]
    # freezing more: the projector's optimizer state in the checkpoint is not read
    r = _run(run + ["--freeze-projector", "--load", ck, "--metrics-file", str(tmp_path / "more.jsonl")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--freeze-projector now frozen" in r.stderr + r.stdout
    assert [m["iteration"] for m in _metrics(tmp_path / "more.jsonl")] == [3, 4]
