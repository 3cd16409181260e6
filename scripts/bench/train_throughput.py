#!/usr/bin/env python
"""Training throughput and MFU on ONE device: our megatron-core trainer (BSHD and THD) next to HF
transformers' ``Qwen3_5MoeForConditionalGeneration`` on the very same samples.

What runs, in one process (world size 1), one model at a time:

1. Data: ``samples-per-step x (warmup + steps)`` samples from the mock provider (random words and
   random-pixel images through the real tokenizer and image preprocessing), lengths uniform in
   [--min-tokens, --max-tokens], a share --image-prob of them with one or two images whose sides
   are [--image-side] x (patch x merge) pixels (proxy: 7..14 -> 224..448 px -> 49..196 image
   tokens). Prompt/answer splits are random; only answer tokens carry loss. When --seq-length is
   below --max-tokens the mix is scaled down to fit (lengths linearly, image sides by the square
   root) and the script says so. Every configuration times the same batches.
2. Ours: ``multimodal_dev.training.initialize`` + ``build_model_and_optimizer`` (DDP wrapper,
   megatron optimizer with fp32 master weights, bf16 model on GPU / fp32 on CPU), then per step
   exactly what ``training.train`` does: ``zero_grad_buffer``, ``zero_grad``,
   ``get_forward_backward_func()`` with ``forward_step`` over one micro-batch of N samples,
   ``optimizer.step()`` (grad clipping inside), ``scheduler.step``. BSHD pads every sample to a row
   of --seq-length; THD packs the N samples into one row. Batches are collated and moved to the
   device before the clock starts (collation is timed apart and reported).
3. HF: the same architecture from the variant (``hf_config_for_variant``: the mapping the
   project's HF-parity tests use), random weights, bf16 params on GPU (``--hf-amp``: fp32 params
   + bf16 autocast, as HF Trainer's --bf16 does; the configs ``hf-amp-*`` build that second model
   beside the first, from the same seed), ``attn_implementation`` = flash_attention_2 when
   importable else sdpa (--hf-attn), HF's default experts implementation (grouped_mm when torch
   has it), torch AdamW (fused on GPU), clip_grad_norm 1.0, router aux loss on. Inputs: the padded
   BSHD batch with ``attention_mask`` ("hf-bshd"), and the packed row without a mask but with
   per-sample restarting text position ids ("hf-packed": HF then builds a block-causal mask for
   sdpa, or takes its varlen path with flash_attention_2). Loss: token cross-entropy in fp32 on
   the same label positions (our labels are already next-token targets, so no shift).
4. Timing: --warmup steps, then --steps steps, each between ``torch.cuda.synchronize()`` calls.
   Tokens/s counts real (non-padding) tokens. Peak memory is ``torch.cuda.max_memory_allocated``,
   reset before each configuration (our BSHD and THD share one model, so both include its
   weights, grads and optimizer state).

FLOPs (``multimodal_dev.models.qwen35_vl.flops.model_flops_per_step``, see its docstring): useful matmul FLOPs
of the real tokens and image patches, ``2*m*n*k`` forward and x3 for forward+backward:
attention projections (q_proj with the output gate = 2 x heads x head_dim wide, k, v, o), causal
attention scores+values over the n(n+1)/2 allowed pairs per sample, router, top-k active routed
experts, shared expert (+ its gate), LM head at every real token, vision tower per patch (ViT
blocks with per-frame attention, merger). Padding is not counted, so BSHD's padding shows as
lower MFU. MFU = model FLOPs / step time / peak; the peak is the H100 SXM bf16 dense spec,
989 TFLOP/s, on H100/H200 (override with --peak-tflops; the achieved bf16 GEMM rate is measured
and printed next to it, ~800 TFLOP/s on an H100, docs/performance.md).

Examples::

    # CPU smoke test (tiny variant, fp32)
    python scripts/bench/train_throughput.py --variant tiny --steps 2 --warmup 1 --seq-length 256 --samples-per-step 4
    # one H100: proxy (1.5 B total / 0.4 B active), bf16
    python scripts/bench/train_throughput.py --variant proxy --seq-length 4096 --samples-per-step 4 \\
        --json runs/bench/proxy_h100.json --profile runs/bench/prof
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
try:  # a plain checkout without `pip install -e .`: the README's PYTHONPATH, done here
    import multimodal_dev  # noqa: F401
except ImportError:
    sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

# Both frameworks see the same allocator settings. Expandable segments keep the variable-length
# steps from fragmenting the cache (without them, the first steps after a large allocation or an
# OOM took seconds); set PYTORCH_CUDA_ALLOC_CONF yourself to measure something else.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from multimodal_dev.models.qwen35_vl.flops import model_flops_per_step, sample_lengths  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM spec sheet, bf16 dense (no sparsity)
ALL_CONFIGS = ("ours-bshd", "ours-thd", "ours-te-bshd", "ours-te-thd", "ours-ab-bshd", "ours-ab-thd", "hf-bshd",
               "hf-packed", "hf-amp-bshd", "hf-amp-packed")
# ours-te-*: our trainer with --transformer-impl transformer_engine (appended to --megatron-args), a
# second model built after the ours-* one, so one run compares the local backend, TE and HF (asked
# for by name: TE is optional, so they are not in the default set). ours-ab-*: the same with
# --ab-megatron-args appended instead: an A/B of one trainer flag side by side in one run.
# hf-amp-*: a second HF model with fp32 params + bf16 autocast (as --hf-amp), beside the bf16-param
# hf-* one: HF at our precision (fp32 master weights and Adam moments) and at its own, in one run.
DEFAULT_CONFIGS = ("ours-bshd", "ours-thd", "hf-bshd", "hf-packed")


# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="proxy", help="qwen35_vl variant (proxy; tiny for a CPU smoke test)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--passes", type=int, default=1,
                   help="run the timed steps this many times and report the last pass: from the second "
                        "pass on every shape has been seen (steady state: no cuBLAS/cuDNN first-use costs "
                        "for new token counts); the earlier passes' step times are kept in the JSON")
    p.add_argument("--seq-length", type=int, default=4096, help="BSHD row length; also the longest sample")
    p.add_argument("--samples-per-step", type=int, default=4,
                   help="samples per step (one micro-batch): BSHD rows, or samples packed in THD's one row")
    p.add_argument("--min-tokens", type=int, default=200, help="shortest sample (before scaling, see above)")
    p.add_argument("--max-tokens", type=int, default=4000, help="longest sample (before scaling)")
    p.add_argument("--image-prob", type=float, default=0.5, help="share of samples with 1-2 images")
    p.add_argument("--image-side", type=int, nargs=2, default=(7, 14), metavar=("MIN", "MAX"),
                   help="image sides in units of patch*merge pixels (proxy: 7 14 -> 224..448 px)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma-separated subset of {','.join(ALL_CONFIGS)}")
    p.add_argument("--skip-hf", action="store_true", help="only our trainer")
    p.add_argument("--cuda-graph-layers", action="store_true",
                   help="ours-thd: replay the decoder layers from CUDA graphs (the trainer's --cuda-graph-layers); "
                        "our THD rows are then padded to --thd-row-multiple (HF's packed rows are not)")
    p.add_argument("--thd-row-multiple", type=int, default=None,
                   help="ours-thd: pad each packed row up to a multiple of this many tokens "
                        "(default 1024 with --cuda-graph-layers, else 1)")
    p.add_argument("--thd-sample-multiple", type=int, default=None,
                   help="ours-thd: pad each packed sample to a multiple of this many tokens (the trainer's flag; "
                        "default 64 with --cuda-graph-layers, else 1)")
    p.add_argument("--hf-attn", default="auto",
                   help="HF attn_implementation: auto (flash_attention_2 if importable, else sdpa), sdpa, "
                        "flash_attention_2, eager, flex_attention")
    p.add_argument("--hf-amp", action="store_true",
                   help="HF with fp32 params + bf16 autocast (HF Trainer --bf16) instead of bf16 params")
    p.add_argument("--fp32", action="store_true", help="on GPU: fp32 instead of bf16 (both frameworks)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--megatron-args", default="",
                   help="extra trainer flags for multimodal_dev.arguments, e.g. "
                        "'--transformer-impl local --moe-token-dispatcher-type alltoall'")
    p.add_argument("--ab-megatron-args", default="",
                   help="trainer flags the ours-ab-* configs add to --megatron-args (an A/B against ours-*), "
                        "e.g. '--chunked-lm-loss'")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"MFU denominator per device (default: {H100_BF16_DENSE_TFLOPS:g} on H100/H200, "
                        "the H100 SXM bf16 dense spec; none on CPU)")
    p.add_argument("--no-gemm-check", action="store_true", help="skip measuring the bf16 GEMM rate")
    p.add_argument("--json", default=None, help="write all numbers and the environment here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="after timing, profile --profile-steps more steps of each configuration: Chrome "
                        "trace DIR/<config>.json and the top-15 ops by device time")
    p.add_argument("--profile-steps", type=int, default=3)
    return p


# ------------------------------------------------------------------------------------------------
# helpers
def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _free_memory() -> None:
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


def _gib(n: float) -> float:
    return n / 2**30


def _mem_now() -> Optional[float]:
    return _gib(torch.cuda.memory_allocated()) if _cuda() else None


def _to_device(batch: dict, dev: torch.device) -> dict:
    return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def _git_tree(root: Path = ROOT) -> Optional[str]:
    """The git tree hash of the files the bench ran from: what ``git add -A`` would commit (ignored
    files left out), staged into a throw-away index so the checkout's own index is not touched.

    ``git_commit`` alone can name the wrong code: a copy of a working tree (the GPU machine's) may
    carry newer files over an older ``.git``. The tree hash names the files themselves: the commit
    they are is the one with ``git log --format='%H %T' | grep TREE``."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, GIT_INDEX_FILE=os.path.join(d, "index"))
            run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=60, env=env)
            if run(["git", "read-tree", "HEAD"]).returncode or run(["git", "add", "-A"]).returncode:
                return None
            return run(["git", "write-tree"]).stdout.strip() or None
    except Exception:  # noqa: BLE001 - provenance, not the measurement
        return None


