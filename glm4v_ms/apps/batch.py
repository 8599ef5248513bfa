"""Batch inference over a JSONL data set: requests, part files, batching, merging (``tools/batch_infer.py``).

The job is split in three layers, each usable on its own:

* **Input** (:func:`scan_input`, :func:`parse_request`): one request per non-blank line. A line's ``index`` is its
  0-based line number; its ``id`` is the line's ``id`` field (a string or an integer) or, when absent, the index.
  Ids are compared as JSON values (``3`` and ``"3"`` differ); a repeated id is an error of the later line. Per-line
  problems (invalid JSON, an unknown field, a missing image, ...) become that line's ``error`` record.
* **Part files** (:class:`PartWriter`, :class:`PartStore`): every data-parallel shard appends one JSON line per
  finished request to ``<output>.parts/rank-<dp_rank>.jsonl``, flushed at once and fsync'ed at intervals. Readers
  keep only complete lines (ending in a newline): a line cut by a kill is ignored, and cut off the file by the
  writer that owns it before it appends again. A request is *done* when some part file (of any earlier world size)
  holds a record for its index with the same id; an error record counts as done unless ``retry_errors``.
* **Execution** (:func:`encode_request`, :func:`collate`, :func:`generate_batch`, :class:`BatchJob`): each shard's
  pending requests are read in windows; within a window they are encoded one by one (so a bad image fails only its
  own line), grouped by media kind (images/text vs video: one forward cannot mix them) and generation settings,
  sorted by prompt length and cut into left-padded batches run by ``generation.iter_tokens``. Text, thinking,
  boxes and statistics are computed per row exactly as ``Glm4vPipeline.stream`` does for one request.

:func:`merge_parts` writes ``<output>``: one line per input request, in input order (a success record is preferred
over an error record of the same request), via a temporary file renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

PART_PREFIX, PART_SUFFIX = "rank-", ".jsonl"

# Request fields. Generation settings override the job's (command line) settings for that request.
GEN_FIELDS = {"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_k": int, "top_p": float,
              "repetition_penalty": float, "seed": int, "max_thinking_tokens": int}
MEDIA_FIELDS = ("prompt", "image", "video", "pdf", "pdf_pages", "pdf_dpi", "system")
REQUEST_FIELDS = ("id", "messages") + MEDIA_FIELDS + tuple(GEN_FIELDS)


class JobError(Exception):
    """A problem with the job itself (input, output, model, launch): the tool prints it and exits 1."""


class RequestError(ValueError):
    """A problem with one request: it becomes that request's error record."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def id_key(value) -> str:
    """Ids compare as JSON values: 3 and "3" are different ids."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------------
# Distributed layout (data parallel shards; tensor-parallel groups share one)
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Layout:
    """Where this process sits in the job. ``rank``/``world``: global (one process per card); ``dp_rank``/``dp_size``:
    the data-parallel shard this process works on; ``writer``: whether it writes that shard's part file."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    writer: bool = True
    launcher: str = "single"  # "msrun" (mindspore.communication is initialised), "flags" (--rank/--world_size)
    barrier: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def coordinator(self) -> bool:
        """The process that shows the progress bar and merges the output."""
        return self.writer and self.dp_rank == 0


def make_layout(rank: int, world: int, local_rank: int = 0, launcher: str = "single", tp: int = 1,
                barrier: Optional[Callable[[], None]] = None) -> Layout:
    """The data-parallel view of a process. With tensor parallelism over ``tp`` consecutive ranks, the ranks of a
    group share one shard (``dp_rank = rank // tp``) and only the group's first rank writes (batch_infer --tp); with
    ``tp`` 1 every rank is the writer of its own shard."""
    if world < 1 or not 0 <= rank < world:
        raise JobError(f"rank {rank} is outside a world of {world} process(es)")
    if tp < 1 or world % tp:
        raise JobError(f"the world size {world} is not a multiple of the tensor-parallel size {tp}")
    return Layout(rank=rank, world=world, local_rank=local_rank, dp_rank=rank // tp, dp_size=world // tp,
                  writer=rank % tp == 0, launcher=launcher, barrier=barrier or (lambda: None))


