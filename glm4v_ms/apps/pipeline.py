"""Model + processor + generation settings: what ``generate.py`` and batch tools call.

    pipe = Glm4vPipeline.from_pretrained("path/or/hub-id" | "tiny-random", dtype="float32", device="CPU")
    messages = pipe.messages("Describe.", images=["cat.jpg"])
    for piece in pipe.stream(messages, result):      # text pieces tagged thinking / answer
        ...
    result.answer, result.thinking, result.boxes, result.stats

Why this module is long: the command-line helpers (flags -> options and generation knobs, the media preflight
``prepare_media``) sit beside the pipeline they feed; they are the first part to move to a module of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..runtime.generation import GenerationConfig, Piece, StepStats, stream_generate
from ..processing.media import MediaOptions
from ..runtime.output import Box, parse_boxes, rescale_boxes, split_thinking
from ..runtime.tool_calls import ToolCall, parse_tool_calls

TINY_RANDOM = "tiny-random"
TINY_RANDOM_46V = "tiny-random-4.6v"  # the same with GLM-4.6V-Flash's files (token ids, tools template, configs)
_TINY = {TINY_RANDOM: "4.1v", TINY_RANDOM_46V: "4.6v"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    pass


class PromptTooLongError(ValueError):
    """The prompt (text and media tokens) does not fit the context."""


def tiny_model_dir(name: str = TINY_RANDOM) -> str:
    """Where tiny-random is cached; the name carries a hash of its builders, so a changed builder rebuilds it."""
    import hashlib

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha1()
    for path in (os.path.join("apps", "tiny.py"), os.path.join("processing", "tiny_tokenizer.py")):
        with open(os.path.join(pkg, path), "rb") as f:
            h.update(f.read())
    return os.path.join(os.path.expanduser("~"), ".cache", "glm4v_ms", f"{name}-{h.hexdigest()[:10]}")


def resolve_model(name: str) -> str:
    """A local folder as is; ``tiny-random`` built on first use; a hub id (``org/name``) downloaded with
    huggingface_hub (a clear error when offline)."""
    if name in _TINY:
        folder = tiny_model_dir(name)
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            from .tiny import make_tiny_model

            make_tiny_model(folder, overwrite=True, variant=_TINY[name])
        return folder
    if os.path.isdir(name):
        return name
    if _HUB_ID.match(name) and not os.path.exists(name):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
        except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
            raise ModelNotFoundError(
                f"model '{name}' is not a local folder and could not be downloaded from the Hugging Face hub "
                f"({type(e).__name__}: {str(e).splitlines()[0].split('. ')[0][:160]}); download it elsewhere and pass "
                "its folder"
            ) from None
    raise ModelNotFoundError(f"model folder not found: {name} (pass a GLM-V folder, a hub id like "
                             "zai-org/GLM-4.1V-9B-Thinking, or tiny-random / tiny-random-4.6v)")


class ModelFolderError(ValueError):
    """A model folder's config, tokenizer, chat template or processor files are missing or broken."""


# Files a folder may carry; each one present must be valid JSON.
_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
               "video_preprocessor_config.json", "chat_template.json", "generation_config.json",
               "special_tokens_map.json")


