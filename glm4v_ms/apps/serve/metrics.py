"""Prometheus text exposition, written by hand (counters, gauges read at scrape time, two histograms)."""

from __future__ import annotations

import threading
from typing import Callable, Dict, List

_TTFT_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_TPOT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]


class _Histogram:
    def __init__(self, buckets: List[float]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count, self.sum = 0, 0.0

    def observe(self, v: float) -> None:
        self.count += 1
        self.sum += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> List[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return out


class Metrics:
    OUTCOMES = ("success", "error", "cancelled", "rejected")

    def __init__(self, gauges: Callable[[], Dict[str, float]] = lambda: {}):
        self.lock = threading.Lock()
        self.requests = {k: 0 for k in self.OUTCOMES}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = _Histogram(_TTFT_BUCKETS)
        self.tpot = _Histogram(_TPOT_BUCKETS)
        self.gauges = gauges

    def finished(self, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        with self.lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def timing(self, ttft: float = None, tpot: float = None) -> None:
        with self.lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            if tpot is not None:
                self.tpot.observe(tpot)

    def render(self) -> str:
        g = self.gauges()
        with self.lock:
            lines = ["# HELP glm4v_requests_total Chat requests by outcome.", "# TYPE glm4v_requests_total counter"]
            lines += [f'glm4v_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()]
            lines += ["# HELP glm4v_prompt_tokens_total Prompt tokens of finished requests.",
                      "# TYPE glm4v_prompt_tokens_total counter", f"glm4v_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP glm4v_completion_tokens_total Generated tokens of finished requests.",
                      "# TYPE glm4v_completion_tokens_total counter",
                      f"glm4v_completion_tokens_total {self.completion_tokens}"]
            for name, help_ in (("running", "Requests holding a decode slot."),
                                ("waiting", "Requests accepted and waiting for a slot.")):
                lines += [f"# HELP glm4v_requests_{name} {help_}", f"# TYPE glm4v_requests_{name} gauge",
                          f"glm4v_requests_{name} {g.get(name, 0)}"]
            lines += ["# HELP glm4v_compiled_shapes Distinct static shapes run in graph mode (one compile each).",
                      "# TYPE glm4v_compiled_shapes gauge"]
            lines += [f'glm4v_compiled_shapes{{graph="{k[7:]}"}} {v}' for k, v in g.items() if k.startswith("shapes_")]
            lines += ["# HELP glm4v_time_to_first_token_seconds Arrival to first token.",
                      "# TYPE glm4v_time_to_first_token_seconds histogram"]
            lines += self.ttft.lines("glm4v_time_to_first_token_seconds")
            lines += ["# HELP glm4v_time_per_output_token_seconds Decode time per token after the first.",
                      "# TYPE glm4v_time_per_output_token_seconds histogram"]
            lines += self.tpot.lines("glm4v_time_per_output_token_seconds")
        return "\n".join(lines) + "\n"
