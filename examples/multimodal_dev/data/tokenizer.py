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
``TextTokenizer.for_model``, which maps the shipped tokenizer's three vision ids onto the model's in
``encode`` (and back in ``decode``) and checks that everything fits the model's vocabulary.

A checkpoint's tokenizer (``--tokenizer DIR`` or ``DIR/tokenizer.json``) is never remapped: its
vision ids must be the model's (``for_model`` says which differ). Its ``tokenizer_config.json``
names the pad token (Qwen: ``<|endoftext|>``; without one ``<|pad|>``, else ``<|endoftext|>``) and
the special tokens a chat template sees; the chat template found next to it
(``chat_template.find_chat_template``) renders the conversations (``chat_template`` attribute;
None: ``sample.build_sample``'s built-in Qwen ChatML layout). See docs/data.md.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from multimodal_dev.data.chat_template import (
    ChatTemplate,
    find_chat_template,
    load_chat_template,
    special_tokens_of,
)

__all__ = [
    "TextTokenizer",
    "default_tokenizer_path",
    "resolve_tokenizer_path",
    "tokenizer_from_flags",
    "LOW_SPECIAL_TOKENS",
    "VISION_SPECIAL_TOKENS",
    "NUM_REGULAR_IDS",
]

PAD, EOS, IM_START, IM_END, UNK = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
LOW_SPECIAL_TOKENS = (PAD, EOS, IM_START, IM_END, UNK)  # ids 0..4 of the shipped tokenizer
VISION_SPECIAL_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)  # ids 248..251
NUM_REGULAR_IDS = 248  # ids below this are text (and the low special tokens)
TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"

log = logging.getLogger(__name__)


