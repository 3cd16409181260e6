#!/usr/bin/env python
"""Regenerate the shipped tokenizer ``multimodal_dev/data/assets/tokenizer.json``.

A byte-level BPE (GPT-2 style pre-tokenisation, so any ASCII text round-trips exactly) trained with
HF ``tokenizers`` on a small built-in corpus: the shapes dataset's questions and answers, the mock
provider's word list, some plain English, and every printable ASCII character (the character
fallback: each ASCII character is a token of its own). It fits the ``tiny`` variant's vocabulary
of 256 ids:

* ids 0..4: ``<|pad|>``, ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<unk>`` (non-ASCII);
* ids 5..247: the ASCII characters and the learned merges;
* ids 248..251: ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``
  (the tiny variant's vision_start/vision_end/image/video token ids).

Deterministic: the corpus is fixed text and the trainer runs on one thread, so the same version of
``tokenizers`` writes the same file (``tests/unit/test_data_tokenizer.py`` checks it).

    python examples/multimodal_dev/scripts/make_tokenizer.py [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import string

# one thread: the BPE trainer's result must not depend on scheduling
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from multimodal_dev.data.shapes import COLOURS, NUMBER_WORDS, QUESTIONS, SHAPES, render_sample  # noqa: E402
from multimodal_dev.data.mock import MOCK_WORDS  # noqa: E402
from multimodal_dev.data.tokenizer import (  # noqa: E402
    LOW_SPECIAL_TOKENS,
    NUM_REGULAR_IDS,
    VISION_SPECIAL_TOKENS,
    default_tokenizer_path,
)

ENGLISH = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
This is a small tokenizer for tests and for a toy vision language model. It reads questions
about images and answers them. What is in the picture? There is a red circle on the left and a
blue square on the right. How many shapes can you see? I can see two shapes. Where is it?
It is at the top of the image, near the bottom, in the middle, next to the other one.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / \\ @ # $ % ^ & * + = < > | ~ `
"""


def corpus() -> list[str]:
    lines = [ENGLISH] * 4
    for qs in QUESTIONS.values():
        lines += list(qs) * 20
    for i in range(400):  # the shapes dataset's own answers, with their real frequencies
        _, conv, _ = render_sample(1234, i, 32)
        lines += [t["content"].replace("<image>\n", "") for t in conv]
    lines += [" ".join(SHAPES), " ".join(COLOURS), " ".join(NUMBER_WORDS)] * 20
    lines.append(" ".join(MOCK_WORDS) * 3)
    lines.append(string.printable)  # every ASCII character is in the alphabet
    return lines


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=NUM_REGULAR_IDS,
        min_frequency=2,
        special_tokens=list(LOW_SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    if tok.get_vocab_size() != NUM_REGULAR_IDS:
        raise RuntimeError(f"trained vocabulary has {tok.get_vocab_size()} ids, expected {NUM_REGULAR_IDS}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_SPECIAL_TOKENS])
    for i, t in enumerate(VISION_SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != NUM_REGULAR_IDS + i:
            raise RuntimeError(f"{t} got id {got}, expected {NUM_REGULAR_IDS + i}")
    return tok


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=default_tokenizer_path(), help="where to write tokenizer.json")
    a = p.parse_args(argv)
    tok = build()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    tok.save(a.out, pretty=True)
    print(f"wrote {a.out}: {tok.get_vocab_size()} ids")


if __name__ == "__main__":
    main()
