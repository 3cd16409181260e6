"""Dataset providers: endless, deterministic, resumable streams of samples and collated batches.

A provider is registered by name (``register_provider``) and built from a ``DataConfig``::

    provider = build_provider(DataConfig(provider="webdataset", data_path=["/data/shapes"], ...))
    batches = provider.batches(dp_rank, dp_size, micro_batch_size, collate_config)
    batch = next(batches)                 # pack_or_pad_batch of micro_batch_size samples
    state = batches.state_dict()          # save with the checkpoint
    batches = provider.batches(dp_rank, dp_size, micro_batch_size, collate_config, state=state)

A sample is ``build_sample``'s dict (``tokens``, ``labels``, ``pixel_values``, ``image_grid_thw``,
``__key__``) plus ``__epoch__`` (and ``__shard__`` for webdataset). Both ``samples(dp_rank,
dp_size)`` and ``batches(...)`` return iterators with ``state_dict()``, ``load_state_dict()`` and
``stats``; a resumed iterator yields exactly what the uninterrupted one
would have. Each data-parallel rank reads a disjoint part of the data.

* ``mock``: synthetic conversations of random words (about ``mock_min_tokens`` to
  ``mock_max_tokens`` tokens) of which about ``mock_image_prob`` have one or two random-pixel
  images. Sample ``i`` is a function of ``(seed, i)`` only; rank ``r`` of ``n`` takes ``r, r+n,
  ...``, so skipping ahead costs nothing.
* ``webdataset``: tar shards (files, directories of ``*.tar``, or globs). A sample is the files
  sharing a key: ``<key>.json`` (``{"conversation": [...]}``, see ``sample.build_sample``) and
  ``<key>.png``/``.jpg`` (or ``<key>.0.png``, ``<key>.1.png``, ... for several images). Every
  epoch the shard order is shuffled with ``(seed, epoch)`` and the shards dealt round-robin to the
  ranks (with fewer shards than ranks, every rank reads every shard and keeps the samples whose
  epoch index is its rank modulo the DP size); the samples of a shard are shuffled with ``(seed,
  epoch, shard)``. The position is (epoch, shard, sample), so resuming reads only tar headers up to
  it and decodes no image. Unreadable shards and bad samples (undecodable image, bad JSON, missing
  part, image-marker count mismatch, too long) are skipped, counted and logged with the shard and
  key; once more distinct ones than ``max_bad_samples`` (``--max-bad-samples``) were met, a
  ``RuntimeError`` stops the run.
"""
from __future__ import annotations

import copy
import glob
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
from PIL import Image

from multimodal_dev.data.collate import CollateConfig, pack_or_pad_batch
from multimodal_dev.data.image import ImageDecodeError, decode_image, smart_resize
from multimodal_dev.data.sample import SampleError, build_sample
from multimodal_dev.data.tokenizer import TextTokenizer

__all__ = [
    "DataConfig",
    "DatasetProvider",
    "SampleIterator",
    "BatchIterator",
    "register_provider",
    "get_provider",
    "available_providers",
    "build_provider",
    "MOCK_WORDS",
]

log = logging.getLogger(__name__)

MOCK_WORDS = tuple("""the a of and to in is it you that he was for on are with as his they be at one have this from or had by
word but what some we can out other were all there when up use your how said an each she which do their time if will way about
many then them write would like so these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under name very through just form sentence great
think say help low line differ turn cause much mean before move right boy old too same tell does set three want air well also
play small end put home read hand port large spell add even land here must big high such follow act why ask men change went
light kind off need house picture try us again animal point mother world near build self earth father head stand own page
should country found answer school grow study still learn plant cover food sun four between state keep eye never last let
thought city tree cross farm hard start might story saw far sea draw left late run while press close night real life few north
circle square triangle red green blue yellow purple orange colour color shape image top bottom left right""".split())

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")


