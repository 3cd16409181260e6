"""Knowledge distillation through the trainer (``--distill``; ``multimodal_dev.distill``), CPU fp32.

The teacher is a weights-only checkpoint (``--teacher-load``) written here: a perturbed
``tiny-hybrid`` (4 layers: Gated DeltaNet + attention, MoE) for a ``tiny`` student (2 layers), or
the student's own initial weights. The runs are the trainer's own ``build_model_and_optimizer`` +
``distill.build_teacher`` + ``train_step`` (``distill_steps``) in gloo ranks. Checked:

* teacher = the student, alpha = 1: ``distill/kd_loss`` is exactly 0 at the first iteration and
  every finalized gradient is exactly that of a run of the plain student whose LM loss is
  multiplied by 0 (what is left: the load-balancing and z-losses); the KD moves afterwards;
* an all-dense teacher (the test plugin's architecture) teaches a MoE student, logging no teacher
  router loss;
* the teacher is frozen: parameters and expert bias bit-identical after 3 steps (the bias random,
  not zero), no ``requires_grad``, no gradient, not in the optimizer, eval mode, no bias counts;
  and its router statistics stay apart: the student's MoE tracker and expert-bias counts at the
  first iteration are those of the student trained without a teacher;
* padding and layout invariance: BSHD rows of 256 and of 512 (twice the padding) and packed THD
  give the same KD, LM, load-balancing (student and teacher) losses and expert counts;
* parallel invariance against one process: TP=2 + SP, CP=2 (THD), EP=2 and PP=2 (the teacher's
  forward-only pre-pass), each with the full distribution and with top-k (k=16 < V/TP);
* an HF teacher (``--teacher-hf-checkpoint``) equal to an HF-started student gives KD 0;
* the entry point writes the ``distill/*`` keys to the JSONL and TensorBoard; bad flags and a
  teacher that reads other batches are refused by name.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed
from multimodal_dev.arguments import ArgumentError, parse_args
from multimodal_dev.models.contract import DataSpec, SetupError

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"
COMMON = ["--variant", "tiny", "--dataset-provider", "mock", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--seq-length", "256", "--layout-independent-init", "--lr-warmup-iters", "1", "--no-progress-bar",
          "--seed", "7", "--moe-z-loss-coeff", "1e-3", "--moe-aux-loss-coeff", "1e-2"]
BIAS = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"]
KD = ["--distill", "--kd-alpha", "0.7", "--kd-temperature", "2"]
TOPK = ["--kd-top-k", "16"]
COMPARED = ("distill/kd_loss", "distill/lm_loss", "distill/moe_lb_loss", "distill/teacher_moe_lb_loss",
            "distill/total_loss", "load_balancing_loss", "z_loss", "grad_norm")


def _steps(*args, **kwargs):
    from distill_steps import steps

    return steps(*args, **kwargs)


def _save(kind, root, argv):
    import distill_steps

    return getattr(distill_steps, kind)(root, argv)


@pytest.fixture(scope="module")
def hybrid_teacher(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("teacher") / "ckpt")
    run_distributed(_save, 1, args=("save_teacher", root, COMMON + ["--variant", "tiny-hybrid"]))
    return root


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isfinite(a) and math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9)


def _mismatches(got: list, want: list, rtol: float, keys=COMPARED) -> list:
    bad = [f"iteration {i + 1} {k}: {g[k]!r} vs {w[k]!r}" for i, (g, w) in enumerate(zip(got, want, strict=True))
           for k in keys if not _close(g[k], w[k], rtol)]
    bad += [f"iteration {i + 1} expert_tokens" for i, (g, w) in enumerate(zip(got, want))
            if g["expert_tokens"] != w["expert_tokens"]]
    return bad


# ------------------------------------------------------------------ teacher = student, alpha = 1
def _copy_and_reference(root):
    from distill_steps import save_student_init, steps

    save_student_init(root, COMMON)
    distilled = steps(COMMON + ["--distill", "--teacher-load", root, "--kd-alpha", "1", "--kd-temperature", "2"],
                      3, keep_grads=True)
    reference = steps(COMMON, 1, reference_zero_lm=True, keep_grads=True)
    return distilled["steps"], reference["steps"]


def test_a_copy_of_the_student_gives_zero_kd_and_only_the_router_loss_gradients(tmp_path):
    distilled, reference = run_distributed(_copy_and_reference, 1, args=(str(tmp_path / "copy"),), timeout=400)[0]
    first, ref = distilled[0], reference[0]
    assert first["distill/kd_loss"] == 0.0
    assert first["tracker"] == ref["tracker"]  # the same router losses recorded
    assert first["grads"].keys() == ref["grads"].keys()
    different = [n for n in ref["grads"] if not torch.equal(first["grads"][n], ref["grads"][n])]
    assert not different, different[:5]
    # not a comparison of zeros: the router weights get the LB/z gradient, the LM head none
    assert any(ref["grads"][n].abs().sum() > 0 for n in ref["grads"] if "router" in n)
    assert all(ref["grads"][n].abs().sum() == 0 for n in ref["grads"] if "output_layer" in n)
    assert distilled[-1]["distill/kd_loss"] > 0  # the student moved away from its copy (lr 0 at iteration 1)


# ------------------------------------------------------------------ a frozen teacher, kept apart
def _frozen(teacher_root, argv):
    from distill_steps import save_teacher, steps

    saved = save_teacher(teacher_root, argv + ["--variant", "tiny-hybrid"])
    distilled = steps(argv + KD + ["--teacher-load", teacher_root], 3)
    plain = steps(argv, 1)
    return saved["expert_bias"], distilled, plain["steps"][0]


def test_the_teacher_is_frozen_and_its_router_statistics_stay_apart(tmp_path):
    saved_bias, run, plain = run_distributed(_frozen, 1, args=(str(tmp_path / "t"), COMMON + BIAS), timeout=400)[0]
    t = run["teacher"]
    assert t["unchanged"] and t["bias_unchanged"]
    assert len(saved_bias) == 4 and all(torch.equal(a, b) for a, b in zip(saved_bias, t["expert_bias"]))
    assert all(b.abs().sum() > 0 for b in saved_bias)  # a random bias: "unchanged" is a real check
    assert not t["requires_grad"] and not t["grad"] and not t["in_optimizer"] and not t["training"]
    assert all(c == 0 for counts in t["bias_counts"] for c in counts)
    assert all(b.abs().sum() > 0 for b in run["student_bias"])  # the student's bias does move
    first = run["steps"][0]
    assert first["tracker"] == plain["tracker"] and first["bias_counts"] == plain["bias_counts"]
    assert first["expert_tokens"] == plain["expert_tokens"]
    assert first["distill/teacher_moe_lb_loss"] > 0 and first["distill/kd_loss"] > 0


def _dense_teacher(root):
    from distill_steps import save_teacher, steps

    plugin = ["--plugin", str(ROOT / "tests" / "plugins" / "dense_vlm.py")]
    save_teacher(root, COMMON + plugin + ["--model-arch", "dense_vlm_test", "--variant", "small"])
    return steps(COMMON + plugin + KD + ["--teacher-load", root], 1)["steps"][0]


def test_an_all_dense_teacher_has_no_router_losses(tmp_path):
    """docs/invariants.md 6: a teacher without MoE layers (tests/plugins/dense_vlm.py) teaches a MoE
    student; its load-balancing term is 0, the student's is there."""
    first = run_distributed(_dense_teacher, 1, args=(str(tmp_path / "dense"),), timeout=400)[0]
    assert first["distill/teacher_moe_lb_loss"] == 0.0
    assert first["distill/moe_lb_loss"] > 0 and first["distill/kd_loss"] > 0


