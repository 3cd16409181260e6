"""Starting from a published-style HF checkpoint (``--hf-checkpoint``), in any parallel layout.

A random-weight ``tiny-hybrid`` HF ``Qwen3_5MoeForConditionalGeneration`` (Gated DeltaNet + full
attention, MoE, vision tower; every weight perturbed) is saved with ``save_pretrained`` in many
shards (transformers writes the published per-expert layout). Checked:

(a) each rank's parameters, read slice by slice from the shards, equal that rank's slices of the
    whole-state-dict conversion (``convert.hf_to_mcore``, itself checked against HF's logits in
    test_qwen35_hybrid) at 1 process, TP=2, EP=2 and PP=2; and an EP=2 / PP=2 rank reads a part of
    the checkpoint only, never holding more than one tensor's slice beyond the model;
(b) the trainer started with ``--hf-checkpoint`` gives, at its first iteration, HF's own loss on
    the same samples (fp32, rtol 1e-5) at 1 process, TP=2+SP, EP=2 and PP=2;
(c) ``--variant`` that disagrees with config.json, and a directory that is not an HF checkpoint,
    are refused naming the flag.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.mcore_ext.testing import run_distributed

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "examples" / "multimodal_dev" / "pretrain_multimodal.py"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from test_qwen35_hybrid import hf_config, perturbed_hf

    d = tmp_path_factory.mktemp("hf")
    model = perturbed_hf(hf_config())
    model.save_pretrained(str(d), max_shard_size="200KB")
    assert len(list(d.glob("*.safetensors"))) > 4 and (d / "model.safetensors.index.json").exists()
    return d


def _hf_state(directory) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


# ----------------------------------------------------------------------------- (a) the slices
def _reference_globals(directory):
    from megatron.mcore_ext.sharding import global_tensors
    from multimodal_dev.models import build_model
    from multimodal_dev.models.qwen35_vl.convert import hf_to_mcore

    model = build_model("qwen35_vl", "tiny-hybrid")
    model.load_state_dict(hf_to_mcore(_hf_state(directory)), strict=True)
    return global_tensors(model)


def _load_and_compare(directory, full):
    from megatron.core import parallel_state as ps
    from megatron.mcore_ext.sharding import local_slices
    from multimodal_dev.hf_checkpoint import SafetensorsReader, load_sharded, read_hf_config
    from multimodal_dev.models.contract import BuildOptions
    from multimodal_dev.models.qwen35_vl.hf_weights import Qwen35HFWeights, configs_from_hf_dict
    from multimodal_dev.models.qwen35_vl.model import build_from_configs

    text, vision, tokens = configs_from_hf_dict(read_hf_config(directory))
    model = build_from_configs(text, vision, tokens,
                               BuildOptions(sequence_parallel=ps.get_tensor_model_parallel_world_size() > 1))
    reader = SafetensorsReader(directory)
    report = load_sharded(model, Qwen35HFWeights(reader, text).resolve, reader)
    want = local_slices(model, full)
    wrong = [n for n, p in model.named_parameters() if not torch.equal(p.data, want[n].to(p.dtype))]
    largest = max(t.numel() * t.element_size() for t in full.values())
    return {"wrong": wrong, "params": len(dict(model.named_parameters())), "filled": report.parameters,
            "read": report.bytes_read, "total": report.checkpoint_bytes, "peak": report.peak_transient_bytes,
            "largest": largest}


@pytest.fixture(scope="module")
def reference(hf_dir):
    return run_distributed(_reference_globals, 1, args=(str(hf_dir),))[0]


@pytest.mark.parametrize("layout", [dict(), dict(tp=2), dict(ep=2), dict(pp=2)], ids=["1", "tp2", "ep2", "pp2"])
def test_each_rank_reads_exactly_its_slices(hf_dir, reference, layout):
    world = 2 if layout else 1
    results = run_distributed(_load_and_compare, world, args=(str(hf_dir), reference), **layout)
    for r in results:
        assert r["wrong"] == [] and r["filled"] == r["params"], r["wrong"][:5]
        assert r["peak"] <= r["largest"]  # one global tensor's worth at most beyond the model
    if "ep" in layout or "pp" in layout:  # the experts / the layers of the other rank are never read
        for r in results:
            assert r["read"] < 0.8 * r["total"], (r["read"], r["total"])
    print({k: [r[k] for r in results] for k in ("read", "total", "peak")})


# ------------------------------------------------------------------------ (b) the trainer
COMMON = ["--dataset-provider", "mock", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--seq-length", "256", "--train-iters", "1", "--lr-warmup-iters", "0", "--lr", "1e-4",
          "--no-progress-bar", "--seed", "5"]


def _launch(script, args, nproc=1):
    """``script`` with ``args`` in a fresh process (``torchrun`` for ``nproc`` > 1)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, str(script), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=ROOT)


def _run(args, nproc=1):
    return _launch(ENTRY, args, nproc)


