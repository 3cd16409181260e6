"""Evaluation (``--eval-interval``, ``--eval-iters``, ``--valid-data-path``; multimodal_dev/evaluation.py).

Proven here, fp32 on CPU:

* the flags: refused combinations name the flag; ``--eval-iters 0`` turns evaluation off;
* end to end (one process, mock data, expert bias on): one ``"split": "valid"`` record per
  evaluation, after every N-th iteration and once at the end, the TensorBoard scalars under
  ``valid/``; its ``lm_loss`` equals a no-grad forward computed in this test over the validation
  batches made here independently (the mock provider with the documented seed, collated as
  training collates) with the weights of the checkpoint the run saved at that iteration, and its
  load-balancing and z-losses equal the training definition (a training-mode forward's recorded
  values) over the same batches; every evaluation reads the same batches;
* the same with ``--dataset-provider webdataset --valid-data-path``: the loss of the validation
  shards' samples, not the training shards';
* evaluation changes nothing of training: the training records of a run with evaluation equal
  those of a run without, bit for bit (so the training data stream is not advanced either), and so
  do the expert biases the two runs saved; in-process, an evaluation leaves megatron's MoE metrics
  tracker, every router buffer (expert bias, expert-bias token counts, global-aux-loss running
  counts, diagnostics) and the train mode exactly as it found them, on the fused routing path
  (the default) and megatron's generic one (expert bias, seq_aux_loss on packed rows,
  global_aux_loss);
* pipeline and data parallel (PP=2, DP=2 under torchrun): the same valid records as one process;
* unusable validation data: a missing path or shards without a usable sample stop the run before
  its first iteration, naming ``--valid-data-path`` (exit 2); validation batches without a loss
  token stop it at the evaluation instead of reporting a loss of 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.mcore_ext.testing import run_distributed
from multimodal_dev.arguments import ArgumentError, parse_args

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"
SEED = 7
# 2 micro-batches of 2 samples per iteration; the schedule fixed by --lr-decay-iters, so runs of
# different lengths train their common iterations identically
COMMON = [
    "--variant", "tiny", "--dataset-provider", "mock", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--seq-length", "256", "--layout-independent-init", "--lr-warmup-iters", "1", "--lr-decay-iters", "10",
    "--no-progress-bar", "--moe-z-loss-coeff", "1e-3", "--seed", str(SEED), "--train-iters", "3",
    # an expert bias that moves every iteration: the one piece of router state the optimizer step updates
    "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
]
EVAL = ["--eval-interval", "2", "--eval-iters", "2"]
K, M = 2, 2  # eval iterations, micro-batches per iteration


def _run(args, nproc=1, timeout=300, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, str(ENTRY), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(ENTRY), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dataset-provider", "webdataset", "--data-path", "x.tar", "--eval-interval", "5"],
         "--eval-interval with --dataset-provider webdataset needs --valid-data-path"),
        (["--valid-data-path", "v.tar"], "--valid-data-path needs --eval-interval"),
        (["--eval-interval", "5", "--valid-data-path", "v.tar"], "mock takes no --valid-data-path"),
        (["--eval-interval", "0"], "--eval-interval must be >= 1"),
        (["--eval-interval", "5", "--eval-iters", "-1"], "--eval-iters must be >= 0"),
    ],
)
def test_bad_eval_flags_raise_naming_the_flag(argv, needle):
    with pytest.raises(ArgumentError) as e:
        parse_args(argv, world_size=1)
    assert needle in str(e.value), str(e.value)


def test_eval_sections():
    assert parse_args([], world_size=1).eval.interval is None  # off by default
    assert parse_args(["--eval-interval", "5", "--eval-iters", "0"], world_size=1).eval.interval is None
    cfg = parse_args(["--dataset-provider", "webdataset", "--data-path", "t.tar", "--eval-interval", "5",
                      "--valid-data-path", "v1.tar", "v2.tar"], world_size=1)
    assert (cfg.eval.interval, cfg.eval.iters, cfg.eval.data_path) == (5, 100, ("v1.tar", "v2.tar"))
    from multimodal_dev.evaluation import validation_data

    data, seed = validation_data(cfg)
    assert data.data_path == ("v1.tar", "v2.tar") and seed == cfg.seed and data.seq_length == cfg.data.seq_length
    mock = parse_args(["--eval-interval", "5", "--seed", "3"], world_size=1)
    assert validation_data(mock) == (mock.data, 3 + 1_000_003)  # the documented validation seed
    from multimodal_dev.arguments import build_parser

    help_text = build_parser().format_help()
    for flag in ("--eval-interval", "--eval-iters", "--valid-data-path"):
        assert flag in help_text


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    with_eval = _run(COMMON + EVAL + ["--save", str(d / "ckpt"), "--save-interval", "2",
                                      "--metrics-file", str(d / "eval.jsonl"), "--tensorboard-dir", str(d / "tb")])
    _run(COMMON + ["--save", str(d / "plain_ckpt"), "--metrics-file", str(d / "plain.jsonl")])
    return {"dir": d, "stdout": with_eval.stdout, "eval": _metrics(d / "eval.jsonl"),
            "plain": _metrics(d / "plain.jsonl")}


def test_one_valid_record_per_evaluation_after_every_nth_iteration_and_at_the_end(runs):
    recs = runs["eval"]
    assert [(r["iteration"], r["split"]) for r in recs] == [
        (1, "train"), (2, "train"), (2, "valid"), (3, "train"), (3, "valid")]
    valid = [r for r in recs if r["split"] == "valid"]
    for r in valid:
        for key in ("lm_loss", "load_balancing_loss", "z_loss", "tokens", "loss_tokens", "expert_tokens"):
            assert key in r, key
        assert r["eval_iters"] == K and r["load_balancing_loss"] > 0 and r["z_loss"] > 0
        assert all(sum(e) == 2 * r["tokens"] for e in r["expert_tokens"])  # top-2 of every valid token
    # the same batches at every evaluation; other weights, another loss
    assert valid[0]["tokens"] == valid[1]["tokens"] and valid[0]["loss_tokens"] == valid[1]["loss_tokens"]
    assert valid[0]["lm_loss"] != valid[1]["lm_loss"]
    assert "valid iter 2 | lm loss" in runs["stdout"] and "valid iter 3 | lm loss" in runs["stdout"]
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    ea = event_accumulator.EventAccumulator(str(runs["dir"] / "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert {"lm_loss", "valid/lm_loss", "valid/load_balancing_loss", "valid/z_loss"} <= set(tags)
    assert [e.step for e in ea.Scalars("valid/lm_loss")] == [2, 3]
    assert [e.step for e in ea.Scalars("lm_loss")] == [1, 2, 3]  # training's tag holds training's values only
    assert [e.value for e in ea.Scalars("lm_loss")] == pytest.approx([r["lm_loss"] for r in recs
                                                                      if r["split"] == "train"])
    assert [e.value for e in ea.Scalars("valid/lm_loss")] == pytest.approx([r["lm_loss"] for r in valid])


def test_evaluation_changes_no_training_record(runs):
    train = [r for r in runs["eval"] if r["split"] == "train"]
    assert len(train) == len(runs["plain"]) == 3
    for a, b in zip(train, runs["plain"]):
        for key in ("lm_loss", "load_balancing_loss", "z_loss", "grad_norm", "lr", "tokens", "expert_tokens",
                    "router"):
            assert a[key] == b[key], (a["iteration"], key, a[key], b[key])


def _independent_validation(argv, checkpoints, valid, train):
    """In a fresh 1-rank process group: the validation batches made here (``valid``: the
    provider's ``DataConfig`` fields, the run's collate), and per checkpoint the masked no-grad
    loss (eval mode), the training definition of the MoE losses (train-mode forwards, megatron's
    tracker) and the routers' expert biases. ``train``: the training data's fields (to show the
    two differ)."""
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker, set_moe_metrics_tracker

    from megatron.mcore_ext.router import PaddingAwareTopKRouter
    from multimodal_dev.data.collate import pack_or_pad_batch
    from multimodal_dev.data.providers import DataConfig, build_provider
    from multimodal_dev.models import build_model

    cfg = parse_args(argv, world_size=1)
    model = build_model(cfg.model.arch, cfg.model.variant, cfg.build_options())

    def provider(fields):
        return build_provider(DataConfig.from_data_spec(model.data_spec, **fields))

    valid_provider = provider(valid)
    collate = valid_provider.collate_config(layout="bshd", target_seqlen=256, divisible_by=cfg.layout.seq_multiple,
                                            truncate=False, row_multiple=1)
    samples = valid_provider.samples(0, 1, max_tokens=256)
    batches = [pack_or_pad_batch([next(samples) for _ in range(2)], collate) for _ in range(K * M)]
    first_train = next(provider(train).samples(0, 1, max_tokens=256))["tokens"]
    first_valid = next(valid_provider.samples(0, 1, max_tokens=256))["tokens"]
    out = {"tokens": sum(int(b["stats"]["tokens"]) for b in batches),
           "differs_from_training": list(first_train) != list(first_valid)}
    routers = [m for m in model.modules() if isinstance(m, PaddingAwareTopKRouter)]
    for it, path in checkpoints.items():
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, path)
        model.load_state_dict(loaded["model"])
        model.eval()
        loss_sum, count = torch.zeros((), dtype=torch.float64), 0.0
        with torch.no_grad():
            for b in batches:
                per_token = model(b).float()  # [b, s]
                mask = b["loss_mask"].float()
                loss_sum += (per_token * mask).sum().double()
                count += float(mask.sum())
        model.train()
        tracker = MoEMetricsTracker()
        set_moe_metrics_tracker(tracker)
        for b in batches:  # with gradients: the routers record their losses (no backward needed)
            model(b)
        moe = {k: float(e.values.sum()) / (len(routers) * len(batches)) for k, e in tracker.metrics.items()}
        bias = [r.expert_bias.clone() for r in routers if r.expert_bias is not None]
        out[it] = {"lm_loss": float(loss_sum) / count, "loss_tokens": count, "expert_bias": bias, **moe}
    return out


def _check_valid_records(valid, want, iterations):
    """The run's valid records against the independent no-grad forward over the same batches."""
    assert want["differs_from_training"]
    assert sorted(valid) == sorted(iterations)
    for it in iterations:
        got, ref = valid[it], want[it]
        assert got["tokens"] == want["tokens"] and got["loss_tokens"] == ref["loss_tokens"]
        assert got["lm_loss"] == pytest.approx(ref["lm_loss"], rel=1e-6, abs=0), it
        assert got["load_balancing_loss"] == pytest.approx(ref["load_balancing_loss"], rel=1e-5), it
        assert got["z_loss"] == pytest.approx(ref["z_loss"], rel=1e-5), it


