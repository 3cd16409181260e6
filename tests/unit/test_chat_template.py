"""A checkpoint-style tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json`` with a chat
template): conversations render as HF's Qwen3-VL processor renders them, the assistant-only labels
equal HF's assistant masks, the all-text labels, the template lookup order, the errors (missing
special tokens, image markers vs images, unusable templates), conversations too long for a row,
and the trainer run end to end with ``--tokenizer DIR``.

Nothing can be downloaded, so the checkpoint is made here: a byte-level BPE built with ``tokenizers``
that has Qwen's special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, the vision
tokens; at small ids, not Qwen's) and a chat template written here with the structure of Qwen3.5's
(content macro with image/video/text items, a system turn first, a ``<think>`` block on the
assistant turns after the last user query, ``|trim``, ``<think>\\n`` in the generation prompt).
The oracle is transformers' own: ``Qwen3VLProcessor.apply_chat_template`` over the tokenizer that
``PreTrainedTokenizerFast.from_pretrained`` loads from the directory, with the Qwen2-VL image
processor (PIL backend), i.e. HF's rendering *and* HF's placeholder expansion, not ours by hand.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from multimodal_dev.arguments import parse_args
from multimodal_dev.data.chat_template import ChatTemplate, ChatTemplateError, find_chat_template
from multimodal_dev.data.collate import CollateConfig, pack_or_pad_batch
from multimodal_dev.data.providers import DataConfig, build_provider
from multimodal_dev.data.sample import SampleError, build_sample
from multimodal_dev.data.tokenizer import TextTokenizer, default_tokenizer_path

KW = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=256, max_pixels=65536)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
# Qwen3.5's pre-tokenizer split (transformers/models/qwen3_5/tokenization_qwen3_5.py)
SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
         r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Written for this test with the structure of Qwen3.5's template (see the module docstring).
QWEN35_LIKE = r"""{%- set images = namespace(n=0) %}
{%- macro body(content, count_vision, in_system=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for part in content %}
            {%- if 'image' in part or 'image_url' in part or part.type == 'image' %}
                {%- if in_system %}{{- raise_exception('images are not allowed in the system turn') }}{%- endif %}
                {%- if count_vision %}{%- set images.n = images.n + 1 %}{%- endif %}
                {%- if add_vision_id %}{{- 'Picture ' ~ images.n ~ ': ' }}{%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in part or part.type == 'video' %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in part %}
                {{- part.text }}
            {%- else %}
                {{- raise_exception('unknown content part') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('unknown content type') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}{{- raise_exception('no messages') }}{%- endif %}
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + body(messages[0].content, false, true)|trim + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}
{%- endfor %}
{%- if ns.last_query < 0 %}{{- raise_exception('no user query') }}{%- endif %}
{%- for m in messages %}
    {%- set content = body(m.content, true)|trim %}
    {%- if m.role == 'system' %}
        {%- if not loop.first %}{{- raise_exception('the system turn must come first') }}{%- endif %}
    {%- elif m.role == 'user' %}
        {{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
    {%- elif m.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if m.reasoning_content is string %}
            {%- set reasoning = m.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning|trim + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- raise_exception('unknown role') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}
    {%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}"""
# the same with HF's {% generation %} markers around everything after the assistant header
WITH_MARKERS = QWEN35_LIKE.replace(
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning|trim + '\\n</think>\\n\\n' + content }}",
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- '<think>\\n' + reasoning|trim + '\\n</think>\\n\\n'"
    " + content }}{{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}",
).replace(
    "{{- '<|im_start|>assistant\\n' + content }}",
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}",
).replace("        {{- '<|im_end|>\\n' }}\n    {%- else %}\n        {{- raise_exception('unknown role') }}",
          "    {%- else %}\n        {{- raise_exception('unknown role') }}")
# the shipped layout (sample.build_sample without a template) as a template
BUILTIN_LIKE = (r"""{%- for m in messages %}{%- if not loop.first %}{{- '\n' }}{%- endif %}"""
                r"""{{- '<|im_start|>' + m.role + '\n' }}{%- if m.content is string %}{{- m.content }}{%- else %}"""
                r"""{%- for p in m.content %}{%- if p.type == 'image' %}{{- '<|vision_start|><|image_pad|>"""
                r"""<|vision_end|>' }}{%- else %}{{- p.text }}{%- endif %}{%- endfor %}{%- endif %}"""
                r"""{{- '<|im_end|>' }}{%- endfor %}""")

CONV = [
    {"role": "system", "content": "You see shapes."},
    {"role": "user", "content": "<image>\nWhat shape is this?"},
    {"role": "assistant", "content": "a red circle"},
    {"role": "user", "content": "And <image> here?"},
    {"role": "assistant", "content": "two"},
]


def _img(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [_img(24, 40), _img(16, 16, 1)]  # grids (1, 6, 10) and (1, 4, 4): 15 and 4 image tokens


def _make_checkpoint(d, template=QWEN35_LIKE, where="tokenizer_config.json", specials=SPECIALS, pad="<|endoftext|>"):
    """A checkpoint-style directory: tokenizer.json, tokenizer_config.json and the template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [("Ċ", "Ċ"), ("e", "d"), ("Ġ", "r")]  # "\n\n" (the think block's), "ed", " r"
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in ("<think>", "</think>")])
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": pad,
           "model_max_length": 4096}
    if where == "tokenizer_config.json":
        cfg["chat_template"] = template
    elif where == "chat_template.jinja":
        with open(os.path.join(d, where), "w") as f:
            f.write(template)
    elif where == "chat_template.json":
        with open(os.path.join(d, where), "w") as f:
            json.dump({"chat_template": template}, f)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return {s: tok.token_to_id(s) for s in specials}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ckpt"))
    return d, _make_checkpoint(d)


def _model_ids(ids, vocab=272):
    return dict(model_vocab_size=vocab, image_token_id=ids["<|image_pad|>"], vision_start_id=ids["<|vision_start|>"],
                vision_end_id=ids["<|vision_end|>"], video_token_id=ids["<|video_pad|>"])


def _tok(d, ids, **kw):
    m = _model_ids(ids)
    return TextTokenizer.for_model(m["model_vocab_size"], m["image_token_id"], m["vision_start_id"],
                                   m["vision_end_id"], path=d, video_token_id=m["video_token_id"], **kw)


def _hf_processor(d):
    """HF's Qwen3-VL processor over the directory's tokenizer (and the template HF found there)."""
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class Processor(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, arg):  # no video processor (its lookup needs torchvision)
            return None

    hf_tok = PreTrainedTokenizerFast.from_pretrained(d)
    ip = Qwen2VLImageProcessorPil(patch_size=KW["patch_size"], temporal_patch_size=KW["temporal_patch_size"],
                                  merge_size=KW["merge_size"], min_pixels=KW["min_pixels"],
                                  max_pixels=KW["max_pixels"], image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Processor(image_processor=ip, tokenizer=hf_tok, video_processor=None, chat_template=hf_tok.chat_template)


HF_MESSAGES = [  # CONV in HF's message format, written out (not through our to_hf_messages)
    {"role": "system", "content": "You see shapes."},
    {"role": "user", "content": [{"type": "image", "image": IMAGES[0]},
                                 {"type": "text", "text": "\nWhat shape is this?"}]},
    {"role": "assistant", "content": "a red circle"},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image", "image": IMAGES[1]},
                                 {"type": "text", "text": " here?"}]},
    {"role": "assistant", "content": "two"},
]


def _trained(sample):
    """Per token: is it a loss target (of the previous position)."""
    return [False] + (sample["labels"][:-1] != -100).tolist()


def test_renders_as_the_hf_processor(ckpt):
    d, ids = ckpt
    t = _tok(d, ids)
    assert t.chat_template is not None and t.chat_template.source.endswith("tokenizer_config.json")
    assert t.pad_id == ids["<|endoftext|>"]  # the config's pad token: the tokenizer has no <|pad|>
    s = build_sample(CONV, IMAGES, t, image_processor_kwargs=KW, key="k")
    out = _hf_processor(d).apply_chat_template(HF_MESSAGES, tokenize=True, return_dict=True)
    assert s["tokens"].tolist() == list(out["input_ids"][0])
    assert s["image_grid_thw"].tolist() == np.asarray(out["image_grid_thw"]).tolist() == [[1, 6, 10], [1, 4, 4]]
    np.testing.assert_allclose(s["pixel_values"].numpy(), np.asarray(out["pixel_values"]), rtol=0, atol=1e-6)
    text = t.decode(s["tokens"].tolist())
    assert text == ("<|im_start|>system\nYou see shapes.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 15 + "<|vision_end|>\nWhat shape is this?"
                    "<|im_end|>\n<|im_start|>assistant\na red circle<|im_end|>\n"
                    "<|im_start|>user\nAnd <|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|> here?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\ntwo<|im_end|>\n")


def test_text_only_equals_the_hf_tokenizer(ckpt):
    d, ids = ckpt
    from transformers import PreTrainedTokenizerFast

    conv = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "  hello\n"}]
    s = build_sample(conv, [], _tok(d, ids), image_processor_kwargs=KW)
    ref = PreTrainedTokenizerFast.from_pretrained(d).apply_chat_template(conv, tokenize=True, return_dict=False)
    assert s["tokens"].tolist() == list(ref)


def test_assistant_only_labels(ckpt):
    d, ids = ckpt
    t = _tok(d, ids)
    s = build_sample(CONV, IMAGES, t, image_processor_kwargs=KW)
    targets = [lab for lab in s["labels"].tolist() if lab != -100]
    # each assistant turn from after its "<|im_start|>assistant\n" header through its <|im_end|>: the first
    # answer (a user turn follows it: no think block) and the last with the template's empty think block
    assert t.decode(targets) == "a red circle<|im_end|><think>\n\n</think>\n\ntwo<|im_end|>"
    assert s["labels"][-1] == -100


def test_chatml_rule_equals_hf_masks_of_the_marked_template(ckpt, tmp_path):
    # HF's convention for Qwen templates (TRL's assistant_only_loss): {% generation %} from after the
    # "<|im_start|>assistant\n" header through <|im_end|>. The same template with those markers renders
    # the same text, and HF's assistant_masks over it are our labels of the unmarked template.
    d, ids = ckpt
    marked = str(tmp_path)
    _make_checkpoint(marked, WITH_MARKERS)
    ours = build_sample(CONV, IMAGES, _tok(d, ids), image_processor_kwargs=KW)
    out = _hf_processor(marked).apply_chat_template(HF_MESSAGES, tokenize=True, return_dict=True,
                                                    return_assistant_tokens_mask=True)
    assert ours["tokens"].tolist() == list(out["input_ids"][0])
    assert sum(out["assistant_masks"][0]) > 0
    assert _trained(ours) == [bool(m) for m in out["assistant_masks"][0]]


def test_all_text_labels(ckpt):
    d, ids = ckpt
    s = build_sample(CONV, IMAGES, _tok(d, ids), image_processor_kwargs=KW, answer_only_loss=False)
    tokens = s["tokens"].tolist()
    vision = {ids[k] for k in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    assert _trained(s) == [i > 0 and tok not in vision for i, tok in enumerate(tokens)]
    labels = s["labels"].tolist()
    assert all(lab == tokens[i + 1] for i, lab in enumerate(labels[:-1]) if lab != -100)


def test_generation_markers_equal_hf_assistant_masks(tmp_path):
    d = str(tmp_path)
    ids = _make_checkpoint(d, WITH_MARKERS)
    t = _tok(d, ids)
    assert t.chat_template.has_generation_markers
    s = build_sample(CONV, IMAGES, t, image_processor_kwargs=KW)
    out = _hf_processor(d).apply_chat_template(HF_MESSAGES, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
    assert s["tokens"].tolist() == list(out["input_ids"][0])
    assert _trained(s) == [bool(m) for m in out["assistant_masks"][0]]
    assert t.decode([x for x in s["labels"].tolist() if x != -100]) == (
        "a red circle<|im_end|><think>\n\n</think>\n\ntwo<|im_end|>")


def test_builtin_layout_as_a_template_gives_the_builtin_sample(tmp_path):
    # the shipped tokenizer with a template of the built-in layout: the same tokens and labels as without
    p = tmp_path / "builtin.jinja"
    p.write_text(BUILTIN_LIKE)
    plain = TextTokenizer.from_file()
    templ = TextTokenizer.from_file(chat_template=str(p))
    assert plain.chat_template is None and not templ.chat_template.has_generation_markers
    conv = [{"role": k["role"], "content": k["content"]} for k in CONV]
    for answer_only in (True, False):
        a = build_sample(conv, IMAGES, plain, image_processor_kwargs=KW, answer_only_loss=answer_only)
        b = build_sample(conv, IMAGES, templ, image_processor_kwargs=KW, answer_only_loss=answer_only)
        assert a["tokens"].tolist() == b["tokens"].tolist()
        assert a["labels"].tolist() == b["labels"].tolist()


def test_builtin_layout_all_text_labels():
    t = TextTokenizer.from_file()
    s = build_sample(CONV[1:3], IMAGES[:1], t, image_processor_kwargs=KW, answer_only_loss=False)
    tokens = s["tokens"].tolist()
    assert _trained(s) == [i > 0 and tok not in (248, 249, 250, 251) for i, tok in enumerate(tokens)]


def test_lookup_order_and_tokenizer_path_forms(tmp_path):
    from transformers import PreTrainedTokenizerFast

    d = str(tmp_path)
    ids = _make_checkpoint(d, "{# config #}" + QWEN35_LIKE)
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("{# jinja #}" + QWEN35_LIKE)
    assert find_chat_template(d)[1].endswith("chat_template.jinja")
    assert PreTrainedTokenizerFast.from_pretrained(d).chat_template.startswith("{# jinja #}")  # HF agrees
    with open(os.path.join(d, "chat_template.json"), "w") as f:
        json.dump({"chat_template": "{# legacy #}" + QWEN35_LIKE}, f)
    assert find_chat_template(d)[0].startswith("{# legacy #}")  # the processor's legacy file first
    # --tokenizer as the directory or as its tokenizer.json: the same template
    for path in (d, os.path.join(d, "tokenizer.json")):
        m = _model_ids(ids)
        t = TextTokenizer.for_model(m["model_vocab_size"], m["image_token_id"], m["vision_start_id"],
                                    m["vision_end_id"], path=path)
        assert t.chat_template.text.startswith("{# legacy #}")
    os.remove(os.path.join(d, "chat_template.json"))
    os.remove(os.path.join(d, "chat_template.jinja"))
    assert find_chat_template(d)[0].startswith("{# config #}")
    assert _tok(d, ids, chat_template="none").chat_template is None


def test_directory_without_template_uses_the_builtin_layout(tmp_path, caplog):
    d = str(tmp_path)
    ids = _make_checkpoint(d, where="nowhere")
    with caplog.at_level("WARNING"):
        t = _tok(d, ids)
    assert t.chat_template is None and "no chat template" in caplog.text
    s = build_sample(CONV[1:3], IMAGES[:1], t, image_processor_kwargs=KW)
    assert t.decode(s["tokens"].tolist()).endswith("<|im_start|>assistant\na red circle<|im_end|>")


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}", "does not render ChatML"),
    ("{% for m in messages %}{{ m.content }", "does not compile"),
    ("{{ raise_exception('no') }}", "fails on a plain user/assistant exchange"),
])
def test_unusable_templates_are_refused_at_load(tmp_path, template, match):
    d = str(tmp_path)
    ids = _make_checkpoint(d, template)
    with pytest.raises(ChatTemplateError, match=match):
        _tok(d, ids)


def test_missing_template_or_tokenizer_errors(tmp_path, ckpt):
    d, ids = ckpt
    with pytest.raises(FileNotFoundError, match="--chat-template"):
        _tok(d, ids, chat_template=str(tmp_path / "nope.jinja"))
    empty = tmp_path / "tokenizer_config.json"
    empty.write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ChatTemplateError, match="holds no 'chat_template'"):
        _tok(d, ids, chat_template=str(empty))
    with pytest.raises(FileNotFoundError, match="without tokenizer.json"):
        TextTokenizer.from_file(str(tmp_path))


def test_a_tokenizer_without_the_special_tokens_is_refused(tmp_path):
    d = str(tmp_path)
    _make_checkpoint(d, specials=[s for s in SPECIALS if s not in ("<|im_start|>", "<|vision_start|>")])
    with pytest.raises(ValueError) as e:
        TextTokenizer.from_file(d)
    msg = str(e.value)
    assert "--tokenizer" in msg and os.path.join(d, "tokenizer.json") in msg
    assert "lacks the special tokens '<|im_start|>', '<|vision_start|>'" in msg
    assert "'<|im_end|>'" not in msg.split("lacks")[1].split(";")[0]  # only the missing ones are listed


def test_a_pad_token_the_tokenizer_lacks_is_named_with_its_config(tmp_path):
    d = str(tmp_path)
    _make_checkpoint(d, pad="<|pad|>")
    with pytest.raises(ValueError, match=r"lacks the special tokens '<\|pad\|>' .*pad_token of .*tokenizer_config"):
        TextTokenizer.from_file(d)


def test_special_tokens_must_be_recognised_whole(tmp_path):
    # "<|im_end|>" in the vocabulary but not an added token: the text "<|im_end|>" would be split
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    chars = sorted(set("<|>_abcdefghijklmnopqrstuvwxyz"))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<|im_end|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS if s != "<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"not recognised whole .*'<\|im_end\|>'"):
        TextTokenizer.from_file(str(tmp_path))


def test_ids_must_match_the_model(ckpt):
    d, ids = ckpt
    m = _model_ids(ids)
    with pytest.raises(ValueError, match=r"--tokenizer .* <\|image_pad\|> is %d in the tokenizer but the model's "
                                         r"image_token_id is 270" % ids["<|image_pad|>"]):
        TextTokenizer.for_model(272, 270, m["vision_start_id"], m["vision_end_id"], path=d)
    with pytest.raises(ValueError, match="video_token_id is 271"):
        TextTokenizer.for_model(272, m["image_token_id"], m["vision_start_id"], m["vision_end_id"], path=d,
                                video_token_id=271)
    with pytest.raises(ValueError, match="does not fit the model"):
        TextTokenizer.for_model(266, m["image_token_id"], m["vision_start_id"], m["vision_end_id"], path=d)


def test_samples_the_template_refuses_are_sample_errors(ckpt):
    d, ids = ckpt
    t = _tok(d, ids)
    late_system = [CONV[1], {"role": "system", "content": "x"}, CONV[2]]
    with pytest.raises(SampleError, match=r"'bad'.*the system turn must come first"):
        build_sample(late_system, IMAGES[:1], t, image_processor_kwargs=KW, key="bad")
    literal = [{"role": "user", "content": "<image> and <|image_pad|>"}, CONV[2]]
    with pytest.raises(SampleError, match=r"sample 'lit'.*more image placeholders"):
        build_sample(literal, IMAGES[:1], t, image_processor_kwargs=KW, key="lit")
    for n in (1, 3):  # two <image> markers: one image too few, one too many
        with pytest.raises(SampleError, match=rf"sample 'shard-0:k7'.*2 <image> markers but the sample has {n} images"):
            build_sample(CONV, [IMAGES[0]] * n, t, image_processor_kwargs=KW, key="shard-0:k7")


def test_rendered_roles_are_checked(ckpt):
    d, ids = ckpt
    t = _tok(d, ids)
    c = t.chat_template
    text, spans = c.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(ChatTemplateError, match="rendered the turns"):
        c.assistant_spans(text, ["user", "assistant", "user"], spans)
    other = ChatTemplate(BUILTIN_LIKE, "builtin")
    assert not other.has_generation_markers


def test_providers_and_cli(ckpt):
    d, ids = ckpt
    cfg = DataConfig(provider="mock", seed=2, tokenizer_path=d, answer_only_loss=False, mock_min_tokens=60,
                     mock_max_tokens=120, **_model_ids(ids))
    p = build_provider(cfg)
    it = p.samples(0, 1)
    samples = [next(it) for _ in range(4)]
    for s in samples:
        assert p.tokenizer.decode(s["tokens"].tolist()).startswith("<|im_start|>user\n")
        assert (s["labels"] != -100).sum() > 0
    b = pack_or_pad_batch(samples, p.collate_config(layout="thd", divisible_by=1))
    assert b["tokens"].shape[1] == sum(s["tokens"].numel() for s in samples)
    assert isinstance(p.collate_config(), CollateConfig) and p.collate_config().pad_token_id == ids["<|endoftext|>"]
    # padded rows (all text): the padding is never a target; every other non-vision text token is one
    longest = max(s["tokens"].numel() for s in samples)
    b = pack_or_pad_batch(samples, p.collate_config(layout="bshd", target_seqlen=longest + 3, divisible_by=1))
    vision = {ids[k] for k in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")}
    for row, s in enumerate(samples):
        n = s["tokens"].numel()
        assert b["padding_mask"][row, n:].all() and not b["padding_mask"][row, :n].any()
        assert (b["labels"][row, n - 1:] == -100).all() and (b["loss_mask"][row, n - 1:] == 0).all()
        want = [t not in vision for t in s["tokens"][1:].tolist()]
        assert (b["labels"][row, :n - 1] != -100).tolist() == want

    run = parse_args(["--tokenizer", d, "--no-answer-only-loss", "--chat-template", "none"], world_size=1)
    assert (run.data.tokenizer, run.data.answer_only_loss, run.data.chat_template) == (d, False, "none")
    run = parse_args([], world_size=1)
    assert (run.data.tokenizer, run.data.answer_only_loss, run.data.chat_template) == (None, True, "auto")


# ---------------------------------------------------------------------------------------------- trainer
ENTRY = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "multimodal_dev", "pretrain_multimodal.py")
TRAIN = ["--variant", "tiny", "--dataset-provider", "mock", "--micro-batch-size", "2", "--global-batch-size", "2",
         "--seq-length", "256", "--layout-independent-init", "--lr-warmup-iters", "1", "--no-progress-bar",
         "--seed", "7", "--train-iters", "2"]


def _make_tiny_checkpoint_tokenizer(d, missing=()):
    """A saved tokenizer directory that fits the ``tiny`` variant (vocabulary 256; vision start/end,
    image, video at 248..251): a character-level BPE built with ``tokenizers``, Qwen's chat tokens at
    0..2, ``<think>``/``</think>`` added; tokenizer.json, tokenizer_config.json, chat_template.jinja.
    ``missing``: special tokens left out (their ids hold placeholders)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<unk>": 3}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    while len(vocab) < 248:
        vocab[f"<|reserved_{len(vocab)}|>"] = len(vocab)
    vocab.update({"<|vision_start|>": 248, "<|vision_end|>": 249, "<|image_pad|>": 250, "<|video_pad|>": 251})
    vocab = {(f"<|reserved_{i}|>" if t in missing else t): i for t, i in vocab.items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS if s not in missing])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in ("<think>", "</think>")])
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>"}, f)
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write(QWEN35_LIKE)
    return d


def _train(args, timeout=300):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MMDEV_FAULT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, ENTRY, *TRAIN, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _records(path):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("split", "train") == "train"]


def test_the_tiny_checkpoint_tokenizer_renders_through_its_template(tmp_path):
    d = _make_tiny_checkpoint_tokenizer(str(tmp_path / "tok"))
    t = TextTokenizer.for_model(256, 250, 248, 249, path=d, video_token_id=251)
    assert t.chat_template.source.endswith("chat_template.jinja") and t.pad_id == 0
    s = build_sample(CONV[1:3], IMAGES[:1], t, image_processor_kwargs=KW)
    assert t.decode(s["tokens"].tolist()) == (
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 15 + "<|vision_end|>\nWhat shape is this?"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\na red circle<|im_end|>\n")


def test_trainer_runs_with_a_checkpoint_tokenizer_directory(tmp_path):
    d = _make_tiny_checkpoint_tokenizer(str(tmp_path / "tok"))
    runs = {}
    for name, extra in (("answers", []), ("all_text", ["--no-answer-only-loss"]),
                        ("truncated", ["--seq-length", "48", "--truncate"])):
        m = tmp_path / f"{name}.jsonl"
        r = _train(["--tokenizer", d, "--metrics-file", str(m), *extra])
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"chat template of {os.path.join(d, 'chat_template.jinja')}" in r.stderr
        runs[name] = (_records(m), r.stderr)
    for recs, _ in runs.values():
        assert [x["iteration"] for x in recs] == [1, 2]
        assert all(np.isfinite(x["lm_loss"]) and x["lm_loss"] > 0 for x in recs)
    # the same samples and initial weights: the loss over all text is another loss than over the answers
    assert runs["all_text"][0][0]["lm_loss"] != runs["answers"][0][0]["lm_loss"]
    assert runs["answers"][0][0]["truncated_samples"] == 0
    # a conversation longer than --seq-length: cut, counted and logged, as any sample
    recs, err = runs["truncated"]
    assert recs[0]["truncated_samples"] > 0 and "truncated" in err


def test_trainer_refuses_a_tokenizer_without_the_special_tokens(tmp_path):
    d = _make_tiny_checkpoint_tokenizer(str(tmp_path / "tok"), missing=("<|vision_end|>",))
    r = _train(["--tokenizer", d])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: --tokenizer" in r.stderr and "lacks the special tokens '<|vision_end|>'" in r.stderr
    assert "Traceback" not in r.stderr


def test_tokenizer_flags_are_checked_when_parsed(tmp_path, ckpt):
    from multimodal_dev.arguments import ArgumentError

    with pytest.raises(ArgumentError, match="--tokenizer .*nope.* does not exist"):
        parse_args(["--tokenizer", str(tmp_path / "nope")], world_size=1)
    with pytest.raises(ArgumentError, match="--tokenizer .* is a directory without tokenizer.json"):
        parse_args(["--tokenizer", str(tmp_path)], world_size=1)
    with pytest.raises(ArgumentError, match="--chat-template .*nope.jinja.*: no such file"):
        parse_args(["--chat-template", str(tmp_path / "nope.jinja")], world_size=1)
    # --hf-checkpoint: its own tokenizer unless --tokenizer says otherwise; none there: the shipped one
    d, _ = ckpt
    assert parse_args(["--hf-checkpoint", d], world_size=1).data.tokenizer == d
    shipped = default_tokenizer_path()
    assert parse_args(["--hf-checkpoint", d, "--tokenizer", shipped], world_size=1).data.tokenizer == shipped
    assert parse_args(["--hf-checkpoint", str(tmp_path)], world_size=1).data.tokenizer is None


def _write_shard(path, samples):
    """A WebDataset tar: per sample ``KEY.json`` (``{"conversation": ...}``) and ``KEY.N.png``."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, conv, images in samples:
            files = {f"{key}.json": json.dumps({"conversation": conv}).encode()}
            for i, im in enumerate(images):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                files[f"{key}.{i}.png"] = buf.getvalue()
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_conversations_too_long_for_the_row(tmp_path, caplog):
    d = _make_tiny_checkpoint_tokenizer(str(tmp_path / "tok"))
    long_answer = " ".join(["circle"] * 20)
    shard = str(tmp_path / "s-000000.tar")
    _write_shard(shard, [("short", CONV[1:3], IMAGES[:1]),
                         ("long", [CONV[1], {"role": "assistant", "content": long_answer}], IMAGES[:1])])
    cfg = DataConfig(provider="webdataset", data_path=[shard], seed=1, tokenizer_path=d, shuffle=False,
                     video_token_id=251, **{k: KW[k] for k in ("patch_size", "merge_size", "min_pixels", "max_pixels")})
    p = build_provider(cfg)
    full = {s["__key__"]: s for s in (next(it) for it in [p.samples(0, 1)] for _ in range(2))}
    n_short, n_long = full["short"]["tokens"].numel(), full["long"]["tokens"].numel()
    assert n_short < n_long
    # without truncation (the collate's row length as the limit): skipped, counted, logged with its key
    with caplog.at_level("WARNING"):
        it = p.samples(0, 1, max_tokens=n_short)
        got = [next(it)["__key__"] for _ in range(2)]
    assert got == ["short", "short"] and it.stats["skipped_samples"] == 1 and "long" in caplog.text
    # with --truncate: cut to the row, counted; the kept targets are the full sample's first ones
    b = pack_or_pad_batch([full["long"]], p.collate_config(layout="bshd", target_seqlen=n_short, truncate=True,
                                                            divisible_by=1))
    assert b["stats"]["truncated_samples"] == 1 and b["tokens"].shape == (1, n_short)
    assert b["labels"][0, :-1].tolist() == full["long"]["labels"][:n_short - 1].tolist()
