"""``TextTokenizer``: the shipped small tokenizer (or any HF ``tokenizers`` JSON) with the chat and
vision special ids a model needs.

The shipped ``assets/tokenizer.json`` (made by ``scripts/make_tokenizer.py``) is a byte-level BPE
of 252 ids that fits the ``tiny`` variant (vocab 256): every ASCII string round-trips exactly;
characters outside ASCII become ``<unk>``. Ids:

==========  =================================================================
0 .. 4      ``<|pad|>``, ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<unk>``
5 .. 247    ASCII characters and learned merges
248 .. 251  ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``
==========  =================================================================

A model whose vision ids differ (``proxy``: image 151655, vision start/end 151652/151653) uses
``TextTokenizer.for_model``, which maps the tokenizer's three vision ids onto the model's in
``encode`` (and back in ``decode``) and checks that everything fits the model's vocabulary.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Optional

__all__ = [
    "TextTokenizer",
    "default_tokenizer_path",
    "LOW_SPECIAL_TOKENS",
    "VISION_SPECIAL_TOKENS",
    "NUM_REGULAR_IDS",
]

PAD, EOS, IM_START, IM_END, UNK = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
LOW_SPECIAL_TOKENS = (PAD, EOS, IM_START, IM_END, UNK)  # ids 0..4 of the shipped tokenizer
VISION_SPECIAL_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)  # ids 248..251
NUM_REGULAR_IDS = 248  # ids below this are text (and the low special tokens)


def default_tokenizer_path() -> str:
    """The shipped tokenizer file (``multimodal_dev/data/assets/tokenizer.json``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.json")


class TextTokenizer:
    """Text <-> ids, with the special ids as attributes.

    ``encode`` never adds BOS/EOS; special-token strings in the text (e.g. ``<|im_end|>``) are
    recognised as the special tokens. The vision ids (``image_token_id``, ``vision_start_id``,
    ``vision_end_id``) are the *model's* ids after ``for_model``.
    """

    def __init__(self, tokenizer, path: str = "<in memory>", id_map: Optional[dict[int, int]] = None,
                 model_vocab_size: Optional[int] = None):
        self._tok = tokenizer
        self.path = path
        self._to_model = dict(id_map or {})
        self._from_model = {v: k for k, v in self._to_model.items()}
        self.model_vocab_size = model_vocab_size

        def need(token: str) -> int:
            i = tokenizer.token_to_id(token)
            if i is None:
                raise ValueError(f"tokenizer {path} has no special token {token!r}; it needs {LOW_SPECIAL_TOKENS[:4] + VISION_SPECIAL_TOKENS[:3]}")
            return self._to_model.get(i, i)

        self.pad_id = need(PAD)
        self.eos_id = need(EOS)
        self.im_start_id = need(IM_START)
        self.im_end_id = need(IM_END)
        self.vision_start_id = need(VISION_START)
        self.vision_end_id = need(VISION_END)
        self.image_token_id = need(IMAGE_PAD)
        vid = tokenizer.token_to_id(VIDEO_PAD)
        self.video_token_id = None if vid is None else self._to_model.get(vid, vid)
        unk = tokenizer.token_to_id(UNK)
        self.unk_id = None if unk is None else self._to_model.get(unk, unk)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: Optional[str] = None) -> "TextTokenizer":
        """Load a HF ``tokenizers`` JSON file (default: the shipped one)."""
        from tokenizers import Tokenizer

        path = default_tokenizer_path() if path is None else os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} does not exist (--tokenizer)")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"cannot load tokenizer file {path!r}: {e}") from e
        return cls(tok, path)

    @classmethod
    def for_model(
        cls,
        model_vocab_size: int,
        image_token_id: int,
        vision_start_id: int,
        vision_end_id: int,
        path: Optional[str] = None,
    ) -> "TextTokenizer":
        """The tokenizer with its vision ids mapped onto a model's; checks that it fits.

        Raises ``ValueError`` when a tokenizer id (other than the three mapped) is not below
        ``model_vocab_size``, when a model vision id is out of range, or when the model's vision
        ids coincide with each other or with another id of the tokenizer.
        """
        base = cls.from_file(path)
        tok = base._tok
        src = {
            "image_token_id": tok.token_to_id(IMAGE_PAD),
            "vision_start_id": tok.token_to_id(VISION_START),
            "vision_end_id": tok.token_to_id(VISION_END),
        }
        dst = {"image_token_id": image_token_id, "vision_start_id": vision_start_id, "vision_end_id": vision_end_id}
        for name, v in list(dst.items()) + [("model_vocab_size", model_vocab_size)]:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TextTokenizer.for_model: {name} must be a non-negative int, got {v!r}")
        for name, v in dst.items():
            if v >= model_vocab_size:
                raise ValueError(
                    f"TextTokenizer.for_model: the model's {name}={v} is not below its vocab size {model_vocab_size}"
                )
        if len(set(dst.values())) != 3:
            raise ValueError(f"TextTokenizer.for_model: the model's vision ids must differ, got {dst}")
        others = sorted(set(range(tok.get_vocab_size(with_added_tokens=True))) - set(src.values()))
        if others and others[-1] >= model_vocab_size:
            raise ValueError(
                f"tokenizer {base.path} does not fit the model: it uses ids up to {others[-1]} "
                f"(vocab {tok.get_vocab_size(with_added_tokens=True)}) but the model's vocab size is "
                f"{model_vocab_size}; use a smaller tokenizer (--tokenizer) or a larger model vocab"
            )
        clash = {n: v for n, v in dst.items() if v in set(others)}
        if clash:
            names = {n: tok.id_to_token(v) for n, v in clash.items()}
            raise ValueError(
                f"TextTokenizer.for_model: the model's {sorted(clash)} {clash} collide with tokenizer "
                f"{base.path}'s own tokens {names}"
            )
        id_map = {src[n]: dst[n] for n in dst if src[n] != dst[n]}
        return cls(tok, base.path, id_map=id_map, model_vocab_size=model_vocab_size)

    # ---- use --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids of the tokenizer itself (252 for the shipped one)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"TextTokenizer.encode needs a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self._to_model:
            m = self._to_model
            ids = [m.get(i, i) for i in ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._from_model:
            m = self._from_model
            ids = [m.get(i, i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"TextTokenizer.decode: ids {bad[:5]} are not ids of tokenizer {self.path}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        i = self._tok.token_to_id(token)
        return None if i is None else self._to_model.get(i, i)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.path!r}, vocab_size={self.vocab_size}, vision ids remapped={self._to_model})"

