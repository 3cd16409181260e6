"""A checkpoint's chat template: where it is found, how a conversation is rendered and tokenised
through it as HF's processor does, and which tokens get a loss.

**Where** (``find_chat_template``, the order transformers 5 reads them, first found wins; the
processor's files before the tokenizer's because the processor renders conversations with images):
``processor_config.json`` (key ``chat_template``), ``chat_template.json`` (the processor's legacy
file, Qwen2/2.5/3-VL checkpoints), ``chat_template.jinja`` (what transformers >= 4.5x saves,
Qwen3.5 checkpoints), ``tokenizer_config.json`` (key ``chat_template``: a string, or a list of
``{"name", "template"}`` of which ``"default"`` is used). ``load_chat_template`` reads one such file
named explicitly (``--chat-template PATH``).

**How** (``ChatTemplate.tokenize``), the steps of ``Qwen3VLProcessor.apply_chat_template``:

1. the conversation becomes HF messages: a user turn with ``<image>`` markers gets the content
   ``[{"type": "text", "text": ...}, {"type": "image"}, ...]`` in marker order, every other turn
   its string (Qwen's templates render both alike);
2. the template renders them with ``add_generation_prompt=False``, ``tools``/``documents`` None and
   the tokenizer config's special tokens (``bos_token``, ``eos_token``, ...) as variables, in a
   Jinja sandbox set up as HF's (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``,
   ``raise_exception``, ``tojson``, ``strftime_now``, ``{% generation %}``): a template is data of
   the checkpoint, and the sandbox keeps it from calling into Python;
3. the text is tokenised (special-token strings recognised, nothing added) and every
   ``<|image_pad|>`` id becomes its image's ``t*h*w / merge**2`` ids, in order. (The processor
   expands the text before tokenising; the ids are the same since ``<|image_pad|>`` is a special
   token, which the tokenizer always cuts out whole.)

**Loss** (a token is in a character span when its characters overlap it: the rule of HF's
``return_assistant_tokens_mask``):

* ``answer_only_loss`` (SFT): the assistant's answers. A template with ``{% generation %}`` markers
  says itself where they are (HF's convention). Otherwise the ChatML turns are read from the
  rendered text: an assistant turn ``<|im_start|>assistant\\n ... <|im_end|>`` is trained from the
  end of its ``<|im_start|>assistant\\n`` header through its ``<|im_end|>`` (the newline after it is
  not): everything the template writes for the answer, for Qwen3/3.5 the ``<think>...</think>``
  block it gives the turns after the last user query included, and the stop token. That is the span
  HF's and TRL's generation-marked Qwen templates mark (the header outside, ``<|im_end|>`` inside),
  so our mask equals ``return_assistant_tokens_mask`` over the same template with those markers.
  Rendering conversation prefixes and diffing would not do: Qwen3/3.5 templates are not
  prefix-stable (an assistant turn gets its think block only when no user turn follows it). The
  rendered roles are checked against the conversation's (the template may add a leading system
  turn), so a template that does not render ChatML turns fails with a clear error instead of
  training on wrong tokens.
* all text (``--no-answer-only-loss``): every token but ``<|vision_start|>``, ``<|vision_end|>``,
  ``<|image_pad|>``, ``<|video_pad|>``; the template's own tokens (``<|im_start|>``, role names,
  ``<|im_end|>``, newlines, think tags, a default system prompt) are trained like any text.
"""
from __future__ import annotations

import contextvars
import json
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Optional

__all__ = ["ChatTemplate", "ChatTemplateError", "find_chat_template", "load_chat_template", "special_tokens_of",
           "TEMPLATE_FILES", "to_hf_messages"]

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMAGE_MARKER = "<image>"  # sample.IMAGE_PLACEHOLDER (not imported: sample.py must stay free of this module)
# transformers 5's lookup order for the default template of a checkpoint directory
TEMPLATE_FILES = ("processor_config.json", "chat_template.json", "chat_template.jinja", "tokenizer_config.json")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_RECORDER: contextvars.ContextVar = contextvars.ContextVar("chat_template_generation_spans", default=None)


class ChatTemplateError(ValueError):
    """A chat template that cannot be found, read or used; the message names the file."""


