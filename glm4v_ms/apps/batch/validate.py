"""Checks of one request that need no model: run on every line before the model is loaded, so that a typo in a
path or a field costs seconds, not a model load, and a job of only bad lines never loads the model.

What is checked here: the line's fields and types (:func:`requests.parse_request`), text that cannot be encoded
(a lone UTF-16 surrogate such as ``"\\ud800"`` is valid JSON but not text), the job's generation settings merged
with the line's, and each local media file: it exists, is a regular readable non-empty file, and an ``image`` is not
a PDF (a PDF goes in the ``pdf`` field, or a ``document`` item, as generate.py requires). What is left to the
encoding step (with the model's processor): decoding the media; images given by URL, data: URI or base64, read
once by :func:`fetch_remote_images` (which refuses a PDF among them too); the prompt's length against the context.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import replace
from typing import Dict, Iterable, Optional, Tuple

from .requests import IMAGE_KEYS, Request, RequestError, item_kind, media_items, parse_request

URL_SCHEMES = ("http://", "https://", "data:")


def validate_line(raw: bytes, index: int, job_settings: Dict) -> Tuple[Dict, Optional[Request], Optional[str]]:
    """One input line (its bytes, already known to hold a JSON object) -> (the decoded line, its parse or None,
    the first problem found by the checks that need no model or None)."""
    obj = json.loads(raw.decode("utf-8"))
    request = None
    try:
        check_text(obj)
        request = parse_request(obj, index)
        check_settings(job_settings, request.settings)
        for kind, key, source in media_items(request.messages):
            for one in (source if isinstance(source, list) else [source]):  # a video may be a list of frames
                check_source(kind, key, one)
    except RequestError as e:
        return obj, request, str(e)
    return obj, request, None


def check_text(obj, where: str = "") -> None:
    """Every string of the request (keys and values, the id aside) must be encodable text."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if where or k != "id":
                check_text(k, where)
                check_text(v, f"{where}.{k}" if where else k)
    elif isinstance(obj, list):
        for n, v in enumerate(obj):
            check_text(v, f"{where}[{n}]")
    elif isinstance(obj, str):
        bad = _lone_surrogate(obj)
        if bad is not None:
            raise RequestError(f"field '{where or 'key'}' contains a lone UTF-16 surrogate ({bad}), which is not "
                               "text; fix the line (escape pairs like \\ud83d\\ude00 must come whole)")


def _lone_surrogate(text: str) -> Optional[str]:
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"\\u{ord(text[e.start]):04x} at character {e.start}"


def check_settings(job_settings: Dict, line_settings: Dict) -> None:
    """The effective generation settings are usable (the checks of GenerationConfig.validate that need no model)."""
    from ...model.generation_config import GenerationConfig

    settings = {k: v for k, v in dict(job_settings, **line_settings).items() if v is not None}
    try:
        GenerationConfig(**settings).validate(vocab_size=1)  # no eos ids here: the vocabulary is not consulted
    except ValueError as e:
        raise RequestError(f"generation settings: {e}") from None


def check_source(kind: str, key: str, source) -> None:
    """A media source of an item: a local file must exist and be readable; an image must not be a PDF."""
    if not isinstance(source, str):
        raise RequestError(f"{kind} item: '{key}' must be a path, URL or data: URI, got {json.dumps(source)[:40]}")
    if key == "base64" or source.startswith(URL_SCHEMES):
        return  # the payload is in the line; URLs are fetched (and checked) when the request is encoded
    from ...processing.media import MediaError, local_path

    try:
        path = local_path(source)
    except MediaError as e:
        raise RequestError(str(e)) from None
    if path is None:
        raise RequestError(f"{kind} {source}: unsupported URL scheme; use a local path, file://, http://, https:// "
                           "or a data: URI")
    head = _head_of_file(kind, source, path)
    if kind == "image" and head == b"%PDF-":
        raise _pdf_as_image(source)


def _pdf_as_image(name: str) -> RequestError:
    return RequestError(f"image {name} is a PDF document; give it in the 'pdf' field (with optional pdf_pages and "
                        "pdf_dpi), or as a {\"type\": \"document\"} item in 'messages'")


def _head_of_file(kind: str, name: str, path: str) -> bytes:
    """The first 5 bytes of a regular, non-empty, readable file; RequestError naming it otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RequestError(f"{kind} {name}: no such file (relative paths are taken from {os.getcwd()})") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise RequestError(f"{kind} {name!r}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise RequestError(f"{kind} {name}: is {what}; give the path of a file")
    if st.st_size == 0:
        raise RequestError(f"{kind} {name}: file is empty (0 bytes); re-create or re-download it")
    try:
        with open(path, "rb") as f:
            return f.read(5)
    except OSError as e:
        raise RequestError(f"{kind} {name}: cannot read it ({e.strerror or e})") from None


def local_files(request: Request) -> Iterable[str]:
    """The local paths of a valid request's media (for the digest of their identity), in order."""
    from ...processing.media import MediaError, local_path

    for _, key, source in media_items(request.messages):
        for one in (source if isinstance(source, list) else [source]):
            if isinstance(one, str) and key != "base64" and not one.startswith(URL_SCHEMES):
                try:
                    yield local_path(one)
                except MediaError:  # a file:// URL on another host: refused by check_source
                    yield None


def fetch_remote_images(request: Request, options) -> Request:
    """The request with its images given as URLs, data: URIs or raw base64 read into bytes (``options``: the
    processor's MediaOptions): a PDF among them is refused like a local one, and the processor gets the bytes, so
    nothing is downloaded twice. Runs when the request is encoded (a download is not a cheap check)."""
    from ...processing.media import describe, is_pdf, read_bytes

    fetched: Dict[str, bytes] = {}

    def fetch(key: str, source: str) -> bytes:
        if source not in fetched:
            data = _b64decode(source) if key == "base64" else read_bytes(source, options)
            if is_pdf(data):
                raise _pdf_as_image(describe(source))
            fetched[source] = data
        return fetched[source]

    messages = []
    for m in request.messages:
        if isinstance(m.get("content"), list):
            m = {**m, "content": [_image_as_bytes(item, fetch) for item in m["content"]]}
        messages.append(m)
    first = request.first_image
    if isinstance(first, str) and first in fetched:
        first = fetched[first]
    return replace(request, messages=messages, first_image=first)


def _image_as_bytes(item: Dict, fetch) -> Dict:
    if item_kind(item) != "image":
        return item
    key = next((k for k in IMAGE_KEYS if k in item), None)
    source = item.get(key)
    if not isinstance(source, str) or not (key == "base64" or source.startswith(URL_SCHEMES)):
        return item  # a local file: checked before the model loaded
    rest = {k: v for k, v in item.items() if k not in IMAGE_KEYS}
    return dict(rest, image=fetch(key, source))


def _b64decode(payload: str) -> bytes:
    try:
        return base64.b64decode(payload)
    except ValueError as e:  # binascii.Error
        raise RequestError(f"image item: invalid base64 payload ({e}); re-encode the file") from None
