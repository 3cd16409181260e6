"""``build_sample``: a chat conversation with images -> one training sample for ``pack_or_pad_batch``.

Layout (Qwen chat template, no system prompt unless the conversation has one)::

    <|im_start|>user\\n {text, with each "<image>" replaced by
        <|vision_start|> <|image_pad|> x (t*h*w / merge**2) <|vision_end|>} <|im_end|>\\n
    <|im_start|>assistant\\n {answer} <|im_end|>          (\\n and the next turn, if any)

Labels are next-token targets: ``labels[i] = tokens[i+1]`` when token ``i+1`` belongs to an
assistant answer (its text and its closing ``<|im_end|>``), else -100; the last label is -100. So
the model learns to produce the answer and to stop, and nothing else (not the prompt, not the
``<|im_start|>assistant\\n`` header, not the newline between turns). With
``answer_only_loss=False`` (``--no-answer-only-loss``) every token is a target except the vision
tokens (``<|vision_start|>``, ``<|image_pad|>`` runs, ``<|vision_end|>``).

When the tokenizer carries a chat template (``tokenizer.chat_template``, a checkpoint's), the
conversation is rendered and its answers found through it instead (``data.chat_template``), as HF's
processor renders it; the layout above is the fallback, and what the shipped tokenizer uses.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from PIL import Image

from multimodal_dev.data.collate import IGNORE_INDEX
from multimodal_dev.data.image import num_image_tokens, preprocess_image

__all__ = ["IMAGE_PLACEHOLDER", "SampleError", "build_sample"]

IMAGE_PLACEHOLDER = "<image>"
_ROLES = ("system", "user", "assistant")


class SampleError(ValueError):
    """A sample cannot be built (bad conversation, image count mismatch, ...). Names the key."""


def build_sample(
    conversation: Sequence[Mapping[str, Any]],
    images: Sequence[Image.Image],
    tokenizer,
    *,
    image_processor_kwargs: Mapping[str, Any],
    key: Optional[str] = None,
    answer_only_loss: bool = True,
) -> dict[str, Any]:
    """Tokenise ``conversation`` (list of ``{"role", "content"}``) with ``images`` in the order of
    the ``"<image>"`` markers in user turns; the loss on the answers only, or on all text.

    ``image_processor_kwargs`` are ``preprocess_image``'s keywords (``patch_size``,
    ``temporal_patch_size``, ``merge_size``, ``min_pixels``, ``max_pixels``, optionally ``mean``,
    ``std``). Returns ``{"tokens", "labels", "pixel_values", "image_grid_thw", "__key__"}``
    (``pixel_values``/``image_grid_thw`` are None without images). Raises ``SampleError`` naming
    ``key`` when the conversation is malformed or the markers do not match the images.
    """
    name = f"sample {key!r}" if key is not None else "sample"
    if not isinstance(conversation, Sequence) or isinstance(conversation, (str, bytes)) or not conversation:
        raise SampleError(f"{name}: conversation must be a non-empty list of {{'role', 'content'}} turns")
    n_markers = 0
    for t, turn in enumerate(conversation):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str) or turn.get("role") not in _ROLES:
            raise SampleError(
                f"{name}: turn {t} must be {{'role': one of {_ROLES}, 'content': str}}, got {turn!r:.200}"
            )
        if IMAGE_PLACEHOLDER in turn["content"]:
            if turn["role"] != "user":
                raise SampleError(f"{name}: turn {t} ({turn['role']}) has an {IMAGE_PLACEHOLDER}; only user turns may")
            n_markers += turn["content"].count(IMAGE_PLACEHOLDER)
    if not any(turn["role"] == "assistant" for turn in conversation):
        raise SampleError(f"{name}: has no assistant turn, so nothing to train on")
    if n_markers != len(images):
        raise SampleError(
            f"{name}: the conversation has {n_markers} {IMAGE_PLACEHOLDER} markers but the sample has "
            f"{len(images)} images; they must match"
        )

    merge = int(image_processor_kwargs["merge_size"])
    pixel_values, grids = [], []
    for i, img in enumerate(images):
        try:
            pv, grid = preprocess_image(img, **image_processor_kwargs)
        except (ValueError, TypeError, OSError) as e:
            raise SampleError(f"{name}: image {i}: {e}") from e
        pixel_values.append(pv)
        grids.append(grid)

    tok = tokenizer
    template = getattr(tok, "chat_template", None)
    if template is not None:
        try:
            ids, trained = template.tokenize(conversation, tok, [num_image_tokens(g, merge) for g in grids],
                                             answer_only_loss=answer_only_loss)
        except ValueError as e:  # ChatTemplateError: the template refused it, or placeholders != images
            raise SampleError(f"{name}: {e}") from e
        return _sample(ids, trained, pixel_values, grids, key)
    nl = tok.encode("\n")
    ids: list[int] = []
    trained: list[bool] = []  # per token: is it part of an assistant answer (target of the previous)

    def add(seq: Sequence[int], train: bool = False) -> None:
        ids.extend(seq)
        trained.extend([train] * len(seq))

    img_i = 0
    for t, turn in enumerate(conversation):
        if t:
            add(nl)
        add([tok.im_start_id])
        add(tok.encode(turn["role"] + "\n"))
        if turn["role"] == "assistant":
            add(tok.encode(turn["content"]), True)
            add([tok.im_end_id], True)
            continue
        parts = turn["content"].split(IMAGE_PLACEHOLDER)
        for j, part in enumerate(parts):
            if j:
                g = grids[img_i]
                n_tok = int(g.prod()) // (merge * merge)
                add([tok.vision_start_id] + [tok.image_token_id] * n_tok + [tok.vision_end_id])
                img_i += 1
            if part:
                add(tok.encode(part))
        add([tok.im_end_id])
    if not answer_only_loss:
        vision = {tok.vision_start_id, tok.vision_end_id, tok.image_token_id, tok.video_token_id}
        trained = [i not in vision for i in ids]
    return _sample(ids, trained, pixel_values, grids, key)


def _sample(ids: list[int], trained: list[bool], pixel_values, grids, key) -> dict[str, Any]:
    """The sample dict; ``trained[i]``: token i is the target of position i-1."""
    tokens = torch.tensor(ids, dtype=torch.long)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    target = torch.tensor(trained[1:], dtype=torch.bool)
    labels[:-1][target] = tokens[1:][target]
    return {
        "tokens": tokens,
        "labels": labels,
        "pixel_values": torch.cat(pixel_values, 0) if pixel_values else None,
        "image_grid_thw": torch.cat(grids, 0) if grids else None,
        "__key__": key,
    }