def _peak_tflops(args) -> tuple[Optional[float], str]:
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if not _cuda():
        return None, "none on CPU (give --peak-tflops for an MFU)"
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        return H100_BF16_DENSE_TFLOPS, "H100 SXM bf16 dense spec"
    return None, f"unknown for {name!r} (give --peak-tflops)"


def measure_gemm_tflops(dtype=torch.bfloat16, n: int = 8192, iters: int = 20) -> Optional[float]:
    """The achieved dense GEMM rate of this GPU (n^3, bf16): what 'peak' can mean in practice."""
    if not _cuda():
        return None
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync()
    dt = (time.perf_counter() - t0) / iters
    del a, b
    _free_memory()
    return 2 * n**3 / dt / 1e12


# ------------------------------------------------------------------------------------------------
# data
def make_samples(variant_cfg: dict, args) -> tuple[list[dict], Any, dict]:
    """The samples of every step (same for every configuration), the provider, and the mix."""
    from multimodal_dev.data.providers import DataConfig, build_provider

    vis = variant_cfg["vision"]
    factor = vis["patch_size"] * vis["spatial_merge_size"]
    lo, hi = args.min_tokens, args.max_tokens
    side_lo, side_hi = args.image_side
    notes = []
    if hi > args.seq_length:
        scale = args.seq_length / hi
        lo, hi = max(8, int(lo * scale)), args.seq_length
        side_lo, side_hi = max(1, round(side_lo * math.sqrt(scale))), max(1, round(side_hi * math.sqrt(scale)))
        notes.append(f"--seq-length {args.seq_length} < --max-tokens {args.max_tokens}: mix scaled to {lo}..{hi} "
                     f"tokens, image sides {side_lo}..{side_hi} x {factor} px")
    lo = min(lo, hi)
    from multimodal_dev.models.qwen35_vl.configuration import configs_for_variant, data_spec

    cfg = DataConfig.from_data_spec(
        data_spec(*configs_for_variant(args.variant)), seed=args.seed, mock_min_tokens=lo, mock_max_tokens=hi, mock_image_prob=args.image_prob,
        mock_min_image_size=side_lo * factor, mock_max_image_size=max(side_lo, side_hi) * factor,
    )
    provider = build_provider(cfg)
    n = args.samples_per_step * (args.warmup + args.steps)
    it = provider.samples(0, 1, max_tokens=args.seq_length)
    t0 = time.perf_counter()
    samples = [next(it) for _ in range(n)]
    mix = dict(min_tokens=lo, max_tokens=hi, image_prob=args.image_prob,
               image_px=[side_lo * factor, max(side_lo, side_hi) * factor], notes=notes,
               generation_s=time.perf_counter() - t0)
    return samples, provider, mix