def part_path(parts_dir: str, dp_rank: int) -> str:
    return os.path.join(parts_dir, f"{PART_PREFIX}{dp_rank}{PART_SUFFIX}")


def part_files(parts_dir: str) -> List[str]:
    """Every part file in the folder (from any earlier world size), in rank order."""
    if not os.path.isdir(parts_dir):
        return []
    found = []
    for name in os.listdir(parts_dir):
        if name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX):
            middle = name[len(PART_PREFIX):-len(PART_SUFFIX)]
            if middle.isdigit():
                found.append((int(middle), os.path.join(parts_dir, name)))
    return [p for _, p in sorted(found)]


# ----------------------------------------------------------------------------------------------------------------
# Input
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class InputIndex:
    """Where each request is in the input file; what is known from its first parse (id, line-level errors)."""
    path: str
    indices: List[int]                 # line numbers of the requests (non-blank lines), ascending
    offsets: Dict[int, Tuple[int, int]]  # index -> (byte offset, byte length)
    ids: Dict[int, object]             # index -> id (the line's, or the index)
    errors: Dict[int, str]             # index -> a line-level error found by the scan (JSON, id, duplicate)

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
    indices, offsets, ids, errors = [], {}, {}, {}
    first_seen: Dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            offset = 0
            for index, raw in enumerate(f):
                length = len(raw)
                text = raw.strip()
                if text:
                    indices.append(index)
                    offsets[index] = (offset, length)
                    ids[index], err = _scan_line(text, index)
                    if err is None and isinstance(ids[index], (str, int)):
                        key = id_key(ids[index])
                        if key in first_seen:
                            err = f"duplicate id {ids[index]!r} (first used on line {first_seen[key]})"
                        else:
                            first_seen[key] = index
                    if err is not None:
                        errors[index] = err
                offset += length
    except OSError as e:
        raise JobError(f"cannot read --input {path}: {e.strerror or e}") from None
    return InputIndex(path, indices, offsets, ids, errors)


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


@dataclass
class Request:
    index: int
    id: object
    messages: List[Dict]
    settings: Dict                 # generation settings given on the line (others: the job's)
    first_image: object = None     # source of the first image (its size rescales boxes), or None


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
    settings = {}
    for name, kind in GEN_FIELDS.items():
        if name in obj:
            _check_type(name, obj[name], kind)
            settings[name] = obj[name]
    for name in ("max_new_tokens", "top_k", "max_thinking_tokens"):
        if settings.get(name, 0) < 0:
            raise RequestError(f"field '{name}' must be >= 0, got {settings[name]}")
    rid = obj.get("id", index)
    if "messages" in obj:
        extra = [k for k in MEDIA_FIELDS if k in obj]
        if extra:
            raise RequestError(f"give either 'messages' or 'prompt' (with image/video/pdf/system), not both "
                               f"(found {', '.join(extra)})")
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise RequestError("field 'messages' must be a non-empty list of {\"role\", \"content\"} objects")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise RequestError(f"each message needs 'role' and 'content', got {json.dumps(m)[:60]}")
            if not isinstance(m["content"], (str, list)):
                raise RequestError("a message's 'content' must be a string or a list of content items")
            if isinstance(m["content"], list) and not all(isinstance(it, dict) for it in m["content"]):
                raise RequestError("content items must be objects like {\"type\": \"text\", \"text\": ...}")
        return Request(index, rid, messages, settings, _first_image_of(messages))
    if "prompt" not in obj:
        raise RequestError("a request needs 'prompt' (with optional image/video/pdf/system) or 'messages'")
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
    if ("pdf_pages" in obj or "pdf_dpi" in obj) and "pdf" not in obj:
        raise RequestError("'pdf_pages' / 'pdf_dpi' need a 'pdf'")
    from .pipeline import Glm4vPipeline
    from ..processing.processor import MixedMediaError

    try:
        messages = Glm4vPipeline.messages(obj["prompt"], images=images, video=obj.get("video"), pdf=obj.get("pdf"),
                                          pdf_pages=obj.get("pdf_pages"), pdf_dpi=obj.get("pdf_dpi"),
                                          system=obj.get("system"))
    except MixedMediaError as e:
        raise RequestError(first_line(e)) from None
    return Request(index, rid, messages, settings, images[0] if images else None)


