"""A small, learnable image+text dataset: coloured shapes and questions about them.

Each sample is one image (``image_size`` square, default 32 px for the ``tiny`` variant) with 1-3
non-overlapping shapes (circle, square, triangle, cross) in one of six colours on a plain or lightly
noisy neutral background, and a 1-3 turn conversation whose answers are read off the image: what
shape, what colour, where (top/bottom + left/right), how many, and a one-line description.

``write_shapes_dataset`` writes WebDataset tar shards (``shapes-000000.tar``, ...; each sample
``<key>.png`` + ``<key>.json`` with ``{"conversation": [...]}``) and a ``meta.json``. The output is a
pure function of the arguments (fixed tar headers, per-sample seeded RNG), so the same seed gives
byte-identical shards. ``scripts/make_shapes_dataset.py`` is the command-line front end.
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES",
    "COLOURS",
    "NUMBER_WORDS",
    "QUESTIONS",
    "vocabulary",
    "render_sample",
    "write_shapes_dataset",
]

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
NUMBER_WORDS = ("zero", "one", "two", "three")
_BACKGROUNDS = ((255, 255, 255), (200, 200, 200), (128, 128, 128), (40, 40, 40))
# Question texts by kind; the answers are produced by ``_answer``.
QUESTIONS = {
    "count": ("How many shapes are there?", "How many shapes do you see?"),
    "shape": ("What shape is this?", "What shape is in the image?"),
    "colour": ("What colour is the shape?", "What color is the shape?"),
    "where": ("Where is the shape?", "Where is the shape in the image?"),
    "describe": ("Describe the image.", "What do you see?"),
    "shapes": ("What shapes are there, from left to right?",),
    "colours": ("What colours are the shapes, from left to right?",),
}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class _Obj:
    shape: str
    colour: str
    cx: float  # centre, in pixels of the final image
    cy: float
    size: float  # side of the bounding square


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _where(o: _Obj, image_size: int) -> str:
    vert = "top" if o.cy < image_size / 2 else "bottom"
    horiz = "left" if o.cx < image_size / 2 else "right"
    return f"{vert} {horiz}"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _answer(kind: str, objs: list[_Obj], image_size: int) -> str:
    ordered = sorted(objs, key=lambda o: o.cx)
    if kind == "count":
        return NUMBER_WORDS[len(objs)]
    if kind == "shape":
        return f"{_article(objs[0].shape)} {objs[0].shape}"
    if kind == "colour":
        return objs[0].colour
    if kind == "where":
        return _where(objs[0], image_size)
    if kind == "describe":
        if len(objs) == 1:
            o = objs[0]
            return f"{_article(o.colour)} {o.colour} {o.shape} in the {_where(o, image_size)}"
        return f"{NUMBER_WORDS[len(objs)]} shapes: " + _join([f"{_article(o.colour)} {o.colour} {o.shape}" for o in ordered])
    if kind == "shapes":
        return _join([o.shape for o in ordered])
    if kind == "colours":
        return _join([o.colour for o in ordered])
    raise ValueError(f"unknown question kind {kind!r}")


def vocabulary() -> list[str]:
    """Every word the dataset's questions and answers use (sorted; for tokenizer training)."""
    words = set(SHAPES) | set(COLOURS) | set(NUMBER_WORDS)
    words |= {"a", "an", "and", "in", "the", "top", "bottom", "left", "right", "shapes"}
    for qs in QUESTIONS.values():
        for q in qs:
            words |= set(q.replace("?", " ").replace(".", " ").replace(",", " ").split())
    return sorted(words)


