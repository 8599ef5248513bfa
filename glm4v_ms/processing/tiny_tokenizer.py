"""A small offline stand-in for the GLM-4.1V tokenizer, and token-id lookups that work on the real one too.

The real ``tokenizer.json`` (151,329 byte-level BPE tokens) only ships with the checkpoint. Tests and tiny models need
a tokenizer with the same *structure*, built without network access:

* byte-level BPE with GLM-4's pre-tokeniser regex, trained here on a few dozen English / Chinese sentences and digits;
* GLM-4.1V's 18 special tokens, in the real relative order, right after the base vocabulary
  (real ids 151329 ... 151346, here ``base ... base + 17``);
* ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` as *non-special* added tokens (they survive
  ``skip_special_tokens=True``, as in HF's integration test);
* eos = pad = ``<|endoftext|>``, padding on the left, model_max_length 65536;
* GLM-4.1V's chat template (spec 6.4).

``build_tiny_tokenizer(folder)`` saves it with transformers 4.57 (a 5.x-saved tokenizer_config.json names a class 4.57
does not know), so ``AutoTokenizer.from_pretrained(folder)`` reloads it under ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, List

# GLM-4.1V special tokens in the order of their real ids (151329, 151330, ...).
SPECIAL_TOKENS: List[str] = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>", "<|begin_of_box|>", "<|end_of_box|>",
]
# Added after the specials; not flagged special, so decoding with skip_special_tokens keeps them.
THINKING_TOKENS: List[str] = ["<think>", "</think>", "<answer>", "</answer>"]

# GLM-4.6V-Flash variant. What is public (transformers 5.x Glm46VConfig defaults and the published config): image
# span 151339 / 151340, <|image|> / <|video|> 151343 / 151344 (base + 10, 11, 14, 15, as in 4.1V) and the video span
# 151361 / 151362 (base + 32, 33 instead of 4.1V's base + 12, 13). The real tokenizer's full order was not available
# offline, so the tiny variant keeps 4.1V's order where the ids agree, moves the box tokens into the freed slots
# 12 / 13, fills 16 .. 31 with reserved tokens, and puts the video span at 32 / 33: every id the model, the
# processor and get_rope_index read sits at its real offset from <|endoftext|>.
SPECIAL_TOKENS_46V: List[str] = (
    SPECIAL_TOKENS[:12] + ["<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>"]
    + [f"<|reserved_{i}|>" for i in range(16, 32)] + ["<|begin_of_video|>", "<|end_of_video|>"])
# GLM-4.6V's tool-call and thinking markup, as non-special added tokens (they stay in decoded text, where the
# tool-call parser reads them).
TOOL_TOKENS: List[str] = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
                          "<tool_response>", "</tool_response>", "/nothink"]
THINKING_TOKENS_46V: List[str] = ["<think>", "</think>"] + TOOL_TOKENS

# GLM-4.5V / GLM-4.6V (glm4v_moe) variant. What is public (transformers 4.57's Glm4vMoeConfig defaults): image span
# 151339 / 151340 and video span 151341 / 151342 (base + 10 .. 13, as in 4.1V), <|image|> / <|video|> 151363 / 151364
# (base + 34, 35). The tiny variant keeps 4.1V's first 14 specials, fills 14 .. 31 with reserved tokens (the real
# file's tokens there, audio / code / thinking / tool markup, were not verifiable offline), puts the box tokens at
# 32 / 33 and <|image|> / <|video|> at 34 / 35: every id the model, the processor and get_rope_index read sits at its
# real offset from <|endoftext|>. Thinking and tool markup are 4.6V's non-special added tokens.
SPECIAL_TOKENS_45V: List[str] = (
    SPECIAL_TOKENS[:14] + [f"<|reserved_{i}|>" for i in range(14, 32)]
    + ["<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>"])

VARIANTS = ("4.1v", "4.6v", "4.5v")

# GLM-4's tiktoken split pattern (spec 6.5): letters, 1-3 digit groups, punctuation runs, newlines, spaces.
GLM4_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# GLM-4.1V's chat template, rendered exactly as in spec 6.4 (no end-of-turn token, no separator between items).
# Every piece is an explicit expression with whitespace control, so the output does not depend on trim_blocks.
CHAT_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- for msg in messages -%}"
    "{%- if msg['role'] == 'system' -%}{{- '<|system|>\\n' -}}"
    "{%- elif msg['role'] == 'user' -%}{{- '<|user|>\\n' -}}"
    "{%- elif msg['role'] == 'observation' -%}{{- '<|observation|>\\n' -}}"
    "{%- elif msg['role'] == 'assistant' -%}{{- '<|assistant|>' -}}"
    "{%- if msg['metadata'] is defined and msg['metadata'] -%}{{- msg['metadata'] -}}{%- endif -%}{{- '\\n' -}}"
    "{%- else -%}{{- raise_exception('GLM-4.1V chat template: unknown role ' ~ msg['role']) -}}"
    "{%- endif -%}"
    "{%- if msg['content'] is string -%}{{- msg['content'] -}}"
    "{%- elif msg['content'] is not none -%}"
    "{%- for item in msg['content'] -%}"
    "{%- if item['type'] == 'video' -%}{{- '<|begin_of_video|><|video|><|end_of_video|>' -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|begin_of_image|><|image|><|end_of_image|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

# GLM-4.6V's chat template, modelled on the published one (chat_template.jinja of GLM-4.6V-Flash / GLM-4.5V): a tool
# list in a system turn, assistant tool calls as <tool_call>NAME\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>...
# </tool_call> (string values as they are, others as JSON), consecutive "tool" messages in one <|observation|> turn
# as <tool_response> blocks, thinking closed with </think> on earlier turns, and media placeholders. Simplified:
# reasoning_content of earlier assistant turns is dropped (the template keeps only the answer), no /nothink switch.
CHAT_TEMPLATE_46V = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- if tools -%}"
    "{{- '<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson(ensure_ascii=False) -}}{{- '\n' -}}{%- endfor -%}"
    "{{- '</tools>\n\nFor each function call, output the function name and arguments within the following XML "
    "format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>' -}}"
    "{%- endif -%}"
    "{%- macro visible(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is not none -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] == 'video' -%}{{- '<|begin_of_video|><|video|><|end_of_video|>' -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<|begin_of_image|><|image|><|end_of_image|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- '<|system|>\n' + visible(m['content']) -}}"
    "{%- elif m['role'] == 'user' -%}{{- '<|user|>\n' + visible(m['content']) -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = visible(m['content']) -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<|assistant|>\n</think>' + content.strip() -}}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] -%}"
    "{%- for tc in m['tool_calls'] -%}"
    "{%- set f = tc['function'] if tc['function'] is defined else tc -%}"
    "{{- '\n<tool_call>' + f['name'] + '\n' -}}"
    "{%- for k, v in f['arguments'].items() -%}"
    "{{- '<arg_key>' + k + '</arg_key>\n<arg_value>' -}}"
    "{%- if v is string -%}{{- v -}}{%- else -%}{{- v | tojson(ensure_ascii=False) -}}{%- endif -%}"
    "{{- '</arg_value>\n' -}}"
    "{%- endfor -%}"
    "{{- '</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|observation|>' -}}{%- endif -%}"
    "{{- '\n<tool_response>\n' + visible(m['content']) + '\n</tool_response>' -}}"
    "{%- else -%}{{- raise_exception('GLM-4.6V chat template: unknown role ' ~ m['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

# Training text: enough variety for a few dozen merges in both scripts, plus the digits timestamps use.
_CORPUS: List[str] = [
    "What kind of dog is this?", "Describe this image in detail.", "Describe the video.",
    "The quick brown fox jumps over the lazy dog.", "A cat is sitting on the table next to a cup of tea.",
    "There are two people walking along the beach at sunset.", "Please read the text in the picture.",
    "How many apples are on the plate?", "The answer is 42.", "You are a helpful assistant.",
    "Let me think step by step about what the picture shows.", "The chart shows sales rising from 2019 to 2024.",
    "In the first frame a car enters from the left; then it stops.", "Summarise the document on page 3.",
    "This is a photo of a red bicycle leaning against a wall.", "Is the traffic light green or red?",
    "这是什么狗？", "请详细描述这张图片。", "图中有几个人？", "视频里发生了什么？",
    "一只猫坐在桌子上。", "答案是四十二。", "请一步一步地思考。", "这份文件的第三页讲了什么？",
    "天空是蓝色的，草地是绿色的。", "我们今天去公园散步。",
    "0 1 2 3 4 5 6 7 8 9", "10 11 12 13 14 15 16 17 18 19 20", "30 45 60 90 120 150 180 240 299 300",
    "3.14159 2.71828 1.41421", "2025-01-31 12:30:45", "x = 14 * 14 * 2 * 2 * 2 * 6144",
    "Q: 7 + 8 = ? A: 15", "第1帧 第2帧 第10帧",
]


def _variant_tokens(variant: str):
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny tokenizer variant {variant!r}; use one of {VARIANTS}")
    if variant == "4.1v":
        return SPECIAL_TOKENS, THINKING_TOKENS
    return (SPECIAL_TOKENS_46V if variant == "4.6v" else SPECIAL_TOKENS_45V), THINKING_TOKENS_46V


def _train_backend(vocab_size: int, variant: str = "4.1v"):
    """Train the byte-level BPE and append GLM's added tokens; returns a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, added = _variant_tokens(variant)
    base_vocab = vocab_size - len(specials) - len(added)
    if base_vocab <= 256:
        raise ValueError(f"vocab_size={vocab_size} leaves {base_vocab} base tokens; byte-level BPE needs more than "
                         f"256 (the byte alphabet) plus {len(specials) + len(added)} added tokens")
    tok = Tokenizer(models.BPE())
    # Split with GLM's regex first, then map bytes to printable characters (no regex of ByteLevel's own).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=base_vocab, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    got = tok.get_vocab_size()
    if got != base_vocab:
        raise RuntimeError(f"BPE training produced {got} tokens instead of {base_vocab}; the built-in corpus is "
                           "too small for this vocab_size")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    # Ids must be consecutive from base_vocab, as the real ones are from 151329.
    for offset, t in enumerate(specials + added):
        if tok.token_to_id(t) != base_vocab + offset:
            raise RuntimeError(f"added token {t!r} got id {tok.token_to_id(t)}, expected {base_vocab + offset}")
    return tok


