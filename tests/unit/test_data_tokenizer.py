"""The shipped tokenizer: fits the tiny variant, exact special ids, ASCII round trip, model id
mapping (``for_model``) and its errors, and that ``make_tokenizer.py`` regenerates it byte for byte."""
from __future__ import annotations

import os
import runpy
import string
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from multimodal_dev.data.tokenizer import TextTokenizer, default_tokenizer_path
from multimodal_dev.models.qwen35_vl.variants import get_variant

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "examples", "multimodal_dev", "scripts", "make_tokenizer.py")


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.from_file()


def test_special_ids_match_the_tiny_variant(tok):
    tiny = get_variant("tiny")
    assert tok.vision_start_id == tiny["vision_start_token_id"] == 248
    assert tok.vision_end_id == tiny["vision_end_token_id"] == 249
    assert tok.image_token_id == tiny["image_token_id"] == 250
    assert tok.video_token_id == tiny["video_token_id"] == 251
    assert (tok.pad_id, tok.eos_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2, 3)
    assert tok.vocab_size <= tiny["text"]["vocab_size"] == 256


def test_every_regular_token_is_below_248(tok):
    vocab = tok._tok.get_vocab(with_added_tokens=True)
    assert len(vocab) == tok.vocab_size == 252
    assert sorted(vocab.values()) == list(range(252))  # dense, no holes
    high = {t: i for t, i in vocab.items() if i >= 248}
    assert high == {"<|vision_start|>": 248, "<|vision_end|>": 249, "<|image_pad|>": 250, "<|video_pad|>": 251}


def test_special_strings_encode_to_one_id(tok):
    for s, i in [("<|pad|>", 0), ("<|endoftext|>", 1), ("<|im_start|>", 2), ("<|im_end|>", 3),
                 ("<|vision_start|>", 248), ("<|vision_end|>", 249), ("<|image_pad|>", 250)]:
        assert tok.encode(s) == [i]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 2 and ids[-1] == 3 and 2 not in ids[1:-1]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.printable, max_size=80))
def test_ascii_round_trip(tok, text):
    assume("<unk>" not in text and "<|" not in text)  # special-token strings are meant to match
    ids = tok.encode(text)
    assert all(0 <= i < 248 for i in ids)
    assert 4 not in ids  # no <unk> for ASCII
    assert tok.decode(ids) == text


def test_shapes_words_are_compact(tok):
    # the dataset's words were in the training corpus: each colour/shape word is one or two tokens
    for w in ["circle", "square", "triangle", "cross", "red", "green", "blue", "yellow", "purple", "orange"]:
        assert len(tok.encode(" " + w)) <= 2, w


def test_non_ascii_becomes_unk(tok):
    ids = tok.encode("caf\u00e9")
    assert tok.unk_id == 4 and 4 in ids
    assert tok.decode(ids).startswith("caf")


def test_for_model_tiny_is_identity(tok):
    t = TextTokenizer.for_model(256, 250, 248, 249)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    assert t.encode(text) == tok.encode(text)


def test_for_model_maps_the_proxy_vision_ids(tok):
    proxy = get_variant("proxy")
    t = TextTokenizer.for_model(proxy["text"]["vocab_size"], proxy["image_token_id"],
                                proxy["vision_start_token_id"], proxy["vision_end_token_id"])
    assert (t.image_token_id, t.vision_start_id, t.vision_end_id) == (151655, 151652, 151653)
    text = "<|vision_start|><|image_pad|><|image_pad|><|vision_end|> a red circle"
    base = tok.encode(text)
    ids = t.encode(text)
    assert ids[:4] == [151652, 151655, 151655, 151653]
    assert ids[4:] == base[4:]  # text ids unchanged
    assert t.decode(ids) == text
    assert t.pad_id == 0 and t.im_end_id == 3


@pytest.mark.parametrize(
    "args, match",
    [
        ((200, 150, 151, 152), "does not fit the model"),  # tokenizer ids up to 251 >= 200
        ((256, 10, 248, 249), "collide"),  # image id on a text token
        ((256, 250, 3, 249), "collide"),  # vision start on <|im_end|>
        ((256, 250, 250, 249), "must differ"),
        ((1000, 1000, 248, 249), "not below its vocab size"),
        ((256, -1, 248, 249), "non-negative"),
    ],
)
def test_for_model_errors(args, match):
    with pytest.raises(ValueError, match=match):
        TextTokenizer.for_model(*args)


def test_missing_file_is_named(tmp_path):
    p = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        TextTokenizer.from_file(p)


def test_make_tokenizer_regenerates_the_shipped_file(tmp_path, monkeypatch):
    out = tmp_path / "tok.json"
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--out", str(out)])
    runpy.run_path(SCRIPT, run_name="__main__")
    with open(default_tokenizer_path(), "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read(), "scripts/make_tokenizer.py no longer reproduces assets/tokenizer.json"
