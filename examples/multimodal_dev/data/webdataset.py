"""The ``webdataset`` provider: tar shards of image + JSON conversation samples.

Shards are files, directories of ``*.tar``, or globs. A sample is the files sharing a key:
``<key>.json`` (``{"conversation": [...]}``, see ``sample.build_sample``) and ``<key>.png``/``.jpg``
(or ``<key>.0.png``, ``<key>.1.png``, ... for several images). Every epoch the shard order is
shuffled with ``(seed, epoch)`` and the shards dealt round-robin to the ranks (with fewer shards
than ranks, every rank reads every shard and keeps the samples whose epoch index is its rank
modulo the DP size); the samples of a shard are shuffled with ``(seed, epoch, shard)``. The
position is (epoch, shard, sample), so resuming reads only tar headers up to it and decodes no
image. Unreadable shards and bad samples (undecodable image, bad JSON, missing part, image-marker
count mismatch, too long) are skipped, counted and logged with the shard and key.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Optional

import numpy as np

from multimodal_dev.data.image import ImageDecodeError, decode_image
from multimodal_dev.data.providers import DataConfig, DatasetProvider, SampleIterator, register_provider
from multimodal_dev.data.sample import SampleError, build_sample

__all__ = ["WebDatasetProvider", "expand_data_paths", "IMAGE_EXTS"]

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")


def expand_data_paths(paths: list[str]) -> list[str]:
    """Shard files from files, directories (their ``*.tar``, sorted) and globs; order kept, no
    duplicates. A path that names nothing is a ``FileNotFoundError`` naming it."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("the webdataset provider needs at least one --data-path (shard file, directory or glob)")
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(glob.glob(os.path.join(p, "*.tar")))
            if not found:
                raise FileNotFoundError(f"--data-path {p!r} is a directory without *.tar shards")
        elif os.path.isfile(p):
            found = [p]
        else:
            found = sorted(f for f in glob.glob(p) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"--data-path {p!r} does not exist (no file, directory or glob match)")
        out += [f for f in found if f not in out]
    return out


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the base name, ext = the rest."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


def _scan_tar(path: str) -> tuple[Optional[tarfile.TarFile], list[tuple[str, dict[str, tarfile.TarInfo]]], Optional[str]]:
    """Open a shard and group its members by key, reading headers only.

    Returns (tar, groups, error): on a corrupt shard ``error`` says why and ``groups`` holds the
    samples whose members were complete before the damage (a truncated shard keeps its prefix).
    """
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError, EOFError) as e:
        return None, [], f"cannot open as a tar file: {type(e).__name__}: {e}"
    error = None
    members = []
    try:
        for m in tar:
            members.append(m)
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"corrupt after {len(members)} members: {type(e).__name__}: {e}"
    size = os.path.getsize(path)
    if error is None:
        # tarfile stops silently at a header cut short; a whole archive ends with a zero block
        with open(path, "rb") as f:
            f.seek(tar.offset)
            block = f.read(512)
        if len(block) < 512 or block.strip(b"\0"):
            error = f"truncated: no end-of-archive marker after {len(members)} members"
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    for m in members:
        if not m.isfile():
            continue
        if m.offset_data + m.size > size:
            error = error or f"truncated: member {m.name} ends past the end of the file"
            continue
        key, ext = _split_name(m.name)
        groups.setdefault(key, {})[ext] = m
    return tar, list(groups.items()), error


def _image_order(ext: str) -> tuple[int, str]:
    head = ext.rsplit(".", 1)[0]
    return (int(head), ext) if head.isdigit() else (-1, ext)


