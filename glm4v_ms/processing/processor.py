"""``Glm4vProcessor``: chat messages and media -> ``input_ids`` and pixel arrays for GLM-4.1V (spec 6.3-6.5).

Same outputs as transformers 4.57's ``Glm4vProcessor`` with the slow image processor, from numpy + PIL; transformers
is used only for the tokenizer. Flow of ``apply_chat_template(messages, tokenize=True)``:

1. Load the media of each conversation (images, PDF pages, videos) from paths, URLs, data: URIs, PIL or numpy.
2. Render the chat template (spec 6.4): ``<|begin_of_image|><|image|><|end_of_image|>`` per image,
   ``<|begin_of_video|><|video|><|end_of_video|>`` per video.
3. Preprocess pixels (image_processing.py, video_processing.py).
4. Expand placeholders (spec 6.3): each ``<|image|>`` becomes t*h*w/merge^2 copies; each ``<|video|>`` becomes, per
   temporal group, ``<|begin_of_image|>`` + h*w/merge^2 ``<|image|>`` + ``<|end_of_image|>`` + str(int(seconds)).
5. Tokenise, left-padding a batch.

Images and videos in one prompt raise ``MixedMediaError``: transformers 4.57 expands such prompts wrongly (spec 6.3).
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .checkpoint_files import PROCESSOR_FAMILIES, load_tokenizer, read_json as _read_json, read_processor_configs
from .image_processing import ImageProcessorConfig, preprocess_images
from .media import MediaOptions, TooManyImagesError, UnreadableMediaError, describe, load_document, load_images
from .video_processing import Video, VideoProcessorConfig, load_video, preprocess_videos


class PromptError(ValueError):
    """The prompt and the media do not fit together (placeholder counts, missing template, ...)."""


class MixedMediaError(PromptError):
    """Images and a video in the same prompt."""


class BatchInputs(dict):
    """Model inputs by name; also readable as attributes (``inputs.input_ids``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_IMAGE_KEYS = ("image", "url", "path", "base64")
_VIDEO_KEYS = ("video", "url", "path")
_DOCUMENT_KEYS = ("document", "pdf", "url", "path")


class Glm4vProcessor:
    """Tokenizer + image / video preprocessing + prompt construction for GLM-4.1V.

    Special tokens (``<|image|>``, ``<|begin_of_image|>`` ...) are looked up in the tokenizer, never hard-coded ids.
    ``media_options`` sets URL timeout, download cap, pixel limit and PDF dpi.
    """

    image_token = "<|image|>"
    video_token = "<|video|>"
    image_start_token = "<|begin_of_image|>"
    image_end_token = "<|end_of_image|>"

    def __init__(self, tokenizer, image_config: Optional[ImageProcessorConfig] = None,
                 video_config: Optional[VideoProcessorConfig] = None, chat_template: Optional[str] = None,
                 media_options: Optional[MediaOptions] = None, family: str = "glm4v"):
        """``family``: "glm4v" (Glm4vProcessor: a video frame group's timestamp is written as whole seconds, "3")
        or "glm46v" (Glm46VProcessor, GLM-4.6V's files: "3.0 seconds"); from_pretrained reads it from the
        folder's ``processor_class``."""
        if family not in PROCESSOR_FAMILIES:
            raise ValueError(f"processor family {family!r}: expected one of {PROCESSOR_FAMILIES}")
        self.family = family
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageProcessorConfig()
        self.video_config = video_config or VideoProcessorConfig()
        self.chat_template = chat_template or _template_text(getattr(tokenizer, "chat_template", None))
        self.media_options = media_options or MediaOptions()
        self.image_token = getattr(tokenizer, "image_token", None) or self.image_token
        self.video_token = getattr(tokenizer, "video_token", None) or self.video_token
        self.image_token_id = self._token_id(self.image_token)
        self.video_token_id = self._token_id(self.video_token)
        self.image_start_token_id = self._token_id(self.image_start_token)
        self.image_end_token_id = self._token_id(self.image_end_token)

    def _token_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if tid is None or (unk is not None and tid == unk):
            raise PromptError(f"tokenizer {getattr(self.tokenizer, 'name_or_path', '')!r} has no {token} token; "
                              "use the GLM-4.1V tokenizer (or glm4v_ms.tiny_tokenizer for tests)")
        return int(tid)

    @classmethod
    def from_pretrained(cls, folder, *, media_options: Optional[MediaOptions] = None, **tokenizer_kwargs):
        """Tokenizer, chat template and preprocessing configs from a checkpoint folder.

        Image and video settings and the processor family: :func:`read_processor_configs` (4.x files, a 5.x
        ``processor_config.json``, both pixel-limit forms; transformers' class defaults when absent).
        Chat template: the tokenizer's, else ``chat_template.jinja``, else ``chat_template.json``.
        """
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: not a folder; pass the checkpoint folder holding tokenizer.json "
                                    "and preprocessor_config.json")
        image_config, video_config, family = read_processor_configs(folder)
        from transformers import AutoTokenizer  # the only use of transformers: the tokenizer

        tokenizer = load_tokenizer(folder, AutoTokenizer, tokenizer_kwargs)
        template = _template_text(getattr(tokenizer, "chat_template", None))
        if template is None and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
            with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
                template = f.read()
        if template is None:
            template = _template_text((_read_json(os.path.join(folder, "chat_template.json")) or {})
                                      .get("chat_template"))
        return cls(tokenizer, image_config, video_config, chat_template=template, media_options=media_options,
                   family=family)

    # ------------------------------------------------------------------------------------------------- chat entry
    def apply_chat_template(self, conversation, *, add_generation_prompt: bool = False, tokenize: bool = False,
                            return_dict: bool = False, return_tensors: Optional[str] = "np", padding: bool = True,
                            chat_template: Optional[str] = None, **template_kwargs):
        """HF-style messages (or a list of conversations) -> prompt string(s), ids, or a dict of model inputs.

        Content items: ``{"type": "text", "text": ...}``, ``{"type": "image", "image" | "url" | "path" | "base64":
        source}``, ``{"type": "video", "video": path | Video | frames, "fps": fps of given frames}``,
        ``{"type": "document", "document": pdf_or_office_file, "pages": "1-3", "dpi": 180}`` (one image per page,
        .ppt/.pptx/.doc/.docx/.odp/.odt via LibreOffice; an image item whose content is a document also becomes its
        pages when tokenising). At most ``media_options.max_images`` images per prompt. With ``tokenize=False``
        only documents are opened (to count pages). Defaults follow transformers (no generation prompt, no
        tokenisation).
        """
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and \
            isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        template = chat_template or self.chat_template
        if template is None:
            raise PromptError("no chat template: the tokenizer has none and the folder has no chat_template.jinja; "
                              "pass chat_template=...")
        if template_kwargs.get("tools") and "tools" not in template:
            raise PromptError("this model's chat template takes no tools (GLM-4.1V has no tool calling; "
                              "GLM-4.6V-Flash does): drop --tools / 'tools'")
        prompts, images, videos = [], [], []
        for conv in conversations:
            messages = self._collect_media(conv, images, videos, load=tokenize)
            prompts.append(self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
                **template_kwargs))
        if not tokenize:
            return prompts if batched else prompts[0]
        # The template already writes [gMASK]<sop>; never let the tokenizer add a prefix again.
        out = self._encode(prompts, images, videos, padding=padding, return_tensors=return_tensors,
                           add_special_tokens=False)
        if return_dict:
            return out
        return out["input_ids"]

    def _collect_media(self, conversation, images: List, videos: List, load: bool) -> List[Dict]:
        """Copy of the messages with payloads removed; loaded images / videos are appended in prompt order."""
        messages = []
        for message in conversation:
            content = message.get("content")
            if isinstance(content, (list, tuple)):
                items = []
                for item in content:
                    items.extend(self._collect_item(item, images, videos, load))
                message = {**message, "content": items}
            if message.get("tool_calls"):
                message = {**message, "tool_calls": [_template_tool_call(tc) for tc in message["tool_calls"]]}
            messages.append(message)
        return messages

    def _collect_item(self, item: Dict, images: List, videos: List, load: bool) -> List[Dict]:
        kind = item.get("type") or next((k for k in ("image", "video", "text") if k in item), None)
        if kind in ("document", "pdf"):
            source = _first(item, _DOCUMENT_KEYS, kind)
            pages = load_document(source, pages=item.get("pages"), dpi=item.get("dpi"), options=self.media_options)
            images.extend((page, f"{describe(source)} page {k + 1}") for k, page in enumerate(pages))
            return [{"type": "image"} for _ in pages]
        if kind == "image":
            if not load:
                return [{"type": "image"}]
            source = _first(item, _IMAGE_KEYS, kind)
            if source is item.get("base64") and not str(source).startswith("data:"):
                source = _b64decode(source)
            loaded = load_images(source, self.media_options, pages=item.get("pages"), dpi=item.get("dpi"))
            name = describe(source)
            images.extend((im, name if len(loaded) == 1 else f"{name} page {k + 1}") for k, im in enumerate(loaded))
            return [{"type": "image"} for _ in loaded]
        if kind == "video":
            if load:
                source = _first(item, _VIDEO_KEYS, kind)
                if isinstance(source, (list, tuple, np.ndarray)) and "fps" in item:
                    source = Video.from_frames(source, item["fps"])
                elif "fps" in item:  # a file's own rate is authoritative; sampling is video_config.fps
                    raise PromptError(f"video item {describe(source)}: 'fps' is the frame rate of a frame list; "
                                      "for a file, drop it (set processor.video_config.fps to change sampling)")
                videos.append(load_video(source, self.video_config, self.media_options))
            return [{"type": "video"}]
        if kind == "text":
            return [{"type": "text", "text": item.get("text", "")}]
        # The template would silently skip it; say so instead.
        raise PromptError(f"content item of type {kind!r} is not supported by GLM-4.1V; use text, image, video "
                          "or document items")

    # ---------------------------------------------------------------------------------------------- text entry
    def __call__(self, text=None, images=None, videos=None, *, padding: bool = True,
                 return_tensors: Optional[str] = "np", add_special_tokens: bool = True) -> BatchInputs:
        """Like transformers' processor: prompt text(s) that already hold ``<|image|>`` / ``<|video|>``
        placeholders, plus the media in placeholder order (a flat list, or one list per prompt).

        A PDF among ``images`` becomes its pages, each needing its own placeholder. A video is a path / URL or a
        ``Video`` (``Video.from_frames(frames, fps)`` for frames in memory).
        """
        if text is None:
            raise PromptError("text is required: give the prompt with <|image|> / <|video|> placeholders "
                              "(apply_chat_template writes them)")
        texts = [text] if isinstance(text, str) else list(text)
        loaded_images = []
        for source in _flatten(images):
            loaded, name = load_images(source, self.media_options), describe(source)
            loaded_images.extend((im, name if len(loaded) == 1 else f"{name} page {k + 1}")
                                 for k, im in enumerate(loaded))
        loaded_videos = [load_video(v, self.video_config, self.media_options) for v in _flatten(videos, video=True)]
        return self._encode(texts, loaded_images, loaded_videos, padding=padding, return_tensors=return_tensors,
                            add_special_tokens=add_special_tokens)

    def _encode(self, texts: List[str], images: List[Tuple], videos: List[Video], *, padding: bool,
                return_tensors: Optional[str], add_special_tokens: bool) -> BatchInputs:
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'np' (numpy) and convert")
        _check_count(texts, self.image_token, len(images), "image", [n for _, n in images])
        _check_count(texts, self.video_token, len(videos), "video", [v.source for v in videos])
        seen_images = seen_videos = 0
        cap = self.media_options.max_images
        for k, t in enumerate(texts):
            n_img, n_vid = t.count(self.image_token), t.count(self.video_token)
            if cap is not None and n_img > cap:
                first = images[seen_images][1]
                raise TooManyImagesError(f"prompt {k} (images from {first} on)", f"has {n_img} images (document "
                                         f"pages count one each), over the cap of {cap} per prompt",
                                         "select fewer pages or images, or raise media_options.max_images "
                                         "(generate.py --max_images)")
            if n_img and n_vid:
                names = [n for _, n in images[seen_images:seen_images + n_img]]
                names += [v.source for v in videos[seen_videos:seen_videos + n_vid]]
                raise MixedMediaError(f"prompt {k} mixes images and video ({', '.join(names)}); GLM-4.1V's "
                                      "processor cannot expand both in one prompt (transformers 4.57 gets it "
                                      "wrong), so put them in separate prompts")
            seen_images, seen_videos = seen_images + n_img, seen_videos + n_vid
        outputs = BatchInputs()
        image_tokens, video_layouts = [], []
        merge = self.image_config.merge_size ** 2
        if images:
            data = preprocess_images([im for im, _ in images], self.image_config, [n for _, n in images])
            outputs.update(data)
            image_tokens = [int(np.prod(g)) // merge for g in data["image_grid_thw"]]
        if videos:
            data = preprocess_videos(videos, self.video_config)
            outputs["pixel_values_videos"] = data["pixel_values_videos"]
            outputs["video_grid_thw"] = data["video_grid_thw"]
            per_group = [int(g[1] * g[2]) // self.video_config.merge_size ** 2 for g in data["video_grid_thw"]]
            video_layouts = list(zip(per_group, data["video_timestamps"]))
        image_iter, video_iter = iter(image_tokens), iter(video_layouts)
        expanded = [self.expand_placeholders(t, image_iter, video_iter) for t in texts]
        encoded = self.tokenizer(expanded, padding=padding, padding_side="left", add_special_tokens=add_special_tokens,
                                 return_attention_mask=True)
        if return_tensors == "np":
            lengths = {len(ids) for ids in encoded["input_ids"]}
            if len(lengths) > 1:
                raise PromptError("prompts of different lengths need padding=True to form one array")
            outputs["input_ids"] = np.asarray(encoded["input_ids"], dtype=np.int64)
            outputs["attention_mask"] = np.asarray(encoded["attention_mask"], dtype=np.int64)
        else:
            outputs["input_ids"], outputs["attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
        return BatchInputs({k: outputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                    "pixel_values_videos", "video_grid_thw") if k in outputs})

    def expand_placeholders(self, text: str, image_tokens: Iterator[int],
                            video_layouts: Iterator[Tuple[int, Sequence[float]]]) -> str:
        """Replace each placeholder by its token run, taking counts from the iterators in order.

        Example (2x2 merged tokens per frame group, groups at 0.0 s and 1.5 s):
        ``<|begin_of_video|><|video|><|end_of_video|>`` ->
        ``<|begin_of_video|><|begin_of_image|>`` + 4 x ``<|image|>`` + ``<|end_of_image|>0<|begin_of_image|>``
        + 4 x ``<|image|>`` + ``<|end_of_image|>1<|end_of_video|>``.
        """
        pieces = re.split(f"({re.escape(self.image_token)}|{re.escape(self.video_token)})", text)
        out = []
        for piece in pieces:
            if piece == self.image_token:
                out.append(self.image_token * next(image_tokens))
            elif piece == self.video_token:
                per_group, timestamps = next(video_layouts)
                out.extend(f"{self.image_start_token}{self.image_token * per_group}{self.image_end_token}"
                           f"{self.format_timestamp(t)}" for t in timestamps)
            else:
                out.append(piece)
        return "".join(out)

    def format_timestamp(self, seconds: float) -> str:
        """A frame group's time as the prompt writes it: "3" (Glm4vProcessor), "3.0 seconds" (Glm46VProcessor)."""
        return f"{seconds:.1f} seconds" if self.family == "glm46v" else str(int(seconds))

    # ---------------------------------------------------------------------------------------------------- decode
    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        return self.tokenizer.decode(np.asarray(token_ids).tolist(), skip_special_tokens=skip_special_tokens,
                                     **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> List[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    def post_process_image_text_to_text(self, generated, skip_special_tokens: bool = True, **kwargs) -> List[str]:
        """Decode generated ids as transformers does (special tokens dropped, ``<think>`` kept)."""
        sequences = np.asarray(generated)
        return self.batch_decode(sequences[None] if sequences.ndim == 1 else sequences,
                                 skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False,
                                 **kwargs)


# ------------------------------------------------------------------------------------------------------- helpers
def _template_text(template) -> Optional[str]:
    """A chat template string; a dict of named templates gives its "default" one."""
    if isinstance(template, dict):
        return template.get("default")
    return template or None


def _template_tool_call(call) -> Dict:
    """An assistant message's tool call as the chat template reads it: OpenAI's form carries ``arguments`` as a
    JSON string, the GLM template iterates ``arguments.items()``, so a string is decoded to its object."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise PromptError(f"tool call {json.dumps(call)[:80]}: needs a function name "
                          "({\"type\": \"function\", \"function\": {\"name\": ..., \"arguments\": ...}})")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise PromptError(f"tool call {fn['name']!r}: arguments are not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise PromptError(f"tool call {fn['name']!r}: arguments must be a JSON object, got {type(args).__name__}")
    return {**call, "function": {**fn, "arguments": args}} if "function" in call else {**fn, "arguments": args}


def _b64decode(payload: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=False)
    except (ValueError, TypeError) as e:
        raise UnreadableMediaError(describe(payload), f"invalid base64 image ({e})", "re-encode the file") from None


def _first(item: Dict, keys: Sequence[str], kind: str):
    for key in keys:
        if key in item:
            return item[key]
    raise PromptError(f"{kind} item {sorted(item)} has no source; give one of the keys {list(keys)}")


def _flatten(media, video: bool = False) -> List:
    """None, one source, a flat list or one list per prompt -> flat list (a video's frame list stays whole)."""
    if media is None:
        return []
    if not isinstance(media, (list, tuple)):
        return [media]
    flat = []
    for entry in media:
        nested = isinstance(entry, (list, tuple)) and not (video and entry and not isinstance(entry[0], (
            str, os.PathLike, Video, dict, list, tuple)))
        flat.extend(entry if nested else [entry])
    return flat


def _check_count(texts: List[str], token: str, count: int, kind: str, names: List[str]) -> None:
    found = sum(t.count(token) for t in texts)
    if found != count:
        listed = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        raise PromptError(f"the prompt has {found} {token} placeholder(s) but {count} {kind}(s) were given"
                          + (f" ({listed})" if listed else "") + f"; give one {kind} per placeholder")
