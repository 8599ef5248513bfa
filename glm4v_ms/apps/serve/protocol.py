"""The OpenAI chat-completions request as GLM-V's clients send it -> processor messages and generation overrides;
OpenAI-style errors; response and chunk bodies with the fields the ``openai`` SDK reads."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ...processing.media import local_path
from ...runtime.output import split_thinking


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None,
                 type_: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                              413: "invalid_request_error", 503: "server_error"}.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> Dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    model: str
    messages: List[Dict]                   # processor (HF) format
    overrides: Dict[str, Any]              # GenerationConfig fields
    stream: bool = False
    include_usage: bool = False
    stop: List[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    enable_thinking: bool = True
    tools: Optional[List[Dict]] = None     # OpenAI function schemas: to the chat template; calls parsed back
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(body: Dict, name: str, lo: float, hi: float, lo_open: bool = False, integer: bool = False):
    v = body.get(name)
    if v is None:
        return None
    if not (_is_int(v) if integer else _is_num(v)):
        raise APIError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {type(v).__name__}",
                       param=name)
    if v < lo or (lo_open and v == lo) or v > hi:
        left = "(" if lo_open else "["
        raise APIError(f"'{name}' must be in {left}{lo}, {hi}], got {v}", param=name)
    return v


def check_media_url(url: Any, where: str, allowed_local: Optional[str]) -> str:
    """data:, http(s):// and (under ``allowed_local`` only) file:// URLs; everything else is refused."""
    if not isinstance(url, str) or not url:
        raise APIError(f"{where}: the URL must be a non-empty string", param=where)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("data", "http", "https"):
        return url
    if scheme == "file":
        if allowed_local is None:
            raise APIError(f"{where}: file:// URLs are refused by this server (start it with "
                           "--allowed_local_media_path DIR to allow files under DIR)", param=where, code="invalid_url")
        try:
            path = local_path(url)
        except ValueError as e:
            raise APIError(f"{where}: {e}", param=where, code="invalid_url") from None
        real, root = os.path.realpath(path), os.path.realpath(allowed_local)
        if os.path.commonpath([real, root]) != root:
            raise APIError(f"{where}: {url} is outside the allowed local media path {allowed_local}", param=where,
                           code="invalid_url")
        return real
    raise APIError(f"{where}: unsupported URL {url[:60]!r}; use a data: URI, http(s):// or file:// URL",
                   param=where, code="invalid_url")


