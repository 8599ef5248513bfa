"""The engine loop: one thread owns the model and runs prefills and shared decode steps (runtime.slots.SlotBatch);
each request runs the ordinary pipeline code (``Glm4vPipeline.stream``: template, media, thinking budget, EOS,
text pieces) in a worker thread of its own, whose session is a row of the shared batch.

The row session's ``prefill`` and ``step`` hand the work to the engine thread and wait for their token. The engine
alternates: admit one waiting request into the lowest free slot (its prefill runs alone), then run one decode step
for every slot whose worker has fed its next token; it steps only when every live row has fed, so a row joins at
the step after its prefill and a row that finishes (EOS, max tokens, stop string, cancel) leaves before the next
step. Worker threads never touch the model; the HTTP side only queues requests and reads their events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Dict, List, Optional

import numpy as np

from ...model.weights import CheckpointError
from ...processing.media import MediaError, MissingDependencyError
from ...processing.processor import PromptError
from ...runtime.generation import _IncrementalDecoder
from ...runtime.slots import SlotBatch
from ...runtime.tool_calls import ToolCallStream
from ..pipeline import ChatResult, PromptTooLongError
from .protocol import APIError, ChatRequest

log = logging.getLogger("glm4v_ms.serve")


class Cancelled(Exception):
    """The client went away."""


class EngineError(RuntimeError):
    """A prefill or decode step failed inside the engine."""


class _Row:
    """A request as the engine sees it."""

    def __init__(self, job: "Job"):
        self.job = job
        self.inputs = None
        self.gen = None
        self.slot: Optional[int] = None       # reserved slot (prefill running or done)
        self.slot_row = None                  # SlotRow once prefilled
        self.fed: Optional[int] = None        # the token to feed at the next step
        self.result: Optional[int] = None
        self.error: Optional[BaseException] = None
        self.event = threading.Event()
        self.queued = True                    # counted in ServeEngine.queued until it gets a slot or ends


class _RowSession:
    """The session ``generation.iter_tokens`` drives, backed by a row of the shared batch."""

    last_logits = None

    def __init__(self, engine: "ServeEngine", row: _Row, gen):
        self.engine, self.row, self.row.gen = engine, row, gen

    # Graph compiles of this request (generation.StepStats keeps them out of the timings): those of its prefill,
    # which runs alone. A decode step is shared by every row of the batch, so a decode-graph compile (the first
    # step of a new tier or key-length bucket) is not charged to any one request; it shows in the step's time.
    @property
    def compile_s(self) -> float:
        sr = self.row.slot_row
        return sr.session.compile_s if sr is not None else 0.0

    @property
    def compiles(self) -> list:
        sr = self.row.slot_row
        return sr.session.compiles if sr is not None else []

    def prefill(self, inputs, cache):
        return np.array([self.engine._prefill(self.row, inputs)], np.int64)

    def step(self, tokens, cache):
        return np.array([self.engine._step(self.row, int(np.asarray(tokens).reshape(-1)[0]))], np.int64)

    def close(self, cache):
        self.engine._release(self.row)


class _StopFilter:
    """Holds back the last characters that could start a stop string; cuts the text at the first match."""

    def __init__(self, stops: List[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buf: List[List[str]] = []  # [kind, text] runs

    def _text(self) -> str:
        return "".join(t for _, t in self.buf)

    def _take(self, n: int) -> List[tuple]:
        out = []
        while n > 0 and self.buf:
            kind, text = self.buf[0]
            if len(text) <= n:
                out.append((kind, text))
                n -= len(text)
                self.buf.pop(0)
            else:
                out.append((kind, text[:n]))
                self.buf[0][1] = text[n:]
                n = 0
        return out

    def push(self, kind: str, text: str):
        """-> (pieces to emit, stopped)."""
        if self.buf and self.buf[-1][0] == kind:
            self.buf[-1][1] += text
        else:
            self.buf.append([kind, text])
        full = self._text()
        hits = [i for i in (full.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self._take(min(hits))
            self.buf = []
            return out, True
        return self._take(len(full) - self.hold), False

    def flush(self):
        out = [(k, t) for k, t in self.buf if t]
        self.buf = []
        return out


class Job:
    """One chat request: what the worker runs and the events it sends back (through ``emit``, thread-safe)."""

    def __init__(self, req: ChatRequest, emit: Callable[[tuple], None]):
        self.req, self.emit = req, emit
        self.cancelled = threading.Event()
        self.t_arrival = time.perf_counter()
        self.t_first: Optional[float] = None
        self.row: Optional[_Row] = None


class ServeEngine:
    def __init__(self, pipe, max_batch: int, max_queue: int, max_context: int, metrics=None):
        self.pipe, self.max_batch, self.max_queue, self.max_context = pipe, max_batch, max_queue, max_context
        self.metrics = metrics
        self.slots = SlotBatch(pipe.model, max_batch, max_context, pipe.mode)
        tok = pipe.processor.tokenizer
        self.tokenizer = tok
        self.eos = set(pipe.gen.eos_token_id or [])
        self.cond = threading.Condition()
        self.pending: deque = deque()
        self.active: Dict[int, _Row] = {}
        self.queued = 0            # accepted, not yet in a slot (media loading or waiting)
        self.stopping = False
        self._last_was_prefill = False
        self.thread = threading.Thread(target=self._loop, name="glm4v-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # -------------------------------------------------------------------------------------------- HTTP side
    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise APIError("the server is shutting down", status=503, code="shutting_down")
            if self.queued >= self.max_queue:
                raise APIError(f"the server is busy ({self.queued} requests waiting, --max_queue {self.max_queue}); "
                               "retry later", status=503, code="server_busy", headers={"Retry-After": "1"})
            self.queued += 1
        job.row = _Row(job)
        threading.Thread(target=self._work, args=(job,), name=f"glm4v-{job.req.id[-6:]}", daemon=True).start()

    def cancel(self, job: Job) -> None:
        """The client left: the worker raises Cancelled at its next prefill/step; the engine skips the row."""
        job.cancelled.set()
        row = job.row
        with self.cond:
            if row is not None and row.error is None:
                row.error = Cancelled()
                row.event.set()
            if row in self.pending:
                self.pending.remove(row)
            self.cond.notify_all()

    def shutdown(self) -> None:
        """Stop the loop; every waiting and running request ends with an error event."""
        with self.cond:
            self.stopping = True
            for row in list(self.pending) + list(self.active.values()):
                if row.error is None:
                    row.error = APIError("the server is shutting down", status=503, code="shutting_down")
                    row.event.set()
            self.pending.clear()
            self.cond.notify_all()

    def counts(self) -> Dict[str, int]:
        with self.cond:
            return {"running": len(self.active), "waiting": self.queued}

    # ------------------------------------------------------------------------------------------- row session
    def _wait(self, row: _Row) -> int:
        row.event.wait()
        if row.error is not None:
            raise row.error
        return row.result

    def _prefill(self, row: _Row, inputs) -> int:
        with self.cond:
            if row.error is not None:
                raise row.error
            row.inputs = inputs
            row.event.clear()
            self.pending.append(row)
            self.cond.notify_all()
        tok = self._wait(row)
        row.job.t_first = time.perf_counter()
        row.job.emit(("started",))
        return tok

    def _step(self, row: _Row, tok: int) -> int:
        with self.cond:
            if row.error is not None:
                raise row.error
            row.event.clear()
            row.fed = tok
            self.cond.notify_all()
        return self._wait(row)

    def _unqueue(self, row: _Row) -> None:
        if row.queued:
            row.queued = False
            self.queued -= 1

    def _release(self, row: _Row) -> None:
        with self.cond:
            self._unqueue(row)
            if row.slot is not None and self.active.get(row.slot) is row:
                del self.active[row.slot]
            row.slot, row.slot_row, row.fed = None, None, None
            if row in self.pending:
                self.pending.remove(row)
            self.cond.notify_all()

    # ------------------------------------------------------------------------------------------- engine loop
    def _next_action(self):
        """Under the lock: ("prefill", row, slot), ("step", rows, fed) or None (wait)."""
        live = [r for r in self.active.values() if r.slot_row is not None and r.error is None]
        ready = bool(live) and all(r.fed is not None for r in live)
        free = [s for s in range(self.max_batch) if s not in self.active]
        can_admit = bool(self.pending) and bool(free)
        if can_admit and not (ready and self._last_was_prefill):
            row = self.pending.popleft()
            row.slot = min(free)
            self.active[row.slot] = row
            self._unqueue(row)
            return ("prefill", row, row.slot)
        if ready:
            fed = [r.fed for r in live]
            for r in live:
                r.fed = None
            return ("step", live, fed)
        return None

    def _loop(self) -> None:
        while True:
            with self.cond:
                action = None
                while not self.stopping:
                    action = self._next_action()
                    if action is not None:
                        break
                    self.cond.wait()
                if self.stopping:
                    return
            if action[0] == "prefill":
                self._last_was_prefill = True
                self._run_prefill(action[1], action[2])
            else:
                self._last_was_prefill = False
                self._run_step(action[1], action[2])

    def _run_prefill(self, row: _Row, slot: int) -> None:
        try:
            tok, slot_row = self.slots.prefill(slot, row.inputs, row.gen)
            err = None
        except Exception as e:  # noqa: BLE001  (handed to the request, the server keeps serving)
            log.exception("prefill failed")
            tok, slot_row, err = None, None, e
        with self.cond:
            if err is not None or row.error is not None:
                if self.active.get(slot) is row:
                    del self.active[slot]
                row.slot = None
                if row.error is None:
                    row.error = err if isinstance(err, (ValueError, APIError)) else EngineError(str(err))
            else:
                row.slot_row, row.result = slot_row, tok
            row.event.set()
            self.cond.notify_all()

    def _run_step(self, rows: List[_Row], fed: List[int]) -> None:
        try:
            toks = self.slots.step([r.slot_row for r in rows], fed)
            err = None
        except Exception as e:  # noqa: BLE001
            log.exception("decode step failed")
            toks, err = None, EngineError(f"decode step failed: {e}")
        with self.cond:
            for i, r in enumerate(rows):
                if r.error is not None or r.slot_row is None:
                    continue  # cancelled or released meanwhile
                if err is not None:
                    r.error = err
                else:
                    r.result = toks[i]
                r.event.set()
            self.cond.notify_all()

    # ---------------------------------------------------------------------------------------------- worker
    def _work(self, job: Job) -> None:
        req, row = job.req, job.row
        result = ChatResult()
        stops = _StopFilter(req.stop) if req.stop else None
        raw = None if req.skip_special_tokens else _IncrementalDecoder(self.tokenizer)
        n_raw = 0
        stopped = False

        def factory(gen, batch, prompt_len):
            return _RowSession(self, row, gen), None

        # With tools, the answer's GLM tool-call markup becomes one "tool_call" event per call once it closes;
        # the rest of the answer (and malformed markup) stays text (runtime.tool_calls.ToolCallStream).
        calls = ToolCallStream(req.tools) if req.tools and req.skip_special_tokens else None
        n_calls = 0

        def emit(kind, text):
            nonlocal n_calls
            if calls is None or kind != "answer":
                job.emit(("delta", kind, text))
                return
            for what, value in calls.feed(text):
                if what == "text":
                    job.emit(("delta", "answer", value))
                else:
                    job.emit(("tool_call", value.as_delta(n_calls), value.as_openai()))
                    n_calls += 1

        def out(kind, text):
            if not text:
                return False
            if stops is None:
                emit(kind, text)
                return False
            pieces, hit = stops.push(kind, text)
            for k, t in pieces:
                emit(k, t)
            return hit

        pieces = self.pipe.stream(req.messages, result, enable_thinking=req.enable_thinking,
                                  max_context=self.max_context, session_factory=factory, tools=req.tools,
                                  **req.overrides)
        try:
            for piece in pieces:
                if raw is None:
                    stopped = out(piece.kind, piece.text)
                else:  # the raw text of every token so far (tags included, EOS left out)
                    text = ""
                    for t in result.tokens[n_raw:]:
                        if t not in self.eos:
                            text += raw.push(t)
                    n_raw = len(result.tokens)
                    stopped = out("answer", text)
                if stopped:
                    break
            if raw is not None and not stopped:
                text = "".join(raw.push(t) for t in result.tokens[n_raw:] if t not in self.eos) + raw.flush()
                stopped = out("answer", text)
            if stops is not None and not stopped:
                for k, t in stops.flush():
                    emit(k, t)
            if calls is not None:
                for _, text in calls.finish():  # a call still open at the end is text
                    job.emit(("delta", "answer", text))
            s = result.stats
            last = result.tokens[-1] if result.tokens else None
            finish = "tool_calls" if n_calls else "stop" if stopped or last in self.eos else "length"
            usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                     "total_tokens": s.prompt_tokens + s.new_tokens}
            job.emit(("done", finish, usage))
        except Cancelled:
            job.emit(("cancelled",))
        except APIError as e:
            job.emit(("error", e))
        except PromptTooLongError as e:
            job.emit(("error", APIError(str(e), param="messages", code="context_length_exceeded")))
        except (MediaError, MissingDependencyError) as e:
            job.emit(("error", APIError(str(e).strip().splitlines()[0], param="messages", code="invalid_media")))
        except (PromptError, CheckpointError, ValueError, OSError) as e:
            job.emit(("error", APIError(str(e).strip().splitlines()[0] or type(e).__name__, param="messages")))
        except EngineError as e:
            job.emit(("error", APIError(str(e), status=500, code="engine_error")))
        except Exception as e:  # noqa: BLE001  (never leave a client hanging)
            log.exception("request %s failed", req.id)
            job.emit(("error", APIError(f"internal error: {type(e).__name__}: {e}", status=500)))
        finally:
            pieces.close()  # runs iter_tokens' finally: the row's slot is released
            self._release(row)
