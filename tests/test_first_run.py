"""What a first run shows and measures: compile seconds kept apart from the steady-state timings (and none for a
repeated request), the load / compile progress reports and their silence by default, the stats line and --json
fields, and the tiny demo streaming its full --max_new_tokens through the thinking / answer split."""

import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.apps.pipeline import Glm4vPipeline
from glm4v_ms.apps.tiny import make_tiny_model
from glm4v_ms.model.weights import checkpoint_files, tensor_nbytes
from glm4v_ms.progress import Progress, StepLog
from glm4v_ms.runtime.engine import graph_runner
from glm4v_ms.runtime.generation import StepStats, generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("first_run") / "tiny"))


def _image_inputs(model):
    """One 4x6-patch image (6 image tokens after the 2x2 merge) between a few text tokens."""
    c = model.config
    rng = np.random.default_rng(3)
    ids = [5, 6, c.image_start_token_id] + [c.image_token_id] * 6 + [c.image_end_token_id, 7, 8, 9]
    pix = rng.standard_normal((24, c.vision.patch_dim)).astype(np.float32)
    return dict(input_ids=np.array([ids]), pixel_values=pix, image_grid_thw=np.array([[1, 4, 6]]))


def test_compile_seconds_are_apart_and_a_repeated_request_compiles_nothing(tiny):
    model = Glm4vForConditionalGeneration.from_pretrained(tiny)
    events = []
    graph_runner(model).compile_listener = lambda what, seconds: events.append((what, seconds))
    x = _image_inputs(model)
    runs = []
    for _ in range(2):
        st = StepStats()
        t0 = time.perf_counter()
        out = generate(model, **x, max_new_tokens=12, eos_token_id=[], do_sample=False, stats=st)
        runs.append((out, st, time.perf_counter() - t0))
    (a, first, wall), (b, second, _) = runs
    # The first request compiled the ViT, prefill and decode graphs; their seconds are reported apart ...
    assert first.compiled and first.compile_s > 0
    assert [w.split(" graph")[0] for w in first.compiles] == ["vision", "prefill", "decode"], first.compiles
    assert first.compiles == ["vision graph for grid 1x4x6", "prefill graph for bucket 16",
                              "decode graph for bucket 256"], first.compiles
    # ... and not inside the steady-state timings, which still measure real work
    assert first.prefill_s > 0 and first.decode_s > 0 and first.new_tokens == 12
    assert first.prefill_s + first.decode_s + first.compile_s <= wall + 0.05
    # the listener saw each compile start, then end with the seconds that make up compile_s
    assert [w for w, s in events if s is None] == first.compiles
    assert abs(sum(s for _, s in events if s is not None) - first.compile_s) < 1e-9
    # A second identical request in the same process compiles nothing, and answers the same
    assert not second.compiled and second.compile_s == 0.0 and second.compiles == []
    assert second.prefill_s > 0 and second.decode_tok_s > 0
    np.testing.assert_array_equal(a, b)
    assert len(events) == 6, events


def test_compiling_calls_do_not_change_the_answer(tiny):
    """A compiling call runs its graph once more than needed (prefill, ViT, the stand-in first decode step): the
    tokens must equal eager decoding's, step for step."""
    model = Glm4vForConditionalGeneration.from_pretrained(tiny)
    x = _image_inputs(model)
    for kwargs in (dict(do_sample=False), dict(do_sample=False, repetition_penalty=1.3)):
        graph = generate(model, **x, max_new_tokens=10, eos_token_id=[], mode="graph", **kwargs)
        eager = generate(model, **x, max_new_tokens=10, eos_token_id=[], mode="eager", **kwargs)
        np.testing.assert_array_equal(graph, eager)


def test_eager_mode_reports_no_compile(tiny):
    model = Glm4vForConditionalGeneration.from_pretrained(tiny)
    st = StepStats()
    generate(model, np.array([[5, 6, 7]]), max_new_tokens=3, eos_token_id=[], mode="eager", stats=st)
    assert not st.compiled and st.compile_s == 0.0 and st.prefill_s > 0


