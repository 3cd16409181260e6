"""Dataset providers: endless, deterministic, resumable streams of samples -- the base and registry.

A provider is registered by name (``register_provider``) and built from a ``DataConfig``::

    provider = build_provider(DataConfig(provider="webdataset", data_path=["/data/shapes"], ...))
    samples = provider.samples(dp_rank, dp_size)     # an endless SampleIterator
    state = samples.state_dict()                     # save with the checkpoint
    samples = provider.samples(dp_rank, dp_size, state=state)

A sample is ``build_sample``'s dict (``tokens``, ``labels``, ``pixel_values``, ``image_grid_thw``,
``__key__``) plus ``__epoch__`` (and ``__shard__`` for webdataset). A resumed iterator yields
exactly what the uninterrupted one would have. Micro-batches are assembled from samples in one
place only, ``data.stream.MicroBatchStream``; ``DatasetProvider.global_order`` tells it whether
every data-parallel rank reads the one global sample order (cheap for generated data: the same
micro-batches whatever the DP size) or its own part of the data (files: no rank reads every
sample).

The built-in providers live in ``data.mock`` and ``data.webdataset``; importing ``multimodal_dev.data``
registers them. Bad samples are skipped, counted and logged with their shard and key; once more
distinct ones than ``max_bad_samples`` (``--max-bad-samples``) were met, a ``RuntimeError`` stops
the run.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from multimodal_dev.data.collate import CollateConfig
from multimodal_dev.data.tokenizer import TextTokenizer

__all__ = [
    "DataConfig",
    "DatasetProvider",
    "SampleIterator",
    "register_provider",
    "get_provider",
    "available_providers",
    "build_provider",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Config and registry
# ------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Everything a provider needs. Defaults fit the qwen35_vl ``tiny`` variant; use
    ``DataConfig.from_data_spec`` to take the vision and vocabulary settings from a model."""

    provider: str = "mock"
    data_path: list[str] = field(default_factory=list)
    seed: int = 1234
    tokenizer_path: Optional[str] = None  # None: the shipped tokenizer; a tokenizer.json or a directory holding one
    chat_template: Optional[str] = "auto"  # "auto": the one next to the tokenizer; "none": built-in layout; a file
    answer_only_loss: bool = True  # False: the loss on every text token, not only the assistant's answers
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
    video_token_id: Optional[int] = None  # checked against a checkpoint's tokenizer (videos are not read)
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
    def from_data_spec(cls, spec, **overrides) -> "DataConfig":
        """Fill the vision and vocabulary fields from a model's ``DataSpec`` (``models.contract``).

        ``min_pixels``/``max_pixels`` default to 4 and 1024 merged tokens per image
        (``(patch*merge)**2`` pixels each), Qwen2-VL's choice scaled to the patch size. A text-only
        model (no vision fields) keeps the defaults, and its data must then carry no images.
        """
        kw: dict[str, Any] = dict(model_vocab_size=spec.vocab_size)
        if spec.has_vision:
            factor = spec.patch_size * spec.spatial_merge_size
            kw.update(
                patch_size=spec.patch_size,
                temporal_patch_size=spec.temporal_patch_size,
                merge_size=spec.spatial_merge_size,
                min_pixels=4 * factor * factor,
                max_pixels=1024 * factor * factor,
                image_token_id=spec.image_token_id,
            )
        for ours, theirs in (("vision_start_id", "vision_start_token_id"), ("vision_end_id", "vision_end_token_id"),
                             ("video_token_id", "video_token_id")):
            if getattr(spec, theirs) is not None:
                kw[ours] = getattr(spec, theirs)
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

    def __init__(self, provider: "DatasetProvider", dp_rank: int, dp_size: int, max_tokens: Optional[int],
                 quiet: bool = False):
        _check_rank(dp_rank, dp_size)
        self.provider = provider
        self.quiet = quiet  # a side pass over the data (statistics): skips are logged at debug level, no limit
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
        (log.warning if first and not self.quiet else log.debug)("skipping %s: %s", what, reason)
        limit = self.provider.config.max_bad_samples
        if limit >= 0 and len(self._bad) > limit and not self.quiet:
            raise RuntimeError(
                f"{len(self._bad)} distinct bad samples/shards, more than --max-bad-samples={limit}; the last: "
                f"{what}: {reason}. Fix the data or raise --max-bad-samples (-1: no limit)"
            )


# ------------------------------------------------------------------------------------------------
# Providers
# ------------------------------------------------------------------------------------------------
class DatasetProvider:
    """Base: holds the config, the tokenizer and the image settings; makes sample iterators.

    ``global_order``: True when every DP rank may read the one global sample order (samples are
    cheap to skip: generated data); False when each DP rank reads its own part of the data."""

    name = "base"
    iterator_class: type[SampleIterator] = SampleIterator
    global_order: bool = False

    def __init__(self, config: DataConfig):
        self.config = config
        if config.max_bad_samples < -1:
            raise ValueError(f"--max-bad-samples must be >= -1 (-1: unlimited), got {config.max_bad_samples}")
        if config.max_sample_tokens is not None and config.max_sample_tokens < 1:
            raise ValueError(f"--max-sample-tokens must be >= 1, got {config.max_sample_tokens}")
        self.tokenizer = TextTokenizer.for_model(
            config.model_vocab_size, config.image_token_id, config.vision_start_id, config.vision_end_id,
            path=config.tokenizer_path, chat_template=config.chat_template, video_token_id=config.video_token_id,
        )
        self.image_kwargs = config.image_processor_kwargs()

    def samples(self, dp_rank: int, dp_size: int, state: Optional[Mapping] = None,
                max_tokens: Optional[int] = None, quiet: bool = False) -> SampleIterator:
        """Endless samples of rank ``dp_rank`` of ``dp_size`` (from ``state`` when given).

        Samples longer than ``min(max_tokens, config.max_sample_tokens)`` are skipped (mock:
        never generated). ``quiet``: a side pass that is not trained on (the unigram baseline):
        its skips are logged at debug level only and never reach ``--max-bad-samples`` -- the
        training pass warns about and counts each of them itself, on the rank that reads it."""
        limits = [m for m in (max_tokens, self.config.max_sample_tokens) if m is not None]
        it = self.iterator_class(self, dp_rank, dp_size, min(limits) if limits else None, quiet=quiet)
        if state is not None:
            it.load_state_dict(state)
        return it

    def collate_config(self, **kwargs) -> CollateConfig:
        """A ``CollateConfig`` with this data's pad/image ids and merge size filled in."""
        kw = dict(pad_token_id=self.tokenizer.pad_id, image_token_id=self.config.image_token_id,
                  spatial_merge_size=self.config.merge_size)
        kw.update(kwargs)
        return CollateConfig(**kw)

    def check_collate_config(self, collate_config: CollateConfig) -> None:
        """The collate must place images the way this data cuts them."""
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