def _first_image_of(messages: List[Dict]):
    for m in messages:
        if isinstance(m.get("content"), list):
            for item in m["content"]:
                kind = item.get("type") or ("image" if "image" in item else None)
                if kind == "image":
                    for key in ("image", "url", "path", "base64"):
                        if key in item:
                            if key == "base64" and not str(item[key]).startswith("data:"):
                                import base64

                                return base64.b64decode(item[key])  # invalid base64 fails in the processor
                            return item[key]
    return None


def media_kind(messages: List[Dict]) -> str:
    """"video" when the prompt has a video (it cannot share a forward with images), else "image" (images or text)."""
    for m in messages:
        if isinstance(m.get("content"), list):
            for item in m["content"]:
                if item.get("type") == "video" or (item.get("type") is None and "video" in item):
                    return "video"
    return "image"


# ----------------------------------------------------------------------------------------------------------------
# Part files
# ----------------------------------------------------------------------------------------------------------------

def repair_tail(path: str) -> int:
    """Cut an incomplete last line (a write interrupted by a kill) off ``path``; returns the bytes removed. Only the
    process that owns the file (or nobody) may call this."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        block = 1 << 16
        end = size
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep = 0
        while end > 0:  # the last newline, searching backwards block by block
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            at = chunk.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def _try_lock(f) -> bool:
    """Exclusive advisory lock; False when another process holds it. Filesystems without locks count as locked
    by nobody."""
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return True  # ENOLCK etc.: no locking here
    except ImportError:
        return True


class PartWriter:
    """Appends result lines to one part file: each line is flushed to the OS at once (a killed process loses
    nothing written), fsync'ed every ``fsync_interval`` seconds and at close (a lost machine loses at most that
    window; the lines are then missing or cut, and redone). Holds an exclusive lock on the file."""

    def __init__(self, path: str, fsync_interval: float = 10.0):
        self.path = path
        self.fsync_interval = fsync_interval
        try:
            self.f = open(path, "ab")
        except OSError as e:
            raise JobError(f"cannot write {path}: {e.strerror or e}") from None
        if not _try_lock(self.f):
            self.f.close()
            raise JobError(f"{path} is being written by another process (is a job with the same --output still "
                           "running?)")
        self.repaired = repair_tail(path)
        self.lines = 0
        self._last_sync = time.monotonic()

    def write(self, record: Dict) -> None:
        self.f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self.f.flush()
        self.lines += 1
        if time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.f.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self.f.closed:
            try:
                self.f.flush()
                self.sync()
            finally:
                self.f.close()


@dataclass
class RecordRef:
    path: str
    offset: int
    length: int
    error: bool


class PartStore:
    """Reads the part files incrementally (only bytes added since the last ``poll``), keeping for each request
    index the best record seen: a success over an error, and among equals the one read last."""

    def __init__(self, parts_dir: str):
        self.dir = parts_dir
        self.pos: Dict[str, int] = {}
        self.best: Dict[int, RecordRef] = {}
        self.ids: Dict[int, object] = {}
        self.corrupt = 0

    def poll(self, on_record: Optional[Callable[[int, object, bool], None]] = None) -> int:
        """Read new complete lines; ``on_record(index, id, is_error)`` for each. Returns how many were read."""
        n = 0
        for path in part_files(self.dir):
            start = self.pos.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # an unfinished last line is left for a later poll
            offset = start
            for raw in data[:end].splitlines(keepends=True):
                rec = _record_head(raw)
                if rec is None:
                    self.corrupt += 1
                else:
                    index, rid, is_error = rec
                    ref = RecordRef(path, offset, len(raw), is_error)
                    old = self.best.get(index)
                    if old is None or not (is_error and not old.error):
                        self.best[index] = ref
                        self.ids[index] = rid
                    n += 1
                    if on_record is not None:
                        on_record(index, rid, is_error)
                offset += len(raw)
            self.pos[path] = start + end
        return n

    def read(self, ref: RecordRef) -> bytes:
        with open(ref.path, "rb") as f:
            f.seek(ref.offset)
            return f.read(ref.length)


def _record_head(raw: bytes):
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("index"), int) or "id" not in rec:
        return None
    return rec["index"], rec["id"], "error" in rec


def check_store_matches(store: PartStore, index: InputIndex) -> None:
    """Every record must belong to a request of this input with the same id; else the input changed since the
    records were written, and resuming would mix two data sets."""
    for i, rid in store.ids.items():
        if i not in index.offsets:
            raise JobError(f"{os.path.dirname(store.best[i].path)} has a result for input line {i}, which is "
                           f"{'blank' if i < _line_count(index) else 'beyond the end'} in {index.path}: the input "
                           "changed since the earlier run; use another --output or delete the .parts folder")
        if id_key(rid) != id_key(index.ids[i]):
            raise JobError(f"{os.path.dirname(store.best[i].path)} has a result for input line {i} with id "
                           f"{rid!r}, but that line's id is now {index.ids[i]!r}: the input changed since the earlier "
                           "run; use another --output or delete the .parts folder")


def _line_count(index: InputIndex) -> int:
    return index.indices[-1] + 1 if index.indices else 0


def merge_parts(index: InputIndex, parts_dir: str, output: str) -> Dict[str, int]:
    """Write ``output``: every request's record once, in input order, through a temporary file renamed into place.
    Raises JobError if a request has no record. Returns counts."""
    store = PartStore(parts_dir)
    store.poll()
    check_store_matches(store, index)
    missing = [i for i in index.indices if i not in store.best]
    if missing:
        raise JobError(f"{len(missing)} request(s) have no result yet (first: input line {missing[0]})")
    out_dir = os.path.dirname(os.path.abspath(output))
    tmp = os.path.join(out_dir, f".{os.path.basename(output)}.tmp-{os.getpid()}")
    errors = 0
    try:
        with open(tmp, "wb") as out:
            handles: Dict[str, object] = {}
            try:
                for i in index.indices:
                    ref = store.best[i]
                    f = handles.get(ref.path)
                    if f is None:
                        f = handles[ref.path] = open(ref.path, "rb")
                    f.seek(ref.offset)
                    out.write(f.read(ref.length))
                    errors += ref.error
            finally:
                for f in handles.values():
                    f.close()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, output)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise JobError(f"cannot write {output}: {e.strerror or e}") from None
    _fsync_dir(out_dir)
    return {"requests": len(index), "errors": errors}


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _locked(path: str):
    """Context manager: an exclusive blocking flock on ``path`` (created if needed)."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        f = open(path, "ab")
        try:
            try:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except (ImportError, OSError):
                pass
            yield
        finally:
            f.close()

    return cm()


