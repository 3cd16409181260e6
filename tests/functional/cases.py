"""The functional-test cases: one table, used by ``test_golden.py`` and ``scripts/regen_golden.py``.

Every case trains the ``tiny`` qwen35_vl variant for a few iterations on the mock provider
(CPU, fp32, gloo) and records the per-iteration metrics JSONL of rank 0. ``COMMON`` fixes the
global batch, and ``--layout-independent-init`` makes every parallel layout start from the same
weights; the mock provider gives the same micro-batches whatever the DP size. So every layout of
the ``main`` group must reproduce the BSHD case: the same lm_loss, load_balancing_loss and
tokens per expert.

Groups:
  main     the reference (``bshd``) and the parallel layouts that must agree with it;
  bias     aux-loss-free balancing (sigmoid scores + expert bias): its own curve;
  padding  a heavily padded BSHD run (--seq-length 512) with and without the padding mask;
  hybrid   tiny-hybrid (Gated DeltaNet layers) and the layouts that must agree with it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

from megatron.mcore_ext.netutil import free_port as _free_port

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"

TRAIN_ITERS = 4
COMMON = [
    "--variant", "tiny", "--dataset-provider", "mock", "--train-iters", str(TRAIN_ITERS),
    "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "256",
    "--layout-independent-init", "--lr-warmup-iters", "1", "--no-progress-bar",
    "--moe-z-loss-coeff", "1e-3", "--seed", "1234",
]
# Flags appended to every case after the golden files were written, each spelling out what was the
# trainer's default then, so the golden values stay valid: --moe-aux-loss-coeff defaulted to 1e-2
# until it became "the architecture's value" (qwen35_vl: 0.001).
IMPLIED_BY_GOLDEN = ["--moe-aux-loss-coeff", "1e-2"]
# Later flags override earlier ones (argparse), so a case may change e.g. --seq-length.
BIAS = ["--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid"]
PADDED = ["--seq-length", "512"]
HYBRID = ["--variant", "tiny-hybrid"]

# The per-iteration fields a golden file keeps.
GOLDEN_FIELDS = ("lm_loss", "load_balancing_loss", "z_loss", "expert_tokens", "tokens", "padding_tokens")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    nproc: int
    flags: tuple[str, ...]  # on top of COMMON
    group: str  # main | bias | padding
    doc: str

    @property
    def argv(self) -> list[str]:
        """The trainer's full argument list (without --metrics-file)."""
        return [*COMMON, *self.flags, *IMPLIED_BY_GOLDEN]

    @property
    def golden_argv(self) -> list[str]:
        """The argument list a golden file records (``IMPLIED_BY_GOLDEN`` was the default then)."""
        return [*COMMON, *self.flags]


CASES: list[Case] = [
    Case("bshd", 1, (), "main", "reference: padded BSHD rows, one process"),
    Case("thd", 1, ("--use-packed-sequence",), "main", "packed THD, one process"),
    Case("tp2_sp", 2, ("--tensor-model-parallel-size", "2", "--sequence-parallel"), "main",
         "tensor parallel 2 with sequence parallelism"),
    Case("ep2_allgather", 2, ("--expert-model-parallel-size", "2"), "main",
         "expert parallel 2 (x DP 2), allgather dispatcher"),
    Case("ep2_alltoall", 2, ("--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"),
         "main", "expert parallel 2 (x DP 2), alltoall dispatcher"),
    Case("cp2_thd", 2, ("--context-parallel-size", "2", "--use-packed-sequence"), "main",
         "context parallel 2 on packed THD"),
    Case("pp2", 2, ("--pipeline-model-parallel-size", "2"), "main",
         "pipeline parallel 2 (BSHD): the MoE layers of both stages need the padding mask"),
    Case("bias", 1, tuple(BIAS), "bias", "expert bias + sigmoid scores, one process"),
    Case("bias_ep2", 2, (*BIAS, "--expert-model-parallel-size", "2"), "bias",
         "expert bias + sigmoid scores, expert parallel 2"),
    Case("hybrid", 1, tuple(HYBRID), "hybrid", "tiny-hybrid (3 Gated DeltaNet + 1 full attention), BSHD, one process"),
    Case("hybrid_thd", 1, (*HYBRID, "--use-packed-sequence"), "hybrid",
         "tiny-hybrid packed: the GDN state resets at every packed sample"),
    Case("hybrid_tp2_sp", 2, (*HYBRID, "--tensor-model-parallel-size", "2", "--sequence-parallel"), "hybrid",
         "tiny-hybrid, tensor parallel 2 + SP: GDN heads split"),
    Case("hybrid_cp2_thd", 2, (*HYBRID, "--context-parallel-size", "2", "--use-packed-sequence"), "hybrid",
         "tiny-hybrid, context parallel 2 on THD: GDN's all-to-all to head parallel"),
    Case("hybrid_pp2", 2, (*HYBRID, "--pipeline-model-parallel-size", "2"), "hybrid",
         "tiny-hybrid, pipeline parallel 2: a stage of GDN layers only"),
    Case("bshd_pad512", 1, tuple(PADDED), "padding", "BSHD rows of 512: mostly padding, mask on"),
    Case("bshd_pad512_nomask", 1, (*PADDED, "--no-padding-mask"), "padding",
         "the same with --no-padding-mask: the routers see the padding"),
]
BY_NAME = {c.name: c for c in CASES}
REFERENCE = {"main": "bshd", "bias": "bias", "hybrid": "hybrid"}  # the run each layout of a group must equal