def model_folder_problems(folder: str) -> List[str]:
    """What a folder lacks for ``generate.py``, one message per problem, each naming its file; [] when complete.

    Checked without loading weights or the tokenizer: config.json (present, valid JSON, a GLM-4.1V config), every
    JSON file present parses, the tokenizer (tokenizer.json, and tokenizer_config.json that names the tokenizer
    class), a chat template (tokenizer_config.json's ``chat_template``, chat_template.jinja or chat_template.json),
    preprocessor_config.json's fields when present (absent: transformers' defaults are used, as transformers does)."""
    from ..model.config import Glm4vConfig
    from ..processing.image_processing import ImageProcessorConfig

    problems: List[str] = []
    parsed: Dict[str, object] = {}
    for name in _JSON_FILES:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path, "r", encoding="utf-8") as f:
                parsed[name] = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems.append(f"{path}: not readable as JSON ({str(e).splitlines()[0][:120]}); re-download the file")
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        problems.insert(0, f"{config_path}: missing (a GLM-4.1V model folder needs config.json)")
    elif "config.json" in parsed:
        try:
            Glm4vConfig.from_dict(parsed["config.json"])
        except (ValueError, TypeError, KeyError) as e:
            problems.insert(0, f"{config_path}: {str(e).splitlines()[0]}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not os.path.exists(os.path.join(folder, name)):
            problems.append(f"{os.path.join(folder, name)}: missing (the tokenizer); copy the tokenizer files of "
                            "the original checkpoint into the folder")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        if name in parsed and not isinstance(parsed[name], dict):
            problems.append(f"{os.path.join(folder, name)}: expected a JSON object, got "
                            f"{type(parsed[name]).__name__}; re-download the file")
    tok_cfg = parsed.get("tokenizer_config.json")
    has_template = (isinstance(tok_cfg, dict) and tok_cfg.get("chat_template")) or \
        os.path.isfile(os.path.join(folder, "chat_template.jinja")) or \
        (isinstance(parsed.get("chat_template.json"), dict) and parsed["chat_template.json"].get("chat_template"))
    if not has_template and "tokenizer_config.json" in parsed:
        problems.append(f"{folder}: no chat template (none in tokenizer_config.json, no chat_template.jinja or "
                        "chat_template.json); copy it from the original checkpoint")
    pre = parsed.get("preprocessor_config.json")
    if isinstance(pre, dict):
        path = os.path.join(folder, "preprocessor_config.json")
        try:
            ImageProcessorConfig.from_dict(pre, path)
        except (ValueError, TypeError, KeyError) as e:
            msg = str(e).splitlines()[0]
            problems.append(msg if path in msg else f"{path}: {msg}")
    return problems


def check_model_folder(folder: str) -> None:
    """Raise ``ModelFolderError`` with the first of ``model_folder_problems`` (see there)."""
    problems = model_folder_problems(folder)
    if problems:
        extra = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ModelFolderError(problems[0] + extra)


def load_processor(folder: str, media_options: Optional[MediaOptions] = None):
    """The folder's processor (tokenizer, chat template, preprocessing), after ``check_model_folder``; a tokenizer
    that still fails to load becomes one ``ModelFolderError`` line naming the folder's tokenizer files."""
    from ..processing.processor import Glm4vProcessor, PromptError

    check_model_folder(folder)
    try:
        return Glm4vProcessor.from_pretrained(folder, media_options=media_options)
    except (ModelFolderError, PromptError):
        raise
    except Exception as e:  # transformers / tokenizers raise many types for a broken tokenizer
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelFolderError(f"{os.path.join(folder, 'tokenizer.json')}: the tokenizer could not be loaded "
                               f"({type(e).__name__}: {msg}); re-download the tokenizer files") from None


@dataclass
class PreparedMedia:
    """A request's media after ``prepare_media``: images decoded (PIL), remote video / PDF bytes fetched once."""
    images: List = field(default_factory=list)
    video: object = None
    pdf: object = None
    pdf_pages: object = None
    pdf_dpi: Optional[float] = None


def prepare_media(images: Sequence = (), video=None, pdf=None, pdf_pages=None, pdf_dpi=None,
                  options: Optional[MediaOptions] = None) -> PreparedMedia:
    """Check (and load) every media input of a request before any model is loaded, so that a typo costs seconds.

    Images are decoded in full (so all their errors surface here, named by their path or URL); a PDF given as an
    image is refused (use ``pdf``: its pages are then chosen with ``pdf_pages`` and rendered at ``pdf_dpi``); a video
    is opened and its stream checked; a PDF is opened, its page count read and ``pdf_pages`` checked against it, and
    the size of every selected page at ``pdf_dpi`` checked against the pixel limit. URLs are fetched here, once."""
    from ..processing.media import (TooManyImagesError, UnreadableMediaError, as_pdf, check_dpi, check_pdf_pages,
                                    describe, is_pdf, load_image, page_ranges, probe_video, source_data)

    options = options or MediaOptions()
    out = PreparedMedia(pdf_pages=pdf_pages)
    for source in images:
        if isinstance(source, (str, os.PathLike, bytes, bytearray)):
            name = describe(source)
            data = source_data(source, options)
            if is_pdf(data):
                raise UnreadableMediaError(name, "is a PDF document, not an image",
                                           "pass it with --pdf (pdf=...): each page becomes an image")
            out.images.append(load_image(data, options, name=name))
        else:
            out.images.append(load_image(source, options))
    if video is not None:
        data = source_data(video, options) if isinstance(video, (str, os.PathLike)) else video
        if isinstance(data, (str, bytes)):
            probe_video(data, options, name=describe(video))
        out.video = video if isinstance(data, str) else data
    if pdf_dpi is not None:
        out.pdf_dpi = check_dpi(pdf_dpi, "--pdf_dpi (pdf_dpi)")
    if pdf is None:
        if pdf_pages is not None:
            raise ValueError("--pdf_pages (pdf_pages) needs a --pdf document")
        return out
    name = describe(pdf)
    if pdf_pages is not None:
        page_ranges(pdf_pages, name)  # the syntax, before the file is read
    raw = source_data(pdf, options)
    data = as_pdf(raw, name, options)  # an office document: converted by LibreOffice (cached) here, once
    if not is_pdf(data):
        raise UnreadableMediaError(name, "is neither a PDF nor an office document (.ppt .pptx .doc .docx .odp .odt)",
                                   "pass images with --image, documents with --pdf (--doc)")
    n_pages = check_pdf_pages(data, pdf_pages, out.pdf_dpi, options, name)
    if options.max_images is not None and n_pages + len(out.images) > options.max_images:
        raise TooManyImagesError(name, f"{n_pages} pages selected (and {len(out.images)} images), over the "
                                 f"cap of {options.max_images} images per prompt", "select pages with --pdf_pages "
                                 "or raise --max_images")
    out.pdf = pdf if isinstance(raw, str) else data  # a local file by its name; fetched bytes (or their PDF) as is
    return out


@dataclass
class ChatResult:
    thinking: str = ""
    answer: str = ""
    text: str = ""                   # the raw reply, markers removed
    tokens: List[int] = field(default_factory=list)
    boxes: List[Box] = field(default_factory=list)          # 0-1000 normalised
    boxes_pixels: List[Box] = field(default_factory=list)   # rescaled to the first image
    stats: StepStats = field(default_factory=StepStats)
    tool_calls: List[ToolCall] = field(default_factory=list)  # parsed from the answer when tools were given

    def apply_tools(self, tools: Optional[Sequence[Dict]]) -> None:
        """With ``tools``, move the answer's well-formed GLM tool calls into ``tool_calls`` (the answer keeps the
        rest of the text; malformed markup stays text). Without tools the answer is left as it is."""
        if tools:
            parsed = parse_tool_calls(self.answer, tools)
            self.answer, self.tool_calls = parsed.content, parsed.tool_calls

    def as_dict(self) -> Dict:
        """prefill_ms and decode_tok_s exclude graph compiles: those are in compile_s (compiled: whether this request
        compiled any graph)."""
        s = self.stats
        return {"thinking": self.thinking, "answer": self.answer,
                "tool_calls": [c.as_openai() for c in self.tool_calls],
                "boxes": [b.as_list() for b in self.boxes], "boxes_pixels": [b.as_list() for b in self.boxes_pixels],
                "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
                "prefill_ms": round(s.prefill_s * 1000, 2), "decode_tok_s": round(s.decode_tok_s, 2),
                "compile_s": round(s.compile_s, 3), "compiled": s.compiled,
                "thinking_cut_at": s.thinking_cut[0] if s.thinking_cut else -1}


def number_type(kind, lo=None, hi=None, lo_open=False, what=""):
    """An argparse type: ``kind`` (int / float) within [lo, hi] (``lo_open``: lo excluded), finite; the message says
    the allowed range (argparse prefixes it with the flag's name)."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {'an integer' if kind is int else 'a number'}")
        bad = (isinstance(value, float) and not math.isfinite(value)) or (lo is not None and (
            value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
        if bad:
            rng = what or (f"> {lo}" if lo_open else f">= {lo}") + (f" and <= {hi}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text[:40]}")
        return value

    parse.__name__ = "integer" if kind is int else "number"  # argparse names the type in its messages
    return parse


def add_generation_arguments(parser, seed_help: str = "sampling seed (reproducible draws)") -> None:
    """The generation flags of the command-line tools (generate.py, tools/batch_infer.py), with the official
    recipe's defaults (generation_config.OFFICIAL_SAMPLING, 8192 new tokens). Out-of-range values are refused by argparse
    (exit 2, the flag named), before anything is loaded."""
    from ..model.generation_config import OFFICIAL_SAMPLING as rec

    parser.add_argument("--max_new_tokens", type=number_type(int, 1), default=8192)
    parser.add_argument("--max_thinking_tokens", type=number_type(int, 0), default=None,
                        help="force </think><answer> after this many thinking tokens (official 'academic' recipe: "
                             "8192)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample off)")
    parser.add_argument("--temperature", type=number_type(float, 0, lo_open=True), default=rec["temperature"])
    parser.add_argument("--top_k", type=number_type(int, 0), default=rec["top_k"], help="0: no top-k filter")
    parser.add_argument("--top_p", type=number_type(float, 0, 1, lo_open=True, what="in (0, 1]"), default=rec["top_p"])
    parser.add_argument("--repetition_penalty", type=number_type(float, 0, lo_open=True),
                        default=rec["repetition_penalty"])
    parser.add_argument("--seed", type=number_type(int, 0, 2**64 - 1, what="in [0, 2**64)"), default=None,
                        help=seed_help)


def add_media_arguments(parser) -> None:
    """URL fetch limits (media.MediaOptions) as command-line flags."""
    d = MediaOptions()
    parser.add_argument("--fetch_timeout", type=number_type(float, 0, lo_open=True), default=d.timeout,
                        help=f"seconds to connect to a URL and for each read (default {d.timeout:g})")
    parser.add_argument("--fetch_deadline", type=number_type(float, 0, lo_open=True), default=d.fetch_deadline,
                        help=f"seconds for a whole URL download (default {d.fetch_deadline:g})")
    parser.add_argument("--min_fetch_rate", type=number_type(float, 0), default=d.min_fetch_rate,
                        help=f"bytes/s a URL download must average after {d.rate_grace:g} s (default "
                             f"{d.min_fetch_rate:g}; 0: no floor)")
    parser.add_argument("--max_images", type=number_type(int, 0), default=d.max_images,
                        help=f"cap on images per prompt, document pages counted one each (default {d.max_images}, "
                             "as GLM-V serves; 0: no cap)")
    parser.add_argument("--doc_timeout", type=number_type(float, 0, lo_open=True), default=d.convert_timeout,
                        help=f"seconds LibreOffice may take to convert an office document (default "
                             f"{d.convert_timeout:g})")


def media_options(args) -> MediaOptions:
    """The flags of add_media_arguments -> MediaOptions."""
    return MediaOptions(timeout=args.fetch_timeout, fetch_deadline=args.fetch_deadline,
                        min_fetch_rate=args.min_fetch_rate, max_images=args.max_images or None,
                        convert_timeout=args.doc_timeout)


def generation_knobs(args) -> Dict:
    """The flags of add_generation_arguments -> GenerationConfig overrides."""
    return dict(max_new_tokens=args.max_new_tokens, max_thinking_tokens=args.max_thinking_tokens,
                do_sample=not args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


class Glm4vPipeline:
    def __init__(self, model, processor, generation_config: GenerationConfig, folder: str, mode: str = "graph"):
        self.model, self.processor, self.gen, self.folder = model, processor, generation_config, folder
        self.mode = mode  # "graph" (compiled decode, sampling on device) or "eager" (PyNative, host sampling)
        self.load_s = 0.0  # seconds from_pretrained took (model folder, weights, processor)

    @classmethod
    def from_pretrained(cls, name: str, dtype: str = "float32", device: str = "CPU",
                        mode: str = "graph", quantized_weights: str = "auto",
                        tensor_parallel=None, media_options: Optional[MediaOptions] = None,
                        progress: bool = False) -> "Glm4vPipeline":
        """``tensor_parallel``: a parallel.TPContext (under msrun) to load this rank's part of the decoder;
        ``media_options``: URL limits, pixel cap and PDF dpi of the processor.
        ``progress``: report on stderr the weights being read (bytes, shard, rate, ETA) and, in graph mode, each
        graph compile (progress.Progress and progress.StepLog: redrawn on a terminal, one line per event in a log).
        Silent by default."""
        from ..model import ops
        from ..model.glm4v import Glm4vForConditionalGeneration
        from ..progress import Progress, StepLog

        t0 = time.perf_counter()
        target = ops.set_device(device)
        if target == "CPU" and str(dtype).lower() in ("bfloat16", "bf16"):
            raise ValueError("bfloat16 compute needs an Ascend device (MindSpore has no bf16 matmul on CPU); "
                             "use --dtype float32 on CPU")
        folder = resolve_model(name)
        bars: List[Progress] = []

        def bar(total: int) -> Progress:
            bars.append(Progress(total, unit="B", desc="loading weights"))
            return bars[-1]

        # Tokenizer, template and processor configs first: a broken file costs seconds, not a whole model load.
        processor = load_processor(folder, media_options)
        try:
            model = Glm4vForConditionalGeneration.from_pretrained(
                folder, dtype=dtype, quantized_weights=quantized_weights,
                tensor_parallel=tensor_parallel if tensor_parallel is not None and tensor_parallel.enabled else None,
                progress=bar if progress else None)
        finally:  # after a failure too: the bar's line is finished before the error is printed
            for b in bars:
                b.close()
        pipe = cls(model, processor, model.generation_config, folder, mode)
        if progress and mode == "graph":
            from ..runtime.engine import graph_runner

            graph_runner(model).compile_listener = StepLog("compiling")
        pipe.load_s = time.perf_counter() - t0
        return pipe

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def messages(prompt: str, images: Sequence = (), video=None, pdf=None, pdf_pages=None, pdf_dpi=None,
                 system: Optional[str] = None, history: Sequence[Dict] = ()) -> List[Dict]:
        """HF-format messages: optional system, earlier turns, then a user turn with media items before the text."""
        if images and video is not None:
            from ..processing.processor import MixedMediaError

            raise MixedMediaError("images and a video in one prompt are not supported by GLM-4.1V (they share the "
                                  "<|image|> placeholder); send them as separate prompts")
        content: List[Dict] = []
        if pdf is not None:
            item = {"type": "document", "document": pdf}
            if pdf_pages:
                item["pages"] = pdf_pages
            if pdf_dpi is not None:
                item["dpi"] = pdf_dpi
            content.append(item)
        content += [{"type": "image", "image": im} for im in images]
        if video is not None:
            content.append({"type": "video", "video": video})
        content.append({"type": "text", "text": prompt})
        msgs: List[Dict] = [{"role": "system", "content": system}] if system else []
        return msgs + list(history) + [{"role": "user", "content": content}]

    def inputs(self, messages, enable_thinking: bool = True, reply_prefix: str = "", *,
               tools: Optional[Sequence[Dict]] = None) -> Dict:
        """Model inputs of a conversation; ``tools`` (OpenAI function schemas) go to the chat template. ``reply_prefix`` (e.g. "<think>") is appended after the generation prompt,
        as the start of the reply. ``enable_thinking=False``: templates that know the switch get it; for the others
        (GLM-4.1V's) the reply starts with an empty ``<think></think>``, so the model starts in its answer."""
        proc = self.processor
        knows = "enable_thinking" in (proc.chat_template or "")
        kwargs = {"enable_thinking": False} if not enable_thinking and knows else {}
        if tools:
            kwargs["tools"] = list(tools)  # a template without tool support is refused by the processor
        inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="np", **kwargs)
        vocab = proc.tokenizer.get_vocab()
        if not enable_thinking and not knows and "<think>" in vocab and "</think>" in vocab:
            reply_prefix = "<think></think>" + reply_prefix
        if reply_prefix:
            inputs = dict(inputs)
            ids = np.asarray(inputs["input_ids"])
            extra = np.asarray(proc.tokenizer.encode(reply_prefix, add_special_tokens=False), ids.dtype)
            inputs["input_ids"] = np.concatenate([ids, np.broadcast_to(extra, (ids.shape[0], len(extra)))], 1)
            if inputs.get("attention_mask") is not None:
                mask = np.asarray(inputs["attention_mask"])
                inputs["attention_mask"] = np.concatenate([mask, np.ones((mask.shape[0], len(extra)), mask.dtype)], 1)
        return inputs

    def generation_config(self, **overrides) -> GenerationConfig:
        return replace(self.gen, **{k: v for k, v in overrides.items() if v is not None})

    def stream(self, messages, result: ChatResult, image_size=None, *, enable_thinking: bool = True,
               reply_prefix: str = "", max_context: Optional[int] = None, session_factory=None,
               tools: Optional[Sequence[Dict]] = None, **overrides) -> Iterator[Piece]:
        """Yield pieces as they decode; ``result`` is filled in as they come and completed at the end.
        ``reply_prefix``, ``enable_thinking``: see ``inputs``. ``max_context``: a smaller context than the model's
        (a server slot); ``session_factory``: see generation.iter_tokens (the server runs the request as a row of
        its shared batch). ``tools``: to the template, and the answer's tool calls parsed into
        ``result.tool_calls``."""
        inputs = dict(self.inputs(messages, enable_thinking, reply_prefix, tools=tools))
        gen = self.generation_config(**overrides)
        ctx = self.model.config.text.max_position_embeddings
        if max_context is not None:
            ctx = min(ctx, max_context)
        n_prompt = int(np.asarray(inputs["input_ids"]).shape[-1])
        if n_prompt >= ctx:
            raise PromptTooLongError(f"the prompt has {n_prompt} tokens but the context is {ctx}; use fewer or "
                             "smaller images, a shorter video or text")
        if n_prompt + gen.max_new_tokens > ctx:
            gen = replace(gen, max_new_tokens=ctx - n_prompt)
        model_inputs = {k: inputs.get(k) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                  "pixel_values_videos", "video_grid_thw")}
        thinking, answer = [], []
        for piece in stream_generate(self.model, self.processor.tokenizer, model_inputs, gen,
                                     stats=result.stats, tokens_out=result.tokens, mode=self.mode,
                                     session_factory=session_factory):
            (thinking if piece.kind == "thinking" else answer).append(piece.text)
            yield piece
        result.thinking = "".join(thinking).strip()
        result.text = "".join(answer)
        _, result.answer = split_thinking(result.text)
        result.apply_tools(tools)
        result.boxes = parse_boxes(result.text)
        if image_size is not None:
            result.boxes_pixels = rescale_boxes(result.boxes, *image_size)

    def chat(self, messages, image_size=None, tools: Optional[Sequence[Dict]] = None, **overrides) -> ChatResult:
        result = ChatResult()
        for _ in self.stream(messages, result, image_size=image_size, tools=tools, **overrides):
            pass
        return result
