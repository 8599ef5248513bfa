"""The input of a batch job: one JSON request per non-blank line of a JSONL file, and its parsing.

A line's ``index`` is its 0-based line number; its ``id`` is the line's ``id`` field (a string or an integer) or,
when absent, the index. Ids are compared as JSON values (``3`` and ``"3"`` differ); a repeated id is an error of the
later line. :func:`scan_input` reads the file once (offsets, ids, line-level errors); :func:`parse_request` turns one
decoded line into a :class:`Request` or a :class:`RequestError` naming the bad field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

# Request fields. Generation settings override the job's (command line) settings for that request.
GEN_FIELDS = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_k": int, "top_p": float,
              "repetition_penalty": float, "seed": int, "max_thinking_tokens": int}
MEDIA_FIELDS = ("prompt", "image", "video", "pdf", "pdf_pages", "pdf_dpi", "system")
REQUEST_FIELDS = ("id", "messages", "tools") + MEDIA_FIELDS + tuple(GEN_FIELDS)
NON_NEGATIVE = ("max_new_tokens", "top_k", "max_thinking_tokens")


class JobError(Exception):
    """A problem with the job itself (input, output, model, launch): the tool prints it and exits 1."""


class RequestError(ValueError):
    """A problem with one request: it becomes that request's error record."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def id_key(value) -> str:
    """Ids compare as JSON values: 3 and "3" are different ids."""
    return json.dumps(value, sort_keys=True)


# ------------------------------------------------------------------------------------------------------ scanning
@dataclass
class InputIndex:
    """Where each request is in the input file; what is known from its first parse (id, line-level errors)."""
    path: str
    indices: List[int]                   # line numbers of the requests (non-blank lines), ascending
    offsets: Dict[int, Tuple[int, int]]  # index -> (byte offset, byte length)
    ids: Dict[int, object]               # index -> id (the line's, or the index)
    errors: Dict[int, str]               # index -> a line-level error found by the scan (JSON, id, duplicate)

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, f, index: int) -> bytes:
        off, n = self.offsets[index]
        f.seek(off)
        return f.read(n)


def scan_input(path: str) -> InputIndex:
    """Read the input once: line offsets, ids, invalid JSON and duplicate ids. Every process computes the same."""
    if not os.path.exists(path):
        raise JobError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise JobError(f"--input {path} is a folder; give a JSONL file (one JSON request per line)")
    index = InputIndex(path, [], {}, {}, {})
    first_seen: Dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            offset = 0
            for i, raw in enumerate(f):
                if raw.strip():
                    _add_line(index, i, offset, raw, first_seen)
                offset += len(raw)
    except OSError as e:
        raise JobError(f"cannot read --input {path}: {e.strerror or e}") from None
    return index


def _add_line(index: InputIndex, i: int, offset: int, raw: bytes, first_seen: Dict[str, int]) -> None:
    index.indices.append(i)
    index.offsets[i] = (offset, len(raw))
    index.ids[i], err = _scan_line(raw.strip(), i)
    if err is None and isinstance(index.ids[i], (str, int)):
        key = id_key(index.ids[i])
        if key in first_seen:
            err = f"duplicate id {index.ids[i]!r} (first used on line {first_seen[key]})"
        else:
            first_seen[key] = i
    if err is not None:
        index.errors[i] = err


def _scan_line(text: bytes, index: int) -> Tuple[object, Optional[str]]:
    try:
        obj = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        return index, f"line is not valid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return index, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return index, f"a request must be a JSON object, got {type(obj).__name__}"
    if "id" not in obj or obj["id"] is None:
        return index, None
    value = obj["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return value, f"id must be a string or an integer, got {json.dumps(value)[:40]}"
    return value, None


# ------------------------------------------------------------------------------------------------------- parsing
@dataclass
class Request:
    index: int
    id: object
    messages: List[Dict]
    settings: Dict                 # generation settings given on the line (others: the job's)
    first_image: object = None     # source of the first image (its size rescales boxes), or None
    tools: Optional[List[Dict]] = None  # OpenAI function schemas: to the chat template, calls parsed from the answer


def _check_type(name: str, value, kind) -> None:
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        want = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(kind, kind.__name__)
        raise RequestError(f"field '{name}' must be {want}, got {json.dumps(value)[:40]}")


def parse_request(obj: Dict, index: int) -> Request:
    """A request line (already JSON-decoded) -> Request, or RequestError naming the bad field."""
    unknown = [k for k in obj if k not in REQUEST_FIELDS]
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r} (a request has: {', '.join(REQUEST_FIELDS)})")
    obj = {k: v for k, v in obj.items() if v is not None}  # null = not given
    settings = parse_settings(obj)
    rid = obj.get("id", index)
    tools = obj.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RequestError("field 'tools' must be a list of tool objects like {\"type\": \"function\", "
                           "\"function\": {\"name\": ..., \"parameters\": {...}}}")
    request = _parse_body(obj, index, rid, settings)
    request.tools = tools or None
    return request


