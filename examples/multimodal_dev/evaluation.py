"""Evaluation on a validation stream: ``--eval-interval N --eval-iters K [--valid-data-path ...]``.

The flags are defined and checked here (``add_arguments``, ``args_from_flags`` -> ``EvalArgs``,
the run's ``eval`` section; ``arguments`` calls them, as it does ``recompute``'s); ``Evaluator``
runs the evaluations for ``training.train``.

When: after every N-th training iteration (``iteration % N == 0``, as Megatron-LM), and once more
when the run reaches ``--train-iters`` unless that iteration was just evaluated (Megatron-LM also
evaluates at the end of training). A run stopped early (``--exit-after-iters``, an exit signal)
does not evaluate at its stop.

How: K iterations of M validation micro-batches (M = the run's micro-batches per iteration)
through megatron-core's ``get_forward_backward_func()`` with ``forward_only=True``, under
``torch.no_grad()`` and ``model.eval()`` (the train/eval mode it had is restored afterwards).
Pipeline parallelism goes through the same schedule as training; every rank takes part.

The validation data (``validation_data``): the run's provider with the run's collate and packing
settings (``data.stream.open_data``: micro-batch size, micro-batches, sequence length, BSHD/THD,
truncation, row multiple), each data-parallel rank its part, as in training:

* ``--valid-data-path``: the provider reads those paths (same seed);
* a generated provider (``mock``) without it: the same provider with seed
  ``--seed + VALID_SEED_OFFSET``: other samples of the same distribution. (A provider that reads
  files, ``--data-path``, needs ``--valid-data-path``; ``arguments`` says so.)

The stream is a ``MicroBatchStream`` of its own and starts again from its first sample at every
evaluation: each evaluation sees the same K x M micro-batches, so two evaluations differ only by
the weights (comparable numbers).

Unusable validation data is said early: the evaluator reads the first validation iteration when it
is built, so a missing path, shards without a usable sample or too many bad samples stop the run
before its first training iteration (``SetupError`` naming ``--valid-data-path`` or the generated
provider); batches without a single loss token stop it at the evaluation (a mean over no token
would read 0).

The record (``"split": "valid"``, docs/metrics.md), global values like training's:

* ``lm_loss``: masked per-token loss summed over the K x M micro-batches, DP x CP and PP stages,
  divided by the number of loss tokens (a token-weighted mean; ``metrics.reduce_lm_loss``);
* ``load_balancing_loss``, ``z_loss``: training's definitions (``megatron.mcore_ext.router``),
  unscaled by their coefficients, mean over the K x M micro-batches and the MoE layers. Megatron-
  core computes them in training mode with gradients only; ``PaddingAwareTopKRouter`` records the
  same values in eval mode when ``record_eval_losses`` is set (here, around the forwards), with no
  gradient attached. ``global_aux_loss`` then uses each micro-batch's own global expert counts
  (training's running counts are training state). Routers of another class record nothing in
  eval mode: both are 0 for them. They are diagnostics of the routing on held-out data;
* ``tokens``, ``padding_tokens``, ``loss_tokens``, ``expert_tokens``, ``router``: over the K iterations.

Isolation (``_isolated``): the evaluation leaves training's state as it found it. It runs on a
fresh megatron ``MoEMetricsTracker`` (training's is put back afterwards); the routers' diagnostic
accumulators are saved, zeroed for the evaluation, collected and restored; the expert-bias counts
(``local_tokens_per_expert``) are only added to with gradients on, and the bias is only updated in
``finalize_model_grads``, which forward-only schedules never call; ``global_aux_loss`` running
counts are untouched (above); CUDA-graph statistics get their eager-call counts back.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import logging
import time
from typing import Optional

import torch

from multimodal_dev.argument_error import ArgumentError
from multimodal_dev.models.contract import SetupError

log = logging.getLogger("multimodal_dev.evaluation")

__all__ = ["EvalArgs", "add_arguments", "args_from_flags", "Evaluator", "validation_data", "VALID_SEED_OFFSET"]

#: a generated provider without ``--valid-data-path`` validates on seed ``--seed`` + this
VALID_SEED_OFFSET = 1_000_003


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """The run's ``eval`` section (``arguments.RunConfig``)."""

    interval: Optional[int]  # None: no evaluation (no --eval-interval, or --eval-iters 0)
    iters: int
    data_path: tuple[str, ...]  # empty: a generated provider's samples of another seed


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (multimodal_dev/evaluation.py)")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="evaluate after every N-th iteration and at the end of training (default: never)")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="iterations of validation batches per evaluation, the same ones each time (0: no evaluation)")
    g.add_argument("--valid-data-path", nargs="*", default=[],
                   help=f"validation shards, dirs or globs (needed with --data-path; mock without it: its samples "
                        f"of --seed + {VALID_SEED_OFFSET})")