# ------------------------------------------------------------------ padding, layout, parallelism
def _variants(argv, world_size=1):
    """The full-distribution and the top-k run of one layout (one pool call)."""
    from distill_steps import steps

    return {name: steps(argv + extra, 2, world_size=world_size)["steps"] for name, extra in (("full", []),
                                                                                            ("topk", TOPK))}


@pytest.fixture(scope="module")
def one_process(hybrid_teacher):
    base = COMMON + KD + ["--teacher-load", hybrid_teacher]
    return {fmt: run_distributed(_variants, 1, args=(base + extra,), timeout=400)[0]
            for fmt, extra in (("bshd", []), ("thd", ["--use-packed-sequence"]))}


def _padded(argv):
    from distill_steps import steps

    return steps(argv, 2)["steps"]


def test_padding_and_bshd_vs_thd_change_no_loss(hybrid_teacher, one_process):
    padded = run_distributed(_padded, 1, args=(COMMON + KD + ["--teacher-load", hybrid_teacher,
                                                              "--seq-length", "512"],), timeout=400)[0]
    bshd, thd = one_process["bshd"]["full"], one_process["thd"]["full"]
    assert [s["loss_tokens"] for s in padded] == [s["loss_tokens"] for s in bshd]
    assert not _mismatches(padded, bshd, 1e-5), _mismatches(padded, bshd, 1e-5)
    assert not _mismatches(thd, bshd, 1e-5), _mismatches(thd, bshd, 1e-5)
    assert all(s["distill/kd_loss"] > 0 and s["distill/teacher_moe_lb_loss"] > 0 for s in bshd)