# ------------------------------------------------------------------------------------------------
# Finding the template
# ------------------------------------------------------------------------------------------------
def _template_from_json(path: str, data: Any) -> Optional[str]:
    t = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(t, list):  # tokenizer_config.json with several named templates
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if "default" not in named:
            raise ChatTemplateError(f"{path}: has named chat templates {sorted(map(str, named))} but no 'default'")
        t = named["default"]
    if t is not None and not isinstance(t, str):
        raise ChatTemplateError(f"{path}: 'chat_template' must be a string, got {type(t).__name__}")
    return t or None


def load_chat_template(path: str) -> tuple[str, str]:
    """``(template, path)`` from a ``.jinja`` file (the template itself) or a JSON file holding a
    ``chat_template`` key. Raises ``FileNotFoundError`` / ``ChatTemplateError`` naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"chat template file {path!r} does not exist (--chat-template)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith(".json"):
        if not text.strip():
            raise ChatTemplateError(f"chat template file {path} is empty")
        return text, path
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ChatTemplateError(f"{path}: not valid JSON: {e}") from e
    t = _template_from_json(path, data)
    if t is None:
        raise ChatTemplateError(f"{path} holds no 'chat_template' (--chat-template)")
    return t, path


def find_chat_template(directory: str) -> Optional[tuple[str, str]]:
    """``(template, path)`` of the first of ``TEMPLATE_FILES`` in ``directory`` that holds one, or
    None when none does (``processor_config.json``/``tokenizer_config.json`` need not have one)."""
    for name in TEMPLATE_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".jinja"):
            return load_chat_template(path)
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ChatTemplateError(f"{path}: not valid JSON: {e}") from e
        t = _template_from_json(path, data)
        if t is not None:
            return t, path
    return None


def special_tokens_of(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The template variables HF passes from the tokenizer config (``bos_token``, ...); a token
    may be stored as a string or as an ``AddedToken`` dict with ``content``."""
    out = {}
    for k in SPECIAL_TOKEN_KEYS:
        v = tokenizer_config.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[k] = v
    return out


