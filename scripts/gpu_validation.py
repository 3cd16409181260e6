"""Correctness runs on GPUs (NCCL, bf16): the functional layouts, loss curves against the 1-GPU run.

Run on a GPU machine (every case whose GPU count fits is run; the others are listed as not run):

    python scripts/gpu_validation.py run --out OUT [--iters 30] [--cases a,b]

writes ``OUT/gpu_validation.json`` (every case's per-iteration metrics, the command, the GPU, the
versions). Then, anywhere:

    python scripts/gpu_validation.py report OUT/gpu_validation.json --doc docs/gpu-validation.md \
        --svg docs/gpu-validation-loss.svg

writes the tables (per case: max relative deviation of lm_loss and load_balancing_loss from the
1-GPU reference over the run, final losses) and an SVG plot of the loss curves.

Every case trains ``tiny`` on the same mock samples with ``--layout-independent-init`` (the same
initial weights in every layout) and the same global batch, so a layout may differ from the
reference only by bf16 rounding and reduction order. The padding check: a heavily padded BSHD run
with the padding mask must give the THD run's load-balancing loss (padding does not dilute it);
without the mask it must not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"

COMMON = ["--variant", "tiny", "--dataset-provider", "mock", "--micro-batch-size", "2", "--global-batch-size", "8",
          "--seq-length", "512", "--layout-independent-init", "--lr", "2e-3", "--lr-warmup-iters", "2",
          "--no-progress-bar", "--moe-z-loss-coeff", "1e-3", "--seed", "1234", "--log-interval", "10"]
BF16 = ["--bf16"]

# name: (GPUs, flags, reference case or None, what it shows)
CASES: dict[str, tuple[int, list[str], str | None, str]] = {
    "bshd": (1, BF16, None, "1-GPU reference, padded batches"),
    "thd": (1, BF16 + ["--use-packed-sequence"], "bshd", "packed batches: same losses as BSHD"),
    "bshd_distopt": (1, BF16 + ["--use-distributed-optimizer"], "bshd", "distributed optimizer (DP=1)"),
    "bshd_no_mask": (1, BF16 + ["--no-padding-mask"], None, "padding mask withheld: padding dilutes the LB loss"),
    "bias": (1, BF16 + ["--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid"], None,
             "expert bias (sigmoid scores), 1-GPU reference of the bias cases"),
    "tp2_sp": (2, BF16 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], "bshd", "TP=2 with SP"),
    "ep2_a2a": (2, BF16 + ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"], "bshd",
                "EP=2, alltoall dispatcher (DP=2)"),
    "cp2_bshd": (2, BF16 + ["--context-parallel-size", "2"], "bshd", "CP=2, BSHD zigzag"),
    "cp2_thd": (2, BF16 + ["--context-parallel-size", "2", "--use-packed-sequence"], "bshd", "CP=2, THD"),
    "dp2_distopt": (2, BF16 + ["--use-distributed-optimizer"], "bshd", "DP=2, distributed optimizer"),
    "ep2_bias": (2, BF16 + ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
                            "--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid"], "bias",
                 "EP=2 with expert bias"),
    # issue 7: 4 and 8 GPUs (tiny at these sizes; every layout against its 1-GPU reference)
    "bshd_mbs1": (1, BF16 + ["--micro-batch-size", "1"], None, "1-GPU reference with micro-batches of 1 (for DP=8)"),
    "tp2_cp2_thd": (4, BF16 + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--context-parallel-size", "2",
                               "--use-packed-sequence"], "bshd", "TP=2 x CP=2, THD"),
    "ep4_bias": (4, BF16 + ["--expert-model-parallel-size", "4", "--moe-token-dispatcher-type", "alltoall",
                            "--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid"], "bias",
                 "EP=4 with expert bias (DP=4)"),
    "dp2_ep2_distopt": (4, BF16 + ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
                                   "--sequence-parallel", "--use-distributed-optimizer"], "bshd",
                        "TP=2 x DP=2, EP=2, distributed optimizer"),
    "ep8": (8, BF16 + ["--micro-batch-size", "1", "--expert-model-parallel-size", "8",
                       "--moe-token-dispatcher-type", "alltoall"], "bshd_mbs1", "EP=8 (DP=8)"),
    "tp2_ep4_sp": (8, BF16 + ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                              "--expert-model-parallel-size", "4"], "bshd", "TP=2 x EP=4 with SP (DP=4)"),
    "cp4_ep2_thd": (8, BF16 + ["--context-parallel-size", "4", "--expert-model-parallel-size", "2",
                               "--use-packed-sequence"], "bshd", "CP=4 x EP=2, THD (DP=2)"),
    "pp2_ep4": (8, BF16 + ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "4"], "bshd",
                "PP=2 x EP=4 (DP=4)"),
}


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def run(args) -> int:
    import tempfile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_validation_"))  # per-case JSONL; the result is one file
    n_gpu = _gpu_count() if not args.fp32 else args.fake_gpus
    wanted = args.cases.split(",") if args.cases else list(CASES)
    common = COMMON + (["--transformer-impl", args.transformer_impl] if args.transformer_impl else [])
    results = {"gpus": n_gpu, "iters": args.iters, "common": common, "cases": {}, "not_run": {}}
    try:
        import torch

        results["torch"] = torch.__version__
        results["device"] = torch.cuda.get_device_name(0) if n_gpu else "cpu"
    except Exception:  # noqa: BLE001
        pass
    try:
        import megatron.core

        results["megatron_core"] = megatron.core.__version__.split("+")[0]
    except Exception:  # noqa: BLE001
        pass
    for name in wanted:
        gpus, flags, ref, what = CASES[name]
        if gpus > n_gpu:
            results["not_run"][name] = f"needs {gpus} GPUs, this machine has {n_gpu}"
            print(f"[{name}] not run: needs {gpus} GPUs", flush=True)
            continue
        metrics = work / f"{name}.jsonl"
        metrics.unlink(missing_ok=True)
        if args.fp32:  # smoke test of this script on a CPU machine
            flags = [f for f in flags if f not in ("--bf16", "--use-distributed-optimizer")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
               str(ENTRY), *common, *flags,
               "--train-iters", str(args.iters), "--metrics-file", str(metrics)]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="4"))
        dt = time.time() - t0
        rec = {"gpus": gpus, "flags": flags, "ref": ref, "what": what, "rc": r.returncode, "seconds": round(dt, 1)}
        if r.returncode == 0 and metrics.exists():
            rec["metrics"] = [json.loads(line) for line in metrics.read_text().splitlines()]
            print(f"[{name}] ok in {dt:.0f}s: lm_loss {rec['metrics'][0]['lm_loss']:.4f} -> "
                  f"{rec['metrics'][-1]['lm_loss']:.4f}", flush=True)
        else:
            rec["error"] = (r.stdout + r.stderr)[-4000:]
            print(f"[{name}] FAILED rc={r.returncode}\n{rec['error'][-2500:]}", flush=True)
        results["cases"][name] = rec
        (out / args.name).write_text(json.dumps(results))  # after every case: a killed run keeps the finished ones
    (out / args.name).write_text(json.dumps(results))
    return 0 if all(c["rc"] == 0 for c in results["cases"].values()) else 1


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _svg(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """A small line plot (no plotting library needed)."""
    w, h, pad = 720, 420, 50
    ys = [y for c in curves.values() for y in c]
    n = max(len(c) for c in curves.values())
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1

    def xy(i, y):
        return pad + (w - 2 * pad) * i / max(n - 1, 1), h - pad - (h - 2 * pad) * (y - lo) / (hi - lo)

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf", "#000000"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 20 * len(curves)}" '
             f'font-family="sans-serif" font-size="12">',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
             f'<rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" fill="none" stroke="#999"/>']
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        _, py = xy(0, y)
        parts.append(f'<text x="{pad - 5}" y="{py + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">iteration (1..{n})</text>')
    for j, (name, c) in enumerate(curves.items()):
        col = colors[j % len(colors)]
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(c)))
        dash = ' stroke-dasharray="5,3"' if j % 2 else ""
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="1.5"{dash}/>')
        ly = h + 20 * j + 5
        parts.append(f'<line x1="{pad}" y1="{ly}" x2="{pad + 30}" y2="{ly}" stroke="{col}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{pad + 36}" y="{ly + 4}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def _padding_table(cases: dict) -> list[str]:
    """Padding invariance in every layout, at iteration 1 (the same weights in every run).

    Per case: the padding the batches carried, the expert assignments routed per MoE layer divided
    by the real tokens (exactly top-k when padding is masked out of routing; more when it is routed),
    and the load-balancing loss with its relative deviation from the padding-free 1-GPU run of its
    kind (``thd`` for the plain cases; the bias cases have no padding-free run, so they are compared
    with ``bias``).
    """
    ok = {k: c for k, c in cases.items() if c["rc"] == 0 and c.get("metrics")}
    if not ok or "expert_tokens" not in next(iter(ok.values()))["metrics"][0]:
        return []
    out = ["", "Padding invariance in every layout (iteration 1, the same weights in every run):", "",
           "| case | padding tokens | real tokens | routed per layer / real tokens | LB loss | "
           "rel. dev. from |", "|---|---|---|---|---|---|"]
    for name, c in ok.items():
        m = c["metrics"][0]
        per_layer = sorted({sum(layer) / max(m["tokens"], 1) for layer in m["expert_tokens"]})
        routed = ", ".join(f"{x:g}" for x in per_layer)
        ref = "bias" if name == "bias" or c.get("ref") == "bias" else "thd"
        if name == ref or ref not in ok:
            dev = "-"
        else:
            dev = f"{_rel(m['load_balancing_loss'], ok[ref]['metrics'][0]['load_balancing_loss']):.1e} ({ref})"
        out.append(f"| {name} | {m['padding_tokens']} | {m['tokens']} | {routed} | "
                   f"{m['load_balancing_loss']:.5f} | {dev} |")
    return out


def _against_table(cases: dict, other: dict) -> list[str]:
    """Each case against the same case of another run (another backend, say): the largest relative
    deviation of lm_loss and of the LB loss over the iterations both ran, and whether every
    iteration's grad norm was finite in both."""
    out = ["", f"Against the same cases with flags `{' '.join(other['common'])}`:", "",
           "| case | max rel. dev. lm_loss | max rel. dev. LB loss | grad norms finite (this / other) |",
           "|---|---|---|---|"]
    for name, c in cases.items():
        o = other["cases"].get(name)
        if c["rc"] != 0 or not o or o["rc"] != 0:
            out.append(f"| {name} | {'FAILED' if c['rc'] else 'no run to compare'} | | |")
            continue
        m, om = c["metrics"], o["metrics"]
        fin = [all(math.isfinite(r.get("grad_norm", 0.0)) for r in x) for x in (m, om)]
        out.append(f"| {name} | {max(_rel(a['lm_loss'], b['lm_loss']) for a, b in zip(m, om)):.2e} | "
                   f"{max(_rel(a['load_balancing_loss'], b['load_balancing_loss']) for a, b in zip(m, om)):.2e} | "
                   f"{fin[0]} / {fin[1]} |")
    return out


