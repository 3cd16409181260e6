"""HF checkpoint <-> our ``dist_checkpointing`` checkpoints (``scripts/convert_hf.py``).

* ``import_hf(cfg)``: under the run's layout (``cfg``: the trainer's flags with ``--hf-checkpoint``
  and ``--save``; one process or torchrun), every rank reads its slices of the HF shards
  (``--hf-checkpoint``'s loader) and the model is saved as a weights-only checkpoint: the
  ``iter_0000000`` of ``--save``, with the HF ``config.json`` kept in its common state. ``--load``
  reshards it into any layout and starts at iteration 0 (``checkpointing.load_weights``).
* ``export_hf(load, out)``: one process reads the newest checkpoint under ``load`` (a converted
  one or any training checkpoint: only the model is read), converts the whole model to HF's
  layout (the architecture's ``HFSupport.state_to_hf``) and writes ``out``: safetensors shards of
  at most ``max_shard_bytes`` with ``model.safetensors.index.json``, ``config.json`` (the one
  the run started from, or the named variant's) and the tokenizer files of ``tokenizer_from``
  (default: the run's ``--hf-checkpoint`` directory, when it still exists). ``out`` is written
  as ``out.partial`` and renamed when complete. Memory: the whole model once, in the
  checkpoint's precision (35B-A3B: ~70 GB of host memory in bf16).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Optional

import torch

__all__ = ["import_hf", "export_hf", "TOKENIZER_FILES"]

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "generation_config.json", "vocab.json", "merges.txt")


def import_hf(cfg) -> str:
    """Save ``cfg.model.hf_checkpoint``'s weights under ``cfg.checkpoint.save`` (collective)."""
    from multimodal_dev import checkpointing, training
    from multimodal_dev.models import build_model_from_hf

    training.initialize(cfg)
    model = build_model_from_hf(cfg.model.hf_checkpoint, cfg.build_options(), arch=cfg.model.arch,
                                variant=cfg.model.variant)
    return checkpointing.save_checkpoint(cfg.checkpoint.save, 0, model, None, None, cfg.to_dict(), None)


def _shards(state: dict, max_bytes: int) -> list[dict]:
    out, cur, size = [], {}, 0
    for k in sorted(state):
        n = state[k].numel() * state[k].element_size()
        if cur and size + n > max_bytes:
            out.append(cur)
            cur, size = {}, 0
        cur[k] = state[k]
        size += n
    return out + ([cur] if cur else [])


def _write_safetensors(state: dict, directory: str, max_bytes: int) -> None:
    from safetensors.torch import save_file

    shards = _shards(state, max_bytes)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, os.path.join(directory, name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in shard})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)


def export_hf(load: str, out: str, *, tokenizer_from: Optional[str] = None, max_shard_bytes: int = 5 << 30,
              dtype: Optional[torch.dtype] = None) -> str:
    """Write the model of the newest checkpoint under ``load`` as an HF checkpoint ``out`` (one
    process). ``dtype``: the tensors' type in the output (default: the checkpoint's)."""
    from multimodal_dev import checkpointing, training
    from multimodal_dev.arguments import parse_args
    from multimodal_dev.models import build_model_from_hf, get_architecture
    from multimodal_dev.models.contract import SetupError

    if os.path.exists(out):
        raise SetupError(f"--out {out} exists: choose a new directory (an export never overwrites)")
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    # the checkpoint's settings decide the model; its config.json is written first and read back
    probe = checkpointing.open_checkpoint(load, schedule={}, scheduler_policy="checkpoint")
    if probe is None:
        raise SetupError(f"--load {load}: no complete checkpoint there")
    args = probe.common.get("args") or {}
    model_args = args.get("model") or {}
    support = get_architecture(model_args.get("arch", "qwen35_vl")).hf
    if support is None:
        raise SetupError(f"architecture {model_args.get('arch')!r} has no HF export")
    config = probe.common.get("hf_config") or support.config_for_variant(model_args["variant"])
    with open(os.path.join(partial, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    cfg = parse_args(["--hf-checkpoint", partial, "--model-arch", model_args.get("arch", "qwen35_vl")], world_size=1)
    training.initialize(cfg)
    model = build_model_from_hf(partial, cfg.build_options(), arch=cfg.model.arch, load_weights=False)
    checkpointing.load_weights(probe, model)
    state = support.state_to_hf(model, config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    _write_safetensors(state, partial, max_shard_bytes)
    source = tokenizer_from or model_args.get("hf_checkpoint")
    copied = []
    if source and os.path.isdir(source):
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(partial, name))
                copied.append(name)
    os.rename(partial, out)
    log.info("exported %s (iteration %d) to %s: %d tensors; tokenizer files %s", probe.path, probe.iteration, out,
             len(state), copied or "none (give --tokenizer-from DIR)")
    return out
