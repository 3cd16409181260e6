#!/usr/bin/env python
"""Distillation end to end on CPU: a hybrid ``tiny-hybrid`` teacher trained on the coloured-shapes
data, distilled into the smaller ``tiny`` student, against the same student trained from scratch
with the same budget (iterations, batches, schedule, seed).

    .venv/bin/python scripts/bench/distill_cpu.py [--teacher-iters 300] [--student-iters 150]

1. makes the shapes dataset (4000 training samples, 8 shards, and 400 validation samples of
   another seed) under ``--workdir`` unless it is there;
2. trains the teacher (``tiny-hybrid``: 3 Gated DeltaNet + 1 attention layer, MoE) and saves it;
3. trains the student twice through ``pretrain_multimodal.py``: from scratch, and with
   ``--distill --teacher-load`` (alpha, temperature: the flags below);
4. prints the student's training LM loss curve (means over windows of iterations) for both runs,
   their validation LM loss at the end (held-out samples) and the teacher's, and the time per run.

Numbers measured on the 2-core development machine are in docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"
MAKE = ROOT / "examples" / "multimodal_dev" / "scripts" / "make_shapes_dataset.py"


def _run(cmd: list, log: Path) -> float:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"distill_cpu.py: {' '.join(map(str, cmd[:3]))} ... failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t0


def _records(path: Path) -> tuple[list, list]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in recs if r.get("split", "train") == "train"], [r for r in recs if r.get("split") == "valid"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "distill_cpu"))
    p.add_argument("--teacher-variant", default="tiny-hybrid")
    p.add_argument("--student-variant", default="tiny")
    p.add_argument("--teacher-iters", type=int, default=300)
    p.add_argument("--student-iters", type=int, default=150)
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=1234, help="the students' seed (the teacher is trained with 1234)")
    p.add_argument("--window", type=int, default=25, help="iterations per mean in the printed curve")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    train_data, valid_data = work / "shapes", work / "shapes_valid"
    if not (train_data / "meta.json").exists():
        _run([MAKE, "--out", train_data, "--num-samples", 4000, "--shard-size", 500, "--image-size", 32, "--seed", 0],
             work / "make_train.log")
    if not (valid_data / "meta.json").exists():
        _run([MAKE, "--out", valid_data, "--num-samples", 400, "--shard-size", 400, "--image-size", 32, "--seed", 1],
             work / "make_valid.log")
    common = ["--model-arch", "qwen35_vl", "--dataset-provider", "webdataset", "--data-path", train_data,
              "--use-packed-sequence", "--micro-batch-size", 16, "--seq-length", 256, "--lr", "3e-3",
              "--lr-warmup-iters", 10, "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3",
              "--no-progress-bar", "--log-interval", 50, "--eval-iters", 8, "--valid-data-path", valid_data]
    teacher_ckpt = work / "teacher_ckpt"
    times = {}
    runs = {"teacher": (a.teacher_variant, a.teacher_iters, ["--save", teacher_ckpt, "--seed", 1234]),
            "scratch": (a.student_variant, a.student_iters, ["--seed", a.seed]),
            "distilled": (a.student_variant, a.student_iters,
                          ["--seed", a.seed, "--distill", "--teacher-load", teacher_ckpt, "--kd-alpha", a.kd_alpha, "--kd-temperature",
                           a.kd_temperature] + (["--kd-top-k", a.kd_top_k] if a.kd_top_k else []))}
    for name, (variant, iters, extra) in runs.items():
        metrics = work / f"{name}.jsonl"
        if name == "teacher" and (teacher_ckpt / "latest_checkpointed_iteration.txt").exists():
            print(f"teacher: reusing {teacher_ckpt} (remove it to train it again)")
            continue
        metrics.unlink(missing_ok=True)
        print(f"{name}: {variant}, {iters} iterations ...", flush=True)
        times[name] = _run([ENTRY, *common, "--variant", variant, "--train-iters", iters, "--eval-interval", iters,
                            "--metrics-file", metrics, *extra], work / f"{name}.log")
    scratch, scratch_valid = _records(work / "scratch.jsonl")
    dist, dist_valid = _records(work / "distilled.jsonl")
    print(f"\nstudent {a.student_variant} from scratch vs distilled from {a.teacher_variant} "
          f"(alpha {a.kd_alpha}, T {a.kd_temperature}, top-k {a.kd_top_k or 'none'}): training LM loss, "
          f"mean per {a.window} iterations")
    print(f"{'iterations':>12} {'scratch':>9} {'distilled':>10} {'KD loss':>9}")
    for lo in range(0, len(scratch), a.window):
        s, d = scratch[lo:lo + a.window], dist[lo:lo + a.window]
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        print(f"{lo + 1:>5}-{lo + len(s):<6} {mean(s, 'lm_loss'):>9.4f} {mean(d, 'lm_loss'):>10.4f} "
              f"{mean(d, 'distill/kd_loss'):>9.4f}")
    print(f"validation LM loss at the end: scratch {scratch_valid[-1]['lm_loss']:.4f}, "
          f"distilled {dist_valid[-1]['lm_loss']:.4f}", end="")
    if (work / "teacher.jsonl").exists():
        _, teacher_valid = _records(work / "teacher.jsonl")
        print(f", teacher {teacher_valid[-1]['lm_loss']:.4f}", end="")
    print(f"; unigram baseline {scratch[-1]['unigram_baseline']:.4f}")
    print("MoE load-balancing term at the end (distilled student / its teacher): "
          f"{dist[-1]['distill/moe_lb_loss']:.5f} / {dist[-1]['distill/teacher_moe_lb_loss']:.5f}")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
