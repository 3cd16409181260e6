"""The trainer end to end on CPU (one process, mock data): flags that cannot work fail before any
model is built; a crash in the middle of a save never leaves an unreadable latest checkpoint;
resuming continues exactly (fp32 CPU: the same losses as an uninterrupted run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multimodal_dev.arguments import ArgumentError, parse_args

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"
COMMON = [
    "--variant", "tiny", "--dataset-provider", "mock", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--seq-length", "256", "--layout-independent-init",
    "--lr-warmup-iters", "1", "--no-progress-bar", "--moe-z-loss-coeff", "1e-3", "--seed", "7",
]


def _run(args, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ENTRY), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "argv, world, needle",
    [
        (["--tensor-model-parallel-size", "2"], 1, "world size 1 is not divisible"),
        (["--tensor-model-parallel-size", "2"], 2, "needs --sequence-parallel"),
        (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (["--global-batch-size", "3", "--micro-batch-size", "2"], 1, "--global-batch-size 3"),
        (["--context-parallel-size", "2", "--seq-length", "250"], 2, "--seq-length 250 must be a multiple of 4"),
        (["--moe-router-enable-expert-bias"], 1, "--moe-router-score-function sigmoid"),
        (["--pipeline-model-parallel-size", "2", "--use-packed-sequence"], 2, "--moe-token-dispatcher-type alltoall"),
        (["--dataset-provider", "webdataset"], 1, "needs --data-path"),
        (["--save-interval", "5"], 1, "--save-interval needs --save"),
        (["--expert-model-parallel-size", "3"], 2, "--expert-model-parallel-size"),
        (["--cuda-graph-layers"], 1, "--cuda-graph-layers needs --use-packed-sequence"),
        (["--thd-row-multiple", "256"], 1, "--thd-row-multiple applies to packed rows"),
        (["--use-packed-sequence", "--thd-row-multiple", "6", "--context-parallel-size", "2"], 2,
         "--thd-row-multiple 6 must be a multiple of 4"),
        (["--thd-sample-multiple", "64"], 1, "--thd-sample-multiple applies to packed rows"),
        (["--use-packed-sequence", "--thd-sample-multiple", "64", "--thd-row-multiple", "96"], 1,
         "--thd-row-multiple 96 must be a multiple of 64"),
    ],
)
def test_bad_flag_combinations_raise_naming_the_flags(argv, world, needle):
    with pytest.raises(ArgumentError, match=None) as e:
        parse_args(argv, world_size=world)
    assert needle in str(e.value), str(e.value)


def test_bad_flags_fail_before_any_model_is_built():
    r = _run(["--sequence-parallel", "--train-iters", "2"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--sequence-parallel needs --tensor-model-parallel-size > 1" in r.stderr
    assert "parameters on rank 0" not in r.stderr + r.stdout  # the model-built log line never came


def test_cpu_rejects_gpu_only_flags():
    if __import__("torch").cuda.is_available():
        pytest.skip("on a GPU machine --bf16 is allowed")
    with pytest.raises(ArgumentError, match="--bf16 needs a GPU"):
        parse_args(["--bf16"], world_size=1)
    with pytest.raises(ArgumentError, match="--use-distributed-optimizer needs a GPU"):
        parse_args(["--use-distributed-optimizer"], world_size=1)
    with pytest.raises(ArgumentError, match="--cuda-graph-layers needs a GPU"):
        parse_args(["--cuda-graph-layers", "--use-packed-sequence"], world_size=1)


def test_cp_default_row_multiple_is_accepted():
    cfg = parse_args(["--use-packed-sequence", "--context-parallel-size", "2"], world_size=2)
    assert cfg.data.row_multiple == 1 and cfg.layout.seq_multiple == 4


# ------------------------------------------------------------------------- kill and resume
def test_crash_mid_save_then_resume_gives_the_uninterrupted_losses(tmp_path):
    iters = ["--train-iters", "6"]
    ref = _run(COMMON + iters + ["--metrics-file", str(tmp_path / "ref.jsonl")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = _metrics(tmp_path / "ref.jsonl")
    assert [r["iteration"] for r in reference] == [1, 2, 3, 4, 5, 6]

    ckpt = tmp_path / "ckpt"
    # saves at 2 and 4; the process is killed hard inside the second save (all shards written,
    # no marker, no rename, no tracker update)
    crashed = _run(COMMON + iters + ["--save", str(ckpt), "--save-interval", "2",
                                     "--metrics-file", str(tmp_path / "crashed.jsonl"),
                                     "--plugin", str(ROOT / "tests" / "plugins" / "crash_in_second_save.py")])
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "iter_0000002" / "COMPLETE").exists()
    assert (ckpt / "iter_0000004.partial").is_dir() and not (ckpt / "iter_0000004").exists()
    assert [r["iteration"] for r in _metrics(tmp_path / "crashed.jsonl")] == [1, 2, 3, 4]

    resumed = _run(COMMON + iters + ["--save", str(ckpt), "--save-interval", "2", "--load", str(ckpt),
                                     "--metrics-file", str(tmp_path / "resumed.jsonl")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "iter_0000002" in resumed.stderr
    after = _metrics(tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in after] == [3, 4, 5, 6]
    for got, want in zip(after, reference[2:]):
        for key in ("lm_loss", "load_balancing_loss", "z_loss", "grad_norm", "lr"):
            assert got[key] == want[key], (got["iteration"], key, got[key], want[key])
        assert got["expert_tokens"] == want["expert_tokens"]
    # the crashed partial save was cleaned up by the next save; the tracker moved on
    assert not (ckpt / "iter_0000004.partial").exists()
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def test_load_from_an_empty_directory_starts_from_scratch(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _run(COMMON + ["--train-iters", "2", "--load", str(tmp_path / "empty"),
                       "--metrics-file", str(tmp_path / "m.jsonl")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no complete checkpoint there" in r.stderr
    assert [m["iteration"] for m in _metrics(tmp_path / "m.jsonl")] == [1, 2]


def test_metrics_record_has_the_contract_fields(tmp_path):
    r = _run(COMMON + ["--train-iters", "2", "--metrics-file", str(tmp_path / "m.jsonl"),
                       "--tensorboard-dir", str(tmp_path / "tb")])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _metrics(tmp_path / "m.jsonl")
    for rec in recs:
        for key in ("iteration", "lm_loss", "load_balancing_loss", "z_loss", "grad_norm", "lr", "tokens",
                    "padding_tokens", "tokens_per_sec", "expert_tokens"):
            assert key in rec, key
        assert len(rec["expert_tokens"]) == 2 and all(len(e) == 8 for e in rec["expert_tokens"])
        # every valid token goes to top-k=2 experts in every MoE layer: counts add up to 2 x tokens
        assert all(sum(e) == 2 * rec["tokens"] for e in rec["expert_tokens"])
        assert rec["z_loss"] > 0 and rec["load_balancing_loss"] > 0
    assert any(f.name.startswith("events.out.tfevents") for f in (tmp_path / "tb").iterdir())
    # megatron's dozen import-time warnings about absent accelerators: one line of ours instead
    assert r.stderr.count("optional accelerators: Transformer Engine") == 1
    assert "Apex is not installed" not in r.stderr and "Transformer Engine and Apex are not" not in r.stderr
    assert "Warning" not in r.stderr, r.stderr[:2000]


# --------------------------------------------------------------------- real WebDataset shards
def test_trains_on_shapes_shards_below_the_unigram_baseline_and_counts_bad_data(tmp_path):
    from multimodal_dev.data.shapes import write_shapes_dataset

    data = tmp_path / "shapes"
    write_shapes_dataset(str(data), num_samples=800, shard_size=200, image_size=32, seed=3)
    (data / "shapes-broken.tar").write_bytes(b"this is not a tar archive" * 40)  # a corrupt shard
    r = _run(["--variant", "tiny", "--dataset-provider", "webdataset", "--data-path", str(data),
              "--use-packed-sequence", "--micro-batch-size", "16", "--seq-length", "256",
              "--train-iters", "60", "--lr", "3e-3", "--lr-warmup-iters", "5", "--no-progress-bar",
              "--metrics-file", str(tmp_path / "m.jsonl")])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _metrics(tmp_path / "m.jsonl")
    baseline = recs[-1]["unigram_baseline"]
    late = sum(x["lm_loss"] for x in recs[-10:]) / 10
    assert recs[0]["lm_loss"] > baseline  # a random model starts above it (about ln(vocab))
    assert late < 0.6 * baseline, (late, baseline)
    assert "shapes-broken.tar" in r.stderr  # skipped and logged with its name
    assert recs[-1]["skipped_samples"] >= 1


def test_seq_aux_loss_packed_equals_padded(tmp_path):
    """seq_aux_loss normalises per sample: the packed run must tell the routers where each packed
    sample is (MultimodalModel's sequence ids); then THD reports what padded BSHD reports."""
    out = {}
    for name, extra in (("bshd", []), ("thd", ["--use-packed-sequence"])):
        r = _run(COMMON + ["--train-iters", "2", "--moe-router-load-balancing-type", "seq_aux_loss",
                           "--metrics-file", str(tmp_path / f"{name}.jsonl"), *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = _metrics(tmp_path / f"{name}.jsonl")
    for a, b in zip(out["bshd"], out["thd"]):
        assert a["load_balancing_loss"] > 0
        assert abs(a["load_balancing_loss"] - b["load_balancing_loss"]) <= 1e-5 * a["load_balancing_loss"]
        assert a["expert_tokens"] == b["expert_tokens"]


def test_thd_rows_padded_to_a_multiple_change_no_loss_or_routing(tmp_path):
    """--thd-row-multiple pads every packed row with a segment of padding, --thd-sample-multiple every
    sample at its end (both for CUDA graphs): with the padding mask, the losses and every expert's
    token count are those of the unpadded rows; for the hybrid model too (a GDN layer's recurrence
    runs on past a sample's real tokens into its padding, never back)."""
    out = {}
    hybrid = ["--variant", "tiny-hybrid"]
    for name, extra in (("plain", []), ("rows", ["--thd-row-multiple", "384"]), ("samples", ["--thd-sample-multiple", "64"]),
                        ("hybrid", hybrid), ("hybrid_samples", hybrid + ["--thd-sample-multiple", "64"])):
        r = _run(COMMON + ["--train-iters", "2", "--use-packed-sequence",
                           "--metrics-file", str(tmp_path / f"{name}.jsonl"), *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = _metrics(tmp_path / f"{name}.jsonl")
    pairs = [("plain", "rows"), ("plain", "samples"), ("hybrid", "hybrid_samples")]
    for a, b in [ab for x, y in pairs for ab in zip(out[x], out[y], strict=True)]:
        assert b["padding_tokens"] > a["padding_tokens"]  # the rows did grow
        assert a["tokens"] == b["tokens"] and a["loss_tokens"] == b["loss_tokens"]
        for k in ("lm_loss", "load_balancing_loss", "z_loss"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (k, a[k], b[k])
        assert a["expert_tokens"] == b["expert_tokens"]


# ------------------------------------------------------------------ the one-house issue's defects
PLUGIN = ROOT / "tests" / "plugins" / "dense_vlm.py"


def test_a_second_architecture_trains_through_the_entry_point(tmp_path):
    """An architecture outside the package (tests/plugins/dense_vlm.py: dense, text + vision, no
    MoE) registers itself and trains through pretrain_multimodal.py. Its all-dense decoder has no
    MoE losses: they are logged as 0, never NaN (megatron's tracker divides by the MoE layers)."""
    m = tmp_path / "m.jsonl"
    r = _run(["--plugin", str(PLUGIN), "--model-arch", "dense_vlm_test", "--variant", "small",
              "--dataset-provider", "mock", "--micro-batch-size", "2", "--seq-length", "256",
              "--train-iters", "3", "--no-progress-bar", "--metrics-file", str(m)])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = _metrics(m)
    assert [x["iteration"] for x in recs] == [1, 2, 3]
    for x in recs:
        assert 0 < x["lm_loss"] < 10 and x["tokens"] > 0
        assert x["load_balancing_loss"] == 0.0 and x["z_loss"] == 0.0  # finite: json would say NaN
        assert x["expert_tokens"] == [] and x["router"] == []
    assert "model dense_vlm_test/small" in r.stderr


def test_architecture_owned_moe_settings_default_to_the_architecture(tmp_path):
    """--moe-aux-loss-coeff left out = qwen35_vl's router_aux_loss_coef 0.001 (it once defaulted to
    1e-2 and replaced the architecture's value); the resolved value is logged once at start."""
    base = ["--variant", "tiny", "--dataset-provider", "mock", "--micro-batch-size", "2", "--seq-length", "256",
            "--layout-independent-init", "--train-iters", "2", "--lr", "1e-2", "--no-progress-bar", "--seed", "7"]
    out = {}
    for name, extra in (("default", []), ("published", ["--moe-aux-loss-coeff", "0.001"]),
                        ("ten_times", ["--moe-aux-loss-coeff", "0.01"])):
        r = _run(base + extra + ["--metrics-file", str(tmp_path / f"{name}.jsonl")])
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = (_metrics(tmp_path / f"{name}.jsonl")[-1]["lm_loss"], r.stderr)
    assert out["default"][0] == out["published"][0] != out["ten_times"][0]
    assert out["default"][1].count("resolved model settings") == 1
    assert "moe_aux_loss_coeff=0.001" in out["default"][1]


def test_a_changed_schedule_is_refused_at_load_and_the_two_flags_resolve_it(tmp_path):
    """Continuing a 4-iteration run with --train-iters 8: megatron's scheduler would keep the
    checkpoint's horizon and train iterations 5-8 at learning rate 0. It is refused, naming both
    values and the two flags; --override-opt-param-scheduler continues with the flags' schedule,
    --use-checkpoint-opt-param-scheduler keeps the checkpoint's and says the rate is 0."""
    ckpt = tmp_path / "ckpt"
    first = _run(COMMON + ["--train-iters", "4", "--save", str(ckpt)])
    assert first.returncode == 0, first.stderr[-3000:]
    more = COMMON + ["--train-iters", "8", "--load", str(ckpt)]
    refused = _run(more + ["--metrics-file", str(tmp_path / "refused.jsonl")])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "decay iterations (--lr-decay-iters (default: --train-iters)): checkpoint 4, flags 8" in refused.stderr
    assert "--override-opt-param-scheduler" in refused.stderr and "--use-checkpoint-opt-param-scheduler" in refused.stderr
    assert not (tmp_path / "refused.jsonl").exists()  # nothing was trained

    flags = _run(more + ["--override-opt-param-scheduler", "--metrics-file", str(tmp_path / "flags.jsonl")])
    assert flags.returncode == 0, flags.stderr[-3000:]
    recs = _metrics(tmp_path / "flags.jsonl")
    assert [x["iteration"] for x in recs] == [5, 6, 7, 8] and all(x["lr"] > 0 for x in recs)

    kept = _run(more + ["--use-checkpoint-opt-param-scheduler", "--metrics-file", str(tmp_path / "kept.jsonl")])
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert all(x["lr"] == 0.0 for x in _metrics(tmp_path / "kept.jsonl"))
    assert "trains with learning rate 0" in kept.stderr