# ----------------------------------------------------------------------------------------------------------------
# Encoding and batching
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    request: Request
    inputs: Dict                  # the processor's output for this request alone (batch of 1)
    prompt_len: int
    image_size: Optional[Tuple[int, int]]
    kind: str
    gen: object                   # GenerationConfig (max_new_tokens already fitted to the context)
    key: tuple                    # requests with equal keys may share a batch


def settings_key(gen, kind: str, index: int) -> tuple:
    """What must be equal for requests to share a batch. Greedy ignores the sampling knobs; a seeded sampled
    request runs alone, so that its draws (and its result) do not depend on its batch neighbours."""
    if gen.do_sample:
        solo = index if gen.seed is not None else None
        sampling = (gen.temperature, gen.top_k, gen.top_p, gen.seed, solo)
    else:
        sampling = ()
    return (kind, gen.max_new_tokens, bool(gen.do_sample), gen.repetition_penalty, gen.max_thinking_tokens,
            tuple(gen.eos_token_id or ()), gen.pad_token_id) + sampling


def encode_request(pipe, request: Request, job_settings: Dict) -> Encoded:
    """Load and preprocess one request alone (a bad image fails here, for this request only), fit its generation
    settings to the context as ``Glm4vPipeline.stream`` does, and compute its batching key."""
    from ..processing.media import load_images

    settings = dict(job_settings)
    settings.update(request.settings)
    gen = pipe.generation_config(**settings)
    gen.validate(pipe.model.config.text.vocab_size)
    inputs = pipe.inputs(request.messages)
    n_prompt = int(np.asarray(inputs["input_ids"]).shape[-1])
    ctx = pipe.model.config.text.max_position_embeddings
    if n_prompt >= ctx:
        raise RequestError(f"the prompt has {n_prompt} tokens but the model's context is {ctx}; use fewer or "
                           "smaller images, a shorter video or text")
    if n_prompt + gen.max_new_tokens > ctx:
        gen = replace(gen, max_new_tokens=ctx - n_prompt)
    size = None
    if request.first_image is not None:  # the pipeline's rule: boxes in pixels of the first image
        size = load_images(request.first_image, pipe.processor.media_options)[0].size
    kind = media_kind(request.messages)
    return Encoded(request, inputs, n_prompt, size, kind, gen, settings_key(gen, kind, request.index))