# ------------------------------------------------------------------------------------------------
# Config and registry
# ------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Everything a provider needs. Defaults fit the qwen35_vl ``tiny`` variant; use
    ``DataConfig.from_variant`` to take the vision and vocabulary settings from a model variant."""

    provider: str = "mock"
    data_path: list[str] = field(default_factory=list)
    seed: int = 1234
    tokenizer_path: Optional[str] = None  # None: the shipped tokenizer
    # vision preprocessing (preprocess_image)
    patch_size: int = 4
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 16 * 16
    max_pixels: int = 256 * 256
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # the model's vocabulary and vision token ids (TextTokenizer.for_model)
    model_vocab_size: int = 256
    image_token_id: int = 250
    vision_start_id: int = 248
    vision_end_id: int = 249
    # robustness
    max_bad_samples: int = 100  # distinct bad samples + bad shards tolerated; -1: unlimited
    max_sample_tokens: Optional[int] = None  # longer samples are skipped (counted as bad)
    shuffle: bool = True  # webdataset: shuffle shards and samples per epoch
    # mock provider
    mock_min_tokens: int = 20
    mock_max_tokens: int = 200
    mock_image_prob: float = 0.5
    mock_min_image_size: int = 16
    mock_max_image_size: int = 32

    @classmethod
    def from_variant(cls, variant: Mapping[str, Any], **overrides) -> "DataConfig":
        """Fill the vision and vocabulary fields from a qwen35_vl variant dict (``get_variant``).

        ``min_pixels``/``max_pixels`` default to 4 and 1024 merged tokens per image
        (``(patch*merge)**2`` pixels each), Qwen2-VL's choice scaled to the patch size.
        """
        vis, text = variant["vision"], variant["text"]
        factor = vis["patch_size"] * vis["spatial_merge_size"]
        kw = dict(
            patch_size=vis["patch_size"],
            temporal_patch_size=vis["temporal_patch_size"],
            merge_size=vis["spatial_merge_size"],
            min_pixels=4 * factor * factor,
            max_pixels=1024 * factor * factor,
            model_vocab_size=text["vocab_size"],
            image_token_id=variant["image_token_id"],
            vision_start_id=variant["vision_start_token_id"],
            vision_end_id=variant["vision_end_token_id"],
        )
        kw.update(overrides)
        return cls(**kw)

    def image_processor_kwargs(self) -> dict:
        return dict(
            patch_size=self.patch_size, temporal_patch_size=self.temporal_patch_size, merge_size=self.merge_size,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, mean=tuple(self.image_mean),
            std=tuple(self.image_std),
        )


_PROVIDERS: dict[str, Callable[[DataConfig], "DatasetProvider"]] = {}


def register_provider(name: str):
    """Class decorator: ``@register_provider("name")`` makes ``get_provider("name")`` return it."""

    def deco(factory):
        if name in _PROVIDERS and _PROVIDERS[name] is not factory:
            raise ValueError(f"data provider {name!r} is already registered ({_PROVIDERS[name]})")
        _PROVIDERS[name] = factory
        return factory

    return deco


def get_provider(name: str) -> Callable[[DataConfig], "DatasetProvider"]:
    if name not in _PROVIDERS:
        raise ValueError(f"data provider {name!r} is unknown; available: {available_providers()}")
    return _PROVIDERS[name]


def available_providers() -> list[str]:
    return sorted(_PROVIDERS)


def build_provider(config: DataConfig) -> "DatasetProvider":
    """``get_provider(config.provider)(config)``."""
    return get_provider(config.provider)(config)


# ------------------------------------------------------------------------------------------------
# Iterators
# ------------------------------------------------------------------------------------------------
def _check_rank(dp_rank: int, dp_size: int) -> None:
    if not (isinstance(dp_size, int) and dp_size >= 1 and isinstance(dp_rank, int) and 0 <= dp_rank < dp_size):
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")


class SampleIterator(Iterator[dict]):
    """An endless iterator of samples of one DP rank, with ``state_dict``/``load_state_dict``.

    Subclasses keep their whole position in ``self._pos`` (a JSON-able dict, updated *before* a
    sample is yielded) and implement ``_generate()`` (a generator starting from ``self._pos``).
    """

    def __init__(self, provider: "DatasetProvider", dp_rank: int, dp_size: int, max_tokens: Optional[int]):
        _check_rank(dp_rank, dp_size)
        self.provider = provider
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.max_tokens = max_tokens
        self._pos: dict[str, Any] = self._initial_pos()
        # skipped_*: every skip (a bad shard is met again each epoch); bad_items: distinct bad ones
        self.stats: dict[str, int] = {"samples_read": 0, "skipped_samples": 0, "skipped_shards": 0, "bad_items": 0,
                                      "epoch": 0}
        self._bad: set[str] = set()  # distinct bad items (shard or shard:key) for --max-bad-samples
        self._gen: Optional[Iterator[dict]] = None

    def _initial_pos(self) -> dict:
        raise NotImplementedError

    def _generate(self) -> Iterator[dict]:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._gen is None:
            self._gen = self._generate()
        return next(self._gen)

    def _header(self) -> dict:
        return {
            "kind": "samples",
            "provider": self.provider.name,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "seed": self.provider.config.seed,
            "max_tokens": self.max_tokens,
        }

    def state_dict(self) -> dict:
        return {
            **self._header(),
            "position": copy.deepcopy(self._pos),
            "stats": dict(self.stats),
            "bad": sorted(self._bad),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        want = self._header()
        diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
        if diff:
            raise ValueError(
                "cannot resume the data iterator: the saved state was made with different settings "
                + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            )
        self._check_position(state["position"])
        self._pos = copy.deepcopy(dict(state["position"]))
        self.stats = dict(state["stats"])
        self._bad = set(state.get("bad", ()))
        self._gen = None  # restart the generator from the loaded position

    def _check_position(self, pos: Mapping) -> None:
        pass

    # ---- bad-sample accounting ------------------------------------------------------------------
    def _count_bad(self, kind: str, shard: str, key: Optional[str], reason: str) -> None:
        item = shard if key is None else f"{shard}:{key}"
        self.stats["skipped_shards" if kind == "shard" else "skipped_samples"] += 1
        first = item not in self._bad
        self._bad.add(item)
        self.stats["bad_items"] = len(self._bad)
        what = f"shard {shard}" if key is None else f"sample {key!r} of shard {shard}"
        (log.warning if first else log.debug)("skipping %s: %s", what, reason)
        limit = self.provider.config.max_bad_samples
        if limit >= 0 and len(self._bad) > limit:
            raise RuntimeError(
                f"{len(self._bad)} distinct bad samples/shards, more than --max-bad-samples={limit}; the last: "
                f"{what}: {reason}. Fix the data or raise --max-bad-samples (-1: no limit)"
            )


class BatchIterator(Iterator[dict]):
    """``pack_or_pad_batch`` of ``micro_batch_size`` consecutive samples, endlessly; resumable."""

    def __init__(self, samples: SampleIterator, micro_batch_size: int, collate_config: CollateConfig):
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.collate_config = collate_config
        self.batches = 0
        self.collate_stats = {"tokens": 0, "padding_tokens": 0, "truncated": 0, "dropped_images": 0}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        group = [next(self.samples) for _ in range(self.micro_batch_size)]
        batch = pack_or_pad_batch(group, self.collate_config)
        s = batch["stats"]
        self.collate_stats["tokens"] += s["tokens"]
        self.collate_stats["padding_tokens"] += s["padding_tokens"]
        self.collate_stats["truncated"] += s["truncated_samples"]
        self.collate_stats["dropped_images"] += s["dropped_images"]
        self.batches += 1
        return batch

    @property
    def stats(self) -> dict:
        return {**self.samples.stats, **self.collate_stats, "batches": self.batches}

    def state_dict(self) -> dict:
        return {
            "kind": "batches",
            "micro_batch_size": self.micro_batch_size,
            "batches": self.batches,
            "collate_stats": dict(self.collate_stats),
            "samples": self.samples.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "batches":
            raise ValueError(f"not a batch-iterator state (kind={state.get('kind')!r}); use samples(...) for it")
        if state["micro_batch_size"] != self.micro_batch_size:
            raise ValueError(
                f"cannot resume the batch iterator: saved with micro_batch_size={state['micro_batch_size']}, "
                f"now {self.micro_batch_size}"
            )
        self.samples.load_state_dict(state["samples"])
        self.batches = int(state["batches"])
        self.collate_stats = dict(state["collate_stats"])


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------
class DatasetProvider:
    """Base: holds the config, the tokenizer and the image settings; makes iterators."""

    name = "base"
    iterator_class: type[SampleIterator] = SampleIterator

    def __init__(self, config: DataConfig):
        self.config = config
        if config.max_bad_samples < -1:
            raise ValueError(f"--max-bad-samples must be >= -1 (-1: unlimited), got {config.max_bad_samples}")
        if config.max_sample_tokens is not None and config.max_sample_tokens < 1:
            raise ValueError(f"--max-sample-tokens must be >= 1, got {config.max_sample_tokens}")
        self.tokenizer = TextTokenizer.for_model(
            config.model_vocab_size, config.image_token_id, config.vision_start_id, config.vision_end_id,
            path=config.tokenizer_path,
        )
        self.image_kwargs = config.image_processor_kwargs()
        self._last: Optional[SampleIterator | BatchIterator] = None

    def samples(self, dp_rank: int, dp_size: int, state: Optional[Mapping] = None,
                max_tokens: Optional[int] = None) -> SampleIterator:
        """Endless samples of rank ``dp_rank`` of ``dp_size`` (from ``state`` when given).

        Samples longer than ``min(max_tokens, config.max_sample_tokens)`` are skipped (mock:
        never generated)."""
        limits = [m for m in (max_tokens, self.config.max_sample_tokens) if m is not None]
        it = self.iterator_class(self, dp_rank, dp_size, min(limits) if limits else None)
        if state is not None:
            it.load_state_dict(state)
        self._last = it
        return it

    def batches(self, dp_rank: int, dp_size: int, micro_batch_size: int, collate_config: CollateConfig,
                state: Optional[Mapping] = None) -> BatchIterator:
        """Endless collated batches. With a ``target_seqlen`` and no ``truncate``, samples longer than
        it are skipped as bad samples (rather than failing the collate)."""
        limit = None
        if collate_config.target_seqlen is not None and not collate_config.truncate:
            limit = collate_config.target_seqlen
        if collate_config.image_token_id not in (None, self.config.image_token_id):
            raise ValueError(
                f"collate_config.image_token_id={collate_config.image_token_id} differs from the data's "
                f"image_token_id={self.config.image_token_id}"
            )
        if collate_config.spatial_merge_size != self.config.merge_size:
            raise ValueError(
                f"collate_config.spatial_merge_size={collate_config.spatial_merge_size} differs from the "
                f"data's merge_size={self.config.merge_size}"
            )
        it = BatchIterator(self.samples(dp_rank, dp_size, max_tokens=limit), micro_batch_size, collate_config)
        if state is not None:
            it.load_state_dict(state)
        self._last = it
        return it

    def collate_config(self, **kwargs) -> CollateConfig:
        """A ``CollateConfig`` with this data's pad/image ids and merge size filled in."""
        kw = dict(pad_token_id=self.tokenizer.pad_id, image_token_id=self.config.image_token_id,
                  spatial_merge_size=self.config.merge_size)
        kw.update(kwargs)
        return CollateConfig(**kw)

    # convenience: the most recently created iterator
    @property
    def stats(self) -> dict:
        return {} if self._last is None else self._last.stats

    def state_dict(self) -> dict:
        if self._last is None:
            raise RuntimeError("no data iterator has been created yet")
        return self._last.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        if self._last is None:
            raise RuntimeError("create the iterator first (or pass state= to samples()/batches())")
        self._last.load_state_dict(state)


