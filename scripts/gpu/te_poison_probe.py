#!/usr/bin/env python
"""Where do non-finite values start? Two trainer steps under poisoned CUDA memory, with a report.

After the model and optimizer are built, the CUDA caching allocator's free blocks are filled with
NaN bytes (``tests/unit/test_te_gpu.poison_cuda_cache``), so a kernel output that is not fully
written shows up as NaN. Forward hooks on every module record the first modules (in execution
order) whose output holds a non-finite value, and after each step the parameters whose finalized
gradient does. Any trainer flags are accepted (one process, world size 1)::

    python scripts/gpu/te_poison_probe.py --variant proxy --transformer-impl transformer_engine \\
        --use-packed-sequence --bf16 --seq-length 4096 --micro-batch-size 4 --global-batch-size 4
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "unit"), str(ROOT), str(ROOT / "examples")]


def probe(argv):
    import torch

    from test_te_gpu import poison_cuda_cache
    from trainer_steps import record_steps

    first_bad: list[str] = []

    def hook(name):
        def check(module, inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            if len(first_bad) < 8 and any(torch.is_tensor(o) and o.is_floating_point() and not torch.isfinite(o).all()
                                          for o in outs):
                first_bad.append(f"{name} ({type(module).__name__})")
        return check

    def patch(model):
        for name, m in model.named_modules():
            m.register_forward_hook(hook(name))
        poison_cuda_cache()

    try:
        r = record_steps(argv, 2, patch=patch)
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {exc}"[:800], first_non_finite_outputs=first_bad)
    bad = sorted({n for s in r["steps"] for n, g in s.get("grads", {}).items() if not torch.isfinite(g).all()})
    return dict(losses=[s["loss"][0] / max(s["loss"][1], 1) for s in r["steps"]],
                grad_norm=[s["grad_norm"] for s in r["steps"]], first_non_finite_outputs=first_bad,
                non_finite_grads=bad[:20], n_non_finite_grads=len(bad))


if __name__ == "__main__":
    from megatron.mcore_ext.testing import run_distributed

    print(run_distributed(probe, 1, gpu=True, args=(sys.argv[1:],))[0], flush=True)