class _WebDatasetIterator(SampleIterator):
    def _initial_pos(self) -> dict:
        # epoch; index into this rank's shard list of the epoch; index into the shard's (shuffled)
        # samples; epoch-wide index of the shard's first sample (sample-split mode); yielded this epoch
        return {"epoch": 0, "shard": 0, "sample": 0, "first_index": 0, "yielded": 0}

    def _check_position(self, pos):
        for k in self._initial_pos():
            if not isinstance(pos.get(k), int) or pos[k] < 0:
                raise ValueError(f"bad webdataset iterator position {dict(pos)!r} (field {k})")

    def _state_extra(self):
        return {"num_shards": len(self.provider.shards)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self._state_extra()}

    def load_state_dict(self, state):
        n = state.get("num_shards")
        if n != len(self.provider.shards):
            raise ValueError(
                f"cannot resume the webdataset iterator: it was saved with {n} shards, --data-path now gives "
                f"{len(self.provider.shards)}"
            )
        super().load_state_dict(state)

    def _plan(self, epoch: int) -> tuple[list[int], bool]:
        """This rank's shard indices for ``epoch`` and whether samples (not shards) are split."""
        n = len(self.provider.shards)
        seed = self.provider.config.seed
        order = np.random.default_rng([seed, epoch]).permutation(n) if self.provider.config.shuffle else np.arange(n)
        if n >= self.dp_size:
            return [int(i) for i in order[self.dp_rank :: self.dp_size]], False
        return [int(i) for i in order], True

    def _generate(self):
        p = self._pos
        cfg = self.provider.config
        while True:
            plan, split = self._plan(p["epoch"])
            self.stats["epoch"] = p["epoch"]
            while p["shard"] < len(plan):
                si = plan[p["shard"]]
                path = self.provider.shards[si]
                tar, groups, error = _scan_tar(path)
                if error is not None and p["sample"] == 0:  # counted once per visit, not on resume
                    self._count_bad("shard", path, None, error)
                try:
                    perm = (np.random.default_rng([cfg.seed, p["epoch"], si]).permutation(len(groups))
                            if cfg.shuffle else np.arange(len(groups)))
                    while p["sample"] < len(groups):
                        j = p["sample"]
                        p["sample"] += 1
                        if split and (p["first_index"] + j) % self.dp_size != self.dp_rank:
                            continue
                        key, parts = groups[int(perm[j])]
                        sample = self._decode(tar, path, key, parts)
                        if sample is None:
                            continue
                        sample["__epoch__"] = p["epoch"]
                        p["yielded"] += 1
                        self.stats["samples_read"] += 1
                        yield sample
                finally:
                    if tar is not None:
                        tar.close()
                p["first_index"] += len(groups)
                p["shard"] += 1
                p["sample"] = 0
            if p["yielded"] == 0:
                raise RuntimeError(
                    f"data-parallel rank {self.dp_rank} of {self.dp_size} got no usable sample in epoch "
                    f"{p['epoch']} from {len(plan)} of {len(self.provider.shards)} shards "
                    f"(skipped: {self.stats['skipped_samples']} samples, {self.stats['skipped_shards']} shards)"
                )
            p.update(epoch=p["epoch"] + 1, shard=0, sample=0, first_index=0, yielded=0)

    def _decode(self, tar: tarfile.TarFile, path: str, key: str, parts: dict[str, tarfile.TarInfo]) -> Optional[dict]:
        try:
            if "json" not in parts:
                raise SampleError(f"has no .json part (parts: {sorted(parts)})")
            img_exts = sorted((e for e in parts if e.rsplit(".", 1)[-1] in IMAGE_EXTS), key=_image_order)

            def read(ext: str) -> bytes:
                try:
                    return tar.extractfile(parts[ext]).read()
                except (tarfile.TarError, OSError, EOFError) as e:
                    raise SampleError(f"cannot read {key}.{ext}: {type(e).__name__}: {e}") from e

            try:
                meta = json.loads(read("json"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SampleError(f"bad JSON in {key}.json: {e}") from e
            conv = meta.get("conversation") if isinstance(meta, dict) else None
            if conv is None:
                raise SampleError(f"{key}.json has no 'conversation' list")
            images = [decode_image(read(e), f"{path}:{key}.{e}") for e in img_exts]
            sample = build_sample(conv, images, self.provider.tokenizer,
                                  image_processor_kwargs=self.provider.image_kwargs, key=key,
                                  answer_only_loss=self.provider.config.answer_only_loss)
            n = sample["tokens"].numel()
            if self.max_tokens is not None and n > self.max_tokens:
                raise SampleError(
                    f"has {n} tokens, more than {self.max_tokens} (--max-sample-tokens, or the collate's "
                    "target_seqlen without truncation)"
                )
        except (SampleError, ImageDecodeError) as e:
            self._count_bad("sample", path, key, str(e))
            return None
        sample["__key__"] = key
        sample["__shard__"] = path
        return sample


@register_provider("webdataset")
class WebDatasetProvider(DatasetProvider):
    """Tar shards in the WebDataset layout; see the module docstring."""

    name = "webdataset"
    iterator_class = _WebDatasetIterator

    def __init__(self, config: DataConfig):
        super().__init__(config)
        self.shards = expand_data_paths(config.data_path)