class RunError(RuntimeError):
    """A case's training run failed or timed out; the message ends with the tail of its output."""


def versions() -> dict:
    import torch
    from importlib.metadata import version

    return {"torch": torch.__version__, "megatron-core": version("megatron-core"), "python": sys.version.split()[0]}


def command(case: Case, metrics_file: str) -> list[str]:
    """The command line of one run. One process: the trainer itself (it starts its own one-rank
    group on a free port); several: torchrun --standalone (a free rendezvous port per run)."""
    argv = [*case.argv, "--metrics-file", metrics_file]
    if case.nproc == 1:
        return [sys.executable, str(ENTRY), *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(case.nproc),
            str(ENTRY), *argv]


def launcher(case: Case) -> str:
    """The launch command as a human would type it (for the golden files)."""
    if case.nproc == 1:
        return "python examples/multimodal_dev/pretrain_multimodal.py"
    return (f"python -m torch.distributed.run --standalone --nproc-per-node {case.nproc} "
            "examples/multimodal_dev/pretrain_multimodal.py")


def run_case(case: Case, workdir: Optional[str] = None, timeout: float = 420.0, tail_chars: int = 6000) -> list[dict]:
    """Train one case; return rank 0's per-iteration metrics records. Raises RunError (with the
    tail of the output) on a non-zero exit, a timeout, or a wrong number of records."""
    own = workdir is None
    wd = tempfile.mkdtemp(prefix=f"functional_{case.name}_") if own else workdir
    metrics = os.path.join(wd, f"{case.name}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(k, None)
    env["MASTER_PORT"] = str(_free_port())  # only the one-process path reads it
    cmd = command(case, metrics)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout if isinstance(e.stdout, str) else (e.stdout or b"").decode(errors="replace")
        raise RunError(f"case {case.name}: timed out after {timeout:.0f}s\n$ {' '.join(cmd)}\n"
                       f"--- output tail ---\n{out[-tail_chars:]}") from None
    if proc.returncode != 0:
        raise RunError(f"case {case.name}: exit code {proc.returncode}\n$ {' '.join(cmd)}\n"
                       f"--- output tail ---\n{proc.stdout[-tail_chars:]}")
    try:
        with open(metrics) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise RunError(f"case {case.name}: no metrics file ({e})\n--- output tail ---\n{proc.stdout[-tail_chars:]}")
    if [r["iteration"] for r in recs] != list(range(1, TRAIN_ITERS + 1)):
        raise RunError(f"case {case.name}: expected iterations 1..{TRAIN_ITERS}, got "
                       f"{[r['iteration'] for r in recs]}\n--- output tail ---\n{proc.stdout[-tail_chars:]}")
    if own:
        os.remove(metrics)
        os.rmdir(wd)
    return recs


def run_cases(cases: list[Case], workdir: Optional[str] = None, slots: Optional[int] = None,
              timeout: float = 420.0) -> dict:
    """Run several cases concurrently, each holding ``nproc`` of ``slots`` slots (default: the
    CPU count + 1; every rank runs with OMP_NUM_THREADS=1). Returns {name: futures.Future}; a
    future's result is the records, or it raises RunError."""
    import concurrent.futures as cf
    import threading

    # one slot more than CPUs by default: the ranks of a multi-process run idle in collectives and
    # pipeline bubbles, and the extra run fills those gaps (2 CPUs: ~135 s instead of ~200 s)
    slots = max(slots or (os.cpu_count() or 1) + 1, max(c.nproc for c in cases))
    cond = threading.Condition()
    free = [slots]

    def job(c: Case):
        with cond:
            cond.wait_for(lambda: free[0] >= c.nproc)
            free[0] -= c.nproc
        try:
            return run_case(c, workdir, timeout=timeout)
        finally:
            with cond:
                free[0] += c.nproc
                cond.notify_all()

    pool = cf.ThreadPoolExecutor(max_workers=len(cases), thread_name_prefix="functional")
    # the biggest first: a 2-process run waits for two free slots, the 1-process runs fill gaps
    ordered = sorted(cases, key=lambda c: -c.nproc)
    futs = {c.name: pool.submit(job, c) for c in ordered}
    pool.shutdown(wait=False)
    return futs


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def golden_record(case: Case, recs: list[dict]) -> dict:
    return {
        "case": case.name,
        "doc": case.doc,
        "group": case.group,
        "nproc": case.nproc,
        "launcher": launcher(case),
        "env": {"OMP_NUM_THREADS": "1"},
        "flags": case.golden_argv,
        "versions": versions(),
        "iterations": [{"iteration": r["iteration"], **{k: r[k] for k in GOLDEN_FIELDS}} for r in recs],
    }


def load_golden(name: str) -> dict:
    with open(golden_path(name)) as f:
        return json.load(f)


def write_golden(case: Case, recs: list[dict]) -> Path:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    p = golden_path(case.name)
    tmp = p.with_suffix(".json.tmp")
    rec = golden_record(case, recs)
    # readable and diffable: one line per key, one line per iteration
    lines = []
    for k, v in rec.items():
        if k == "iterations":
            body = ",\n".join("  " + json.dumps(it) for it in v)
            lines.append(f' "{k}": [\n{body}\n ]')
        else:
            lines.append(f" {json.dumps(k)}: {json.dumps(v)}")
    with open(tmp, "w") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    os.replace(tmp, p)
    return p
