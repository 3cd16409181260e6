"""What a checkpoint must pass before anything of it is loaded: its manifest, and no code in it.

* **Integrity.** Every save writes ``MANIFEST.json`` inside the atomic rename (``checkpointing``):
  the size and sha256 of every file of the checkpoint, each rank hashing the files it wrote. At
  load every file is checked against it (the ranks share the work); a missing, truncated or changed
  file is refused by name, and the error names the older complete checkpoints there are. Nothing
  falls back silently.
* **No code.** torch's distributed checkpoint reads ``.metadata`` with ``pickle.load`` and the
  checkpoint's objects (megatron's ``ShardedObject``: RNG states, data positions) with
  ``torch.load(weights_only=False)``: a crafted file would run code on every rank that loads it.
  Before those readers see the directory, ``.metadata`` is unpickled here with an unpickler that
  admits only the classes that metadata is made of (torch's checkpoint metadata dataclasses,
  ``torch.Size``, dtypes, layouts), and every stored object is loaded with
  ``torch.load(weights_only=True)``; anything else is refused, naming the file or object. (The
  common state is read by megatron-core with ``weights_only=True`` already.) Our saves store only
  plain Python values and tensors in those objects (``checkpointing._rng_state``).

Guaranteed: a checkpoint that passes both checks was written by a save of this trainer, unchanged
since, or at least holds nothing but data. Not guaranteed: that a checkpoint someone else made
with different weights is "good" -- only that loading it runs no code of theirs.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["MANIFEST", "write_manifest", "verify_manifest", "verify_no_code", "UnsafeCheckpointError",
           "DamagedCheckpointError"]

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_NOT_HASHED = {MANIFEST, "COMPLETE"}
_CHUNK = 8 << 20


class DamagedCheckpointError(ValueError):
    pass


class UnsafeCheckpointError(ValueError):
    pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n not in _NOT_HASHED and os.path.isfile(os.path.join(directory, n)))


def _mine(name: str, rank: int) -> bool:
    """The files rank ``rank`` hashes: its own shards (``__<rank>_*``); rank 0 also the rest."""
    if name.startswith("__"):
        return name.split("_")[2] == str(rank)
    return rank == 0


def write_manifest(directory: str) -> None:
    """Collective: every rank hashes its files, rank 0 writes ``MANIFEST.json``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    entries = {n: {"bytes": os.path.getsize(os.path.join(directory, n)), "sha256": _sha256(os.path.join(directory, n))}
               for n in _files(directory) if _mine(n, rank)}
    parts = [entries]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, entries)
    if rank == 0:
        merged = {k: v for p in parts for k, v in p.items()}
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump({"version": 1, "files": merged}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())


def verify_manifest(directory: str) -> Optional[str]:
    """Collective. None when every file matches; else what is wrong (the same text on every rank).
    A checkpoint without a manifest (written before manifests existed) passes with a warning."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        log.warning("%s has no %s (written before manifests): its files cannot be checked", directory, MANIFEST)
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    problems = []
    for i, (name, want) in enumerate(sorted(files.items())):
        if i % world != rank:
            continue
        p = os.path.join(directory, name)
        if not os.path.exists(p):
            problems.append(f"{name} is missing")
        elif os.path.getsize(p) != want["bytes"]:
            problems.append(f"{name} has {os.path.getsize(p)} bytes, the manifest says {want['bytes']}")
        elif _sha256(p) != want["sha256"]:
            problems.append(f"{name} does not match its sha256 in the manifest (changed or corrupted)")
    extra = sorted(set(_files(directory)) - set(files)) if rank == 0 else []
    problems += [f"{name} is not in the manifest" for name in extra]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = [p for g in gathered for p in g]
    return "; ".join(sorted(problems)) or None


# ------------------------------------------------------------------------------------------------
# no code
def _allowed(module: str, name: str) -> bool:
    if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
        return True
    if module == "torch.serialization" and name == "_get_layout":
        return True
    if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner"):
        return not name.startswith("__")
    if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
        return True
    return module == "collections" and name == "OrderedDict"


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if not _allowed(module, name):
            raise UnsafeCheckpointError(f"{module}.{name}")
        return super().find_class(module, name)


def verify_no_code(directory: str) -> Optional[str]:
    """None when ``.metadata`` and every stored object hold data only; else what was refused."""
    path = os.path.join(directory, ".metadata")
    if not os.path.exists(path):
        return None  # not a torch_dist checkpoint: megatron's own loader will say what it is
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except UnsafeCheckpointError as e:
        return f".metadata names {e}, which checkpoint metadata never contains (refusing to unpickle it)"
    except Exception as e:  # noqa: BLE001 - a damaged file
        return f".metadata cannot be read ({type(e).__name__}: {e})"
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_items = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        if index.fqn not in byte_items:
            continue
        try:
            with open(os.path.join(directory, info.relative_path), "rb") as f:
                f.seek(info.offset)
                blob = f.read(info.length)
            torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError for a forbidden global
            return (f"the stored object {index.fqn!r} ({info.relative_path}) is not plain data "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    return None
