"""The merged output: every request's current record once, in input order, and the guard of an existing file.

:func:`merge_parts` writes ``<output>`` through a temporary file renamed into place. :func:`check_output` refuses
an existing ``--output`` that is not a results file of this tool, before anything is written: such a file is never
replaced. A file is ours when it is empty, or when its first and its last line are JSON objects carrying
``"format": "glm4v_ms.batch_infer/<n>"`` (parts.FORMAT), or the exact key set of the first version's records
(written before the marker existed).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

from .parts import FORMAT, PartStore
from .requests import InputIndex, JobError

# The keys of a version-1 record (before "format" and "request_digest"): a success, or an error.
_V1_KEYS = ({"id", "index", "thinking", "answer", "boxes", "boxes_pixels", "prompt_tokens", "new_tokens",
             "prefill_ms", "decode_tok_s", "thinking_cut_at", "batch_size", "batch_s"}, {"id", "index", "error"})
_FORMAT_PREFIX = FORMAT.rsplit("/", 1)[0] + "/"


def is_our_line(raw: bytes) -> bool:
    try:
        rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(rec, dict):
        return False
    fmt = rec.get("format")
    return (isinstance(fmt, str) and fmt.startswith(_FORMAT_PREFIX)) or set(rec) in _V1_KEYS


def check_output(output: str) -> None:
    """JobError when ``output`` exists and is not a results file of this tool (nothing is written)."""
    if not os.path.lexists(output):
        return
    if os.path.isdir(output):
        raise JobError(f"--output {output} is a folder; give a file name like results.jsonl")
    refuse = (f"--output {output} exists and is not a results file of batch_infer (its lines lack "
              f"\"format\": \"{FORMAT}\"); it is left untouched: give another --output, or delete the file")
    if not os.path.isfile(output):
        raise JobError(refuse)
    try:
        first, last = _first_and_last_line(output)
    except OSError as e:
        raise JobError(f"cannot read --output {output}: {e.strerror or e}") from None
    if first is not None and not (is_our_line(first) and is_our_line(last)):
        raise JobError(refuse)


def _first_and_last_line(path: str, block: int = 1 << 20):
    """(first line, last line) of a file (None, None when it is empty); lines longer than ``block`` bytes are cut,
    which makes them unreadable as JSON, so such a file is not taken for ours."""
    with open(path, "rb") as f:
        first = f.readline(block)
        if not first:
            return None, None
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - block))
        tail = f.read().rstrip(b"\n")
    return first, tail[tail.rfind(b"\n") + 1:]


def merge_parts(index: InputIndex, parts_dir: str, output: str,
                expected: Optional[Dict[int, tuple]] = None) -> Dict[str, int]:
    """Write ``output``: every request's record once, in input order, through a temporary file renamed into place.
    ``expected`` (index -> (id, digest)): only records of the current requests are used (see PartStore).
    Raises JobError if a request has no record. Returns counts."""
    store = PartStore(parts_dir, expected)
    store.poll()
    missing = [i for i in index.indices if i not in store.best]
    if missing:
        raise JobError(f"{len(missing)} request(s) have no result yet (first: input line {missing[0]})")
    check_output(output)
    out_dir = os.path.dirname(os.path.abspath(output))
    tmp = os.path.join(out_dir, f".{os.path.basename(output)}.tmp-{os.getpid()}")
    try:
        errors = _copy_records(index, store, tmp)
        os.replace(tmp, output)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise JobError(f"cannot write {output}: {e.strerror or e}") from None
    fsync_dir(out_dir)
    return {"requests": len(index), "errors": errors}


def _copy_records(index: InputIndex, store: PartStore, tmp: str) -> int:
    """Copy each request's best record into ``tmp`` in input order (fsync'ed); returns the number of errors."""
    errors = 0
    handles: Dict[str, object] = {}
    try:
        with open(tmp, "wb") as out:
            for i in index.indices:
                ref = store.best[i]
                f = handles.get(ref.path)
                if f is None:
                    f = handles[ref.path] = open(ref.path, "rb")
                f.seek(ref.offset)
                out.write(f.read(ref.length))
                errors += ref.error
            out.flush()
            os.fsync(out.fileno())
    finally:
        for f in handles.values():
            f.close()
    return errors


def fsync_dir(path: str) -> None:
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