def args_from_flags(a: argparse.Namespace) -> EvalArgs:
    """The checked flags (``ArgumentError`` names the flag of a combination that cannot work)."""
    if a.eval_interval is not None and a.eval_interval < 1:
        raise ArgumentError(f"--eval-interval must be >= 1, got {a.eval_interval}")
    if a.eval_iters < 0:
        raise ArgumentError(f"--eval-iters must be >= 0 (0: no evaluation), got {a.eval_iters}")
    if a.valid_data_path and a.eval_interval is None:
        raise ArgumentError("--valid-data-path needs --eval-interval (when to evaluate)")
    if a.valid_data_path and a.dataset_provider == "mock":
        raise ArgumentError("--dataset-provider mock takes no --valid-data-path (it validates on another seed)")
    on = a.eval_interval is not None and a.eval_iters > 0
    if on and not a.valid_data_path and (a.data_path or a.dataset_provider == "webdataset"):
        raise ArgumentError(f"--eval-interval with --dataset-provider {a.dataset_provider} needs --valid-data-path "
                            "(validation shards, dirs or globs; only generated data validates on another seed)")
    return EvalArgs(interval=a.eval_interval if on else None, iters=a.eval_iters,
                    data_path=tuple(a.valid_data_path) if on else ())


def validation_data(cfg):
    """``(data section, seed)`` of the validation stream (see the module docstring)."""
    if cfg.eval.data_path:
        return dataclasses.replace(cfg.data, data_path=tuple(cfg.eval.data_path)), cfg.seed
    return cfg.data, cfg.seed + VALID_SEED_OFFSET


@contextlib.contextmanager
def _isolated(ddp, model, graphs=None):
    """Eval mode, no gradients, the routers' eval losses on, and training's tracker, router
    diagnostics and CUDA-graph eager counts set aside for the duration (restored on exit)."""
    from megatron.core.transformer.moe.moe_logging import (
        MoEMetricsTracker,
        get_moe_metrics_tracker,
        set_moe_metrics_tracker,
    )

    from megatron.mcore_ext.router import PaddingAwareTopKRouter
    from megatron.mcore_ext.router_diagnostics import RoutingDiagnostics

    training_tracker = get_moe_metrics_tracker()
    diags = [m for m in model.modules() if isinstance(m, RoutingDiagnostics)]
    saved = [[b.clone() for b in d.buffers()] for d in diags]
    routers = [m for m in model.modules() if isinstance(m, PaddingAwareTopKRouter)]
    eager = None if graphs is None else collections.Counter(graphs.stats["eager"])
    was_training = ddp.training
    set_moe_metrics_tracker(MoEMetricsTracker())
    for d in diags:
        d.reset()
    for r in routers:
        r.record_eval_losses = True
    ddp.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        ddp.train(was_training)
        for r in routers:
            del r.record_eval_losses  # back to the class default (off)
        with torch.no_grad():
            for d, bufs in zip(diags, saved):
                for b, s in zip(d.buffers(), bufs):
                    b.copy_(s)
        set_moe_metrics_tracker(training_tracker)
        if eager is not None:
            graphs.stats["eager"] = eager