def default_tokenizer_path() -> str:
    """The shipped tokenizer file (``multimodal_dev/data/assets/tokenizer.json``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer.json")


def resolve_tokenizer_path(path: Optional[str]) -> str:
    """``--tokenizer``: None (the shipped file), a ``tokenizer.json`` file, or a directory holding one
    (a checkpoint directory). Raises ``FileNotFoundError`` naming the path."""
    if path is None:
        return default_tokenizer_path()
    path = os.fspath(path)
    if os.path.isdir(path):
        f = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(f):
            raise FileNotFoundError(f"--tokenizer {path!r} is a directory without {TOKENIZER_FILE} (a checkpoint "
                                    "directory holds tokenizer.json, tokenizer_config.json and the chat template)")
        return f
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--tokenizer {path!r} does not exist (a tokenizer.json, or a directory holding one)")
    return path


def tokenizer_from_flags(tokenizer: Optional[str], chat_template: str, hf_checkpoint: Optional[str] = None
                         ) -> Optional[str]:
    """The ``--tokenizer`` of a run, checked when the flags are parsed (before any model is built):
    the flag; else the ``--hf-checkpoint`` directory when it holds a ``tokenizer.json`` (a published
    checkpoint is trained with its own ids); else None (the shipped file). Raises
    ``FileNotFoundError`` naming the flag when ``--tokenizer`` or a ``--chat-template`` file is not there."""
    if tokenizer is None and hf_checkpoint:
        if os.path.isfile(os.path.join(hf_checkpoint, TOKENIZER_FILE)):
            tokenizer = hf_checkpoint
        else:
            log.warning("--hf-checkpoint %s has no %s: the shipped tokenizer is used, whose text ids are not the "
                        "checkpoint's (give --tokenizer)", hf_checkpoint, TOKENIZER_FILE)
    if tokenizer is not None:
        resolve_tokenizer_path(tokenizer)
    if chat_template not in ("auto", "none") and not os.path.isfile(chat_template):
        raise FileNotFoundError(f"--chat-template {chat_template!r}: no such file (auto, none, or a .jinja, "
                                "chat_template.json or tokenizer_config.json file)")
    return tokenizer


def _is_shipped(path: str) -> bool:
    return os.path.realpath(path) == os.path.realpath(default_tokenizer_path())


def _read_tokenizer_config(tokenizer_file: str) -> dict[str, Any]:
    p = os.path.join(os.path.dirname(tokenizer_file), TOKENIZER_CONFIG)
    if not os.path.isfile(p):
        return {}
    try:
        with open(p, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {p} (next to --tokenizer {tokenizer_file}): {e}") from e
    return cfg if isinstance(cfg, dict) else {}


def _chat_template_for(tokenizer_file: str, chat_template: Optional[str],
                       special_tokens: dict[str, str]) -> Optional[ChatTemplate]:
    """``chat_template``: "auto" (the template next to the tokenizer, if any), "none" (the built-in
    layout), or the path of a template file (``.jinja``, or JSON with a ``chat_template`` key)."""
    if chat_template in (None, "none"):
        return None
    if chat_template == "auto":
        found = find_chat_template(os.path.dirname(tokenizer_file))
        if found is None:
            if not _is_shipped(tokenizer_file):
                log.warning("no chat template next to --tokenizer %s: conversations use the built-in Qwen ChatML "
                            "layout (--chat-template PATH to give one)", tokenizer_file)
            return None
    else:
        found = load_chat_template(chat_template)
    template = ChatTemplate(found[0], found[1], special_tokens)
    answers = ("marked by {% generation %}" if template.has_generation_markers else
               f"after each {IM_START}assistant\\n header through its {IM_END}")
    log.info("conversations are rendered with the chat template of %s (answers %s)", found[1], answers)
    return template


def _check_special_tokens(tokenizer, path: str, pad_token: str, pad_source: str) -> None:
    """Refuse a tokenizer that lacks a token the samples need, or that would split one when it
    appears in a rendered chat (a vocabulary entry that is not an added token); names them all."""
    required = list(dict.fromkeys((pad_token, EOS, IM_START, IM_END) + VISION_SPECIAL_TOKENS[:3]))
    missing = [t for t in required if tokenizer.token_to_id(t) is None]
    present = [t for t in required + [VIDEO_PAD] if tokenizer.token_to_id(t) is not None]
    split = [t for t in present if tokenizer.encode(t, add_special_tokens=False).ids != [tokenizer.token_to_id(t)]]
    problems = []
    if missing:
        problems.append("lacks the special tokens " + ", ".join(map(repr, missing))
                        + (f" ({pad_token!r} is {pad_source})" if pad_token in missing else ""))
    if split:
        problems.append("has tokens that are not recognised whole in text (not added/special tokens): "
                        + ", ".join(map(repr, split)))
    if problems:
        raise ValueError(f"--tokenizer {path}: " + "; ".join(problems) + f"; a Qwen-VL tokenizer.json has "
                         f"{', '.join((EOS, IM_START, IM_END) + VISION_SPECIAL_TOKENS)} as special tokens")


class TextTokenizer:
    """Text <-> ids, with the special ids as attributes.

    ``encode`` never adds BOS/EOS; special-token strings in the text (e.g. ``<|im_end|>``) are
    recognised as the special tokens. The vision ids (``image_token_id``, ``vision_start_id``,
    ``vision_end_id``) are the *model's* ids after ``for_model``. ``pad_token``: the config's pad
    token; None: ``<|pad|>`` if the tokenizer has it, else ``<|endoftext|>`` (Qwen's).
    ``chat_template``: a ``ChatTemplate`` that renders conversations, or None.
    """

    def __init__(self, tokenizer, path: str = "<in memory>", id_map: Optional[dict[int, int]] = None,
                 model_vocab_size: Optional[int] = None, pad_token: Optional[str] = None,
                 chat_template: Optional[ChatTemplate] = None):
        self._tok = tokenizer
        self.path = path
        self._to_model = dict(id_map or {})
        self._from_model = {v: k for k, v in self._to_model.items()}
        self.model_vocab_size = model_vocab_size
        self.chat_template = chat_template

        pad_source = f"the pad_token of {TOKENIZER_CONFIG}" if pad_token is not None else "the pad token"
        if pad_token is None:
            pad_token = PAD if tokenizer.token_to_id(PAD) is not None else EOS
        _check_special_tokens(tokenizer, path, pad_token, pad_source)

        def need(token: str) -> int:
            i = tokenizer.token_to_id(token)
            return self._to_model.get(i, i)

        self.pad_token = pad_token
        self.pad_id = need(pad_token)
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
    def from_file(cls, path: Optional[str] = None, chat_template: Optional[str] = "auto") -> "TextTokenizer":
        """Load a HF ``tokenizers`` JSON file or a directory holding one (default: the shipped
        file), with the ``tokenizer_config.json`` and chat template next to it. ``chat_template``:
        "auto" (the one next to the tokenizer, if any), "none", or a template file."""
        from tokenizers import Tokenizer

        path = resolve_tokenizer_path(path)
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"cannot load tokenizer file {path!r}: {e}") from e
        special = special_tokens_of(_read_tokenizer_config(path))
        template = _chat_template_for(path, chat_template, special)
        return cls(tok, path, pad_token=special.get("pad_token"), chat_template=template)

    @classmethod
    def for_model(
        cls,
        model_vocab_size: int,
        image_token_id: int,
        vision_start_id: int,
        vision_end_id: int,
        path: Optional[str] = None,
        chat_template: Optional[str] = "auto",
        video_token_id: Optional[int] = None,
    ) -> "TextTokenizer":
        """The tokenizer (``from_file(path, chat_template)``) for a model; checks that it fits.

        Only the shipped tokenizer has its vision ids mapped onto the model's; any other must have
        the model's ids (``video_token_id`` too, when given). Raises ``ValueError`` when they differ,
        when a tokenizer id (other than the three mapped) is not below ``model_vocab_size``, when a
        model vision id is out of range, or when the model's vision ids coincide with each other or
        with another id of the tokenizer.
        """
        base = cls.from_file(path, chat_template=chat_template)
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
        if not _is_shipped(base.path):
            pairs = dict(zip(dst, (IMAGE_PAD, VISION_START, VISION_END)))
            diff = {n: (pairs[n], src[n], dst[n]) for n in dst if src[n] != dst[n]}
            if video_token_id is not None and base.video_token_id not in (None, video_token_id):
                diff["video_token_id"] = (VIDEO_PAD, base.video_token_id, video_token_id)
            if diff:
                raise ValueError(
                    f"--tokenizer {base.path} does not match the model: "
                    + ", ".join(f"{tok_name} is {a} in the tokenizer but the model's {n} is {b}"
                                for n, (tok_name, a, b) in diff.items())
                    + "; use the tokenizer of the checkpoint the model comes from (or the variant it belongs to)"
                )
        others = sorted(set(tok.get_vocab(with_added_tokens=True).values()) - set(src.values()))
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
        return cls(tok, base.path, id_map=id_map, model_vocab_size=model_vocab_size, pad_token=base.pad_token,
                   chat_template=base.chat_template)

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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``encode(text)`` and each token's character range in ``text`` (the tokenizer's offsets)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        m = self._to_model
        return [m.get(i, i) for i in enc.ids], list(enc.offsets)

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
        t = None if self.chat_template is None else self.chat_template.source
        return (f"TextTokenizer({self.path!r}, vocab_size={self.vocab_size}, vision ids remapped={self._to_model}, "
                f"chat template={t})")