def test_weight_loading_progress_counts_every_byte(tiny):
    class Recorder:
        def __init__(self, total):
            self.total, self.updates, self.closed = total, [], False

        def update(self, n, **postfix):
            self.updates.append((n, postfix))

        def close(self):
            self.closed = True

    bars = []
    Glm4vForConditionalGeneration.from_pretrained(tiny, progress=lambda total: bars.append(Recorder(total)) or bars[-1])
    (bar,) = bars
    files = checkpoint_files(tiny)
    assert bar.total == sum(tensor_nbytes(files).values()) > 0
    assert sum(n for n, _ in bar.updates) == bar.total and bar.closed
    assert {p["shard"] for _, p in bar.updates} == {"1/1"}


def test_library_is_silent_by_default_and_progress_reports_on_request(tiny, capfd):
    pipe = Glm4vPipeline.from_pretrained(tiny)
    pipe.chat(pipe.messages("Hi"), max_new_tokens=3)
    assert capfd.readouterr().err == ""
    assert pipe.load_s > 0
    noisy = Glm4vPipeline.from_pretrained(tiny, progress=True)
    # a new model compiles again; 300 tokens cross from decode bucket 256 to 512 on the way
    noisy.chat(noisy.messages("Hi"), max_new_tokens=300, eos_token_id=[])
    err = capfd.readouterr().err.splitlines()
    assert err[0].startswith("loading weights: ") and "100.0%" in err[0] and "shard=1/1" in err[0], err
    assert "compiling prefill graph for bucket 16 ..." in err, err
    assert any(e.startswith("compiling prefill graph for bucket 16: done in ") for e in err), err
    assert any(e.startswith("compiling decode graph for bucket 512: done in ") for e in err), err


def test_step_log_terminal_and_log_file():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    log, tty = io.StringIO(), Tty()
    for stream in (log, tty):
        steps = StepLog("compiling", stream=stream)
        steps("decode graph for bucket 512")
        steps("decode graph for bucket 512", 5.25)
    assert log.getvalue() == ("compiling decode graph for bucket 512 ...\n"
                              "compiling decode graph for bucket 512: done in 5.2 s\n")
    assert tty.getvalue() == "compiling decode graph for bucket 512 ... done in 5.2 s\n"
    quiet = io.StringIO()
    StepLog("compiling", enabled=False, stream=quiet)("x")
    assert quiet.getvalue() == ""
    bar = Progress(10, unit="B", desc="loading weights", stream=log)
    bar.update(10, shard="1/1")
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("loading weights: 10 B/10 B 100.0%")


def _run(*args, script="generate.py"):
    env = dict(os.environ, GLOG_v="3")
    cmd = ["bash", script, *args] if script.endswith(".sh") else [sys.executable, script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_json_and_stats_line_report_load_and_compile_apart(tiny):
    r = _run("--model_name", tiny, "--prompt", "Describe.", "--json", "--max_new_tokens", "6", "--greedy")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("load_s", "compile_s", "compiled", "prefill_ms", "decode_tok_s"):
        assert key in out, out
    assert out["load_s"] > 0 and out["compiled"] is True and out["compile_s"] > 0
    stats = [ln for ln in r.stderr.splitlines() if "prompt tokens" in ln]
    assert len(stats) == 1 and "one-time: load " in stats[0] and "compiled 2 graphs in " in stats[0], r.stderr
    assert "compiling prefill graph for bucket 16 ..." in r.stderr  # log mode: one line per event


def test_demo_streams_every_token_through_the_thinking_answer_split():
    r = _run(script="scripts/demo.sh")  # the README's main command, no arguments
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[demo: tiny-random's weights are random" in r.stderr and "EOS is ignored" in r.stderr
    stats = [ln for ln in r.stderr.splitlines() if "prompt tokens" in ln]
    assert len(stats) == 1 and "; 64 new tokens, " in stats[0], r.stderr
    # the same settings as JSON (text only): 32 thinking tokens cut by the forced </think><answer>, then the answer
    j = _run("--model_name", "tiny-random", "--prompt", "What is in this picture?", "--max_new_tokens", "64",
             "--demo", "--json")
    assert j.returncode == 0, j.stderr
    out = json.loads(j.stdout.strip().splitlines()[-1])
    assert out["new_tokens"] == 64 and out["thinking_cut_at"] == 32
    assert out["thinking"] and out["answer"]


def test_demo_flag_refuses_real_models(tiny):
    r = _run("--model_name", tiny, "--prompt", "x", "--demo")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: --demo is only for"), r.stderr