def _parse_body(obj: Dict, index: int, rid, settings: Dict) -> Request:
    if "messages" in obj:
        extra = [k for k in MEDIA_FIELDS if k in obj]
        if extra:
            raise RequestError(f"give either 'messages' or 'prompt' (with image/video/pdf/system), not both "
                               f"(found {', '.join(extra)})")
        messages = _parse_messages(obj["messages"])
        return Request(index, rid, messages, settings, _first_image_of(messages))
    if "prompt" not in obj:
        raise RequestError("a request needs 'prompt' (with optional image/video/pdf/system) or 'messages'")
    messages, images = _prompt_messages(obj)
    return Request(index, rid, messages, settings, images[0] if images else None)


def parse_settings(obj: Dict) -> Dict:
    """The generation settings a line gives, type-checked."""
    settings = {}
    for name, kind in GEN_FIELDS.items():
        if name in obj:
            _check_type(name, obj[name], kind)
            settings[name] = obj[name]
    for name in NON_NEGATIVE:
        if settings.get(name, 0) < 0:
            raise RequestError(f"field '{name}' must be >= 0, got {settings[name]}")
    return settings


def _parse_messages(messages) -> List[Dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("field 'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RequestError(f"each message needs 'role' and 'content', got {json.dumps(m)[:60]}")
        if m["content"] is None and m.get("tool_calls"):
            continue  # an assistant turn that only called tools (OpenAI writes content: null)
        if not isinstance(m["content"], (str, list)):
            raise RequestError("a message's 'content' must be a string or a list of content items")
        if isinstance(m["content"], list) and not all(isinstance(it, dict) for it in m["content"]):
            raise RequestError("content items must be objects like {\"type\": \"text\", \"text\": ...}")
    return messages


def _prompt_messages(obj: Dict) -> Tuple[List[Dict], List[str]]:
    """The prompt form (prompt, image, video, pdf, pdf_pages, pdf_dpi, system) -> HF messages, and the images."""
    _check_type("prompt", obj["prompt"], str)
    images = obj.get("image", [])
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise RequestError("field 'image' must be a path/URL or a list of them")
    for name in ("video", "pdf", "system"):
        if name in obj:
            _check_type(name, obj[name], str)
    pages = obj.get("pdf_pages")
    if pages is not None and (isinstance(pages, bool) or not isinstance(pages, (str, int))):
        raise RequestError("field 'pdf_pages' must be a page range like \"1-3,5\" or a page number")
    if "pdf_dpi" in obj:
        _check_type("pdf_dpi", obj["pdf_dpi"], float)
        if not obj["pdf_dpi"] > 0:
            raise RequestError(f"field 'pdf_dpi' must be > 0 (dots per inch; 180 by default), got {obj['pdf_dpi']}")
    if ("pdf_pages" in obj or "pdf_dpi" in obj) and "pdf" not in obj:
        raise RequestError("'pdf_pages' / 'pdf_dpi' need a 'pdf'")
    from ..pipeline import Glm4vPipeline
    from ...processing.processor import MixedMediaError

    try:
        messages = Glm4vPipeline.messages(obj["prompt"], images=images, video=obj.get("video"), pdf=obj.get("pdf"),
                                          pdf_pages=obj.get("pdf_pages"), pdf_dpi=obj.get("pdf_dpi"),
                                          system=obj.get("system"))
    except MixedMediaError as e:
        raise RequestError(first_line(e)) from None
    return messages, images


# ------------------------------------------------------------------------------------------------ media items
IMAGE_KEYS = ("image", "url", "path", "base64")
_VIDEO_KEYS = ("video", "url", "path")
_DOCUMENT_KEYS = ("document", "pdf", "url", "path")


def item_kind(item: Dict) -> Optional[str]:
    """A content item's type as the processor reads it ("image", "video", "document", "pdf", "text", ...)."""
    return item.get("type") or next((k for k in ("image", "video", "text") if k in item), None)


def media_items(messages: List[Dict]):
    """(kind, key, source) of every media item of the messages, in order; kind is image, video or document."""
    for m in messages:
        if not isinstance(m.get("content"), list):
            continue
        for item in m["content"]:
            kind = item_kind(item)
            kind = "document" if kind == "pdf" else kind
            keys = {"image": IMAGE_KEYS, "video": _VIDEO_KEYS, "document": _DOCUMENT_KEYS}.get(kind)
            key = next((k for k in keys if k in item), None) if keys else None
            if key is not None:
                yield kind, key, item[key]


def _first_image_of(messages: List[Dict]):
    for kind, key, source in media_items(messages):
        if kind == "image":
            if key == "base64" and not str(source).startswith("data:"):
                import base64

                return base64.b64decode(source)  # invalid base64 fails in the processor
            return source
    return None


def media_kind(messages: List[Dict]) -> str:
    """"video" when the prompt has a video (it cannot share a forward with images), else "image" (images or text)."""
    return "video" if any(kind == "video" for kind, _, _ in media_items(messages)) else "image"
