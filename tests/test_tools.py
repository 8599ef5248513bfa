"""tools/ascend_check.py and tools/bench.py run end to end (functional checks; speed is what bench.py reports)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
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


def _load_ascend_check():
    spec = importlib.util.spec_from_file_location("ascend_check_moe", os.path.join(ROOT, "tools", "ascend_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ascend_check_moe_dry_run_on_cpu():
    p = _run("tools/ascend_check.py", "--allow_cpu", "--moe", "--tokens", "3")
    assert p.returncode == 0, p.stderr[-2000:]
    for stage in ("moe.prefill.logits (fp32 path under the fast path's routing)", "moe.graph.prefill.logits",
                  "moe.graph.decode.logits", "MoE (16 experts, top 4, 2 of 4 groups)",
                  "router layer 1: 61 tokens, 244 choices compared, 0 differing", "router layer 2: 61 tokens",
                  "MoE greedy tokens agreeing before the first difference: 3/3"):
        assert stage in p.stdout, stage
    assert "FAILED" not in p.stdout + p.stderr


def test_ascend_check_moe_through_the_kernel_models(tmp_path):
    """The MoE check with the fused path on, the Ascend kernels (attention, norms, rotary, swiglu and the MoE routing /
    grouped-matmul / unpermute kernels) replaced by tests/ascend_sim.py's NumPy models (PyNative, so the runtime's
    eager session stands in for the compiled one): every stage within tolerance, identical expert choices."""
    import mindspore as ms
    import ascend_sim
    from glm4v_ms.model import ops

    ac = _load_ascend_check()
    folder = ac.aligned_tiny(str(tmp_path), moe=ac.MOE_ROUTING)
    try:
        with ascend_sim.simulated_kernels() as calls:
            errors, routing, agree = ac.moe_model_errors(ms, folder, ac.prompt(), ms.float32, 3, mode="eager")
            kernels = {c["kernel"] for c in calls}
    finally:
        ops.set_fused(False)
    assert {"moe_init_routing_v2", "grouped_matmul_v4", "moe_token_unpermute"} <= kernels, kernels
    assert set(errors) == {"moe.prefill.logits (fp32 path under the fast path's routing)",
                           "moe.eager.prefill.logits", "moe.eager.decode.logits"}
    assert all(v < 1e-5 for v in errors.values()), errors
    assert [r["layer"] for r in routing] == [1, 2] and all(r["differing"] == 0 and r["passed"] for r in routing)
    assert agree == 3


def test_ascend_check_forced_routing_takes_effect(tmp_path):
    """The hooks that impose the fast path's expert choices on the fp32 path: the model's own choices give its own
    logits (up to the routing weights being recomputed in fp64); other choices change them."""
    import mindspore as ms
    from glm4v_ms import load_model
    from glm4v_ms.apps.router_check import forward_with_router

    ac = _load_ascend_check()
    model = load_model(ac.aligned_tiny(str(tmp_path), moe=ac.MOE_ROUTING), dtype=ms.float32)
    x = ac.prompt()
    out, router = forward_with_router(model, x)
    free = out.logits.asnumpy()

    def forced(ids_by_layer):
        handles = ac._force_routing(model, ids_by_layer)
        try:
            return model(**x).logits.asnumpy()
        finally:
            for h in handles:
                h.remove()

    assert ac.rel(forced({i: r.ids for i, r in router.items()}), free) < 1e-6
    shifted = forced({i: (r.ids + 1) % 16 for i, r in router.items()})
    assert ac.rel(shifted, free) > 1e-3
    assert np.array_equal(model(**x).logits.asnumpy(), free)  # the hooks are gone


def test_ascend_check_takes_the_routing_of_a_moe_model(tmp_path):
    """A glm4v_moe --model turns the MoE check on with that folder's routing (tiny-random-4.5v: 8 experts, top 2,
    1 of 2 groups); its decode is timed on the folder itself."""
    from glm4v_ms.apps.preflight import TINY_RANDOM_45V, resolve_model

    p = _run("tools/ascend_check.py", "--allow_cpu", "--tokens", "2", "--model", resolve_model(TINY_RANDOM_45V))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "MoE (8 experts, top 2, 1 of 2 groups)" in p.stdout and "router layer 2: 61 tokens, 122 choices" in p.stdout
    assert "decode (--model, batch 1, graph)" in p.stdout and "FAILED" not in p.stdout + p.stderr


def test_ascend_check_names_failed_moe_checks(monkeypatch, capsys):
    """With --moe, a MoE logits check above its tolerance and a router layer with a real divergence (the comparison's
    report forced to one here) make the tool exit 1 and name them."""
    import glm4v_ms.apps.router_check as router_check

    ac = _load_ascend_check()
    monkeypatch.setattr(ac, "TOLERANCE", dict(ac.TOLERANCE, **{"moe.": -1.0}))
    monkeypatch.setattr(ac, "bandwidth_gb_s", lambda ms, size_mb=1024: 1.0)
    real = router_check.compare_router

    def one_real_divergence(*a, **k):
        reports = real(*a, **k)
        reports[-1].update(real=1, passed=False, first_real=dict(token=0, ours=[0], reference=[1], kind="expert",
                                                                 ours_only=0, reference_only=1, gap=1.0,
                                                                 tolerance=1e-3))
        return reports

    monkeypatch.setattr(router_check, "compare_router", one_real_divergence)
    assert ac.main(["--allow_cpu", "--moe", "--tokens", "2"]) == 1
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert "moe.graph.decode.logits" in last and last.endswith("moe.router.layer.2"), last
    assert "first real divergence at token 0" in out
