"""Part files: where each data-parallel shard appends its results, and how they are read back.

Every shard appends one JSON line per finished request to ``<output>.parts/rank-<dp_rank>.jsonl``, flushed at once
and fsync'ed at intervals (:class:`PartWriter`). Readers keep only complete lines (ending in a newline): a line cut
by a kill is ignored, and cut off the file by the writer that owns it before it appends again (:func:`repair_tail`).

Each record is ``{"id", "index", <the result or "error">, "request_digest", "format"}``: ``format`` (``FORMAT``)
marks a line as a result of this tool (an existing --output is only replaced when its lines carry it, see
merge.check_output); ``request_digest`` says which version of the request it answers (resume.py).
:class:`PartStore` keeps, for each request, the best record whose id and digest match the current input: a success
over an error, and among equals the one read last; the others are counted as stale.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from .requests import JobError, id_key

PART_PREFIX, PART_SUFFIX = "rank-", ".jsonl"
FORMAT = "glm4v_ms.batch_infer/2"   # version 1: records without "format" and "request_digest"


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


def encode_record(record: Dict) -> bytes:
    """One JSON line. Text that is not valid Unicode (a lone surrogate in an id) is written \\u-escaped."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")


# ------------------------------------------------------------------------------------------------------ writing
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
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep = _after_last_newline(f, size)
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def _after_last_newline(f, size: int, block: int = 1 << 16) -> int:
    """Offset just after the file's last newline (0 if none), searching backwards block by block."""
    end = size
    while end > 0:
        start = max(0, end - block)
        f.seek(start)
        at = f.read(end - start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def try_lock(f) -> bool:
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


@contextlib.contextmanager
def locked(path: str):
    """An exclusive blocking flock on ``path`` (created if needed) for the duration of the block."""
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
        if not try_lock(self.f):
            self.f.close()
            raise JobError(f"{path} is being written by another process (is a job with the same --output still "
                           "running?)")
        self.repaired = repair_tail(path)
        self.lines = 0
        self._last_sync = time.monotonic()

    def write(self, record: Dict) -> None:
        self.f.write(encode_record(record))
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


# ------------------------------------------------------------------------------------------------------ reading
@dataclass
class RecordRef:
    path: str
    offset: int
    length: int
    error: bool


@dataclass
class RecordHead:
    index: int
    id: object
    error: bool
    digest: Optional[str]


def record_head(raw: bytes) -> Optional[RecordHead]:
    """What the store needs of a line, or None when the line is not one of our records."""
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("index"), int) or "id" not in rec:
        return None
    digest = rec.get("request_digest")
    return RecordHead(rec["index"], rec["id"], "error" in rec, digest if isinstance(digest, str) else None)


class PartStore:
    """Reads the part files incrementally (only bytes added since the last ``poll``), keeping for each request
    index the best record seen: a success over an error, and among equals the one read last.

    ``expected`` (index -> (id, digest)) is the current input: a record whose index is not in it, or whose id or
    digest differs, is stale (``stale[index]`` = "changed", or "undigested" for records without a digest) and never
    chosen. Without ``expected`` every record counts."""

    def __init__(self, parts_dir: str, expected: Optional[Dict[int, tuple]] = None):
        self.dir = parts_dir
        self.expected = expected
        self.pos: Dict[str, int] = {}
        self.best: Dict[int, RecordRef] = {}
        self.stale: Dict[int, str] = {}
        self.corrupt = 0

    def poll(self, on_record: Optional[Callable[[int, object, bool], None]] = None) -> int:
        """Read new complete lines; ``on_record(index, id, is_error)`` for each current one. Returns how many
        current records were read."""
        n = 0
        for path in part_files(self.dir):
            for offset, raw in self._new_lines(path):
                head = record_head(raw)
                if head is None:
                    self.corrupt += 1
                elif self._accept(head):
                    self._offer(head, RecordRef(path, offset, len(raw), head.error))
                    n += 1
                    if on_record is not None:
                        on_record(head.index, head.id, head.error)
        return n

    def _new_lines(self, path: str):
        """(offset, line) of the complete lines added to ``path`` since the last poll."""
        start = self.pos.get(path, 0)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # an unfinished last line is left for a later poll
        self.pos[path] = start + end
        offset = start
        for raw in data[:end].splitlines(keepends=True):
            yield offset, raw
            offset += len(raw)

    def _accept(self, head: RecordHead) -> bool:
        if self.expected is None:
            return True
        want = self.expected.get(head.index)
        if want is not None and id_key(head.id) == id_key(want[0]) and head.digest == want[1]:
            return True
        if want is not None and head.index not in self.best:
            self.stale[head.index] = "undigested" if head.digest is None else "changed"
        return False

    def _offer(self, head: RecordHead, ref: RecordRef) -> None:
        old = self.best.get(head.index)
        if old is None or not (head.error and not old.error):
            self.best[head.index] = ref
            self.stale.pop(head.index, None)

    def read(self, ref: RecordRef) -> bytes:
        with open(ref.path, "rb") as f:
            f.seek(ref.offset)
            return f.read(ref.length)
