"""One training step of a variant on a GPU, eager and with ``--cuda-graph-layers``, compared.

    python scripts/bench/layer_graphs_check.py [--variant proxy] [--steps 3]

Builds the model once (bf16, THD rows padded to ``--thd-row-multiple``), then runs the same batches
eagerly and with the decoder layers graphed, with the same weights (no optimizer step): per layer
the largest difference of the layer outputs, the loss, and per parameter the relative difference
of the accumulated ``main_grad`` (and any NaN/Inf). It prints where the two paths part, if they do.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="proxy")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--samples-per-step", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="batches compared (each: eager, then graphed)")
    p.add_argument("--thd-row-multiple", type=int, default=1024)
    p.add_argument("--thd-sample-multiple", type=int, default=64, help="each packed sample padded to a multiple "
                   "(64: what Gated DeltaNet layers need to be graphed; the trainer's default with graphs)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--reverse", action="store_true", help="compare the batches in reverse order")
    p.add_argument("--warmup-iters", type=int, default=2, help="LayerGraphs' warm-up passes per layer before a capture")
    p.add_argument("--megatron-args", default="", help="more trainer flags, as train_throughput.py's "
                   "(e.g. --megatron-args='--transformer-impl transformer_engine')")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("layer_graphs_check needs a CUDA GPU")
    targs = tt.build_parser().parse_args(["--variant", a.variant, "--seq-length", str(a.seq_length),
                                          "--samples-per-step", str(a.samples_per_step), "--seed", str(a.seed),
                                          "--steps", str(a.steps), "--warmup", "0",
                                          f"--megatron-args={a.megatron_args}"])
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron.mcore_ext.layer_graphs import LayerGraphs

    margs, batches, (ddp, model, optimizer, scheduler, _) = tt.build_ours(targs, "thd", a.thd_row_multiple,
                                                                              a.thd_sample_multiple)
    batches = batches[: a.steps]
    if a.reverse:
        batches = batches[::-1]
    model.config.finalize_model_grads_func = None  # keep NaNs visible instead of DDP's check raising
    fb = get_forward_backward_func()
    layers = model.decoder_layers()
    outs: list = []
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, inp, out, i=i: outs.append((i, out[0].detach().float().clone())))
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    gin: dict = {}  # layer -> is the gradient w.r.t. its input finite

    def pre_hook(m, args, kwargs, i):
        h = kwargs.get("hidden_states", args[0] if args else None)
        if h is not None and h.requires_grad:
            h.register_hook(lambda g, i=i: gin.__setitem__(i, bool(torch.isfinite(g).all())))

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(functools.partial(pre_hook, i=i), with_kwargs=True)

    def step(batch):
        outs.clear()
        gin.clear()
        ddp.zero_grad_buffer()
        losses = tt.one_microbatch(fb, ddp, margs, batch, "thd")
        torch.cuda.synchronize()
        s = sum(d["lm loss"].double() for d in losses)
        grads = {n: q.main_grad.detach().float().clone() for n, q in named}
        return float(s[0] / s[1]), list(outs), grads

    ok = True
    graphs = LayerGraphs(layers, warmup_calls=0, num_warmup_iters=a.warmup_iters,
                         sample_multiple=a.thd_sample_multiple)
    for k, batch in enumerate(batches):
        graphs.enabled = False
        loss_e, out_e, g_e = step(batch)
        bad_e = [n for n, g in g_e.items() if not torch.isfinite(g).all()]
        graphs.enabled = True
        for rep in ("first graphed call", "second"):
            loss_g, out_g, g_g = step(batch)
            bad_g = [n for n, g in g_g.items() if not torch.isfinite(g).all()]
            print(f"batch {k} (row {batch['tokens'].shape[1]} tokens), graphed {rep}: loss eager {loss_e:.6f} "
                  f"graphed {loss_g:.6f}; non-finite main_grad: eager {len(bad_e)}, graphed {len(bad_g)} "
                  f"{bad_g[:6]}", flush=True)
            for (i, oe), (j, og) in zip(out_e, out_g):
                d = (oe - og).abs().max().item()
                if d > 0 or not torch.isfinite(og).all():
                    print(f"  layer {i}: max |out diff| {d:.3e}, finite {bool(torch.isfinite(og).all())}", flush=True)
            if bad_g:
                print("  gradient w.r.t. each layer's input finite:", [gin.get(i) for i in range(len(layers))])
                first = max((i for i in range(len(layers)) if gin.get(i) is False), default=None)
                if first is not None:
                    pre = f"language_model.decoder.layers.{first}."
                    print(f"  first layer (from the top) whose backward is non-finite: {first}; its non-finite "
                          f"parameters: {[n[len(pre):] for n in bad_g if n.startswith(pre)][:12]}")
                empty = {n for n, g in g_e.items() if ".local_experts." in n and not g.any()}
                print(f"  experts' weights with an all-zero eager main_grad (no tokens): {len(empty)}, of them "
                      f"non-finite when graphed: {len(empty & set(bad_g))}; non-finite expert weights that had "
                      f"tokens: {len([n for n in bad_g if '.local_experts.' in n and n not in empty])}")
            worst = sorted(((float((g_g[n] - g_e[n]).norm() / g_e[n].norm().clamp_min(1e-30)), n) for n in g_e
                            if n not in bad_g), reverse=True)[:5]
            print("  largest relative main_grad differences:", [(n, f"{r:.2e}") for r, n in worst], flush=True)
            ok &= not bad_g and abs(loss_e - loss_g) <= 1e-3 * abs(loss_e)
        print(f"  graphs so far: {graphs.stats['captures']} captures, {graphs.stats['replays']} replays, "
              f"eager {dict(graphs.stats['eager'])}", flush=True)
    print("RESULT:", "graphed == eager (within tolerance)" if ok else "graphed and eager DIFFER", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
