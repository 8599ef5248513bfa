"""A small progress bar for long command-line jobs (checkpoint conversion, batch inference, checkpoint loading),
and a reporter for blocking steps without intermediate progress (graph compiles).

    bar = Progress(total=n_bytes, unit="B", desc="converting")
    bar.update(4096, shard="2/6")
    bar.close()

    steps = StepLog("compiling")
    steps("decode graph for bucket 512")        # compiling decode graph for bucket 512 ...
    steps("decode graph for bucket 512", 5.3)   # ... done in 5.3 s

Shows count/total, percent, average rate, ETA and any ``key=value`` postfix. With ``unit="B"`` the counts and the rate
are printed as bytes (kB, MB, GB: powers of 1000). On a terminal the line is redrawn in place with ``\\r`` at most
10 times a second; on anything else (a log file, a pipe) a plain line is printed at most every 5 seconds, and once
at the end, so logs stay short. StepLog completes its line in place on a terminal and prints one line per event
elsewhere.

This module imports nothing from glm4v_ms, so any layer may take its objects as callbacks.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import Callable, Optional, TextIO


def format_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disk sizes and --shard_size are given)."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """75 -> '1:15', 3725 -> '1:02:05'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of a job of ``total`` units (``None``: unknown total, no percent or ETA).

    ``enabled=False`` prints nothing (the counters still run). ``stream`` defaults to ``sys.stderr``.
    ``interval`` overrides the minimum time between two printed lines; ``clock`` is for tests."""

    def __init__(self, total: Optional[float] = None, unit: str = "it", desc: str = "", enabled: bool = True,
                 stream: Optional[TextIO] = None, interval: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.unit = unit
        self.desc = desc
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.interval = interval if interval is not None else (0.1 if self.tty else 5.0)
        self.clock = clock
        self.n = 0
        self.postfix = {}
        self.start = clock()
        self.closed = False
        # A terminal shows the bar at once; a log gets its first line only after `interval` (short jobs: one line).
        self._last_print = self.start
        if self.enabled and self.tty:
            self._print(self.start)

    # ------------------------------------------------------------------------------------------------------------
    def update(self, n: float = 1, **postfix) -> None:
        """Add ``n`` done units; ``postfix`` items (e.g. ``shard="2/6"``) are shown after the figures."""
        self.n += n
        self.postfix.update(postfix)
        if not self.enabled or self.closed:
            return
        now = self.clock()
        if now - self._last_print >= self.interval:
            self._print(now)

    def close(self) -> None:
        """Print the final line (with the elapsed time instead of the ETA). Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            self._print(self.clock(), final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------------------
    def _amount(self, x: float) -> str:
        if self.unit == "B":
            return format_bytes(x)
        return f"{x:g}" if isinstance(x, float) else str(x)

    def format(self, now: Optional[float] = None, final: bool = False) -> str:
        """The status line (without any terminal control characters)."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        parts = []
        if self.total is not None:
            count = f"{self._amount(self.n)}/{self._amount(self.total)}"
            if self.unit != "B":
                count += f" {self.unit}"
            pct = 100.0 * self.n / self.total if self.total else 100.0
            parts.append(f"{count} {pct:5.1f}%")
        else:
            parts.append(self._amount(self.n) + ("" if self.unit == "B" else f" {self.unit}"))
        if self.unit == "B":
            parts.append(f"{format_bytes(rate)}/s")
        else:
            parts.append(f"{rate:.3g} {self.unit}/s")
        if final:
            parts.append(f"in {format_duration(elapsed)}")
        elif self.total is not None:
            remaining = max(self.total - self.n, 0)
            parts.append("ETA " + (format_duration(remaining / rate) if rate > 0 else "?"))
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        line = " | ".join(parts)
        return f"{self.desc}: {line}" if self.desc else line

    def _print(self, now: float, final: bool = False) -> None:
        self._last_print = now
        line = self.format(now, final)
        try:
            if self.tty:
                width = shutil.get_terminal_size((80, 24)).columns - 1
                # \r: back to the line start; ESC[K: clear what a longer previous line left behind.
                self.stream.write("\r" + line[:width] + "\x1b[K" + ("\n" if final else ""))
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not break the job it reports on
            self.enabled = False


class StepLog:
    """Reports blocking steps that have no intermediate progress (a graph compile): ``log(what)`` when one starts,
    ``log(what, seconds)`` when it is done (the signature of engine.GraphRunner.compile_listener). On a terminal the
    start line ``compiling <what> ...`` is completed in place with `` done in 5.3 s``; elsewhere (a log file, a pipe)
    each event is one line. ``enabled=False`` prints nothing."""

    def __init__(self, verb: str = "", enabled: bool = True, stream: Optional[TextIO] = None):
        self.verb, self.enabled = verb, enabled
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self._open: Optional[str] = None  # the step whose start line waits for its end (terminal only)

    def __call__(self, what: str, seconds: Optional[float] = None) -> None:
        if not self.enabled:
            return
        text = f"{self.verb} {what}".strip()
        if seconds is None:
            line = f"{text} ..." + ("" if self.tty else "\n")
            self._open = what if self.tty else None
        elif self._open == what:
            line, self._open = f" done in {seconds:.1f} s\n", None
        else:
            line = ("\n" if self._open else "") + f"{text}: done in {seconds:.1f} s\n"
            self._open = None
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not break the job it reports on
            self.enabled = False