def collate_steps(samples: list[dict], provider, args, layout: str, row_multiple: int = 1,
                  sample_multiple: int = 1) -> tuple[list[dict], float]:
    """One collated batch per step; and the mean collate time per step (seconds)."""
    from multimodal_dev.data.collate import pack_or_pad_batch

    cc = provider.collate_config(layout=layout, target_seqlen=args.seq_length,
                                 divisible_by=math.lcm(args.seq_multiple, sample_multiple), row_multiple=row_multiple)
    N = args.samples_per_step
    out, t = [], 0.0
    for i in range(len(samples) // N):
        t0 = time.perf_counter()
        out.append(pack_or_pad_batch(samples[i * N:(i + 1) * N], cc))
        t += time.perf_counter() - t0
    return out, t / max(len(out), 1)


def data_summary(samples: list[dict], bshd: list[dict], thd: list[dict], image_token_id: int) -> dict:
    lens = [int(torch.as_tensor(s["tokens"]).numel()) for s in samples]
    n_img_samples = sum(1 for s in samples if s.get("image_grid_thw") is not None and len(s["image_grid_thw"]))
    n_images = sum(len(s["image_grid_thw"]) for s in samples if s.get("image_grid_thw") is not None)
    img_tok = sum(int((torch.as_tensor(s["tokens"]) == image_token_id).sum()) for s in samples)
    loss_tok = sum(int((torch.as_tensor(s["labels"]) != -100).sum()) for s in samples)

    def pad_share(batches):
        real = sum(b["stats"]["tokens"] for b in batches)
        pad = sum(b["stats"]["padding_tokens"] for b in batches)
        return pad / max(real + pad, 1)

    return dict(
        samples=len(samples), tokens_min=min(lens), tokens_mean=statistics.mean(lens), tokens_max=max(lens),
        samples_with_images=n_img_samples, images=n_images, image_token_share=img_tok / sum(lens),
        loss_token_share=loss_tok / sum(lens), padding_share_bshd=pad_share(bshd), padding_share_thd=pad_share(thd),
        thd_row_tokens_mean=statistics.mean(int(b["tokens"].shape[1]) for b in thd),
    )


# ------------------------------------------------------------------------------------------------
# measurement
def measure(name: str, step: Callable[[dict], Any], batches: list[dict], args, flops: list[int],
            tokens: list[int], padding_share: float, peak: Optional[float], extra: dict,
            after_step: Optional[Callable[[], None]] = None, loss_of: Callable[[Any], float] = float) -> dict:
    """Warm up, time --steps steps (batches[warmup:]), optionally profile; a result dict."""
    rec: dict[str, Any] = dict(config=name, status="ok", **extra)
    print(f"\n[{name}] warmup {args.warmup} + {args.steps} timed steps ...", flush=True)
    if _cuda():
        _free_memory()
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(args.warmup):  # timed too: first-use compilations (fla's Triton kernels) show here
            t0 = time.perf_counter()
            step(batches[i])
            if after_step:
                after_step()
            _sync()
            rec.setdefault("warmup_s", []).append(round(time.perf_counter() - t0, 3))
            print(f"  warm-up {i + 1}/{args.warmup}: {rec['warmup_s'][-1]:9.2f} s", flush=True)
        earlier = []
        for pass_no in range(1, args.passes + 1):
            if pass_no > 1:
                earlier.append([t * 1e3 for t in times])
            times, losses = [], []
            for i in range(args.warmup, args.warmup + args.steps):
                _sync()
                t0 = time.perf_counter()
                out = step(batches[i])
                _sync()
                times.append(time.perf_counter() - t0)
                losses.append(loss_of(out))
                if after_step:
                    after_step()
                tag = f" (pass {pass_no}/{args.passes})" if args.passes > 1 else ""
                print(f"  step {i - args.warmup + 1}/{args.steps}{tag}: {times[-1] * 1e3:9.1f} ms  "
                      f"loss {losses[-1]:.4f}", flush=True)
    except Exception as e:  # noqa: BLE001 - one configuration failing must not lose the others
        rec["status"] = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}"
        print(f"  [{name}] FAILED: {rec['status']}", flush=True)
        if not _is_oom(e):
            traceback.print_exc()
        if _cuda():
            rec["peak_mem_gib"] = _gib(torch.cuda.max_memory_allocated())
        _free_memory()
        return rec
    tot = sum(times)
    tf = flops[args.warmup:args.warmup + args.steps]
    tk = tokens[args.warmup:args.warmup + args.steps]
    rec.update(
        step_ms_median=statistics.median(times) * 1e3, step_ms_mean=tot / len(times) * 1e3,
        step_ms=[t * 1e3 for t in times], real_tokens_per_step=sum(tk) / len(tk),
        tokens_per_s=sum(tk) / tot, model_tflop_per_step=sum(tf) / len(tf) / 1e12,
        # robust to a few slow outlier steps (e.g. kernel autotuning on new shapes): per-step rate
        tokens_per_s_median=statistics.median(k / t for k, t in zip(tk, times)),
        tflops_per_s=sum(tf) / tot / 1e12, padding_share=padding_share, losses=losses,
    )
    if earlier:  # the reported numbers are the last pass's
        rec["step_ms_earlier_passes"] = earlier
        rec["tokens_per_s_first_pass"] = sum(tk) / (sum(earlier[0]) / 1e3)
    rec["mfu"] = rec["tflops_per_s"] / peak if peak else None
    if _cuda():
        rec["peak_mem_gib"] = _gib(torch.cuda.max_memory_allocated())
        rec["peak_reserved_gib"] = _gib(torch.cuda.max_memory_reserved())
    if args.profile:
        try:
            rec["profile"] = profile(name, step, batches[:args.profile_steps], args.profile, after_step)
        except Exception as e:  # noqa: BLE001
            print(f"  [{name}] profiling failed: {type(e).__name__}: {e}", flush=True)
    return rec