def report(args) -> int:
    res = json.loads(Path(args.results).read_text())
    cases = res["cases"]
    lines = [f"Run on {res.get('gpus')} x {res.get('device')}, torch {res.get('torch')}, megatron-core "
             f"{res.get('megatron_core')}; {res['iters']} iterations of `tiny`, bf16, flags "
             f"`{' '.join(res['common'])}` plus the case's own.", "",
             "| case | GPUs | what | max rel. dev. lm_loss | max rel. dev. LB loss | final lm_loss | final LB loss | s |",
             "|---|---|---|---|---|---|---|---|"]
    curves = {}
    for name, c in cases.items():
        if c["rc"] != 0:
            lines.append(f"| {name} | {c['gpus']} | {c['what']} | FAILED (rc {c['rc']}) | | | | {c['seconds']} |")
            continue
        m = c["metrics"]
        curves[name] = [r["lm_loss"] for r in m]
        dev_lm = dev_lb = "(reference)"
        ref = c.get("ref")
        if ref and ref in cases and cases[ref]["rc"] == 0:
            rm = cases[ref]["metrics"]
            dev_lm = f"{max(_rel(a['lm_loss'], b['lm_loss']) for a, b in zip(m, rm)):.2e}"
            dev_lb = f"{max(_rel(a['load_balancing_loss'], b['load_balancing_loss']) for a, b in zip(m, rm)):.2e}"
        elif ref:
            dev_lm = dev_lb = f"(no {ref} run)"
        lines.append(f"| {name} | {c['gpus']} | {c['what']} | {dev_lm} | {dev_lb} | {m[-1]['lm_loss']:.4f} | "
                     f"{m[-1]['load_balancing_loss']:.4f} | {c['seconds']} |")
    for name, why in res.get("not_run", {}).items():
        lines.append(f"| {name} | {CASES[name][0]} | {CASES[name][3]} | not run: {why} | | | | |")
    # padding check
    if all(k in cases and cases[k]["rc"] == 0 for k in ("bshd", "thd", "bshd_no_mask")):
        b, t, n = (cases[k]["metrics"] for k in ("bshd", "thd", "bshd_no_mask"))
        lines += ["", "Padding check (iteration 1, the same weights in every run):", "",
                  "| run | padding share | load_balancing_loss |", "|---|---|---|"]
        for name, m in (("BSHD, mask on", b), ("THD", t), ("BSHD, mask off", n)):
            r0 = m[0]
            lines.append(f"| {name} | {r0['padding_tokens'] / max(r0['tokens'] + r0['padding_tokens'], 1):.1%} | "
                         f"{r0['load_balancing_loss']:.5f} |")
    lines += _padding_table(cases)
    if args.against:
        lines += _against_table(cases, json.loads(Path(args.against).read_text()))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.doc:
        Path(args.doc).write_text(text)
    if args.svg and curves:
        _svg(curves, Path(args.svg), "lm_loss per iteration (bf16)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--iters", type=int, default=30)
    r.add_argument("--cases", default=None, help="comma-separated subset of: " + ",".join(CASES))
    r.add_argument("--fp32", action="store_true", help="CPU smoke test of this script: no bf16, no dist. optimizer")
    r.add_argument("--fake-gpus", type=int, default=1, help="with --fp32: processes to allow per case")
    r.add_argument("--transformer-impl", default=None, choices=("local", "transformer_engine"),
                   help="passed to every case (default: the trainer's auto)")
    r.add_argument("--name", default="gpu_validation.json", help="result file name under --out")
    q = sub.add_parser("report")
    q.add_argument("results")
    q.add_argument("--doc", default=None, help="write the markdown tables here")
    q.add_argument("--svg", default=None, help="write the loss-curve plot here")
    q.add_argument("--against", default=None,
                   help="another run's results (e.g. --transformer-impl local): each case is also compared "
                        "with the same case there, iteration by iteration")
    a = p.parse_args(argv)
    return run(a) if a.cmd == "run" else report(a)


if __name__ == "__main__":
    sys.exit(main())
