"""GLM-4.6V tool calls in the model's text -> OpenAI ``tool_calls``; a whole reply or a stream of text pieces.

The model writes a call as (chat_template.jinja of GLM-4.6V-Flash; GLM-4.5V and GLM-4.5 use the same markup)::

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    <arg_key>days</arg_key>
    <arg_value>3</arg_value>
    </tool_call>

and this module turns it into ``{"id": "call_...", "type": "function", "function": {"name": "get_weather",
"arguments": "{\\"city\\": \\"Paris\\", \\"days\\": 3}"}}``.

Value types (the rule of vLLM's ``glm45`` tool parser, reimplemented): a value whose parameter the request's tool
schema declares ``"type": "string"`` is kept as the exact text; any other value is read as JSON if it parses
(numbers, booleans, null, objects, lists), else as a Python literal (``True``, ``None``, ``'x'``), else kept as text.
Whitespace around names, keys and values is stripped (the template writes newlines between the tags).

Malformed markup is never an error: a ``<tool_call>`` block without a name, with text outside its
``<arg_key>/<arg_value>`` pairs, with a key lacking its value, or never closed is returned as ordinary text.

API for callers (generate.py, batch jobs, the server):
* :func:`parse_tool_calls` (a complete reply) -> :class:`ParsedReply` (``content``, ``tool_calls``);
* :class:`ToolCallStream` (incremental): ``feed(piece)`` returns events as soon as they are certain: text that can
  no longer be part of a call, and each call once its ``</tool_call>`` has arrived; ``finish()`` flushes the rest
  (an unclosed call comes back as text). A server streams each call as one delta.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
_NAME = re.compile(r"[^\s<>]+")  # a function name: one word without markup


@dataclass
class ToolCall:
    name: str
    arguments: Dict[str, object]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> Dict:
        """OpenAI chat-completions form: arguments as a JSON string."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    def as_delta(self, index: int) -> Dict:
        """One streamed ``choices[0].delta.tool_calls`` entry carrying the whole call (``index``: its position
        among the reply's calls), as a server sends it once the call has closed."""
        return dict(self.as_openai(), index=index)


@dataclass
class ParsedReply:
    content: str                        # the reply without its well-formed calls (malformed ones stay in it)
    tool_calls: List[ToolCall]

    @property
    def finish_reason(self) -> Optional[str]:
        """"tool_calls" when the reply made calls (OpenAI's value), else None (the caller knows stop / length)."""
        return "tool_calls" if self.tool_calls else None


def _string_params(tools: Optional[Sequence[Dict]]) -> Dict[str, set]:
    """Function name -> names of its parameters typed "string" in the request's tool schemas (OpenAI form
    ``{"type": "function", "function": {"name", "parameters": {"properties": {...}}}}`` or the bare function)."""
    out: Dict[str, set] = {}
    for tool in tools or ():
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function", tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        props = (fn.get("parameters") or {}).get("properties") if isinstance(fn.get("parameters"), dict) else None
        names = set()
        for key, schema in (props or {}).items():
            kind = schema.get("type") if isinstance(schema, dict) else None
            if kind == "string" or (isinstance(kind, list) and kind and all(k in ("string", "null") for k in kind)):
                names.add(key)
        out[fn["name"]] = names
    return out


def _value(text: str, is_string: bool):
    if is_string:
        return text
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_call_body(body: str, string_params: Optional[Dict[str, set]] = None) -> Optional[Tuple[str, Dict]]:
    """The text between ``<tool_call>`` and ``</tool_call>`` -> (name, arguments), or None if it is malformed."""
    body = body.strip()
    cut = body.find("<arg_key>")
    head, rest = (body, "") if cut < 0 else (body[:cut], body[cut:])
    name = head.strip()
    if not _NAME.fullmatch(name):
        return None
    strings = (string_params or {}).get(name, set())
    args: Dict[str, object] = {}
    pos = 0
    for m in _PAIR.finditer(rest):
        if m.start() != pos:
            return None  # text between pairs
        key = m.group(1).strip()
        if not key or "<" in key:
            return None
        args[key] = _value(m.group(2).strip(), key in strings)
        pos = m.end()
    if rest[pos:].strip():
        return None  # a key without its value, or trailing text
    return name, args


Event = Tuple[str, Union[str, ToolCall]]  # ("text", str) or ("tool_call", ToolCall)


class ToolCallStream:
    """Incremental parser: feed text pieces as they decode, get text and complete calls back in order."""

    def __init__(self, tools: Optional[Sequence[Dict]] = None, new_id: Optional[Callable[[], str]] = None):
        self._strings = _string_params(tools)
        self._new_id = new_id
        self._buf = ""
        self._in_call = False

    def _call(self, name: str, args: Dict) -> ToolCall:
        return ToolCall(name, args, self._new_id()) if self._new_id else ToolCall(name, args)

    def feed(self, text: str) -> List[Event]:
        self._buf += text
        events: List[Event] = []
        while True:
            if not self._in_call:
                k = self._buf.find(CALL_OPEN)
                if k < 0:
                    # keep back a tail that may be the start of "<tool_call>"
                    hold = next((n for n in range(min(len(CALL_OPEN) - 1, len(self._buf)), 0, -1)
                                 if CALL_OPEN.startswith(self._buf[-n:])), 0)
                    emit, self._buf = self._buf[:len(self._buf) - hold], self._buf[len(self._buf) - hold:]
                    if emit:
                        events.append(("text", emit))
                    return events
                if k:
                    events.append(("text", self._buf[:k]))
                self._buf, self._in_call = self._buf[k + len(CALL_OPEN):], True
            k = self._buf.find(CALL_CLOSE)
            if k < 0:
                return events
            body, self._buf, self._in_call = self._buf[:k], self._buf[k + len(CALL_CLOSE):], False
            parsed = parse_call_body(body, self._strings)
            if parsed is None:
                events.append(("text", CALL_OPEN + body + CALL_CLOSE))
            else:
                events.append(("tool_call", self._call(*parsed)))

    def finish(self) -> List[Event]:
        """The rest of the text: a call still open at the end is returned as text."""
        rest = (CALL_OPEN if self._in_call else "") + self._buf
        self._buf, self._in_call = "", False
        return [("text", rest)] if rest else []


def parse_tool_calls(text: str, tools: Optional[Sequence[Dict]] = None,
                     new_id: Optional[Callable[[], str]] = None) -> ParsedReply:
    """A complete reply -> its text without the well-formed calls (stripped) and the calls in order."""
    stream = ToolCallStream(tools, new_id)
    events = stream.feed(text) + stream.finish()
    content = "".join(v for kind, v in events if kind == "text")
    calls = [v for kind, v in events if kind == "tool_call"]
    return ParsedReply(content.strip() if calls else content, calls)

