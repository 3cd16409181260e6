"""The ``mock`` provider: synthetic conversations of random words, some with random-pixel images.

About ``mock_min_tokens`` to ``mock_max_tokens`` tokens per sample, of which about
``mock_image_prob`` have one or two images. Sample ``i`` is a function of ``(seed, i)`` only;
rank ``r`` of ``n`` takes ``r, r+n, ...``, so skipping ahead costs nothing, and every DP rank can
read the global order (``global_order = True``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from multimodal_dev.data.image import smart_resize
from multimodal_dev.data.providers import DataConfig, DatasetProvider, SampleIterator, register_provider
from multimodal_dev.data.sample import build_sample

__all__ = ["MockProvider", "MOCK_WORDS"]

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
    global_order = True  # sample i is cheap to make from (seed, i): every DP rank reads the global order

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
            sample = build_sample(conv, images, self.tokenizer, image_processor_kwargs=self.image_kwargs, key=key,
                                  answer_only_loss=c.answer_only_loss)
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
