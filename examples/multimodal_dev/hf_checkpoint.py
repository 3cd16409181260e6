"""Reading a published HF checkpoint into a sharded model, each rank reading only its slices.

An HF checkpoint directory holds ``config.json``, ``model.safetensors`` or shards named by
``model.safetensors.index.json``, and tokenizer files. ``SafetensorsReader`` reads a tensor, or
a slice of one (``reader.read(name, index)``: safetensors reads only the requested bytes), and
counts what it read. ``load_sharded(model, resolve)`` fills every local parameter of a built
(TP/EP/PP-sharded) model: megatron's sharded state dict says, per local parameter, which global
tensor it is part of and where (``mcore_ext.sharding.parameter_placements``); the architecture's
``resolve(global_key, index, global_shape)`` returns exactly that part, read from the reader.

So no rank materialises the model: a pipeline stage reads only its layers, an expert-parallel
rank only its experts, a tensor-parallel rank only its rows or columns of the embedding, the LM
head and the row-parallel projections (the architecture's rules say which smaller tensors are
read whole and cut). ``LoadReport`` says what each rank read and the most it held at once.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from typing import Any, Optional

import torch

from multimodal_dev.models.contract import SetupError

__all__ = ["SafetensorsReader", "read_hf_config", "load_sharded", "LoadReport", "HFCheckpointError"]

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"


class HFCheckpointError(SetupError):
    """A checkpoint directory that cannot be read as asked (the message names the file or tensor)."""


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise HFCheckpointError(f"--hf-checkpoint {directory}: no {CONFIG} there (an HF checkpoint directory "
                                "holds config.json and model*.safetensors)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise HFCheckpointError(f"--hf-checkpoint {directory}: {CONFIG} is not JSON ({e})") from e


class SafetensorsReader:
    """Tensors of an HF checkpoint directory by name, read whole or in slices, never all at once."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.files = dict(json.load(f)["weight_map"])
        else:
            shards = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
            if not shards:
                raise HFCheckpointError(f"--hf-checkpoint {directory}: no {INDEX} and no *.safetensors file")
            self.files = {}
            for n in shards:
                with safe_open(os.path.join(directory, n), framework="pt") as f:
                    self.files.update({k: n for k in f.keys()})
        missing = sorted({n for n in self.files.values() if not os.path.isfile(os.path.join(directory, n))})
        if missing:
            raise HFCheckpointError(f"--hf-checkpoint {directory}: {INDEX} names shards that are missing: {missing}")
        self._open: dict[str, Any] = {}
        self.bytes_read = 0
        self.tensors_read = 0

    def keys(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _slice(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            raise HFCheckpointError(f"--hf-checkpoint {self.directory}: no tensor {name!r}")
        fname = self.files[name]
        if fname not in self._open:
            self._open[fname] = safe_open(os.path.join(self.directory, fname), framework="pt")
        return self._open[fname].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: Optional[tuple] = None) -> torch.Tensor:
        """``name`` whole, or ``name[index]`` (ints and slices) read without the rest."""
        s = self._slice(name)
        t = s[index] if index is not None else s[:]
        self.bytes_read += t.numel() * t.element_size()
        self.tensors_read += 1
        return t

    def close(self) -> None:
        self._open.clear()


@dataclasses.dataclass
class LoadReport:
    parameters: int  # local parameters filled
    bytes_read: int  # bytes read from the shards by this rank
    checkpoint_bytes: int  # bytes of every tensor in the checkpoint
    peak_transient_bytes: int  # the most read-and-not-yet-copied bytes held at once

    def describe(self) -> str:
        gib = 2.0 ** 30
        return (f"{self.parameters} parameters filled from {self.bytes_read / gib:.3f} GiB read of "
                f"{self.checkpoint_bytes / gib:.3f} GiB; at most {self.peak_transient_bytes / 2**20:.1f} MiB "
                "held at once beyond the model")


def load_sharded(model, resolve: Callable[[str, tuple, tuple], torch.Tensor], reader: SafetensorsReader,
                 skip: Callable[[str], bool] = lambda key: False) -> LoadReport:
    """Fill every local parameter of ``model`` from ``resolve`` (one placement at a time).

    ``resolve(global_key, index, global_shape)`` returns the part ``index`` (ints for megatron's
    prepended axes such as the expert, then slices) of the global tensor ``global_key``.
    ``skip(global_key)``: parameters left as built (e.g. none; for tests). Every parameter must be
    covered by a placement, and every placement's shape must match, or ``HFCheckpointError``.
    """
    from megatron.mcore_ext.sharding import parameter_placements

    params = dict(model.named_parameters())
    placements = parameter_placements(model)
    uncovered = sorted(set(params) - set(placements))
    if uncovered:
        raise HFCheckpointError(f"parameters without a place in megatron's sharded state dict: {uncovered[:10]}")
    total = 0
    for name in reader.keys():
        shape = reader.shape(name)
        n = 1
        for d in shape:
            n *= d
        total += n * _bytes_per_element(reader, name)
    peak, filled = 0, 0
    with torch.no_grad():
        for name, parts in placements.items():
            if name not in params:
                continue  # a buffer (e.g. the routers' expert bias): not in an HF checkpoint
            p = params[name]
            for key, index, shape, local_index in parts:
                if skip(key):
                    continue
                before = reader.bytes_read
                part = resolve(key, index, shape)
                target = p.data[local_index]
                if tuple(part.shape) != tuple(target.shape):
                    raise HFCheckpointError(f"{key}{_show(index)}: the checkpoint gives shape {tuple(part.shape)}, "
                                            f"the model's part has {tuple(target.shape)}")
                target.copy_(part)
                peak = max(peak, reader.bytes_read - before, part.numel() * part.element_size())
            filled += 1
    return LoadReport(filled, reader.bytes_read, total, peak)


def _bytes_per_element(reader: SafetensorsReader, name: str) -> int:
    dtype = reader._slice(name).get_dtype()
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
            "I8": 1, "U8": 1, "BOOL": 1}.get(dtype, 4)


def _show(index: tuple) -> str:
    parts = [str(i) if isinstance(i, int) else f"{i.start}:{i.stop}" for i in index]
    return "[" + ", ".join(parts) + "]"