def profile(name: str, step, batches, out_dir: str, after_step=None) -> str:
    from torch.profiler import ProfilerActivity, profile as tprofile

    os.makedirs(out_dir, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if _cuda() else [])
    with tprofile(activities=acts) as prof:
        for b in batches:
            step(b)
            if after_step:
                after_step()
        _sync()
    path = os.path.join(out_dir, f"{name}.json")
    prof.export_chrome_trace(path)
    ka = prof.key_averages()
    keys = (("self_cuda_time_total", "self_device_time_total") if _cuda() else ()) + ("self_cpu_time_total",)
    printed_device = False
    for key in keys:
        if printed_device and key != "self_cpu_time_total":
            continue
        try:
            table = ka.table(sort_by=key, row_limit=25)
        except Exception:  # noqa: BLE001 - the key's name changed across torch versions
            continue
        printed_device = printed_device or key != "self_cpu_time_total"
        print(f"  [{name}] top-25 ops by {key} over {len(batches)} profiled steps (trace: {path}):\n{table}",
              flush=True)
    # host syncs: each one stalls the CPU until the GPU has caught up
    syncs = {e.key: e.count for e in ka if any(s in e.key for s in ("Synchronize", "aten::item", "aten::_local_scalar_dense",
                                                                   "Memcpy DtoH", "cudaMemcpy"))}
    if syncs:
        print(f"  [{name}] sync-like ops (count over {len(batches)} steps): {syncs}", flush=True)
    return path


# ------------------------------------------------------------------------------------------------
# ours
def megatron_args(args, layout: str, extra: tuple = ()):
    from multimodal_dev.arguments import parse_args

    argv = ["--variant", args.variant, "--micro-batch-size", str(args.samples_per_step),
            "--seq-length", str(args.seq_length), "--train-iters", "1000000", "--lr", str(args.lr),
            "--lr-decay-style", "constant", "--seed", str(args.seed), "--no-progress-bar"]
    if _cuda() and not args.fp32:
        argv.append("--bf16")
    if layout == "thd":
        argv.append("--use-packed-sequence")
    argv += shlex.split(args.megatron_args) + list(extra)
    return parse_args(argv, world_size=1)


def resolve_thd_padding(args) -> None:
    """``--thd-row-multiple`` / ``--thd-sample-multiple`` as the trainer resolves and checks them
    (its defaults with ``--cuda-graph-layers``, the multiples the layout needs): the trainer's own
    parser reads them for a THD run, so the bench pads ours-thd's rows as the trainer would."""
    from multimodal_dev.arguments import ArgumentError

    extra = ["--cuda-graph-layers"] if args.cuda_graph_layers else []
    for flag, v in (("--thd-row-multiple", args.thd_row_multiple), ("--thd-sample-multiple", args.thd_sample_multiple)):
        if v is not None:
            extra += [flag, str(v)]
    try:
        data = megatron_args(args, "thd", tuple(extra)).data
    except ArgumentError as e:
        raise SystemExit(f"ours-thd: {e}") from None
    args.thd_row_multiple, args.thd_sample_multiple = data.row_multiple, data.sample_multiple


def _run_margs(args, margs):
    """``margs`` with the bench's own model and data options: one model serves both layouts, the
    CUDA graphs only ever take its THD calls, THD rows padded to ``--thd-row-multiple``."""
    return dataclasses.replace(margs, model=dataclasses.replace(margs.model, cuda_graph_layers=args.cuda_graph_layers),
                               data=dataclasses.replace(margs.data, row_multiple=args.thd_row_multiple,
                                                        sample_multiple=args.thd_sample_multiple))


def one_microbatch(fb, ddp, margs, batch: dict, layout: str, forward_only: bool = False):
    """``batch`` (one micro-batch of the step's samples) through megatron's schedule with our
    ``forward_step``, as ``training.train`` runs it; returns the loss dicts. Every bench and
    profiling script runs our steps through this."""
    from multimodal_dev.forward_step import forward_step

    return fb(forward_step_func=functools.partial(forward_step, use_padding_mask=True), data_iterator=iter([batch]),
              model=[ddp], num_microbatches=1, seq_length=margs.data.seq_length,
              micro_batch_size=1 if layout == "thd" else margs.data.micro_batch_size, decoder_seq_length=None,
              forward_only=forward_only)


def build_ours(args, layout: str, row_multiple: int = 1, sample_multiple: int = 1):
    """For the scripts that study our trainer alone (profiling, op census, graph check): the megatron
    arguments of ``args`` (initialised), the steps' batches of ``layout`` on the device, and
    ``training.build_model_and_optimizer``'s ``(ddp, model, optimizer, scheduler, layer_graphs)``.
    With the bench's ``--cuda-graph-layers`` the step is ours-thd's as ``main`` times it: the layers
    graphed, the rows and samples padded as the trainer resolves its flags (the multiples given
    here are then ignored)."""
    from multimodal_dev import training
    from multimodal_dev.models.qwen35_vl.variants import get_variant

    margs = megatron_args(args, layout)
    if getattr(args, "cuda_graph_layers", False):
        if layout != "thd":
            raise SystemExit("--cuda-graph-layers graphs the THD step only")
        resolve_thd_padding(args)
        margs = _run_margs(args, margs)
        row_multiple, sample_multiple = args.thd_row_multiple, args.thd_sample_multiple
    args.seq_multiple = margs.layout.seq_multiple
    training.initialize(margs)
    samples, provider, _ = make_samples(get_variant(args.variant), args)
    batches, _ = collate_steps(samples, provider, args, layout, row_multiple, sample_multiple)
    dev = torch.device("cuda", torch.cuda.current_device()) if _cuda() else torch.device("cpu")
    return margs, [_to_device(b, dev) for b in batches], training.build_model_and_optimizer(margs)