def _place(rng: np.random.Generator, n: int, image_size: int) -> list[tuple[float, float, float]]:
    """Up to ``n`` non-overlapping (cx, cy, size) boxes; centres kept off the middle lines so
    top/bottom and left/right are unambiguous."""
    boxes: list[tuple[float, float, float]] = []
    lo, hi = 0.28 * image_size, (0.42 if n == 1 else 0.34) * image_size
    for _ in range(200):
        if len(boxes) == n:
            break
        s = float(rng.uniform(lo, hi))
        cx = float(rng.uniform(s / 2 + 0.5, image_size - s / 2 - 0.5))
        cy = float(rng.uniform(s / 2 + 0.5, image_size - s / 2 - 0.5))
        if abs(cx - image_size / 2) < 1.5 or abs(cy - image_size / 2) < 1.5:
            continue
        if any(abs(cx - bx) < (s + bs) / 2 + 1 and abs(cy - by) < (s + bs) / 2 + 1 for bx, by, bs in boxes):
            continue
        if any(abs(cx - bx) < 2 for bx, _, _ in boxes):  # left-to-right order must be clear
            continue
        boxes.append((cx, cy, s))
    return boxes


def _draw(draw: ImageDraw.ImageDraw, o: _Obj) -> None:
    k = _SUPERSAMPLE
    cx, cy, r = o.cx * k, o.cy * k, o.size * k / 2
    fill = COLOURS[o.colour]
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        q = r * 0.85
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif o.shape == "cross":
        w = r * 0.36
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(o.shape)


def render_sample(seed: int, index: int, image_size: int = 32) -> tuple[Image.Image, list[dict], list[dict]]:
    """Sample ``index`` of the dataset with ``seed``: (image, conversation, objects)."""
    rng = np.random.default_rng([seed, index])
    n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    boxes = _place(rng, n, image_size)
    objs = [
        _Obj(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), cx, cy, s) for cx, cy, s in boxes
    ]
    bg = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    big = Image.new("RGB", (image_size * _SUPERSAMPLE,) * 2, bg)
    draw = ImageDraw.Draw(big)
    for o in objs:
        _draw(draw, o)
    img = big.resize((image_size, image_size), Image.Resampling.BOX)
    if rng.random() < 0.5:  # light noise
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-8, 9, size=(image_size, image_size, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")

    kinds = ["count", "describe"] + (["shape", "colour", "where"] if len(objs) == 1 else ["shapes", "colours"])
    n_turns = int(rng.integers(1, 4))
    chosen = [kinds[i] for i in rng.permutation(len(kinds))[:n_turns]]
    conversation = []
    for t, kind in enumerate(chosen):
        qs = QUESTIONS[kind]
        q = qs[int(rng.integers(len(qs)))]
        conversation.append({"role": "user", "content": ("<image>\n" if t == 0 else "") + q})
        conversation.append({"role": "assistant", "content": _answer(kind, objs, image_size)})
    objects = [
        {"shape": o.shape, "colour": o.colour, "cx": round(o.cx, 2), "cy": round(o.cy, 2), "size": round(o.size, 2)}
        for o in objs
    ]
    return img, conversation, objects


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shapes_dataset(
    out: str, num_samples: int, shard_size: int = 1000, image_size: int = 32, seed: int = 0
) -> dict:
    """Write ``num_samples`` samples as shards of ``shard_size`` under ``out``; returns the meta."""
    if num_samples < 1 or shard_size < 1 or image_size < 8:
        raise ValueError(
            f"need num_samples >= 1, shard_size >= 1, image_size >= 8; got {num_samples}, {shard_size}, {image_size}"
        )
    os.makedirs(out, exist_ok=True)
    shards = []
    for s in range(math.ceil(num_samples / shard_size)):
        name = f"shapes-{s:06d}.tar"
        shards.append(name)
        with tarfile.open(os.path.join(out, name), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * shard_size, min(num_samples, (s + 1) * shard_size)):
                img, conv, objs = render_sample(seed, i, image_size)
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                key = f"{i:08d}"
                _add(tar, f"{key}.png", buf.getvalue())
                _add(tar, f"{key}.json", json.dumps({"conversation": conv, "objects": objs}).encode())
    meta = {
        "count": num_samples,
        "shard_size": shard_size,
        "shards": shards,
        "image_size": image_size,
        "seed": seed,
        "shapes": list(SHAPES),
        "colours": list(COLOURS),
        "vocabulary": vocabulary(),
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta
