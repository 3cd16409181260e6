"""``scripts/bench/train_throughput.py`` end to end on CPU (tiny, ours only, a few steps): the JSON
has what the docs read from it, and ``--passes 2`` reports the second pass of the same steps while
keeping the first.

The bench's numbers on CPU mean nothing; what is checked is the bookkeeping: each timed step once
per pass, the reported rate computed from the last pass's times, the earlier pass kept apart."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, str(ROOT / "scripts" / "bench" / "train_throughput.py"), "--variant", "tiny",
         "--seq-length", "256", "--samples-per-step", "2"]


def _run_bench(tmp_path, *args, check: bool = True):
    """The bench (tiny, rows of 256, 2 samples a step) with ``args``, in a single-process
    subprocess; its result and, when it succeeded, the JSON it wrote."""
    out = tmp_path / "tp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(BENCH + [*args, "--json", str(out)], capture_output=True, text=True, env=env, timeout=600,
                       cwd=tmp_path)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, (json.loads(out.read_text()) if r.returncode == 0 else None)


def test_passes_report_the_last_pass_and_keep_the_first(tmp_path):
    r, d = _run_bench(tmp_path, "--warmup", "1", "--steps", "3", "--passes", "2", "--skip-hf")
    assert r.stdout.count("(pass 2/2)") == 2 * 3  # both layouts, every timed step, second pass
    assert d["args"]["passes"] == 2
    by = {x["config"]: x for x in d["results"]}
    assert set(by) == {"ours-bshd", "ours-thd"}
    for rec in by.values():
        assert rec["status"] == "ok"
        assert len(rec["step_ms"]) == 3 and len(rec["step_ms_earlier_passes"]) == 1
        assert len(rec["step_ms_earlier_passes"][0]) == 3
        tokens = rec["real_tokens_per_step"] * 3
        # the reported rate is the last pass's, the first pass's rate is kept apart
        assert abs(rec["tokens_per_s"] - tokens / (sum(rec["step_ms"]) / 1e3)) < 1e-6 * rec["tokens_per_s"]
        first = tokens / (sum(rec["step_ms_earlier_passes"][0]) / 1e3)
        assert abs(rec["tokens_per_s_first_pass"] - first) < 1e-6 * first
        assert len(rec["losses"]) == 3
    assert by["ours-thd"]["padding_share"] == 0.0 and by["ours-bshd"]["padding_share"] > 0.0


def test_thd_row_multiple_pads_only_our_thd_rows(tmp_path):
    """``--thd-row-multiple``: our THD rows are padded (the JSON says by how much, and the padding is
    not counted as tokens), the forward-only check still finds the BSHD loss, the useful tokens
    per step are the same samples' as BSHD's."""
    _, d = _run_bench(tmp_path, "--warmup", "0", "--steps", "2", "--skip-hf", "--thd-row-multiple", "384")
    by = {x["config"]: x for x in d["results"]}
    thd, bshd = by["ours-thd"], by["ours-bshd"]
    assert thd["row_multiple"] == 384 and bshd["row_multiple"] is None
    assert 0.0 < thd["padding_share"] == d["data"]["padding_share_thd_rows"] and d["data"]["padding_share_thd"] == 0.0
    assert thd["real_tokens_per_step"] == bshd["real_tokens_per_step"]
    a, b = thd["forward_only_loss_first_batch"], bshd["forward_only_loss_first_batch"]
    assert abs(a - b) <= 1e-5 * abs(b), (a, b)


def test_ab_configs_train_a_second_model_with_the_extra_flags(tmp_path):
    """``ours-ab-*`` with ``--ab-megatron-args``: a second model of the same seed trained with the
    flags added (here a 1000x learning rate), reported beside ``ours-*`` with their ratio. The same
    initial weights and first batch give the same first loss; the flag shows in every later loss."""
    flags = ["--warmup", "0", "--steps", "3", "--skip-hf", "--lr", "1e-5", "--configs", "ours-thd,ours-ab-thd"]
    _, d = _run_bench(tmp_path, *flags, "--ab-megatron-args=--lr 1e-2")
    by = {x["config"]: x for x in d["results"]}
    base, ab = by["ours-thd"], by["ours-ab-thd"]
    assert base["status"] == ab["status"] == "ok"
    assert abs(base["losses"][0] - ab["losses"][0]) <= 1e-6 * abs(base["losses"][0])
    assert abs(base["losses"][-1] - ab["losses"][-1]) > 1e-3, (base["losses"], ab["losses"])
    assert abs(d["summary"]["ab_over_base_thd"] - ab["tokens_per_s"] / base["tokens_per_s"]) < 1e-9
    # without the flags the ab configs are refused, naming the flag
    bad, _ = _run_bench(tmp_path, *flags, check=False)
    assert bad.returncode != 0
    assert "--configs ours-ab-*: give the flags to compare with --ab-megatron-args" in bad.stderr, bad.stderr[-2000:]


def test_the_lm_head_on_the_loss_rows_trains_as_megatrons_head_on_every_position(tmp_path):
    """The trainer's default LM head (loss rows only, mcore_ext.lm_head_rows) against megatron's on
    every position (``--lm-head-all-positions``), same seed and batches: the same losses over three
    optimizer steps, BSHD and THD -- the two paths are one training run."""
    flags = ["--warmup", "0", "--steps", "3", "--skip-hf", "--configs", "ours-bshd,ours-thd,ours-ab-bshd,ours-ab-thd"]
    r, d = _run_bench(tmp_path, *flags, "--ab-megatron-args=--lm-head-all-positions")
    by = {x["config"]: x for x in d["results"]}
    for layout in ("bshd", "thd"):
        rows, every = by[f"ours-{layout}"]["losses"], by[f"ours-ab-{layout}"]["losses"]
        assert len(rows) == len(every) == 3
        for a, b in zip(rows, every):
            assert abs(a - b) <= 1e-5 * abs(b), (layout, rows, every)
    said = r.stdout + r.stderr
    assert "LM head: on the positions with loss only" in said and "LM head: on every position" not in said


def test_cuda_graph_layers_needs_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("on a GPU the flag is allowed (tests/unit/test_layer_graphs.py covers it)")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench" / "train_throughput.py"), "--variant", "tiny",
           "--skip-hf", "--cuda-graph-layers"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and "--cuda-graph-layers needs a CUDA GPU" in r.stderr


_FREED = """
import gc, sys, weakref
sys.path[:0] = [{root!r}, {root!r} + "/examples", {root!r} + "/scripts/bench"]
import train_throughput as tt
from multimodal_dev import training
refs, build = [], training.build_model_and_optimizer
def spy(margs):
    out = build(margs)
    refs.append(weakref.ref(out[0]))
    return out