def make_batches(encoded: Sequence[Encoded], batch_size: int) -> List[List[Encoded]]:
    """Group by key (in order of first appearance), sort each group by prompt length, cut into batches."""
    groups: Dict[tuple, List[Encoded]] = {}
    for e in encoded:
        groups.setdefault(e.key, []).append(e)
    batches = []
    for members in groups.values():
        members = sorted(members, key=lambda e: (e.prompt_len, e.request.index))
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    return batches


_ARRAY_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def collate(inputs: Sequence[Dict]) -> Dict:
    """Per-request processor outputs -> one left-padded batch, equal to what the processor makes for the list of
    conversations, except for the ids under the padding: each row is padded with its own first token (the template's
    [gMASK]) rather than the pad token, so that the set of tokens a row has "seen" (the repetition penalty's input)
    is the same as when the request runs alone. The attention mask hides the padding either way."""
    rows = [np.asarray(x["input_ids"], dtype=np.int64).reshape(-1) for x in inputs]
    masks = [np.asarray(x["attention_mask"], dtype=np.int64).reshape(-1) for x in inputs]
    s = max(len(r) for r in rows)
    ids = np.zeros((len(rows), s), np.int64)
    mask = np.zeros((len(rows), s), np.int64)
    for k, (r, m) in enumerate(zip(rows, masks)):
        ids[k, :s - len(r)] = r[0]
        ids[k, s - len(r):] = r
        mask[k, s - len(r):] = m
    out = {"input_ids": ids, "attention_mask": mask}
    for key in _ARRAY_KEYS:
        parts = [np.asarray(x[key]) for x in inputs if x.get(key) is not None]
        out[key] = np.concatenate(parts, axis=0) if parts else None
    return out


def pieces_from_tokens(tokenizer, tokens: Sequence[int], think, markers: set, eos: set, kind: str):
    """(thinking, answer_text) of one row's generated tokens, exactly as ``generation.stream_generate`` yields them."""
    from ..runtime.generation import text_pieces

    parts = {"thinking": [], "answer": []}
    for piece in text_pieces(tokenizer, tokens, think, markers, eos, kind):
        parts[piece.kind].append(piece.text)
    return "".join(parts["thinking"]), "".join(parts["answer"])