def _text_of(content, where: str) -> str:
    """A message's content as plain text (string, or text parts only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"{where}.content[{j}]: only text parts are allowed in this message",
                               param=f"{where}.content[{j}]")
            out.append(part["text"])
        return "".join(out)
    raise APIError(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")


def _media_url(part: Dict, key: str, where: str) -> Any:
    v = part.get(key)
    if isinstance(v, dict):
        v = v.get("url")
    if v is None:
        raise APIError(f"{where}: a '{key}' part needs {{\"{key}\": {{\"url\": ...}}}} or a URL string",
                       param=where)
    return v


def _document_item(part: Dict, where: str, allowed_local: Optional[str]) -> Dict:
    """OpenAI's file part ``{"type": "file", "file": {"file_data": "data:application/pdf;base64,...", "filename"}}``
    -> the processor's document item (its pages become images, rendered on the server): a PDF, or an office document
    (.ppt .pptx .doc .docx .odp .odt, recognised from its bytes and converted by LibreOffice where installed). Extensions: ``file.url``
    (an http(s):// or allowed file:// URL instead of inline data) and ``file.pages`` ("1-3,5"; all pages if absent).
    Uploaded ``file_id`` references are not supported: this server keeps no files."""
    f = part.get("file")
    if not isinstance(f, dict):
        raise APIError(f"{where}: a 'file' part needs {{\"file\": {{\"file_data\": \"data:application/pdf;base64,..."
                       f"\"}}}}", param=where)
    if "file_id" in f and "file_data" not in f and "url" not in f:
        raise APIError(f"{where}.file.file_id: uploaded files are not supported; send the document inline as "
                       "file_data",
                       param=f"{where}.file.file_id", code="unsupported_content")
    data, url = f.get("file_data"), f.get("url")
    if (data is None) == (url is None):
        raise APIError(f"{where}.file: give exactly one of 'file_data' (a data: URI or base64) or 'url'",
                       param=f"{where}.file")
    if data is not None:
        if not isinstance(data, str) or not data:
            raise APIError(f"{where}.file.file_data must be a non-empty string", param=f"{where}.file.file_data")
        source = data if data.startswith("data:") else "data:application/pdf;base64," + data
    else:
        source = check_media_url(url, f"{where}.file.url", allowed_local)
    item = {"type": "document", "document": source}
    pages = f.get("pages")
    if pages is not None:
        if not isinstance(pages, (str, int)) or isinstance(pages, bool):
            raise APIError(f"{where}.file.pages must be a page range string like '1-3,5'",
                           param=f"{where}.file.pages")
        item["pages"] = str(pages)
    return item


def convert_messages(messages: Any, allowed_local: Optional[str]) -> List[Dict]:
    """OpenAI messages -> the processor's messages. Earlier assistant turns keep only their answer (thinking
    removed with runtime.output.split_thinking, as the CLI keeps ``result.answer``)."""
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list of messages", param="messages")
    out: List[Dict] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(f"{where}.role must be 'system', 'user', 'assistant' or 'tool', got {role!r}",
                           param=f"{where}.role")
        content = m.get("content")
        if role == "system":
            out.append({"role": "system", "content": _text_of(content, where)})
            continue
        if role == "assistant":
            turn = {"role": "assistant", "content": split_thinking(_text_of(content, where))[1]}
            calls = m.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                          for c in calls):
                    raise APIError(f"{where}.tool_calls must be a list of {{\"type\": \"function\", \"function\": "
                                   "{\"name\", \"arguments\"}} objects", param=f"{where}.tool_calls")
                turn["tool_calls"] = calls
            out.append(turn)
            continue
        if role == "tool":  # a tool's result goes back into the template (GLM's observation turn)
            out.append({"role": "tool", "content": _text_of(content, where)})
            continue
        if isinstance(content, str):
            out.append({"role": "user", "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list) or not content:
            raise APIError(f"{where}.content must be a string or a non-empty list of content parts",
                           param=f"{where}.content")
        items = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise APIError(f"{pw} must be an object with a 'type'", param=pw)
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(f"{pw}.text must be a string", param=f"{pw}.text")
                items.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                items.append({"type": "image", "image": check_media_url(_media_url(part, kind, pw), pw, allowed_local)})
            elif kind == "video_url":
                items.append({"type": "video", "video": check_media_url(_media_url(part, kind, pw), pw, allowed_local)})
            elif kind == "file":
                items.append(_document_item(part, pw, allowed_local))
            else:
                raise APIError(f"{pw}: content part type {kind!r} is not supported; use text, image_url, video_url "
                               "or file (a PDF or office document)", param=f"{pw}.type", code="unsupported_content")
        out.append({"role": "user", "content": items})
    if out[-1]["role"] not in ("user", "tool"):
        raise APIError("the last message must be from the user (or a tool's result)",
                       param=f"messages[{len(messages) - 1}].role")
    return out


def parse_chat_request(body: Any, served_names: List[str], allowed_local: Optional[str]) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("'model' is required (a string; see GET /v1/models)", param="model")
    if model not in served_names:
        raise APIError(f"model {model!r} is not served here; available: {', '.join(served_names)}", status=404,
                       param="model", code="model_not_found")
    messages = convert_messages(body.get("messages"), allowed_local)
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise APIError(f"'n' must be 1 (one choice per request), got {n!r}", param="n")
    ov: Dict[str, Any] = {}
    mt = _number(body, "max_completion_tokens", 1, 1 << 30, integer=True)
    mt = mt if mt is not None else _number(body, "max_tokens", 1, 1 << 30, integer=True)
    if mt is not None:
        ov["max_new_tokens"] = mt
    t = _number(body, "temperature", 0, 2)
    if t is not None:
        ov["do_sample"] = t > 0
        if t > 0:
            ov["temperature"] = float(t)
    p = _number(body, "top_p", 0, 1, lo_open=True)
    if p is not None:
        ov["top_p"] = float(p)
    k = _number(body, "top_k", -1, 1 << 30, integer=True)
    if k is not None:
        ov["top_k"] = max(k, 0)  # -1 (vLLM) and 0 both mean no top-k
    rp = _number(body, "repetition_penalty", 0, 100, lo_open=True)
    if rp is not None:
        ov["repetition_penalty"] = float(rp)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise APIError(f"'seed' must be an integer, got {type(seed).__name__}", param="seed")
        ov["seed"] = seed
    budget = _number(body, "thinking_budget", 1, 1 << 30, integer=True)
    budget = budget if budget is not None else _number(body, "max_thinking_tokens", 1, 1 << 30, integer=True)
    if budget is not None:
        ov["max_thinking_tokens"] = budget
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError("'ignore_eos' must be true or false", param="ignore_eos")
    if ignore_eos:  # vLLM's extension: decode up to max_tokens
        ov["eos_token_id"] = []
    stop = body.get("stop")
    if stop is None:
        stops: List[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise APIError("'stop' must be a string or a list of strings", param="stop")
    if any(not s for s in stops):
        raise APIError("'stop' strings must not be empty", param="stop")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError("'stream' must be true or false", param="stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise APIError("'stream_options' must be an object", param="stream_options")
    skip = body.get("skip_special_tokens", True)
    if not isinstance(skip, bool):
        raise APIError("'skip_special_tokens' must be true or false", param="skip_special_tokens")
    ctk = body.get("chat_template_kwargs") or {}
    if not isinstance(ctk, dict):
        raise APIError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    thinking = ctk.get("enable_thinking", True)
    if not isinstance(thinking, bool):
        raise APIError("'chat_template_kwargs.enable_thinking' must be true or false",
                       param="chat_template_kwargs.enable_thinking")
    return ChatRequest(model=model, messages=messages, overrides=ov, stream=bool(stream),
                       include_usage=bool(so.get("include_usage", False)), stop=stops, skip_special_tokens=skip,
                       enable_thinking=thinking, tools=_tools(body))


def _tools(body: Dict) -> Optional[List[Dict]]:
    """``tools`` (OpenAI function schemas) for the chat template, or None. ``tool_choice`` "auto" (the default) and
    "none" (the tools are not shown to the model) are supported; forcing a call ("required", a named function)
    is not, since the model's output is not constrained."""
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    if choice not in ("auto", "none"):
        raise APIError(f"'tool_choice' {choice!r} is not supported: use \"auto\" or \"none\" (the model decides "
                       "whether to call a tool)", param="tool_choice", code="unsupported_value")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise APIError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects",
                       param="tools")
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(f"tools[{k}] needs {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                           "\"parameters\": {...}}}}", param=f"tools[{k}]")
    return tools if tools and choice == "auto" else None


# ------------------------------------------------------------------------------------------------------ responses
def delta_fields(kind: str, text: str) -> Dict:
    """Thinking goes to ``reasoning_content`` and ``reasoning`` (clients read one or the other), the answer to
    ``content``."""
    if kind == "thinking":
        return {"reasoning_content": text, "reasoning": text}
    return {"content": text}


def chunk(req: ChatRequest, delta: Dict, finish_reason: Optional[str] = None) -> Dict:
    return {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": req.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def usage_chunk(req: ChatRequest, usage: Dict) -> Dict:
    return {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": req.model,
            "choices": [], "usage": usage}


def completion(req: ChatRequest, content: str, reasoning: Optional[str], finish_reason: str, usage: Dict,
               tool_calls: Optional[List[Dict]] = None) -> Dict:
    message = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning is not None:
        message["reasoning_content"] = reasoning
        message["reasoning"] = reasoning
    return {"id": req.id, "object": "chat.completion", "created": req.created, "model": req.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage}