training.build_model_and_optimizer = spy
tt.main(["--variant", "tiny", "--seq-length", "256", "--samples-per-step", "2", "--min-tokens", "20",
         "--max-tokens", "200", "--configs", "ours-thd", "--steps", "1", "--warmup", "0", "--no-gemm-check"])
gc.collect()
print("ALIVE" if refs[0]() is not None else "FREED")
"""


def _run_script(script: str, cwd) -> str:
    """``script`` (formatted with the repository root) in a fresh single-process Python; its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", script.format(root=str(ROOT))], capture_output=True, text=True,
                       env=env, timeout=600, cwd=cwd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_a_model_the_bench_frees_is_gone_before_the_next_one_is_built(tmp_path):
    """The benches build several models in one process (ours, ours-te, HF; the student twice in
    distill_throughput.py): a model they drop must really be freed, or the next one's peak memory
    counts it. Found on the H200: 15 GiB stayed allocated after "freed" -- the sorted dispatcher
    kept its last probabilities with their autograd graph, which reaches every parameter's
    AccumulateGrad node and through DDP's hooks the whole model."""
    out = _run_script(_FREED, tmp_path)
    assert out.strip().splitlines()[-1] == "FREED", out[-2000:]


def test_the_bench_pads_thd_rows_as_the_trainer_resolves_its_flags():
    """ours-thd's padding flags are the trainer's (the same defaults and checks, read by the
    trainer's own parser), so a bench figure is one the trainer reproduces with those flags."""
    import argparse

    import pytest

    sys.path[:0] = [str(ROOT / "scripts" / "bench")]
    try:
        import train_throughput as tt
    finally:
        del sys.path[0]

    def args(**kw):
        base = dict(variant="tiny", samples_per_step=2, seq_length=256, lr=1e-5, seed=1, fp32=False, megatron_args="",
                    cuda_graph_layers=False, thd_row_multiple=None, thd_sample_multiple=None)
        return argparse.Namespace(**{**base, **kw})

    a = args()
    tt.resolve_thd_padding(a)
    assert (a.thd_row_multiple, a.thd_sample_multiple) == (1, 1)
    a = args(thd_row_multiple=384, thd_sample_multiple=64)
    tt.resolve_thd_padding(a)
    assert (a.thd_row_multiple, a.thd_sample_multiple) == (384, 64)
    with pytest.raises(SystemExit, match=r"ours-thd: --thd-row-multiple 100 must be a multiple of 64"):
        tt.resolve_thd_padding(args(thd_row_multiple=100, thd_sample_multiple=64))
    with pytest.raises(SystemExit, match=r"ours-thd: --thd-sample-multiple must be >= 1, got 0"):
        tt.resolve_thd_padding(args(thd_sample_multiple=0))


