"""tools/ascend_check.py and tools/bench.py run end to end (functional checks; speed is what bench.py reports)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

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
    for stage in ("vision.features", "prefill.logits", "decode.logits", "memory bandwidth", "tokens/s",
                  "weight_quant int4 group 128 bias act-order", "weight_quant int8 group 128 bias",
                  "padded.eager hidden states finite", "padded.eager row 1 logits", "padded.graph row 0 prefill logits",
                  "padded.graph decode logits finite", "rotary B16 kv-heads 1 S1", "rotary B16 kv-heads 1 S8",
                  "routed_experts N1 experts 0-15 of 16 graph", "routed_experts N37 experts 8-15 of 16 eager"):
        assert stage in p.stdout, stage
    assert "FAILED" not in p.stdout + p.stderr and "4/4" in p.stdout


@pytest.mark.parametrize("args,needle", [
    (["--tokens", "1"], "--tokens is 1: it must be at least 2"),
    (["--tokens", "0"], "--tokens is 0: it must be at least 2"),
    (["--model", "/nonexistent/folder"], "--model /nonexistent/folder: not a checkpoint folder"),
])
def test_ascend_check_bad_arguments_end_in_one_line(args, needle):
    p = _run("tools/ascend_check.py", "--allow_cpu", *args, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {needle}"), p.stderr


def test_ascend_check_names_every_failed_check(monkeypatch, capsys):
    """A check above its tolerance (here: every tolerance set below zero) makes the tool exit 1 and name them all."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ascend_check", os.path.join(ROOT, "tools", "ascend_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "TOLERANCE", {k: -1.0 for k in mod.TOLERANCE})
    monkeypatch.setattr(mod, "bandwidth_gb_s", lambda ms, size_mb=1024: 1.0)
    assert mod.main(["--allow_cpu", "--tokens", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("FAILED: vision.features, prefill.logits, decode.logits, weight_quant int4 group 128")
    assert "padded.graph row 1 prefill logits" in err and "rotary B16 kv-heads 1 S8" in err
    assert "routed_experts N37 experts 8-15 of 16 graph" in err


def test_set_device_ascend_applies_the_checked_configuration(monkeypatch):
    """The MindSpore configuration tools/ascend_check.py validates is the one every entry point gets:
    glm4v_ms.set_device("Ascend") (used by generate.py, the pipeline, batch jobs and ascend_check) applies
    ops.ASCEND_JIT_CONFIG. MindSpore's device calls are stubbed: no NPU here."""
    import mindspore as ms
    from glm4v_ms.model import ops
    seen = {}
    monkeypatch.setattr(ms, "set_device", lambda *a, **k: None)
    monkeypatch.setattr(ms, "set_context", lambda **k: seen.update(k))
    monkeypatch.setitem(ops._DEVICE, "target", None)
    monkeypatch.setattr(ops, "_FUSED", dict(ops._FUSED))
    assert ops.set_device("Ascend", 0) == "Ascend"
    assert seen == {"jit_config": {"jit_level": "O0", "infer_boost": "on"}} and ops.fused()


def test_bench_json_on_the_tiny_config():
    p = _run("tools/bench.py", "--config", "tiny", "--batches", "1", "--modes", "graph", "--new_tokens", "4",
             "--repeats", "1", "--threads", "1", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("decode_tok_s", "torch_decode_tok_s", "prefill_ms", "torch_prefill_ms", "roofline_fraction"):
        assert out[key] > 0, key
    assert set(out["results"]) == {"ours_graph_b1", "torch_sdpa_b1", "torch_eager_b1"}
    assert out["torch_attn"] == "sdpa"  # the comparison is against transformers' default attention
    res = out["results"]
    assert res["torch_sdpa_b1"]["attn_implementation"] == "sdpa"
    assert res["torch_eager_b1"]["attn_implementation"] == "eager"
    for r in res.values():  # both sides: the same thread count, one warm-up and the same number of measured runs
        assert r["threads"] == 1 and r["runs"] == 1 and r["peak_mb"] > 0 and r["decode_tok_s"] > 0, r
    assert out["threads"] == 1 and len(out["load_average"]) == 2


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_tool", os.path.join(ROOT, "tools", "bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, needle", [(["--batches", "1,x"], "--batches '1,x'"),
                                          (["--batches", "0"], "--batches '0'"),
                                          (["--modes", "foo"], "--modes 'foo'"),
                                          (["--torch_attn", "flash"], "--torch_attn 'flash'")])
def test_bench_bad_flags_are_one_line(capsys, argv, needle):
    rc = _load_bench().main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_bench_without_torch_is_one_line(capsys, monkeypatch):
    bench = _load_bench()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    rc = bench.main(["--config", "tiny"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "torch not installed" in lines[0] and "--skip_torch" in lines[0], err
