"""Training metrics: per-iteration token counts, loss reductions, MoE losses, router diagnostics,
and the writers (JSONL, TensorBoard, console lines, progress bar). The record's keys are the
metrics contract of ``docs/metrics.md``; every value is global (what one process would report).

* ``IterationStats.hook`` sees every micro-batch (``forward_step``'s ``batch_hook``) and adds up
  the collate's real and padding token counts;
* ``reduce_lm_loss``: the masked LM loss (sum, count) over micro-batches, DP x CP and PP stages;
* ``moe_losses``: megatron's MoE metrics tracker for the iteration (then cleared), under the names
  of ``mcore_ext.router.LOAD_BALANCING_METRICS``; 0 when the model has no MoE layer (megatron's
  tracker would divide by zero MoE layers);
* ``router_diagnostics``: ``collect_router_diagnostics`` of every pipeline stage;
* ``unigram_baseline``: the loss of a model that ignores its inputs, for comparison;
* ``MetricsWriter``: rank 0's outputs, training records (``"split": "train"``) and the
  evaluation's (``"split": "valid"``, ``evaluation.py``).
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["IterationStats", "reduce_lm_loss", "moe_losses", "num_moe_layers", "router_diagnostics", "count_across_replicas",
           "unigram_baseline", "MetricsWriter", "TB_SCALARS"]

#: the record's scalars that also go to TensorBoard (router diagnostics go per layer)
TB_SCALARS = ("lm_loss", "load_balancing_loss", "z_loss", "grad_norm", "lr", "tokens_per_sec", "padding_fraction",
              # --distill only (multimodal_dev.distill.step.KEYS)
              "distill/kd_loss", "distill/lm_loss", "distill/moe_lb_loss", "distill/teacher_moe_lb_loss",
              "distill/total_loss")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class IterationStats:
    """Token counts of the micro-batches this rank ran (from the collate's stats)."""

    def __init__(self):
        self.tokens = 0
        self.padding = 0
        self.truncated = 0

    def hook(self, batch):
        st = batch.get("stats") or {}
        self.tokens += int(st.get("tokens", 0))
        self.padding += int(st.get("padding_tokens", 0))
        self.truncated += int(st.get("truncated_samples", 0))


def reduce_lm_loss(losses_reduced, key: str = "lm loss") -> tuple[float, float]:
    """Global (sum, count) of the masked LM loss (or another ``[sum, count]`` the loss function
    reports under ``key``, e.g. distillation's "kd loss"): over micro-batches, DP x CP and PP stages."""
    from megatron.core import parallel_state as ps

    acc = torch.zeros(2, dtype=torch.float64, device=_device())
    if ps.is_pipeline_last_stage():
        for d in losses_reduced:
            acc += d[key].to(acc)
        dist.all_reduce(acc, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:  # rank 0 sits on the first stage
        dist.all_reduce(acc, group=ps.get_pipeline_model_parallel_group())
    return float(acc[0]), float(acc[1])


def num_moe_layers(config) -> int:
    """How many of the model's decoder layers are MoE layers (``moe_layer_freq``: an interval or a 0/1 list)."""
    if not config.num_moe_experts:
        return 0
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return len(range(0, config.num_layers, freq))
    return sum(1 for x in freq if x)


def moe_losses(config, num_microbatches: int) -> dict[str, float]:
    """The iteration's MoE losses from megatron's metrics tracker (its reduction), then cleared.

    ``config``: the model's ``TransformerConfig`` (the resolved load-balancing type and z-loss)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron.mcore_ext.router import LOAD_BALANCING_METRICS, Z_LOSS_METRIC

    out = {"load_balancing_loss": 0.0, "z_loss": 0.0}
    if num_moe_layers(config) == 0:  # all-dense: no router ever recorded anything
        return out
    lbl = LOAD_BALANCING_METRICS.get(config.moe_router_load_balancing_type)
    names = ([lbl] if lbl else []) + ([Z_LOSS_METRIC] if config.moe_z_loss_coeff else [])
    if not names:
        return out
    total: dict = {}
    get_moe_metrics_tracker().report(
        loss_scale=1.0 / num_microbatches,
        iteration=0,
        force_initialize=True,
        track_names=names,
        num_layers=config.num_layers,
        moe_layer_freq=config.moe_layer_freq,
        total_loss_dict=total,
    )
    if lbl and lbl in total:
        out["load_balancing_loss"] = float(total[lbl])
    if Z_LOSS_METRIC in total:
        out["z_loss"] = float(total[Z_LOSS_METRIC])
    return out


def router_diagnostics(model) -> list[dict]:
    """Per MoE layer, over the whole model (all pipeline stages), globally reduced."""
    from megatron.core import parallel_state as ps

    from megatron.mcore_ext.router_diagnostics import collect_router_diagnostics

    diags = collect_router_diagnostics(model)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        parts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(parts, diags, group=ps.get_pipeline_model_parallel_group())
        diags = sorted((d for p in parts for d in p), key=lambda d: d["layer"])
    return diags


def count_across_replicas(values: list[float], counts_here: bool) -> list[float]:
    """Sum ``values`` over the ranks where ``counts_here`` (one rank per data-parallel replica)."""
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    if not counts_here:
        t.zero_()
    dist.all_reduce(t)
    return t.tolist()


def unigram_baseline(provider, num_samples: int = 512, max_tokens: Optional[int] = None) -> float:
    """Entropy (nats per token) of the trained-on tokens' unigram distribution over the first
    ``num_samples`` samples: the loss of a model that ignores its inputs and predicts token
    frequencies. A model that learns from the images and the text goes well below it."""
    import numpy as np

    it = provider.samples(0, 1, max_tokens=max_tokens, quiet=True)  # its skips are the training pass's to report
    counts: dict[int, int] = {}
    for _ in range(num_samples):
        lab = np.asarray(next(it)["labels"])
        vals, cnt = np.unique(lab[lab != -100], return_counts=True)
        for v, c in zip(vals.tolist(), cnt.tolist()):
            counts[v] = counts.get(v, 0) + c
    c = np.array(list(counts.values()), dtype=np.float64)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


class MetricsWriter:
    """Rank 0: JSONL (``docs/metrics.md``), TensorBoard scalars, console lines and the progress bar."""

    def __init__(self, logging_args, train_iters: int, start_iteration: int, enabled: bool):
        self.enabled = enabled
        self.args = logging_args
        self.train_iters = train_iters
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if logging_args.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(logging_args.metrics_file)), exist_ok=True)
            self.jsonl = open(logging_args.metrics_file, "a")
        if logging_args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=logging_args.tensorboard_dir)
        if logging_args.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=train_iters, initial=start_iteration, desc="train", unit="it",
                            dynamic_ncols=True, file=sys.stdout)

    def write(self, rec: dict) -> None:
        """One record: ``"split": "train"`` (one per iteration) or ``"valid"`` (one per evaluation:
        TensorBoard tags under ``valid/``, a short console line always printed, no progress step)."""
        if not self.enabled:
            return
        it = rec["iteration"]
        valid = rec.get("split") == "valid"
        tag = "valid/" if valid else ""
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k in TB_SCALARS:
                if rec.get(k) is not None and math.isfinite(rec[k]):
                    self.tb.add_scalar(tag + k, rec[k], it)
            for d in rec.get("router", []):
                for k in ("entropy", "load_balance", "max_min_ratio"):
                    if math.isfinite(d[k]):
                        self.tb.add_scalar(f"{tag}router/layer{d['layer']}/{k}", d[k], it)
        if valid:
            line = (f"valid iter {it} | lm loss {rec['lm_loss']:.4f} | lb loss {rec['load_balancing_loss']:.4g} | "
                    f"z loss {rec['z_loss']:.4g}")
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)
            return
        line = (f"iter {it:>6}/{self.train_iters} | lm loss {rec['lm_loss']:.4f} | "
                f"lb loss {rec['load_balancing_loss']:.4g} | z loss {rec['z_loss']:.4g} | "
                f"grad norm {rec['grad_norm']:.3f} | lr {rec['lr']:.3g} | "
                f"tok/s {rec['tokens_per_sec']:.0f} | pad {rec['padding_fraction']:.1%}")
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {rec['lm_loss']:.3f}", refresh=False)
            self.bar.update(1)
            if it % self.args.log_interval == 0:
                self.bar.write(line)
        elif it % self.args.log_interval == 0:
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