def run_ours(args, margs, batches: dict[str, list[dict]], flops, tokens, pads, peak, wanted,
             prefix: str = "ours") -> list[dict]:
    """Build our model from ``margs`` and time the configs ``{prefix}-bshd`` / ``{prefix}-thd`` of
    ``wanted`` on it."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from multimodal_dev import metrics, training

    training.seed_everything(margs.seed)  # every model of a run alike: ours-te-*, ours-ab-* start as ours-*
    t0 = time.perf_counter()
    ddp, model, optimizer, scheduler, graphs = training.build_model_and_optimizer(margs)
    n_params = sum(p.numel() for p in model.parameters())
    impl = model.config.transformer_impl
    print(f"ours: built {margs.model.arch}/{margs.model.variant} ({_count(n_params)} parameters, "
          f"{'bf16' if margs.bf16 else 'fp32'}, transformer impl {impl}) in {time.perf_counter() - t0:.1f} s; "
          f"memory allocated {_mem_now() or 0:.2f} GiB", flush=True)
    fb = get_forward_backward_func()
    config = model.config
    attn = {"bshd": f"{impl}: SDPA causal", "thd": f"{impl}: mask-based THD"}
    if impl == "transformer_engine":
        from megatron.mcore_ext.te_attention import TE_THD_MAX_HEAD_DIM

        attn = {"bshd": "TE fused attention", "thd": "TE fused attention (THD)"}
        if config.kv_channels > TE_THD_MAX_HEAD_DIM:  # mcore_ext.te_attention routes these rows to ours
            attn["thd"] = f"TE spec, THD head_dim {config.kv_channels}: ours (torch varlen flash)"
    elif _cuda():
        from megatron.mcore_ext.attention import varlen_available

        if varlen_available():
            attn["thd"] = f"{impl}: torch varlen flash"

    def loss_of(losses):
        s = sum(d["lm loss"].double() for d in losses)
        return float(s[0] / s[1].clamp(min=1))

    data_key = {"bshd": "bshd", "thd": "thd_rows" if "thd_rows" in batches else "thd"}
    # the two layouts compute the same thing: one forward-only pass on the first batch of each
    check = {"bshd": None, "thd": None}
    check_failed = False
    if {f"{prefix}-bshd", f"{prefix}-thd"} <= set(wanted):  # it compares the two (BSHD needs the most memory)
        try:
            for layout in ("bshd", "thd"):
                with torch.no_grad():  # forward only (and no CUDA graph capture for it)
                    losses = one_microbatch(fb, ddp, margs, batches[data_key[layout]][0], layout, forward_only=True)
                check[layout] = loss_of(losses)
            metrics.moe_losses(config, 1)
            print(f"ours: forward-only loss on the first step's samples: BSHD {check['bshd']:.5f}, THD {check['thd']:.5f} "
                  f"(|diff| {abs(check['bshd'] - check['thd']):.2e}; equal up to rounding)", flush=True)
        except Exception as e:  # noqa: BLE001 - a check, not the measurement
            print(f"ours: forward-only layout check failed: {type(e).__name__}: {e}", flush=True)
            check_failed = True
    if check_failed:  # outside the except block: its traceback holds the failed step's tensors
        _free_memory()
    results = []
    for layout in ("bshd", "thd"):
        name = f"{prefix}-{layout}"
        if name not in wanted:
            continue

        def step(batch, layout=layout):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            losses = one_microbatch(fb, ddp, margs, batch, layout)
            ok, _, _ = optimizer.step()
            if ok:
                scheduler.step(increment=1)
            return losses

        def clear_moe_metrics():  # what train() does per iteration (the tracker accumulates otherwise)
            metrics.moe_losses(config, 1)

        results.append(measure(name, step, batches[data_key[layout]], args, flops, tokens, pads[data_key[layout]], peak,
                               dict(framework="ours", layout=layout, attn=attn[layout], params_b=n_params / 1e9,
                                    forward_only_loss_first_batch=check[layout],
                                    row_multiple=args.thd_row_multiple if layout == "thd" else None,
                                    cuda_graph_layers=bool(graphs) and layout == "thd"),
                               after_step=clear_moe_metrics, loss_of=loss_of))
        if graphs is not None and layout == "thd":
            st = graphs.stats
            results[-1]["layer_graphs"] = dict(captures=st["captures"], capture_s=round(st["capture_s"], 2),
                                               replays=st["replays"], eager=dict(st["eager"]))
            print(f"{name} cuda graphs: {st['captures']} captured in {st['capture_s']:.1f} s, {st['replays']} "
                  f"replays, eager calls {dict(st['eager'])}", flush=True)
    # free everything before the next model (config holds bound methods of ddp and optimizer)
    config.no_sync_func = config.finalize_model_grads_func = config.grad_scale_func = None
    del ddp, model, optimizer, scheduler, fb, config, graphs
    _free_memory()
    if _cuda():
        print(f"ours: freed; memory allocated now {_mem_now():.2f} GiB", flush=True)
    return results


# ------------------------------------------------------------------------------------------------
# HF
def hf_config_for_variant(variant_cfg: dict):
    """HF ``Qwen3_5MoeConfig`` from a qwen35_vl variant dict (as tests/unit/test_qwen35_model.py and
    test_qwen35_params_and_parallel.py map it: the rope fields go into ``rope_parameters``)."""
    from transformers import Qwen3_5MoeConfig

    text = dict(variant_cfg["text"])
    rope = dict(rope_type="default", mrope_interleaved=True, rope_theta=text.pop("rope_theta"),
                partial_rotary_factor=text.pop("partial_rotary_factor"), mrope_section=text.pop("mrope_section"))
    return Qwen3_5MoeConfig(
        text_config=dict(text, rope_parameters=rope), vision_config=dict(variant_cfg["vision"]),
        tie_word_embeddings=False,
        **{k: variant_cfg[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                       "vision_end_token_id")},
    )


def hf_attn_implementation(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        from transformers.utils import is_flash_attn_2_available

        if _cuda() and is_flash_attn_2_available():
            return "flash_attention_2"
    except Exception:  # noqa: BLE001
        pass
    return "sdpa"


def hf_inputs(batch: dict, packed: bool, dtype: torch.dtype) -> dict:
    """HF forward kwargs from our collated batch (already on the device) + the labels.

    position_ids are [4, b, s]: HF's text row (the token index in its sample; restarting per packed
    sample is what makes HF detect packing) and our three MRoPE rows (HF's get_rope_index gives the
    same ids; passing them skips its per-sample Python loop, as a data collator would)."""
    tokens, pos = batch["tokens"], batch["position_ids"]
    b, s = tokens.shape
    idx = torch.arange(s, device=tokens.device)
    if packed:
        cu = batch["cu_seqlens_padded"].to(tokens.device).long()
        starts = cu[torch.bucketize(idx, cu[1:], right=True)]
        text_pos = (idx - starts).view(1, s)
        attention_mask = None
    else:
        text_pos = idx.view(1, s).expand(b, s)
        attention_mask = (~batch["padding_mask"]).long()
    kw = dict(input_ids=tokens, attention_mask=attention_mask, position_ids=torch.cat([text_pos[None], pos], 0),
              use_cache=False, output_router_logits=True)
    if batch.get("pixel_values") is not None:
        kw.update(pixel_values=batch["pixel_values"].to(dtype), image_grid_thw=batch["image_grid_thw"])
    return kw


def run_hf(args, variant_cfg, batches, flops, tokens, pads, peak, wanted, prefix="hf") -> tuple[list[dict], dict]:
    import torch.nn.functional as F
    import transformers
    from transformers import Qwen3_5MoeForConditionalGeneration

    dev = torch.device("cuda", torch.cuda.current_device()) if _cuda() else torch.device("cpu")
    bf16 = _cuda() and not args.fp32
    amp = bf16 and (args.hf_amp or prefix == "hf-amp")
    param_dtype = torch.bfloat16 if bf16 and not amp else torch.float32
    attn = hf_attn_implementation(args.hf_attn)
    cfg = hf_config_for_variant(variant_cfg)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # hf-* and hf-amp-* start from the same random weights
    with torch.device(dev):
        model = Qwen3_5MoeForConditionalGeneration._from_config(cfg, attn_implementation=attn, dtype=param_dtype)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    experts_impl = getattr(model.config.text_config, "_experts_implementation", None)
    info = dict(transformers=transformers.__version__, attn_implementation=model.config._attn_implementation,
                experts_implementation=experts_impl, param_dtype=str(param_dtype).replace("torch.", ""),
                autocast_bf16=amp, params_b=n_params / 1e9)
    print(f"hf: built Qwen3_5MoeForConditionalGeneration ({_count(n_params)} parameters, params "
          f"{info['param_dtype']}{' + bf16 autocast' if amp else ''}, attn {info['attn_implementation']}, "
          f"experts {experts_impl}) in {time.perf_counter() - t0:.1f} s; memory allocated {_mem_now() or 0:.2f} GiB",
          flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01, fused=_cuda())
    V = cfg.text_config.vocab_size
    coef = cfg.text_config.router_aux_loss_coef
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    def ce_of(kw, labels):
        out = model(**kw)
        lab = labels.reshape(-1)
        n = (lab != -100).sum().clamp(min=1)
        ce = F.cross_entropy(out.logits.float().reshape(-1, V), lab, ignore_index=-100, reduction="sum") / n
        return ce, out.aux_loss

    # does HF's packed input compute what the padded one does? (it does only if HF isolates the samples)
    in_dtype = param_dtype if not amp else torch.float32
    try:
        with torch.no_grad(), autocast():
            pad_ce = float(ce_of(hf_inputs(batches["bshd"][0], False, in_dtype), batches["bshd"][0]["labels"])[0])
            pack_ce = float(ce_of(hf_inputs(batches["thd"][0], True, in_dtype), batches["thd"][0]["labels"])[0])
        same = abs(pad_ce - pack_ce) < 2e-2
        info["forward_loss_first_batch"] = dict(padded=pad_ce, packed=pack_ce, packed_equivalent=same)
        print(f"hf: forward-only loss on the first step's samples: padded {pad_ce:.5f}, packed {pack_ce:.5f} "
              f"(|diff| {abs(pad_ce - pack_ce):.2e}: "
              f"{'the packed path isolates the samples' if same else 'MISMATCH: HF packed input is not equivalent'})",
              flush=True)
    except Exception as e:  # noqa: BLE001 - a check, not the measurement
        print(f"hf: forward-only packed/padded check failed: {type(e).__name__}: {e}", flush=True)
    _free_memory()
    results = []
    # packed first: HF's better configuration should not run in a cache left behind by the padded
    # one (which may OOM at 4096 x 4 for proxy)
    for name, layout, packed in ((f"{prefix}-packed", "thd", True), (f"{prefix}-bshd", "bshd", False)):
        if name not in wanted:
            continue
        inputs = [(hf_inputs(b, packed, in_dtype), b["labels"]) for b in batches[layout]]
        index = {id(b): i for i, b in enumerate(batches[layout])}

        def step(batch, inputs=inputs, index=index):
            kw, labels = inputs[index[id(batch)]]
            with autocast():
                ce, aux = ce_of(kw, labels)
                loss = ce + coef * aux if aux is not None else ce
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return ce.detach()

        attn_desc = info["attn_implementation"] + (" + attention_mask" if not packed else
                                                   (" varlen via position_ids" if "flash" in attn
                                                    else " + document mask from position_ids" if "flex" in attn
                                                    else " + block-causal mask from position_ids"))
        results.append(measure(name, step, batches[layout], args, flops, tokens, pads[layout], peak,
                               dict(framework="hf", layout=layout, attn=attn_desc, params_b=n_params / 1e9,
                                    param_dtype=info["param_dtype"], autocast_bf16=amp)))
        del inputs, index
    del model, opt, params
    _free_memory()
    return results, info


# ------------------------------------------------------------------------------------------------
def _fmt(v, spec, na="n/a"):
    return na if v is None else format(v, spec)


def print_table(results: list[dict], peak: Optional[float]) -> None:
    hdr = (f"{'config':<13} {'status':<8} {'step ms':>9} {'real tok/s':>12} {'TFLOP/s':>9} "
           f"{'MFU':>7} {'peak GiB':>9} {'pad':>6} {'loss':>8}  attention")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in results:
        ok = r["status"] == "ok"
        print(f"{r['config']:<13} {r['status'][:8]:<8} {_fmt(r.get('step_ms_median') if ok else None, '9.1f'):>9} "
              f"{_fmt(r.get('tokens_per_s') if ok else None, '12,.0f'):>12} "
              f"{_fmt(r.get('tflops_per_s') if ok else None, '9.2f' if (r.get('tflops_per_s') or 0) >= 1 else '9.4f'):>9} "
              f"{_fmt(r.get('mfu') if ok else None, '7.1%'):>7} {_fmt(r.get('peak_mem_gib'), '9.2f'):>9} "
              f"{_fmt(r.get('padding_share') if ok else None, '6.1%'):>6} "
              f"{_fmt(r['losses'][-1] if ok else None, '8.4f'):>8}  {r.get('attn', '')}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = sorted(set(wanted) - set(ALL_CONFIGS))
    if bad:
        raise SystemExit(f"--configs: unknown {bad}; choose from {ALL_CONFIGS}")
    if args.skip_hf:
        wanted = [c for c in wanted if not c.startswith("hf-")]
    if any(c.startswith("ours-ab-") for c in wanted) and not args.ab_megatron_args.strip():
        raise SystemExit("--configs ours-ab-*: give the flags to compare with --ab-megatron-args")
    if args.steps < 1 or args.warmup < 0 or args.samples_per_step < 1 or args.passes < 1:
        raise SystemExit("need --steps >= 1, --warmup >= 0, --samples-per-step >= 1, --passes >= 1")

    from multimodal_dev import training
    from multimodal_dev.models.qwen35_vl.variants import get_variant

    variant_cfg = get_variant(args.variant)
    margs = megatron_args(args, "bshd")
    args.seq_multiple = margs.layout.seq_multiple
    if args.cuda_graph_layers and not _cuda():
        raise SystemExit("--cuda-graph-layers needs a CUDA GPU")
    resolve_thd_padding(args)
    # one model serves both layouts; the graphs only ever take its THD calls
    margs = _run_margs(args, margs)
    training.initialize(margs)  # process group (world size 1) + megatron parallel state, once
    dev = torch.device("cuda", torch.cuda.current_device()) if _cuda() else torch.device("cpu")
    peak, peak_src = _peak_tflops(args)
    dtype_name = "fp32" if (args.fp32 or not _cuda()) else "bf16"
    env = dict(
        torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        device=torch.cuda.get_device_name() if _cuda() else f"CPU ({platform.processor() or platform.machine()}, "
                                                             f"{torch.get_num_threads()} threads)",
        dtype=dtype_name, peak_tflops=peak, peak_source=peak_src, git_commit=_git_commit(), git_tree=_git_tree(),
        host=platform.node(), cuda_alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    )
    try:
        import megatron.core

        env["megatron_core"] = getattr(megatron.core, "__version__", None)
    except Exception:  # noqa: BLE001
        pass
    print(f"train_throughput: variant {args.variant}, {env['device']}, torch {env['torch']}, {dtype_name}; "
          f"seq length {args.seq_length}, {args.samples_per_step} samples/step, {args.warmup} warmup + "
          f"{args.steps} timed steps; configs {wanted}", flush=True)
    print(f"MFU peak: {_fmt(peak, 'g')} TFLOP/s ({peak_src})", flush=True)
    gemm = None if args.no_gemm_check else measure_gemm_tflops()
    if gemm:
        print(f"measured bf16 GEMM 8192^3: {gemm:.0f} TFLOP/s"
              + (f" ({gemm / peak:.0%} of the peak used for MFU)" if peak else ""), flush=True)
    env["measured_gemm_tflops"] = gemm

    # ---- data ----------------------------------------------------------------------------------
    samples, provider, mix = make_samples(variant_cfg, args)
    for n in mix["notes"]:
        print("note:", n, flush=True)
    batches_cpu, collate_s = {}, {}
    for layout in ("bshd", "thd"):
        batches_cpu[layout], collate_s[layout] = collate_steps(samples, provider, args, layout)
    if args.thd_row_multiple > 1 or args.thd_sample_multiple > 1:  # ours-thd's rows, padded (HF packs the plain rows)
        batches_cpu["thd_rows"], collate_s["thd_rows"] = collate_steps(samples, provider, args, "thd",
                                                                       args.thd_row_multiple, args.thd_sample_multiple)
    data = data_summary(samples, batches_cpu["bshd"], batches_cpu["thd"], variant_cfg["image_token_id"])
    data.update(mix=mix, collate_ms_per_step={k: v * 1e3 for k, v in collate_s.items()})
    flops = [model_flops_per_step(variant_cfg["text"], variant_cfg["vision"], b)["total"] for b in batches_cpu["thd"]]
    flops_bshd = [model_flops_per_step(variant_cfg["text"], variant_cfg["vision"], b)["total"] for b in batches_cpu["bshd"]]
    if flops != flops_bshd:
        print("WARNING: useful FLOPs differ between the BSHD and THD batches of the same samples", flush=True)
    tokens = [sum(sample_lengths(b)) for b in batches_cpu["thd"]]
    parts: dict[str, float] = {}
    for b in batches_cpu["thd"][args.warmup:]:
        for k, v in model_flops_per_step(variant_cfg["text"], variant_cfg["vision"], b).items():
            parts[k] = parts.get(k, 0) + v / args.steps
    pads = {"bshd": data["padding_share_bshd"], "thd": data["padding_share_thd"]}
    if "thd_rows" in batches_cpu:
        b = batches_cpu["thd_rows"]
        pads["thd_rows"] = (sum(x["stats"]["padding_tokens"] for x in b)
                            / sum(x["stats"]["padding_tokens"] + x["stats"]["tokens"] for x in b))
        data["padding_share_thd_rows"] = pads["thd_rows"]
        print(f"ours-thd rows padded to multiples of {args.thd_row_multiple} tokens, samples to multiples of "
              f"{args.thd_sample_multiple}: padding share "
              f"{pads['thd_rows']:.1%}, {len({int(x['tokens'].shape[1]) for x in b})} distinct row lengths", flush=True)
    print(f"data: {data['samples']} samples ({data['tokens_min']}..{data['tokens_max']} tokens, mean "
          f"{data['tokens_mean']:.0f}); {data['samples_with_images']} with images ({data['images']} images, "
          f"{data['image_token_share']:.1%} of tokens are image tokens, images {mix['image_px'][0]}..{mix['image_px'][1]} px); "
          f"{data['loss_token_share']:.1%} of tokens carry loss; generated in {mix['generation_s']:.1f} s", flush=True)
    print(f"padding share: BSHD (rows of {args.seq_length}) {pads['bshd']:.1%}, THD (packed) {pads['thd']:.1%}; "
          f"collate per step: BSHD {collate_s['bshd'] * 1e3:.1f} ms, THD {collate_s['thd'] * 1e3:.1f} ms "
          f"(not in the step times)", flush=True)
    print(f"useful model FLOPs per timed step (fwd+bwd): {parts['total'] / 1e12:.4f} TFLOP = "
          + ", ".join(f"{k} {v / parts['total']:.1%}" for k, v in parts.items() if k not in ("total", "forward")),
          flush=True)
    batches = {k: [_to_device(b, dev) for b in v] for k, v in batches_cpu.items()}

    # ---- measure ------------------------------------------------------------------------------
    results: list[dict] = []
    hf_info: dict = {}
    te_margs = ab_margs = None
    if any(c.startswith("ours-te-") for c in wanted):
        te_margs = _run_margs(args, megatron_args(args, "bshd", ("--transformer-impl", "transformer_engine")))
    if any(c.startswith("ours-ab-") for c in wanted):
        ab_margs = _run_margs(args, megatron_args(args, "bshd", tuple(shlex.split(args.ab_megatron_args))))
    for prefix, m in (("ours", margs), ("ours-te", te_margs), ("ours-ab", ab_margs)):
        mine = [c for c in wanted if c in (f"{prefix}-bshd", f"{prefix}-thd")]
        if not mine:
            continue
        try:
            results += run_ours(args, m, batches, flops, tokens, pads, peak, mine, prefix=prefix)
        except Exception as e:  # noqa: BLE001
            print(f"{prefix}: FAILED to build or run: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            results += [dict(config=c, status=f"error: {type(e).__name__}: {e}") for c in mine]
            _free_memory()
    for prefix in ("hf", "hf-amp"):
        mine = [c for c in wanted if c in (f"{prefix}-bshd", f"{prefix}-packed")]
        if not mine:
            continue
        try:
            r, hf_info[prefix] = run_hf(args, variant_cfg, batches, flops, tokens, pads, peak, mine, prefix=prefix)
            results += r
        except Exception as e:  # noqa: BLE001
            print(f"{prefix}: cannot build or run Qwen3_5MoeForConditionalGeneration for {args.variant}: "
                  f"{type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            hf_info[prefix] = dict(error=f"{type(e).__name__}: {e}")
            results += [dict(config=c, status=f"error: {type(e).__name__}") for c in mine]
            _free_memory()

    # ---- report -------------------------------------------------------------------------------
    print_table(results, peak)
    ok = [r for r in results if r["status"] == "ok"]
    best = {fw: max((r for r in ok if r["framework"] == fw), key=lambda r: r["tokens_per_s"], default=None)
            for fw in ("ours", "hf")}
    summary: dict[str, Any] = {}
    for fw, r in best.items():
        if r:
            summary[f"best_{fw}"] = dict(config=r["config"], tokens_per_s=r["tokens_per_s"], mfu=r["mfu"])
    if best["ours"] and best["hf"]:
        summary["ours_over_hf"] = best["ours"]["tokens_per_s"] / best["hf"]["tokens_per_s"]
        summary["ours_over_hf_median"] = (best["ours"].get("tokens_per_s_median", float("nan"))
                                          / best["hf"].get("tokens_per_s_median", float("nan")))
        print(f"\nbest ours: {best['ours']['config']} {best['ours']['tokens_per_s']:,.0f} real tok/s; best HF: "
              f"{best['hf']['config']} {best['hf']['tokens_per_s']:,.0f} real tok/s; ours/HF = "
              f"{summary['ours_over_hf']:.2f}x")
        print(f"ours/HF by median per-step rate (robust to outlier steps): {summary['ours_over_hf_median']:.2f}x")
        hf_rows = [r for r in ok if r["framework"] == "hf"]
        if len(hf_rows) > 1:  # e.g. HF at its bf16 params and at our precision (hf-amp-*)
            summary["ours_over_hf_by_config"] = {r["config"]: best["ours"]["tokens_per_s"] / r["tokens_per_s"]
                                                 for r in hf_rows}
            print("best ours over each HF row: " + ", ".join(
                f"{c} {v:.2f}x" for c, v in summary["ours_over_hf_by_config"].items()))
    o = {r["config"]: r for r in ok}
    if "ours-bshd" in o and "ours-thd" in o:
        summary["ours_thd_over_bshd"] = o["ours-thd"]["tokens_per_s"] / o["ours-bshd"]["tokens_per_s"]
        print(f"ours THD / BSHD: {summary['ours_thd_over_bshd']:.2f}x real tokens/s")
    for layout in ("bshd", "thd"):
        if f"ours-te-{layout}" in o and f"ours-{layout}" in o:
            summary[f"te_over_local_{layout}"] = o[f"ours-te-{layout}"]["tokens_per_s"] / o[f"ours-{layout}"]["tokens_per_s"]
            print(f"ours {layout.upper()}: TE / local {summary[f'te_over_local_{layout}']:.2f}x real tokens/s")
        if f"ours-ab-{layout}" in o and f"ours-{layout}" in o:
            summary[f"ab_over_base_{layout}"] = o[f"ours-ab-{layout}"]["tokens_per_s"] / o[f"ours-{layout}"]["tokens_per_s"]
            print(f"ours {layout.upper()}: with {args.ab_megatron_args!r} / without "
                  f"{summary[f'ab_over_base_{layout}']:.2f}x real tokens/s")
    print(f"MFU = useful model TFLOP/s / {_fmt(peak, 'g')} ({peak_src}); FLOP counting: multimodal_dev/models/qwen35_vl/flops.py")
    if args.json:
        out = dict(env=env, args={k: v for k, v in vars(args).items()}, data=data,
                   model_flops_per_step_mean={k: v for k, v in parts.items()}, hf=hf_info.get("hf", {}),
                   hf_amp=hf_info.get("hf-amp", {}), results=results,
                   summary=summary, megatron_args=shlex.split(args.megatron_args))
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {args.json}")
    training.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