@pytest.fixture(scope="module")
def reference(runs):
    """The independent forwards for the mock runs' checkpoints (iterations 2, 3; "plain": the run
    without evaluation, at its end)."""
    checkpoints = {it: str(runs["dir"] / "ckpt" / f"iter_{it:07d}") for it in (2, 3)}
    checkpoints["plain"] = str(runs["dir"] / "plain_ckpt" / "iter_0000003")
    mock = {"provider": "mock", "seed": SEED}
    return run_distributed(_independent_validation, 1,
                           args=(COMMON + EVAL, checkpoints, {**mock, "seed": SEED + 1_000_003}, mock))[0]


def test_valid_loss_is_a_no_grad_forward_over_the_validation_batches(runs, reference):
    _check_valid_records({r["iteration"]: r for r in runs["eval"] if r["split"] == "valid"}, reference, (2, 3))


def test_evaluation_changes_no_expert_bias(reference):
    """The expert bias is updated by every training step (finalize_model_grads, from the training
    forwards' token counts): the run with evaluations ends with the bias of the run without."""
    import torch

    with_eval, plain = reference[3]["expert_bias"], reference["plain"]["expert_bias"]
    assert len(plain) == 2 and all(b.abs().sum() > 0 for b in plain)  # loaded, and moved from its zero start
    for a, b in zip(with_eval, plain, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout, extra", [("pp2", ["--pipeline-model-parallel-size", "2"]), ("dp2", [])])
def test_parallel_evaluation_equals_one_process(runs, tmp_path, layout, extra):
    _run(COMMON + EVAL + extra + ["--metrics-file", str(tmp_path / "m.jsonl")], nproc=2)
    recs = _metrics(tmp_path / "m.jsonl")
    par = [r for r in recs if r["split"] == "valid"]
    one = [r for r in runs["eval"] if r["split"] == "valid"]
    assert [r["iteration"] for r in par] == [r["iteration"] for r in one] == [2, 3]
    assert [r["split"] for r in recs] == [r["split"] for r in runs["eval"]]
    for a, b in zip(par, one):
        assert a["tokens"] == b["tokens"] and a["loss_tokens"] == b["loss_tokens"]
        assert a["expert_tokens"] == b["expert_tokens"], layout
        for key in ("lm_loss", "load_balancing_loss", "z_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (layout, a["iteration"], key)


# ------------------------------------------------------------------------------ webdataset
WDS = ["--variant", "tiny", "--dataset-provider", "webdataset", "--micro-batch-size", "2", "--global-batch-size",
       "4", "--seq-length", "256", "--layout-independent-init", "--lr-warmup-iters", "1", "--no-progress-bar",
       "--seed", str(SEED), "--moe-z-loss-coeff", "1e-3"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Shapes shards: 32 training samples and, apart, 8 validation samples of another seed."""
    from multimodal_dev.data.shapes import write_shapes_dataset

    d = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(str(d / "train"), num_samples=32, shard_size=16, image_size=32, seed=3)
    write_shapes_dataset(str(d / "valid"), num_samples=K * M * 2, shard_size=4, image_size=32, seed=11)
    return d


def test_webdataset_valid_data_path_evaluates_the_validation_shards(shapes, tmp_path):
    d = tmp_path
    argv = WDS + ["--data-path", str(shapes / "train"), "--valid-data-path", str(shapes / "valid"), *EVAL,
                  "--train-iters", "2", "--save", str(d / "ckpt"), "--metrics-file", str(d / "m.jsonl")]
    r = _run(argv)
    recs = _metrics(d / "m.jsonl")
    assert [(x["iteration"], x["split"]) for x in recs] == [(1, "train"), (2, "train"), (2, "valid")]
    assert f"--valid-data-path {shapes / 'valid'}" in r.stderr + r.stdout  # the log says what it validates on
    wds = {"provider": "webdataset", "seed": SEED}
    want = run_distributed(_independent_validation, 1, args=(
        argv, {2: str(d / "ckpt" / "iter_0000002")}, {**wds, "data_path": [str(shapes / "valid")]},
        {**wds, "data_path": [str(shapes / "train")]}))[0]
    _check_valid_records({x["iteration"]: x for x in recs if x["split"] == "valid"}, want, (2,))


def _write_tar(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize("case", ["missing", "no_usable_sample"])
def test_unusable_validation_data_stops_the_run_before_training(shapes, tmp_path, case):
    if case == "missing":
        valid, needle = str(tmp_path / "nothing-*.tar"), "does not exist"
    else:  # a readable shard without any sample, and one whose only sample is bad (skipped, counted)
        _write_tar(tmp_path / "empty.tar", [])
        _write_tar(tmp_path / "bad.tar", [("k0.json", b'{"conversation": 3}')])
        valid, needle = str(tmp_path), "got no usable sample"
    r = _run(WDS + ["--data-path", str(shapes / "train"), "--valid-data-path", valid, *EVAL, "--train-iters", "2",
                    "--metrics-file", str(tmp_path / "m.jsonl")], check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    msg = r.stderr
    assert "rank 0: error: --eval-interval: the validation data (--valid-data-path" in msg, msg[-3000:]
    assert needle in msg and valid in msg and "Traceback" not in msg, msg[-3000:]
    assert not (tmp_path / "m.jsonl").exists() or not _metrics(tmp_path / "m.jsonl")  # no iteration ran


def test_validation_batches_without_a_loss_token_stop_the_run(shapes, tmp_path):
    """Prompts longer than --seq-length under --truncate: the answers are cut, every label is
    -100. The evaluation says so instead of reporting a loss of 0 over no token."""
    import tarfile

    with tarfile.open(shapes / "valid" / "shapes-000000.tar") as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    key = min(n.split(".")[0] for n in blobs)
    sample = json.loads(blobs[f"{key}.json"])
    sample["conversation"][0]["content"] += " What shape is in the image?" * 60
    _write_tar(tmp_path / "long.tar", [(f"{key}.png", blobs[f"{key}.png"]),
                                       (f"{key}.json", json.dumps(sample).encode())])
    r = _run(WDS + ["--data-path", str(shapes / "train"), "--valid-data-path", str(tmp_path / "long.tar"),
                    "--truncate", "--eval-interval", "1", "--eval-iters", "1", "--train-iters", "2",
                    "--metrics-file", str(tmp_path / "m.jsonl")], check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "rank 0: error: --eval-interval: the validation batches (--eval-iters 1, --valid-data-path" in r.stderr, \
        r.stderr[-3000:]
    assert "hold no loss token" in r.stderr and "Traceback" not in r.stderr
    assert [x["split"] for x in _metrics(tmp_path / "m.jsonl")] == ["train"]  # iteration 1 trained, then it stopped


# ------------------------------------------------------------------- isolation, in-process
def _evaluation_leaves_training_state(argv):
    """Training-mode forwards of one iteration (tracker, diagnostics and expert-bias counts
    filled), then an evaluation; the state before and after it, and the eval MoE losses against
    the training definition over the same validation batches (per micro-batch counts for
    global_aux_loss: its running counts are reset before each micro-batch here)."""
    import torch
    from megatron.core.transformer.moe.moe_logging import (
        MoEMetricsTracker,
        get_moe_metrics_tracker,
        set_moe_metrics_tracker,
    )

    from megatron.mcore_ext.router import PaddingAwareTopKRouter
    from multimodal_dev import evaluation, training
    from multimodal_dev.data.stream import open_data

    cfg = parse_args(argv, world_size=1)
    ddp, model, *_ = training.build_model_and_optimizer(cfg)
    routers = [m for m in model.modules() if isinstance(m, PaddingAwareTopKRouter)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for r in routers:
            if r.expert_bias is not None:
                r.expert_bias.copy_(0.1 * torch.randn(r.expert_bias.shape, generator=g))

    def stream(seed):
        return open_data(cfg.data, model.data_spec, seed=seed, seq_multiple=cfg.layout.seq_multiple,
                         reads_data=True, dp_rank=0, dp_size=1)[1]

    for b in stream(cfg.seed).next_iteration():
        model(b)
    tracker = get_moe_metrics_tracker()

    def state():
        return {"tracker": {k: e.values.clone() for k, e in tracker.metrics.items()},
                "buffers": [{n: b.clone() for n, b in r.named_buffers()} for r in routers]}

    before = state()
    rec = evaluation.Evaluator(cfg, ddp, model).evaluate(1)
    out = {"rec": rec, "before": before, "after": state(), "same_tracker": get_moe_metrics_tracker() is tracker,
           "train_mode": model.training and all(m.training for m in model.modules()),
           "flags_off": not any(r.record_eval_losses for r in routers),
           "fused": all(r._fast_routing_applies() for r in routers)}
    set_moe_metrics_tracker(MoEMetricsTracker())
    valid = stream(cfg.seed + evaluation.VALID_SEED_OFFSET)
    n = 0
    for _ in range(cfg.eval.iters):
        for b in valid.next_iteration():
            for r in routers:
                r.reset_global_aux_loss_tracker()
            model(b)
            n += 1
    out["want"] = {k: float(e.values.sum()) / (len(routers) * n) for k, e in get_moe_metrics_tracker().metrics.items()}
    return out


@pytest.mark.parametrize("name, extra", [
    ("fused_default", []),  # softmax, micro-batch aux loss: PaddingAwareTopKRouter's fused routing
    ("expert_bias", ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias"]),
    ("seq_aux_loss_thd", ["--moe-router-load-balancing-type", "seq_aux_loss", "--use-packed-sequence"]),
    ("global_aux_loss", ["--moe-router-load-balancing-type", "global_aux_loss"]),
])
def test_evaluation_leaves_training_state_as_it_found_it(name, extra):
    import torch

    from megatron.mcore_ext.router import LOAD_BALANCING_METRICS

    argv = ["--variant", "tiny", "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "256",
            "--layout-independent-init", "--moe-z-loss-coeff", "1e-3", "--seed", str(SEED), "--eval-interval", "1",
            "--eval-iters", "2", *extra]
    out = run_distributed(_evaluation_leaves_training_state, 1, args=(argv,))[0]
    before, after = out["before"], out["after"]
    assert out["same_tracker"] and out["train_mode"] and out["flags_off"]
    assert before["tracker"].keys() == after["tracker"].keys()
    for k in before["tracker"]:
        assert torch.equal(before["tracker"][k], after["tracker"][k]), k
        assert before["tracker"][k].abs().sum() > 0, k  # training had recorded something to keep
    for b, a in zip(before["buffers"], after["buffers"], strict=True):
        assert b.keys() == a.keys()
        for k in b:
            assert torch.equal(b[k], a[k]), (name, k)
        assert b["diagnostics.valid_tokens"] > 0
        if name == "expert_bias":
            assert b["local_tokens_per_expert"].sum() > 0 and b["expert_bias"].abs().sum() > 0
        if name == "global_aux_loss":
            assert b["global_tokens_per_expert"].sum() > 0
    assert out["fused"] == (name == "fused_default")  # the routing path this case is about
    lbl = LOAD_BALANCING_METRICS[{"fused_default": "aux_loss", "expert_bias": "aux_loss",
                                  "seq_aux_loss_thd": "seq_aux_loss", "global_aux_loss": "global_aux_loss"}[name]]
    rec, want = out["rec"], out["want"]
    assert rec["split"] == "valid" and rec["load_balancing_loss"] > 0 and rec["z_loss"] > 0
    assert rec["load_balancing_loss"] == pytest.approx(want[lbl], rel=1e-5)
    assert rec["z_loss"] == pytest.approx(want["z_loss"], rel=1e-5)
