"""Resume: which earlier results still answer the current requests.

Every result record carries ``request_digest``, a SHA-256 over what decides its answer:

* the request line itself, as parsed JSON (key order and spacing aside): prompt or messages, system, media
  references (paths, URLs, data: URIs), pdf_pages/pdf_dpi, per-line settings, the id;
* the identity of each local media file: its content hash when it is at most ``HASH_BYTES`` (64 KiB), else its
  real path, size and modification time (a file replaced in place by another of the same size and time, e.g. with
  ``cp -p``, is not noticed); a missing file has the identity "missing", so the line is redone when it appears.
  URLs are identified by their string (the server's content may change without notice);
* the generation settings in effect (the job's, overridden by the line's), with the sampling knobs dropped for
  greedy requests (they do not change a greedy answer); for sampled requests also the run mode (graph mode samples
  on the device, eager mode on the host: different draws);
* the model: its folder's real path and each file's name, size and modification time, and the dtype, device and
  quantised-weights mode.

Batch size, world size, tensor parallelism and (for greedy requests) graph vs eager mode are left out: the
results do not depend on them (tests/test_batch_infer.py checks each). A result is reused only when its digest and
id equal the current line's; any other record of that line is stale and the line is redone. Records written
before digests existed have none: they count as stale too.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .requests import InputIndex, Request

HASH_BYTES = 64 * 1024
SAMPLING_KNOBS = ("temperature", "top_k", "top_p", "seed")
DIGEST_VERSION = 1


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=True).encode("ascii")).hexdigest()


def file_identity(path: Optional[str]) -> List:
    """What tells a media file from another: its content (small files), else real path, size and mtime."""
    if path is None:
        return ["url"]
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL character in the path
        return ["missing", path]
    if os.path.isfile(path) and st.st_size <= HASH_BYTES:
        try:
            with open(path, "rb") as f:
                return ["sha256", hashlib.sha256(f.read()).hexdigest()]
        except OSError:
            return ["unreadable", path]
    return ["stat", os.path.realpath(path), st.st_size, st.st_mtime_ns]


def model_identity(folder: str, runtime: Dict) -> Dict:
    """The model folder (real path, and name/size/mtime of its files) and the runtime settings that change numbers
    (``runtime``: dtype, device, quantized_weights; ``mode`` is added per sampled request)."""
    folder = os.path.realpath(folder)
    files = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.startswith(".") and os.path.isfile(path):
            st = os.stat(path)
            files.append([name, st.st_size, st.st_mtime_ns])
    return {"folder": folder, "files": files, "runtime": dict(runtime)}


def effective_settings(job_settings: Dict, line_settings: Dict, mode: str) -> Dict:
    """The generation settings that change the answer of a request."""
    s = {k: v for k, v in dict(job_settings, **line_settings).items() if v is not None}
    if not s.get("do_sample"):
        for k in SAMPLING_KNOBS:
            s.pop(k, None)
    else:
        s["mode"] = mode
    return s


@dataclass
class Fingerprint:
    """What every digest of the job shares: the model and the job's settings."""
    model: Dict
    settings: Dict              # the job's generation settings (command line)
    mode: str = "graph"

    def digest(self, line_obj, request: Optional[Request], files: List[Optional[str]]) -> str:
        """The digest of a request line. ``line_obj``: the decoded line, or the line's bytes when it is not a JSON
        object; ``request``: its parse (None when it did not parse); ``files``: its local media paths."""
        if isinstance(line_obj, bytes):
            line_obj = {"raw_sha256": hashlib.sha256(line_obj.strip()).hexdigest()}
        line_settings = request.settings if request is not None else {}
        return _sha256({"v": DIGEST_VERSION, "line": line_obj, "media": [file_identity(p) for p in files],
                        "settings": effective_settings(self.settings, line_settings, self.mode),
                        "model": self.model})


# --------------------------------------------------------------------------------------------- reuse decisions
@dataclass
class ResumePlan:
    """For each request of the input: reuse its result, or redo it (and why)."""
    reused: List[int] = field(default_factory=list)
    changed: List[int] = field(default_factory=list)     # a result exists for another version of the request
    undigested: List[int] = field(default_factory=list)  # only results of an older version of this tool
    retried: List[int] = field(default_factory=list)     # an error result, redone with --retry_errors
    new: List[int] = field(default_factory=list)         # no result at all

    @property
    def pending(self) -> List[int]:
        return sorted(self.changed + self.undigested + self.retried + self.new)


def plan_resume(index: InputIndex, store, retry_errors: bool) -> ResumePlan:
    """Sort every request by what its records in ``store`` (a PartStore read with the current digests) allow."""
    plan = ResumePlan()
    for i in index.indices:
        ref = store.best.get(i)
        if ref is not None and not (ref.error and retry_errors):
            plan.reused.append(i)
        elif ref is not None:
            plan.retried.append(i)
        elif store.stale.get(i) == "undigested":
            plan.undigested.append(i)
        elif i in store.stale:
            plan.changed.append(i)
        else:
            plan.new.append(i)
    return plan


def describe_plan(plan: ResumePlan, index: InputIndex, limit: int = 5) -> List[str]:
    """Log lines naming the requests that are redone because they changed since their result."""
    lines = []
    for what, items in (("changed since their earlier result (prompt, media, settings or model)", plan.changed),
                        ("have only results without a request digest (an older batch_infer)", plan.undigested)):
        if items:
            names = ", ".join(f"{index.ids[i]!r} (line {i})" for i in items[:limit])
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            lines.append(f"[{len(items)} request(s) {what}: recomputed: {names}{more}]")
    return lines