def build_tiny_tokenizer(folder: str, vocab_size: int = 320, variant: str = "4.1v"):
    """Build the tiny GLM-4.1V (or, ``variant="4.6v"``, GLM-4.6V-Flash; ``"4.5v"``, GLM-4.5V) tokenizer, save it into ``folder`` and return
    it as a ``PreTrainedTokenizerFast``.

    ``vocab_size`` is the total length including the added tokens (4.1v, default 320: 298 BPE tokens, specials at
    298..315, ``<think>`` ... ``</answer>`` at 316..319; 4.6v: 34 specials and 11 thinking / tool tokens after the
    BPE tokens). Files are written to a temporary folder first and then moved into place, so an interrupted build
    never leaves a half-written tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_backend(vocab_size, variant),
        eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        padding_side="left", model_max_length=131072 if variant == "4.6v" else 65536,
        clean_up_tokenization_spaces=False,
        # GLM-4.5V's published template has the same tool and thinking markup as GLM-4.6V's
        chat_template=CHAT_TEMPLATE if variant == "4.1v" else CHAT_TEMPLATE_46V,
    )
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tiny_tokenizer.", dir=folder)
    try:
        tokenizer.save_pretrained(staging)
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def special_token_ids(tokenizer) -> Dict[str, int]:
    """Id of every GLM-4.1V special and thinking token, read from ``tokenizer`` (real or tiny).

    Raises ``KeyError`` naming the tokens the tokenizer does not know (a wrong tokenizer, not a GLM-4.1V one).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS + ["<think>", "</think>"] if t not in vocab]
    if missing:
        raise KeyError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} lacks GLM-V tokens {missing}; "
                       "load the tokenizer that ships with the checkpoint")
    known = SPECIAL_TOKENS + THINKING_TOKENS + TOOL_TOKENS
    return {t: int(vocab[t]) for t in known if t in vocab}


def model_token_ids(tokenizer) -> Dict[str, object]:
    """The token-id fields of a GLM-4.1V config.json, read from ``tokenizer``.

    Top-level: image/video placeholder and span ids. Text config: ``pad_token_id`` and the ``eos_token_id`` list of
    the hub generation config (``<|endoftext|>``, ``<|user|>``, ``<|observation|>``, ``</answer>``, spec 7).
    With the real tokenizer this gives 151343, 151344, 151339, ... and eos [151329, 151336, 151338, 151348].
    """
    ids = special_token_ids(tokenizer)
    return {
        "image_token_id": ids["<|image|>"], "video_token_id": ids["<|video|>"],
        "image_start_token_id": ids["<|begin_of_image|>"], "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"], "video_end_token_id": ids["<|end_of_video|>"],
        "pad_token_id": ids["<|endoftext|>"],
        # </answer> ends 4.1V's answers; GLM-4.6V has no <answer> markup (eos: <|endoftext|>, <|user|>,
        # <|observation|>, which also ends a turn that made tool calls)
        "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
        + ([ids["</answer>"]] if "</answer>" in ids else []),
    }