def _hf_loss_on_first_iteration(hf_dir) -> tuple[float, int]:
    """HF's mean next-token loss over the samples the first iteration trains on (the mock
    provider's first global-batch samples, in order), each sample alone."""
    from transformers import Qwen3_5MoeForConditionalGeneration

    from multimodal_dev.data.providers import DataConfig, build_provider
    from multimodal_dev.hf_checkpoint import read_hf_config
    from multimodal_dev.models.qwen35_vl.configuration import data_spec
    from multimodal_dev.models.qwen35_vl.hf_weights import configs_from_hf_dict

    text, vision, tokens = configs_from_hf_dict(read_hf_config(str(hf_dir)))
    provider = build_provider(DataConfig.from_data_spec(data_spec(text, vision, tokens), provider="mock", seed=5))
    it = provider.samples(0, 1, max_tokens=256)
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(4):
            s = next(it)
            ids = torch.as_tensor(s["tokens"])[None]
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=s["pixel_values"],
                        image_grid_thw=s["image_grid_thw"], mm_token_type_ids=(ids == tokens["image_token_id"]).int())
            labels = torch.as_tensor(s["labels"])
            keep = labels != -100
            ce = torch.nn.functional.cross_entropy(out.logits[0].double()[keep], labels[keep], reduction="sum")
            total += float(ce)
            count += int(keep.sum())
    return total / count, count


@pytest.fixture(scope="module")
def hf_first_loss(hf_dir):
    return _hf_loss_on_first_iteration(hf_dir)


@pytest.mark.parametrize("nproc, flags", [
    (1, []),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (2, ["--expert-model-parallel-size", "2"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
], ids=["1", "tp2_sp", "ep2", "pp2"])
def test_the_first_iteration_loss_is_hfs_in_every_layout(tmp_path, hf_dir, hf_first_loss, nproc, flags):
    r = _run(COMMON + flags + ["--hf-checkpoint", str(hf_dir), "--metrics-file", str(tmp_path / "m.jsonl")], nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    want, count = hf_first_loss
    assert rec["loss_tokens"] == count  # the same samples
    assert rec["lm_loss"] == pytest.approx(want, rel=1e-5), (rec["lm_loss"], want)
    assert "--hf-checkpoint" in r.stderr and "parameters filled from" in r.stderr


# ------------------------------------------------------------------------------ (c) refusals
def test_a_variant_that_disagrees_with_config_json_is_refused(tmp_path, hf_dir):
    r = _run(COMMON + ["--hf-checkpoint", str(hf_dir), "--variant", "tiny"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "--variant tiny disagrees with --hf-checkpoint" in r.stderr and "linear_attention" in r.stderr
    ok = _run(COMMON + ["--hf-checkpoint", str(hf_dir), "--variant", "tiny-hybrid", "--train-iters", "1"])
    assert ok.returncode == 0, ok.stderr[-3000:]


def test_a_directory_without_config_json_is_refused(tmp_path):
    r = _run(COMMON + ["--hf-checkpoint", str(tmp_path)])
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"--hf-checkpoint {tmp_path}: no config.json there" in r.stderr


# ----------------------------------------------------------------------- import / export
CONVERT = ROOT / "scripts" / "convert_hf.py"


def _convert(args, nproc=1):
    return _launch(CONVERT, args, nproc)


def test_import_then_load_in_another_layout_gives_hfs_loss(tmp_path, hf_dir, hf_first_loss):
    r = _convert(["import", "--hf-checkpoint", str(hf_dir), "--save", str(tmp_path / "ck"),
                  "--expert-model-parallel-size", "2"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ck" / "iter_0000000" / "COMPLETE").exists()
    r = _run(COMMON + ["--hf-checkpoint", str(hf_dir), "--load", str(tmp_path / "ck"),
                       "--tensor-model-parallel-size", "2", "--sequence-parallel",
                       "--metrics-file", str(tmp_path / "m.jsonl")], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "a converted checkpoint" in r.stderr and "parameters filled from" not in r.stderr  # weights: --load's
    rec = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    assert rec["lm_loss"] == pytest.approx(hf_first_loss[0], rel=1e-5)


def test_export_loads_in_hf_with_the_same_logits_and_the_round_trip_is_exact(tmp_path, hf_dir):
    from transformers import Qwen3_5MoeForConditionalGeneration

    r = _run(COMMON + ["--hf-checkpoint", str(hf_dir), "--train-iters", "1", "--lr", "0", "--min-lr", "0",
                       "--save", str(tmp_path / "ck")])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _convert(["export", "--load", str(tmp_path / "ck"), "--out", str(tmp_path / "out"), "--max-shard-size", "300KB"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    assert len(list(out.glob("*.safetensors"))) > 2
    assert (out / "generation_config.json").exists()  # the run's --hf-checkpoint files beside the weights
    assert not (tmp_path / "out.partial").exists()

    original = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    exported = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    a, b = original.state_dict(), exported.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    ids = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        assert torch.equal(original(input_ids=ids).logits, exported(input_ids=ids).logits)
    # and back: importing the export gives the same checkpoint weights as importing the original
    r = _convert(["import", "--hf-checkpoint", str(out), "--save", str(tmp_path / "ck2")])
    assert r.returncode == 0, r.stderr[-3000:]
    r2 = _convert(["export", "--load", str(tmp_path / "ck2"), "--out", str(tmp_path / "out2")])
    assert r2.returncode == 0, r2.stderr[-3000:]
    c = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(tmp_path / "out2"), torch_dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_export_of_a_named_variant_writes_a_config_hf_reads(tmp_path):
    from transformers import Qwen3_5MoeForConditionalGeneration

    r = _run(COMMON + ["--variant", "tiny-hybrid", "--save", str(tmp_path / "ck")])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _convert(["export", "--load", str(tmp_path / "ck"), "--out", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr[-3000:]
    model = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(tmp_path / "out"), torch_dtype=torch.float32)
    assert model.config.text_config.layer_types.count("linear_attention") == 3