# ------------------------------------------------------------------------------------------------
# The Jinja environment (HF's, so that templates render byte for byte as in transformers)
# ------------------------------------------------------------------------------------------------
def _compile(template: str, source: str):
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # torch depends on jinja2, so this is unusual
        raise ChatTemplateError(f"rendering the chat template {source} needs jinja2: {e}") from e
    if tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ChatTemplateError(f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need >= 3.1.6")

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: records the character span it renders."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

        def _record(self, caller):
            out = caller()
            rec = _RECORDER.get()
            if rec is not None:
                blocks, spans = rec
                start = sum(len(b) for b in blocks)
                spans.append((start, start + len(out)))
            return out

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore attributes (as HF's)."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template {source} does not compile: {type(e).__name__}: {e}") from e


def to_hf_messages(conversation: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """Our turns (``{"role", "content"}`` with ``<image>`` markers) as HF chat messages."""
    out = []
    for turn in conversation:
        content: Any = turn["content"]
        if IMAGE_MARKER in content:
            items: list[dict[str, str]] = []
            for j, part in enumerate(content.split(IMAGE_MARKER)):
                if j:
                    items.append({"type": "image"})
                if part:
                    items.append({"type": "text", "text": part})
            content = items
        out.append({"role": turn["role"], "content": content})
    return out


def _chatml_turns(text: str) -> list[tuple[str, int, int, int]]:
    """``(role, start, body_start, end)`` of each ``<|im_start|>role\\n ... <|im_end|>`` turn of a
    rendered text (``end`` just after the ``<|im_end|>``)."""
    turns, pos = [], 0
    while (s := text.find(IM_START, pos)) >= 0:
        nl, e = text.find("\n", s), text.find(IM_END, s)
        if nl < 0 or e < 0 or nl > e:
            raise ChatTemplateError(f"the rendered chat has a turn without a 'role\\n' header or {IM_END} at "
                                    f"character {s}: {text[s:s + 80]!r}")
        turns.append((text[s + len(IM_START):nl], s, nl + 1, e + len(IM_END)))
        pos = e + len(IM_END)
    return turns


def _overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token: does its character range overlap one of the (sorted) spans (HF's rule)."""
    mask, j = [], 0
    for a, b in offsets:
        while j < len(spans) and a >= spans[j][1]:
            j += 1
        mask.append(j < len(spans) and b > spans[j][0])
    return mask


# ------------------------------------------------------------------------------------------------
# ChatTemplate
# ------------------------------------------------------------------------------------------------
class ChatTemplate:
    """A compiled chat template. ``source`` names where it came from (for messages and logs).

    At construction it renders a probe conversation: a template that fails, or (without
    ``{% generation %}`` markers) does not render ChatML turns, is refused here, at start-up,
    rather than on every sample."""

    def __init__(self, template: str, source: str = "<in memory>", special_tokens: Optional[Mapping[str, str]] = None):
        self.text = template
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._compiled = _compile(template, source)
        self.has_generation_markers = bool(_GENERATION_TAG.search(template))
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            text, _ = self.render(probe)
        except Exception as e:  # noqa: BLE001 -- whatever the template raises, say which template
            raise ChatTemplateError(f"chat template {source} fails on a plain user/assistant exchange: "
                                    f"{type(e).__name__}: {e}") from e
        if not self.has_generation_markers:
            try:
                roles = [t[0] for t in _chatml_turns(text)]
            except ChatTemplateError as e:
                raise ChatTemplateError(f"chat template {source}: {e}") from e
            if roles[-2:] != ["user", "assistant"]:
                raise ChatTemplateError(
                    f"chat template {source} does not render ChatML turns ('{IM_START}role\\n...{IM_END}'): a "
                    f"user/assistant exchange renders as {text[:200]!r}; the assistant's answers cannot be found "
                    "(add {% generation %} markers around them)")

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
               **kwargs) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its ``{% generation %}`` blocks."""
        variables = {**self.special_tokens, **kwargs}
        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        token = _RECORDER.set((blocks, spans))
        try:
            for block in self._compiled.generate(messages=list(messages), tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **variables):
                blocks.append(block)
        finally:
            _RECORDER.reset(token)
        return "".join(blocks), spans

    def assistant_spans(self, text: str, conversation_roles: Sequence[str],
                        generation_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Character spans of the assistant's answers in a rendered ``text`` (see the module docstring)."""
        if self.has_generation_markers:
            return sorted(generation_spans)
        turns = _chatml_turns(text)
        roles = [t[0] for t in turns]
        want = list(conversation_roles)
        if roles != want and not (roles[:1] == ["system"] and roles[1:] == want):
            raise ChatTemplateError(f"chat template {self.source} rendered the turns {roles} for a conversation "
                                    f"of {want}")
        return [(body, end) for role, _, body, end in turns if role == "assistant"]

    def tokenize(self, conversation: Sequence[Mapping[str, str]], tokenizer, image_tokens: Sequence[int],
                 answer_only_loss: bool = True) -> tuple[list[int], list[bool]]:
        """``(ids, trained)`` of a conversation whose images take ``image_tokens[i]`` ids each;
        ``trained[i]``: token i is a loss target (of the previous position). Raises
        ``ChatTemplateError`` when the template refuses the conversation or the placeholders do not
        match the images."""
        try:
            text, gen_spans = self.render(to_hf_messages(conversation))
        except Exception as e:  # raise_exception(...), or a template that trips on this conversation
            raise ChatTemplateError(f"chat template {self.source}: {type(e).__name__}: {e}") from e
        ids, offsets = tokenizer.encode_with_offsets(text)
        if answer_only_loss:
            spans = self.assistant_spans(text, [t["role"] for t in conversation], gen_spans)
            flags = _overlap_mask(offsets, spans)
        else:
            flags = [True] * len(ids)
        image, video = tokenizer.image_token_id, tokenizer.video_token_id
        vision = {tokenizer.vision_start_id, tokenizer.vision_end_id, image, video}
        out_ids: list[int] = []
        out_flags: list[bool] = []
        k = 0
        for i, f in zip(ids, flags):
            if i == image:
                if k == len(image_tokens):
                    raise ChatTemplateError(f"the rendered chat has more image placeholders than the "
                                            f"{len(image_tokens)} images (is there a literal <|image_pad|> in the text?)")
                out_ids += [i] * image_tokens[k]
                out_flags += [False] * image_tokens[k]
                k += 1
                continue
            if video is not None and i == video:
                raise ChatTemplateError("the rendered chat has a <|video_pad|>; videos are not supported")
            out_ids.append(i)
            out_flags.append(f and i not in vision)
        if k != len(image_tokens):
            raise ChatTemplateError(f"chat template {self.source} rendered {k} image placeholders for "
                                    f"{len(image_tokens)} images")
        return out_ids, out_flags

    def __repr__(self) -> str:
        return f"ChatTemplate({self.source!r}, generation markers={self.has_generation_markers})"