# ---- mock ----------------------------------------------------------------------------------------
class _MockIterator(SampleIterator):
    def _initial_pos(self) -> dict:
        return {"next": 0}  # samples this rank has taken

    def _check_position(self, pos):
        if not isinstance(pos.get("next"), int) or pos["next"] < 0:
            raise ValueError(f"bad mock iterator position {pos!r}")

    def _generate(self):
        while True:
            i = self.dp_rank + self._pos["next"] * self.dp_size
            self._pos["next"] += 1
            self.stats["samples_read"] += 1
            sample = self.provider.make_sample(i, self.max_tokens)
            sample["__epoch__"] = 0
            yield sample


@register_provider("mock")
class MockProvider(DatasetProvider):
    """Synthetic samples; ``make_sample(i)`` depends on ``(seed, i)`` only."""

    name = "mock"
    iterator_class = _MockIterator

    def __init__(self, config: DataConfig):
        super().__init__(config)
        c = config
        if not 1 <= c.mock_min_tokens <= c.mock_max_tokens:
            raise ValueError(f"need 1 <= mock_min_tokens <= mock_max_tokens, got {c.mock_min_tokens}, {c.mock_max_tokens}")
        if not 1 <= c.mock_min_image_size <= c.mock_max_image_size:
            raise ValueError("need 1 <= mock_min_image_size <= mock_max_image_size")
        tok = self.tokenizer
        self._first_len = [len(tok.encode(w)) for w in MOCK_WORDS]
        self._next_len = [len(tok.encode(" " + w)) for w in MOCK_WORDS]
        # template tokens of a conversation of n (user, assistant) pairs with empty texts
        self._overhead = {
            n: len(build_sample([{"role": r, "content": ""} for _ in range(n) for r in ("user", "assistant")], [],
                                tok, image_processor_kwargs=self.image_kwargs)["tokens"])
            for n in (1, 2)
        }

    def _words(self, rng: np.random.Generator, budget: int) -> list[str]:
        """Random words whose encoding takes about ``budget`` tokens (at least one word)."""
        out, used = [], 0
        while True:
            w = int(rng.integers(len(MOCK_WORDS)))
            n = self._first_len[w] if not out else self._next_len[w]
            if out and used + n > budget:
                return out
            out.append(MOCK_WORDS[w])
            used += n

    def make_sample(self, index: int, max_tokens: Optional[int] = None) -> dict:
        c = self.config
        rng = np.random.default_rng([c.seed, index])
        target = int(rng.integers(c.mock_min_tokens, c.mock_max_tokens + 1))
        if max_tokens is not None:
            target = min(target, max_tokens)
        pairs = int(rng.integers(1, 3))
        images = []
        if rng.random() < c.mock_image_prob:
            for _ in range(int(rng.integers(1, 3))):
                h, w = (int(v) for v in rng.integers(c.mock_min_image_size, c.mock_max_image_size + 1, size=2))
                images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB"))
        factor = c.patch_size * c.merge_size
        img_tokens = 0
        for im in images:
            gh, gw = smart_resize(im.height, im.width, factor, c.min_pixels, c.max_pixels)
            img_tokens += (gh // c.patch_size) * (gw // c.patch_size) // (c.merge_size**2) + 2
        text_budget = target - self._overhead[pairs] - img_tokens
        if text_budget < 2 * pairs:  # too short for the images: drop them
            images, text_budget = [], target - self._overhead[pairs]
        # random prompt/answer split of the text budget over the turns
        shares = rng.dirichlet(np.ones(2 * pairs)) * max(text_budget, 2 * pairs)
        texts = [self._words(rng, int(b)) for b in shares]  # q0, a0, q1, a1, ...
        key = f"mock-{index:010d}"
        while True:
            conv = []
            for t in range(pairs):
                prefix = "<image>" * len(images) if t == 0 else ""
                conv += [{"role": "user", "content": prefix + " ".join(texts[2 * t])},
                         {"role": "assistant", "content": " ".join(texts[2 * t + 1])}]
            sample = build_sample(conv, images, self.tokenizer, image_processor_kwargs=self.image_kwargs, key=key)
            if max_tokens is None or sample["tokens"].numel() <= max_tokens:
                return sample
            # over the limit (word-boundary rounding): drop a word from the longest text, then images
            longest = max(range(len(texts)), key=lambda i: len(texts[i]))
            if len(texts[longest]) > 1:
                texts[longest].pop()
            elif images:
                images = []
            else:
                raise ValueError(
                    f"mock: sample {key} has {sample['tokens'].numel()} tokens even at its shortest, more than "
                    f"the limit {max_tokens} (--max-sample-tokens / --seq-length); raise it"
                )


# ---- webdataset ----------------------------------------------------------------------------------
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
                                  image_processor_kwargs=self.provider.image_kwargs, key=key)
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