def generate_batch(pipe, batch: Sequence[Encoded]) -> List[Dict]:
    """Run one batch (same key) and return one record per request, with ChatResult.as_dict()'s keys."""
    from ..runtime.generation import StepStats, _prompt_opens_thinking, iter_tokens, thinking_tokens
    from ..runtime.output import parse_boxes, rescale_boxes, split_thinking
    from .pipeline import ChatResult

    tok = pipe.processor.tokenizer
    think = thinking_tokens(tok)
    vocab = tok.get_vocab()
    markers = {i for i in (vocab.get("<answer>"), vocab.get("</answer>")) if i is not None}
    gen = batch[0].gen
    eos = set(gen.eos_token_id or [])
    inputs = collate([e.inputs for e in batch])
    stats = StepStats()
    t_start = time.perf_counter()
    steps, times, compiled = [], [], []
    for step in iter_tokens(pipe.model, inputs, gen, think, stats, mode=pipe.mode):
        steps.append(np.asarray(step).copy())
        times.append(time.perf_counter())
        compiled.append(stats.compile_s)  # graph compiles so far: one-time work, kept out of decode_s
    batch_s = time.perf_counter() - t_start
    tokens = np.stack(steps, axis=1) if steps else np.zeros((len(batch), 0), np.int64)
    records = []
    for r, e in enumerate(batch):
        row = tokens[r].tolist()
        n = len(row)
        for k, t in enumerate(row):
            if t in eos:
                n = k + 1
                break
        row = row[:n]
        ids = np.asarray(e.inputs["input_ids"]).reshape(-1)
        kind = "thinking" if think is not None and _prompt_opens_thinking(ids, think) else "answer"
        thinking, text = pieces_from_tokens(tok, row, think, markers, eos, kind)
        cut = stats.thinking_cut[r] if r < len(stats.thinking_cut) else -1
        st = StepStats(prompt_tokens=e.prompt_len, new_tokens=n, prefill_s=stats.prefill_s,
                       decode_s=(times[n - 1] - times[0] - (compiled[n - 1] - compiled[0])) if n else 0.0,
                       thinking_cut=[cut] if cut >= 0 else [], compile_s=stats.compile_s, compiles=stats.compiles)
        result = ChatResult(thinking=thinking.strip(), text=text, tokens=row, stats=st)
        _, result.answer = split_thinking(text)
        result.boxes = parse_boxes(text)
        if e.image_size is not None:
            result.boxes_pixels = rescale_boxes(result.boxes, *e.image_size)
        rec = {"id": e.request.id, "index": e.request.index}
        rec.update(result.as_dict())
        rec["batch_size"] = len(batch)
        rec["batch_s"] = round(batch_s, 3)
        records.append(rec)
    return records


def error_record(index: int, rid, message: str) -> Dict:
    return {"id": rid, "index": index, "error": message}


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class JobOptions:
    input: str
    output: str
    batch_size: int = 4
    sort_window: int = 32
    retry_errors: bool = False
    fsync_interval: float = 10.0
    progress: bool = True
    settings: Dict = field(default_factory=dict)  # the job's generation settings (per-line fields override)
    max_failed_batches: int = 5                   # consecutive batches failing as a whole: the job stops
    test_delay: float = 0.0                       # tests: seconds to wait between generating a batch and writing it