LAYOUTS = {
    "tp2_sp": (dict(tp=2), ["--tensor-model-parallel-size", "2", "--sequence-parallel"], "bshd"),
    "cp2_thd": (dict(cp=2), ["--context-parallel-size", "2", "--use-packed-sequence"], "thd"),
    "ep2": (dict(ep=2), ["--expert-model-parallel-size", "2"], "bshd"),
    "pp2": (dict(pp=2), ["--pipeline-model-parallel-size", "2"], "bshd"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_parallel_layouts_give_what_one_process_gives(hybrid_teacher, one_process, name):
    layout, flags, fmt = LAYOUTS[name]
    argv = COMMON + KD + ["--teacher-load", hybrid_teacher] + flags
    ranks = run_distributed(_variants, 2, args=(argv,), kwargs={"world_size": 2}, timeout=400, **layout)
    for variant in ("full", "topk"):
        got, want = ranks[0][variant], one_process[fmt][variant]
        assert not _mismatches(got, want, 1e-4), (variant, _mismatches(got, want, 1e-4))
        assert ranks[1][variant][0]["distill/kd_loss"] == got[0]["distill/kd_loss"]  # every rank reports it
    full, topk = one_process[fmt]["full"], one_process[fmt]["topk"]
    assert abs(full[0]["distill/kd_loss"] - topk[0]["distill/kd_loss"]) > 1e-4  # top-k is another loss


# ------------------------------------------------------------------ an HF teacher
def _hf_copy(hf_dir):
    from distill_steps import steps

    argv = ["--dataset-provider", "mock", "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length",
            "256", "--no-progress-bar", "--seed", "5", "--hf-checkpoint", hf_dir]
    return steps(argv + ["--distill", "--teacher-hf-checkpoint", hf_dir, "--kd-alpha", "1"], 1)["steps"][0]


def test_an_hf_teacher_equal_to_the_hf_started_student_gives_zero_kd(tmp_path):
    pytest.importorskip("transformers")
    from test_qwen35_hybrid import hf_config, perturbed_hf

    perturbed_hf(hf_config()).save_pretrained(str(tmp_path), max_shard_size="200KB")
    first = run_distributed(_hf_copy, 1, args=(str(tmp_path),), timeout=400)[0]
    assert first["distill/kd_loss"] == 0.0 and first["distill/teacher_moe_lb_loss"] > 0
    assert first["distill/teacher_moe_lb_loss"] == pytest.approx(first["distill/moe_lb_loss"], rel=1e-6)


# ------------------------------------------------------------------ the entry point, the flags
def test_the_entry_point_writes_the_distill_metrics(tmp_path, hybrid_teacher):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    jsonl, tb = tmp_path / "m.jsonl", tmp_path / "tb"
    r = subprocess.run([sys.executable, str(ENTRY), *COMMON, *KD, "--teacher-load", hybrid_teacher, "--train-iters",
                        "2", "--metrics-file", str(jsonl), "--tensorboard-dir", str(tb)],
                       capture_output=True, text=True, env=env, timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    from multimodal_dev.distill.step import KEYS

    for rec in recs:
        assert set(KEYS) <= set(rec), sorted(rec)
        assert rec["distill/lm_loss"] == rec["lm_loss"]
        want = 0.7 * rec["distill/kd_loss"] + 0.3 * rec["lm_loss"] + rec["distill/moe_lb_loss"] + 1e-3 * 2 * rec["z_loss"]
        assert rec["distill/total_loss"] == pytest.approx(want, rel=1e-9)
        assert rec["distill/moe_lb_loss"] == pytest.approx(1e-2 * 2 * rec["load_balancing_loss"], rel=1e-9)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert set(KEYS) <= set(acc.Tags()["scalars"]), acc.Tags()["scalars"]
    assert "distillation: teacher" in r.stderr


@pytest.mark.parametrize("argv, needle", [
    (["--kd-alpha", "0.5"], "--kd-alpha needs --distill"),
    (["--teacher-load", "x"], "--teacher-load needs --distill"),
    (["--distill"], "--distill needs exactly one teacher"),
    (["--distill", "--teacher-load", "x", "--teacher-hf-checkpoint", "y"], "(both were given)"),
    (["--distill", "--teacher-load", "x", "--kd-alpha", "1.5"], "--kd-alpha must be in [0, 1]"),
    (["--distill", "--teacher-load", "x", "--kd-temperature", "0"], "--kd-temperature must be > 0"),
    (["--distill", "--teacher-load", "x", "--kd-top-k", "0"], "--kd-top-k must be >= 1"),
    (["--distill", "--teacher-load", "x", "--chunked-lm-loss"], "--chunked-lm-loss with --distill"),
    (["--distill", "--teacher-load", "x", "--cross-entropy-loss-fusion"], "--cross-entropy-loss-fusion with --distill"),
])
def test_bad_distill_flags_are_refused_naming_them(argv, needle):
    with pytest.raises(ArgumentError) as e:
        parse_args(argv, world_size=1)
    assert needle in str(e.value), str(e.value)


def test_the_flags_reach_the_run_config():
    assert not parse_args([], world_size=1).distill.enabled
    d = parse_args(["--distill", "--teacher-load", "ck", "--kd-top-k", "8", "--kd-temperature", "2"],
                   world_size=1).distill
    assert (d.enabled, d.teacher_load, d.top_k, d.temperature, d.alpha) == (True, "ck", 8, 2.0, 0.5)


def test_a_teacher_that_reads_other_batches_or_no_checkpoint_is_refused(tmp_path):
    from multimodal_dev.distill.teacher import _check_same_data, _from_checkpoint

    spec = DataSpec(vocab_size=256, image_token_id=250, patch_size=4)
    with pytest.raises(SetupError, match=r"vocab_size: teacher 512, student 256"):
        _check_same_data(SimpleNamespace(data_spec=DataSpec(vocab_size=512, image_token_id=250, patch_size=4)),
                         SimpleNamespace(data_spec=spec))
    _check_same_data(SimpleNamespace(data_spec=spec), SimpleNamespace(data_spec=spec))
    args = parse_args(["--distill", "--teacher-load", str(tmp_path)], world_size=1).distill
    with pytest.raises(SetupError, match=r"--teacher-load .*: no complete checkpoint there"):
        _from_checkpoint(args, None)