class Evaluator:
    """The validation of one run: opens the validation data once (collective: every rank builds
    it), then ``maybe_evaluate(iteration)`` after each training iteration."""

    def __init__(self, cfg, ddp, model, graphs=None):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from multimodal_dev.data.stream import open_data

        self.cfg, self.ddp, self.model, self.graphs = cfg, ddp, model, graphs
        data, seed = validation_data(cfg)
        self.source = (f"--valid-data-path {' '.join(data.data_path)}, read by --dataset-provider {data.provider}"
                       if cfg.eval.data_path
                       else f"{data.provider} samples of seed {seed} (--seed + {VALID_SEED_OFFSET})")
        tp_rank = ps.get_tensor_model_parallel_rank()
        try:
            # the template's own position is never read: every evaluation makes a fresh stream from it
            _, self._template = open_data(data, model.data_spec, seed=seed, seq_multiple=cfg.layout.seq_multiple,
                                          reads_data=cfg.layout.reads_data(tp_rank),
                                          dp_rank=ps.get_data_parallel_rank(),
                                          dp_size=ps.get_data_parallel_world_size())
            probe = self._fresh_stream()
            if probe is not None:  # empty or unusable validation data: said now, before any training
                probe.next_iteration()
        except (OSError, RuntimeError, SetupError) as e:  # a missing path, no usable sample, too many bad ones
            raise SetupError(f"--eval-interval: the validation data ({self.source}) cannot be used: {e}") from e
        self._counts_here = cfg.layout.counts_once(tp_rank, ps.get_context_parallel_rank(),
                                                   ps.get_pipeline_model_parallel_rank())
        self._forward_backward = get_forward_backward_func()
        self.last_iteration: Optional[int] = None
        log.info("evaluation: every %d iterations and at the end, %d iterations of %s", cfg.eval.interval,
                 cfg.eval.iters, self.source)

    def maybe_evaluate(self, iteration: int, final: bool = False) -> Optional[dict]:
        """The valid record when an evaluation is due after ``iteration`` (``final``: the run
        reached --train-iters), else None. Collective."""
        due = iteration != self.last_iteration if final else iteration % self.cfg.eval.interval == 0
        return self.evaluate(iteration) if due else None

    def _fresh_stream(self):
        from multimodal_dev.data.stream import MicroBatchStream

        t = self._template
        if t is None:  # a rank that reads no data (its TP group's first rank does)
            return None
        return MicroBatchStream(t.provider, t.collate_config, micro_batch_size=t.micro_batch_size,
                                num_microbatches=t.num_microbatches, dp_rank=t.dp_rank, dp_size=t.dp_size)

    def evaluate(self, iteration: int) -> dict:
        """K validation iterations, forward only, from the stream's start. Collective."""
        from multimodal_dev import metrics
        from multimodal_dev.forward_step import forward_step

        cfg, d = self.cfg, self.cfg.data
        t0 = time.perf_counter()
        stats = metrics.IterationStats()
        step = functools.partial(forward_step, use_padding_mask=cfg.model.padding_mask, batch_hook=stats.hook)
        stream = self._fresh_stream()
        losses = []
        with _isolated(self.ddp, self.model, self.graphs):
            for _ in range(cfg.eval.iters):
                micro = stream.next_iteration() if stream is not None else None
                losses += self._forward_backward(
                    forward_step_func=step, data_iterator=iter(micro) if micro is not None else None,
                    model=[self.ddp], num_microbatches=d.num_microbatches, seq_length=d.seq_length,
                    micro_batch_size=1 if d.packed else d.micro_batch_size, decoder_seq_length=None,
                    forward_only=True,
                )
            moe = metrics.moe_losses(self.model.config, cfg.eval.iters * d.num_microbatches)
            diags = metrics.router_diagnostics(self.model)
        loss_sum, loss_count = metrics.reduce_lm_loss(losses)  # global: every rank raises or none
        if loss_count == 0:
            raise SetupError(f"--eval-interval: the validation batches (--eval-iters {cfg.eval.iters}, {self.source}) "
                             "hold no loss token (every label -100: answers cut by --truncate, or no trained-on "
                             "text), so there is no validation loss to report")
        tokens, padding = (int(c) for c in metrics.count_across_replicas([stats.tokens, stats.padding],
                                                                          self._counts_here))
        self.last_iteration = iteration
        return {
            "iteration": iteration,
            "split": "valid",
            "lm_loss": loss_sum / max(loss_count, 1.0),
            "load_balancing_loss": moe["load_balancing_loss"],
            "z_loss": moe["z_loss"],
            "tokens": tokens,
            "padding_tokens": padding,
            "loss_tokens": int(loss_count),
            "eval_iters": cfg.eval.iters,
            "expert_tokens": [x["tokens_per_expert"] for x in diags],
            "router": [{k: x[k] for k in ("layer", "entropy", "load_balance", "max_min_ratio")} for x in diags],
            "eval_time_s": time.perf_counter() - t0,
        }