class BatchJob:
    """One process's part of a batch-inference job. ``load_pipeline()`` is called only if this shard has work."""

    def __init__(self, options: JobOptions, layout: Layout, load_pipeline: Callable[[], object],
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)):
        self.o, self.layout, self.load_pipeline, self.log = options, layout, load_pipeline, log
        self.parts_dir = os.path.abspath(options.output) + ".parts"
        self.generated = 0      # requests answered by this process in this run
        self.errors = 0         # error records written by this process in this run

    # --------------------------------------------------------------------------------------------------- set-up
    def _prepare_output(self) -> None:
        out = os.path.abspath(self.o.output)
        if os.path.isdir(out):
            raise JobError(f"--output {self.o.output} is a folder; give a file name like results.jsonl")
        parent = os.path.dirname(out)
        if not os.path.isdir(parent):
            raise JobError(f"the folder of --output does not exist: {parent}")
        try:
            os.makedirs(self.parts_dir, exist_ok=True)
        except OSError as e:
            raise JobError(f"cannot create {self.parts_dir}: {e.strerror or e}") from None
        if not os.access(parent, os.W_OK) or not os.access(self.parts_dir, os.W_OK):
            raise JobError(f"cannot write to {parent if not os.access(parent, os.W_OK) else self.parts_dir}: "
                           "permission denied")

    def _repair_orphans(self) -> None:
        """Part files of shards that no process of this world owns: cut their incomplete tails (the coordinator
        only), and refuse to run if some other process is still writing one."""
        mine = {part_path(self.parts_dir, d) for d in range(self.layout.dp_size)}
        for path in part_files(self.parts_dir):
            if path in mine:
                continue
            with open(path, "ab") as f:
                if not _try_lock(f):
                    raise JobError(f"{path} is being written by another process (is an earlier job with the same "
                                   "--output still running?)")
                cut = repair_tail(path)
            if cut:
                self.log(f"[repaired {path}: dropped an incomplete last line of {cut} bytes]")

    # ----------------------------------------------------------------------------------------------------- run
    def run(self) -> Dict:
        lay = self.layout
        index = scan_input(self.o.input)
        self._prepare_output()
        writer = None
        if lay.writer:
            writer = PartWriter(part_path(self.parts_dir, lay.dp_rank), self.o.fsync_interval)
            if writer.repaired:
                self.log(f"[repaired {writer.path}: dropped an incomplete last line of {writer.repaired} bytes; "
                         "its request is redone]")
        try:
            if lay.coordinator:
                self._repair_orphans()
            store = PartStore(self.parts_dir)
            store.poll()
            check_store_matches(store, index)
            if store.corrupt:
                self.log(f"[warning: {store.corrupt} unreadable line(s) in {self.parts_dir} ignored; their requests "
                         "are redone if no other record covers them]")
            done = {i for i, ref in store.best.items() if not (ref.error and self.o.retry_errors)}
            pending = [i for i in index.indices if i not in done]
            # Nobody writes before every process has read the part files: all see the same done set.
            lay.barrier()
            mine = [i for i in pending if i % lay.dp_size == lay.dp_rank]
            self.summary = {"requests": len(index), "done_before": len(index) - len(pending),
                            "pending": len(pending), "mine": len(mine)}
            if lay.coordinator or (lay.writer and lay.launcher == "flags"):
                self.log(f"[{len(index)} requests: {len(index) - len(pending)} done before this run, {len(pending)} "
                         f"to do over {lay.dp_size} shard(s); this shard: {len(mine)}]")
            tracker = _Tracker(store, pending, len(index) - len(pending), self.o, lay) if lay.coordinator else None
            t0 = time.perf_counter()
            if mine:
                pipe = self.load_pipeline()
                self._work(pipe, index, mine, writer, tracker)
            if writer is not None:
                writer.close()
            self.summary["seconds"] = time.perf_counter() - t0
            self.summary.update(generated=self.generated, errors=self.errors)
            if lay.writer:
                self.log(f"[rank {lay.rank}: {self.generated + self.errors} request(s) done in this run "
                         f"({self.errors} error(s)) in {self.summary['seconds']:.1f} s]")
            merged = None
            if lay.coordinator and (lay.launcher != "flags" or lay.dp_size == 1):
                tracker.wait()  # the other shards' processes are still running: wait for their records
                merged = self._merge(index)
            elif lay.writer and lay.launcher == "flags":
                merged = self._merge_if_complete(index)  # independent processes: the last one merges
            if tracker is not None:
                tracker.close()
            self.summary["merged"] = merged
            return self.summary
        finally:
            if writer is not None:
                writer.close()

    def _merge(self, index: InputIndex) -> Dict:
        with _locked(os.path.join(self.parts_dir, ".merge.lock")):
            return merge_parts(index, self.parts_dir, self.o.output)

    def _merge_if_complete(self, index: InputIndex) -> Optional[Dict]:
        with _locked(os.path.join(self.parts_dir, ".merge.lock")):
            store = PartStore(self.parts_dir)
            store.poll()
            if any(i not in store.best for i in index.indices):
                return None
            return merge_parts(index, self.parts_dir, self.o.output)

    # ---------------------------------------------------------------------------------------------------- work
    def _write(self, writer: Optional[PartWriter], record: Dict) -> None:
        if writer is not None:
            writer.write(record)
        if "error" in record:
            self.errors += 1
        else:
            self.generated += 1

    def _work(self, pipe, index: InputIndex, mine: List[int], writer, tracker) -> None:
        window = max(self.o.sort_window, self.o.batch_size)
        failed_in_a_row = 0
        with open(index.path, "rb") as f:
            for start in range(0, len(mine), window):
                encoded = []
                for i in mine[start:start + window]:
                    rec = self._encode(pipe, index, f, i)
                    if isinstance(rec, Encoded):
                        encoded.append(rec)
                    else:
                        self._write(writer, rec)
                if tracker is not None:
                    tracker.update()
                for batch in make_batches(encoded, self.o.batch_size):
                    records, failed = self._generate(pipe, batch)
                    failed_in_a_row = failed_in_a_row + 1 if failed else 0
                    if failed_in_a_row >= self.o.max_failed_batches:
                        raise JobError(f"{failed_in_a_row} batches in a row failed as a whole (last: "
                                       f"{records[-1]['error']}); stopping: the model or device is not working")
                    if self.o.test_delay:
                        time.sleep(self.o.test_delay)
                    for rec in records:
                        self._write(writer, rec)
                    if tracker is not None:
                        tracker.update()

    def _encode(self, pipe, index: InputIndex, f, i: int):
        rid = index.ids[i]
        if i in index.errors:
            return error_record(i, rid, index.errors[i])
        try:
            obj = json.loads(index.read(f, i).decode("utf-8"))
            request = parse_request(obj, i)
            return encode_request(pipe, request, self.o.settings)
        except Exception as e:  # anything about this one request (media, prompt, settings) fails only it
            return error_record(i, rid, _describe_error(e))

    def _generate(self, pipe, batch: List[Encoded]) -> Tuple[List[Dict], bool]:
        """Records of a batch. If the batch fails as a whole, each request is retried alone, so that one bad
        request does not take its neighbours down; ``failed`` says that every request of the batch failed."""
        try:
            return generate_batch(pipe, batch), False
        except Exception as e:
            if len(batch) == 1:
                return [error_record(batch[0].request.index, batch[0].request.id, _describe_error(e))], True
        records = []
        for e in batch:
            recs, _ = self._generate(pipe, [e])
            records += recs
        return records, all("error" in r for r in records)