_BUILD_GRAPHED = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/examples", {root!r} + "/scripts/bench"]
import train_throughput as tt
from megatron.mcore_ext import layer_graphs
from multimodal_dev import training
seen = []
# on CPU: the flag check passes (graphs need a GPU) and no model is built; only the arguments matter
layer_graphs.layout_problems = lambda **kw: []
training.build_model_and_optimizer = lambda margs: seen.append(margs) or (None,) * 5
args = tt.build_parser().parse_args(["--variant", "tiny", "--seq-length", "2048", "--samples-per-step", "2",
                                     "--min-tokens", "100", "--max-tokens", "900", "--steps", "2", "--warmup", "0",
                                     "--cuda-graph-layers"])
margs, batches, _ = tt.build_ours(args, "thd")
m = seen[0]
rows = sorted({{int(b["tokens"].shape[-1]) % 1024 for b in batches}})
samples = sorted({{int(x) % 64 for b in batches for x in b["cu_seqlens_padded"].view(-1).diff()}})
print("RESULT", m.model.cuda_graph_layers, m.data.row_multiple, m.data.sample_multiple, rows, samples)
"""


def test_the_profiling_scripts_build_the_graphed_step_the_bench_times():
    """gpu_gaps.py / op_census.py pass the bench's flags to ``build_ours``: with --cuda-graph-layers
    the model they profile must have its layers graphed and its THD rows padded as the bench's
    ours-thd (rows to 1,024, samples to 64: the trainer's defaults with graphs), or the profile is
    of another step than the one timed."""
    line = [ln for ln in _run_script(_BUILD_GRAPHED, ROOT).splitlines() if ln.startswith("RESULT")][-1]
    assert line == "RESULT True 1024 64 [0] [0]", line


def test_the_recorded_tree_names_the_files_run_not_the_commit_checked_out(tmp_path):
    """``_git_tree``: a clean checkout records its commit's tree; changed files (as the GPU machine's
    copy of a newer working tree over an older .git has) record the tree of the commit they would
    make, not HEAD's, and the checkout's own index is left as it was."""
    import subprocess as sp

    sys.path[:0] = [str(ROOT / "scripts" / "bench")]
    try:
        import train_throughput as tt
    finally:
        del sys.path[0]

    def git(*a):
        return sp.run(["git", *a], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@t"); git("config", "user.name", "t")
    (tmp_path / ".gitignore").write_text("big/\n")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "-A"); git("commit", "-qm", "one")
    assert tt._git_tree(tmp_path) == git("rev-parse", "HEAD^{tree}")
    (tmp_path / "a.py").write_text("x = 2\n")
    (tmp_path / "b.py").write_text("y = 1\n")
    (tmp_path / "big").mkdir(); (tmp_path / "big" / "w.whl").write_text("ignored")
    tree = tt._git_tree(tmp_path)
    assert tree != git("rev-parse", "HEAD^{tree}")
    assert git("status", "--porcelain").splitlines() == ["M a.py", "?? b.py"]  # the index untouched
    git("add", "-A"); git("commit", "-qm", "two")
    assert tree == git("rev-parse", "HEAD^{tree}")


def test_hf_amp_rows_are_a_second_hf_model_of_the_same_seed(tmp_path):
    """``hf-amp-*`` beside ``hf-*``: HF built twice from the same seed, once per precision (on a GPU
    bf16 params, and fp32 params + bf16 autocast; on CPU both run fp32, so their losses are equal),
    each row saying its precision, and ours over each HF row in the summary."""
    _, d = _run_bench(tmp_path, "--warmup", "0", "--steps", "2", "--no-gemm-check",
                      "--configs", "ours-thd,hf-bshd,hf-amp-bshd")
    by = {x["config"]: x for x in d["results"]}
    hf, amp = by["hf-bshd"], by["hf-amp-bshd"]
    assert hf["status"] == amp["status"] == "ok"
    assert hf["param_dtype"] == amp["param_dtype"] == d["hf"]["param_dtype"] == d["hf_amp"]["param_dtype"] == "float32"
    assert hf["autocast_bf16"] is False and amp["autocast_bf16"] is False  # no bf16 on CPU
    assert hf["losses"] == amp["losses"]  # the same seed, the same precision here
    ratios = d["summary"]["ours_over_hf_by_config"]
    for name, row in (("hf-bshd", hf), ("hf-amp-bshd", amp)):
        assert abs(ratios[name] - by["ours-thd"]["tokens_per_s"] / row["tokens_per_s"]) < 1e-9
