"""tools/ascend_check.py and tools/bench.py run end to end (functional checks; speed is what bench.py reports)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_ascend_check_says_it_needs_an_npu():
    p = _run("tools/ascend_check.py")
    assert p.returncode == 2
    assert "needs an Ascend NPU" in p.stderr and "Traceback" not in p.stderr


def test_ascend_check_dry_run_on_cpu():
    p = _run("tools/ascend_check.py", "--allow_cpu", "--tokens", "4")
    assert p.returncode == 0, p.stderr[-2000:]
    for stage in ("vision.features", "prefill.logits", "decode.logits", "memory bandwidth", "tokens/s"):
        assert stage in p.stdout
    assert "FAILED" not in p.stdout and "4/4" in p.stdout


def test_bench_json_on_the_tiny_config():
    p = _run("tools/bench.py", "--config", "tiny", "--batches", "1", "--modes", "graph", "--new_tokens", "4",
             "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("decode_tok_s", "torch_decode_tok_s", "prefill_ms", "torch_prefill_ms", "roofline_fraction"):
        assert out[key] > 0, key
    assert set(out["results"]) == {"ours_graph_b1", "torch_b1"}
    assert out["results"]["ours_graph_b1"]["peak_mb"] > 0