def _describe_error(e: BaseException) -> str:
    from ..processing.media import MediaError, MissingDependencyError
    from ..processing.processor import PromptError

    known = (RequestError, MediaError, PromptError, MissingDependencyError, OSError, ValueError, KeyError)
    msg = first_line(e)
    return msg if isinstance(e, known) else f"{type(e).__name__}: {msg}"


class _Tracker:
    """The coordinator's view of the whole job: which pending requests (of every shard) have a record by now,
    read from the part files as they grow; drives the progress bar."""

    def __init__(self, store: PartStore, pending: Sequence[int], done_before: int, options: JobOptions,
                 layout: Layout):
        from ..progress import Progress

        self.store = store
        self.left = set(pending)
        self.total = len(self.left)
        self.errors = 0
        self.layout = layout
        self.bar = Progress(total=self.total, unit="req", desc="batch_infer", enabled=options.progress)
        self.bar.postfix.update(before=done_before, errors=0, shards=layout.dp_size)
        self._last_poll = 0.0

    def _on_record(self, index: int, rid, is_error: bool) -> None:
        if index in self.left:
            self.left.discard(index)
            self.errors += is_error
            self.bar.n += 1

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_poll < 1.0 and self.layout.dp_size > 1:
            return
        self._last_poll = now
        self.store.poll(self._on_record)
        self.bar.update(0, errors=self.errors)

    def wait(self, poll_s: float = 0.5) -> None:
        """Until every pending request has a record (the other shards' processes finish theirs). This process's
        own shard is finished and flushed by now: a request of it without a readable record is an error, not
        something to wait for."""
        self.update(force=True)
        lay = self.layout
        own = sorted(i for i in self.left if i % lay.dp_size == lay.dp_rank)
        if own:
            raise JobError(f"{len(own)} result(s) of this process (first: input line {own[0]}) cannot be read back "
                           f"from {part_path(self.store.dir, lay.dp_rank)}; check the disk, then run again")
        while self.left:
            time.sleep(poll_s)
            self.update(force=True)

    def close(self) -> None:
        self.bar.close()
