"""One process's part of a batch-inference job: the steps that tie input, resume, part files, batches and merge.

:meth:`BatchJob.run`, in order: scan the input; refuse an --output that is not ours; check every line without the
model (validate.py) and compute its digest (resume.py); read the part files and decide, per request, reuse or redo
(and say why); write the error records of this shard's invalid lines; load the model only if a valid request of
this shard is left, and run its requests in windows of sorted batches; merge (the coordinator, or under
independent launchers the last process to finish).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from .decode import generate_batch
from .layout import Layout
from .merge import check_output, merge_parts
from .parts import FORMAT, PartStore, PartWriter, locked, part_files, part_path, repair_tail, try_lock
from .requests import InputIndex, JobError, RequestError, first_line, parse_request, scan_input
from .resume import Fingerprint, ResumePlan, describe_plan, plan_resume
from .schedule import Encoded, encode_request, make_batches
from .tracker import Tracker
from .validate import check_settings, local_files, validate_line

LOGGED_LINE_ERRORS = 10  # invalid lines named in the log (all of them are in the output)


@dataclass
class JobOptions:
    input: str
    output: str
    # resume.model_identity(folder, runtime), part of every digest; or a function returning it, called once the
    # input and output passed their checks (resolving a model may mean a download)
    model_identity: Union[Dict, Callable[[], Dict]]
    batch_size: int = 4
    sort_window: int = 32
    retry_errors: bool = False
    fsync_interval: float = 10.0
    progress: bool = True
    settings: Dict = field(default_factory=dict)  # the job's generation settings (per-line fields override)
    mode: str = "graph"                           # graph/eager: part of a sampled request's digest
    max_failed_batches: int = 5                   # consecutive batches failing as a whole: the job stops
    test_delay: float = 0.0                       # tests: seconds to wait between generating a batch and writing it


@dataclass
class Checked:
    """Every request after the checks that need no model: its digest, and its error if it has one."""
    digests: Dict[int, str]
    errors: Dict[int, str]
    expected: Dict[int, tuple]  # index -> (id, digest): what a reusable record must carry


def record_error(index: int, rid, message: str) -> Dict:
    return {"id": rid, "index": index, "error": message}


def describe_error(e: BaseException) -> str:
    from ...processing.media import MediaError, MissingDependencyError
    from ...processing.processor import PromptError

    known = (RequestError, MediaError, PromptError, MissingDependencyError, OSError, ValueError, KeyError)
    msg = first_line(e)
    return msg if isinstance(e, known) else f"{type(e).__name__}: {msg}"


class BatchJob:
    """One process's part of a batch-inference job. ``load_pipeline()`` is called only if this shard has a valid
    request to run."""

    def __init__(self, options: JobOptions, layout: Layout, load_pipeline: Callable[[], object],
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)):
        self.o, self.layout, self.load_pipeline, self.log = options, layout, load_pipeline, log
        self.parts_dir = os.path.abspath(options.output) + ".parts"
        self.fingerprint: Optional[Fingerprint] = None  # set by run() once the input and output are checked
        self.generated = 0      # requests answered by this process in this run
        self.errors = 0         # error records written by this process in this run
        self.summary: Dict = {}

    # ----------------------------------------------------------------------------------------------------- run
    def run(self) -> Dict:
        index = scan_input(self.o.input)
        self._check_job_settings()
        self._check_output()
        model = self.o.model_identity
        self.fingerprint = Fingerprint(model() if callable(model) else model, self.o.settings, self.o.mode)
        self._make_parts_dir()
        checked = self.check_requests(index)
        writer = self._open_writer()
        try:
            store, plan = self._plan(index, checked)
            mine = [i for i in plan.pending if self.layout.owns(i)]
            self._announce(index, checked, plan, mine)
            tracker = self._tracker(store, plan)
            t0 = time.perf_counter()
            self._work(index, checked, mine, writer, tracker)
            if writer is not None:
                writer.close()
            self._report(time.perf_counter() - t0)
            self.summary["merged"] = self._finish(index, checked, tracker)
            return self.summary
        finally:
            if writer is not None:
                writer.close()

    # -------------------------------------------------------------------------------------------------- set-up
    def _check_job_settings(self) -> None:
        try:
            check_settings(self.o.settings, {})
        except RequestError as e:
            raise JobError(f"the job's (command line's) {e}") from None

    def _check_output(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.o.output))
        if not os.path.isdir(parent):
            raise JobError(f"the folder of --output does not exist: {parent}")
        check_output(self.o.output)  # an existing file that is not ours is refused before anything is written

    def _make_parts_dir(self) -> None:
        parent = os.path.dirname(os.path.abspath(self.o.output))
        try:
            os.makedirs(self.parts_dir, exist_ok=True)
        except OSError as e:
            raise JobError(f"cannot create {self.parts_dir}: {e.strerror or e}") from None
        if not os.access(parent, os.W_OK) or not os.access(self.parts_dir, os.W_OK):
            raise JobError(f"cannot write to {parent if not os.access(parent, os.W_OK) else self.parts_dir}: "
                           "permission denied")

    def _open_writer(self) -> Optional[PartWriter]:
        if not self.layout.writer:
            return None
        writer = PartWriter(part_path(self.parts_dir, self.layout.dp_rank), self.o.fsync_interval)
        if writer.repaired:
            self.log(f"[repaired {writer.path}: dropped an incomplete last line of {writer.repaired} bytes; "
                     "its request is redone]")
        return writer

    def _repair_orphans(self) -> None:
        """Part files of shards that no process of this world owns: cut their incomplete tails (the coordinator
        only), and refuse to run if some other process is still writing one."""
        mine = {part_path(self.parts_dir, d) for d in range(self.layout.dp_size)}
        for path in part_files(self.parts_dir):
            if path in mine:
                continue
            with open(path, "ab") as f:
                if not try_lock(f):
                    raise JobError(f"{path} is being written by another process (is an earlier job with the same "
                                   "--output still running?)")
                cut = repair_tail(path)
            if cut:
                self.log(f"[repaired {path}: dropped an incomplete last line of {cut} bytes]")

    # ------------------------------------------------------------------------------------------- checks, plan
    def check_requests(self, index: InputIndex) -> Checked:
        """Every line: the checks that need no model, and its digest. Every process computes the same."""
        checked = Checked({}, {}, {})
        with open(index.path, "rb") as f:
            for i in index.indices:
                digest, error = self._check_line(index, f, i)
                checked.digests[i] = digest
                checked.expected[i] = (index.ids[i], digest)
                if error is not None:
                    checked.errors[i] = error
        return checked

    def _check_line(self, index: InputIndex, f, i: int) -> Tuple[str, Optional[str]]:
        raw = index.read(f, i)
        if i in index.errors:  # not JSON, not an object, bad or duplicate id: the line's bytes are its identity
            return self.fingerprint.digest(raw, None, []), index.errors[i]
        obj, request, error = validate_line(raw, i, self.o.settings)
        files = list(local_files(request)) if request is not None else []
        return self.fingerprint.digest(obj, request, files), error

    def _plan(self, index: InputIndex, checked: Checked) -> Tuple[PartStore, ResumePlan]:
        if self.layout.coordinator:
            self._repair_orphans()
        store = PartStore(self.parts_dir, checked.expected)
        store.poll()
        if store.corrupt:
            self.log(f"[warning: {store.corrupt} unreadable line(s) in {self.parts_dir} ignored; their requests "
                     "are redone if no other record covers them]")
        plan = plan_resume(index, store, self.o.retry_errors)
        self.layout.barrier()  # nobody writes before every process has read the part files: all see the same plan
        return store, plan

    def _announce(self, index: InputIndex, checked: Checked, plan: ResumePlan, mine: List[int]) -> None:
        lay = self.layout
        pending = plan.pending
        self.summary = {"requests": len(index), "done_before": len(plan.reused), "pending": len(pending),
                        "mine": len(mine), "changed": len(plan.changed) + len(plan.undigested),
                        "invalid": sum(1 for i in pending if i in checked.errors)}
        if not (lay.coordinator or (lay.writer and lay.launcher == "flags")):
            return
        self.log(f"[{len(index)} requests: {len(plan.reused)} done before this run, {len(pending)} to do over "
                 f"{lay.dp_size} shard(s); this shard: {len(mine)}]")
        for line in describe_plan(plan, index):
            self.log(line)
        bad = [i for i in pending if i in checked.errors]
        for i in bad[:LOGGED_LINE_ERRORS]:
            self.log(f"[request {index.ids[i]!r} (line {i}): error: {checked.errors[i]}]")
        if len(bad) > LOGGED_LINE_ERRORS:
            self.log(f"[... and {len(bad) - LOGGED_LINE_ERRORS} more invalid request(s); see their error results]")

    def _tracker(self, store: PartStore, plan: ResumePlan) -> Optional[Tracker]:
        if not self.layout.coordinator:
            return None
        return Tracker(store, plan.pending, len(plan.reused), self.layout, enabled=self.o.progress)

    # ------------------------------------------------------------------------------------------------- finish
    def _report(self, seconds: float) -> None:
        self.summary.update(seconds=seconds, generated=self.generated, errors=self.errors)
        if self.layout.writer:
            self.log(f"[rank {self.layout.rank}: {self.generated + self.errors} request(s) done in this run "
                     f"({self.errors} error(s)) in {seconds:.1f} s]")

    def _finish(self, index: InputIndex, checked: Checked, tracker: Optional[Tracker]) -> Optional[Dict]:
        lay = self.layout
        merged = None
        if lay.coordinator and (lay.launcher != "flags" or lay.dp_size == 1):
            tracker.wait()  # the other shards' processes are still running: wait for their records
            merged = self._merge(index, checked, only_if_complete=False)
        elif lay.writer and lay.launcher == "flags":
            merged = self._merge(index, checked, only_if_complete=True)  # independent processes: the last merges
        if tracker is not None:
            tracker.close()
        return merged

    def _merge(self, index: InputIndex, checked: Checked, only_if_complete: bool) -> Optional[Dict]:
        with locked(os.path.join(self.parts_dir, ".merge.lock")):
            if only_if_complete:
                store = PartStore(self.parts_dir, checked.expected)
                store.poll()
                if any(i not in store.best for i in index.indices):
                    return None
            return merge_parts(index, self.parts_dir, self.o.output, checked.expected)

    # --------------------------------------------------------------------------------------------------- work
    def _write(self, writer: Optional[PartWriter], record: Dict, checked: Checked) -> None:
        record["request_digest"] = checked.digests[record["index"]]
        record["format"] = FORMAT
        if writer is not None:
            writer.write(record)
        if "error" in record:
            self.errors += 1
        else:
            self.generated += 1

    def _work(self, index: InputIndex, checked: Checked, mine: List[int], writer, tracker) -> None:
        """Error records of this shard's invalid requests first (no model needed), then the valid ones."""
        valid = []
        for i in mine:
            if i in checked.errors:
                self._write(writer, record_error(i, index.ids[i], checked.errors[i]), checked)
            else:
                valid.append(i)
        if tracker is not None:
            tracker.update()
        if valid:
            self.log(f"[rank {self.layout.rank}: loading the model for {len(valid)} request(s)]")
            self._generate_all(self.load_pipeline(), index, checked, valid, writer, tracker)

    def _generate_all(self, pipe, index: InputIndex, checked: Checked, todo: List[int], writer, tracker) -> None:
        window = max(self.o.sort_window, self.o.batch_size)
        failed_in_a_row = 0
        with open(index.path, "rb") as f:
            for start in range(0, len(todo), window):
                encoded = []
                for i in todo[start:start + window]:
                    rec = self._encode(pipe, index, f, i)
                    if isinstance(rec, Encoded):
                        encoded.append(rec)
                    else:
                        self._write(writer, rec, checked)
                for batch in make_batches(encoded, self.o.batch_size):
                    records, failed = self._generate(pipe, batch)
                    failed_in_a_row = failed_in_a_row + 1 if failed else 0
                    if failed_in_a_row >= self.o.max_failed_batches:
                        raise JobError(f"{failed_in_a_row} batches in a row failed as a whole (last: "
                                       f"{records[-1]['error']}); stopping: the model or device is not working")
                    if self.o.test_delay:
                        time.sleep(self.o.test_delay)
                    for rec in records:
                        self._write(writer, rec, checked)
                    if tracker is not None:
                        tracker.update()

    def _encode(self, pipe, index: InputIndex, f, i: int):
        """The request encoded by the processor, or its error record (a corrupt image, a URL, a too-long prompt)."""
        try:
            request = parse_request(json.loads(index.read(f, i).decode("utf-8")), i)
            return encode_request(pipe, request, self.o.settings)
        except Exception as e:  # anything about this one request (media, prompt, settings) fails only it
            return record_error(i, index.ids[i], describe_error(e))

    def _generate(self, pipe, batch: List[Encoded]) -> Tuple[List[Dict], bool]:
        """Records of a batch. If the batch fails as a whole, each request is retried alone, so that one bad
        request does not take its neighbours down; ``failed`` says that every request of the batch failed."""
        try:
            return generate_batch(pipe, batch), False
        except Exception as e:
            if len(batch) == 1:
                return [record_error(batch[0].request.index, batch[0].request.id, describe_error(e))], True
        records = []
        for e in batch:
            recs, _ = self._generate(pipe, [e])
            records += recs
        return records, all("error" in r for r in records)
