"""Tensor parallelism (glm4v_ms/model/parallel.py).

* Without msrun: the slicing functions (each rank's pieces reassemble to the full tensor; gate/up), the loader (two
  ranks' parameters reassemble to the full model's), the config-divisibility errors, and the split math: the full
  decoder's logits recomputed from the two ranks' sublayers run one after the other, their partial outputs summed
  explicitly where the all-reduce would be.
* With msrun (2 CPU processes, mccl): TP=2 logits of a full eager forward over a left-padded batch of image prompts
  and of 8 graph-mode decode steps equal the single-process model's within relative 1e-5 (fp32; only the order of
  the partial sums differs; measured ~5e-7), greedy tokens equal (graph and eager), both ranks' results are
  bitwise identical, unseeded sampling draws the same tokens on both ranks, and converted and GPTQ folders load.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import record
from reference import rel_err, max_abs, tiny_config_dict
from tp_worker import STEPS, eager_greedy, graph_greedy, tp_inputs
from glm4v_ms import Glm4vForConditionalGeneration, TextConfig, load_tp_model
from glm4v_ms.model import ops
from glm4v_ms.model.kv_cache import KVCache, additive_causal_mask
from glm4v_ms.model.parallel import (TPContext, TPSplit, check_divisible, init_tensor_parallel,
                               local_text_config, shard_cols, shard_gate_up, shard_rows)
from glm4v_ms.apps.tiny import random_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # relative, fp32: the all-reduce changes only the summation order
# 4 query heads, 2 KV heads (GQA 2:1 on each rank), head_dim 32 with partial rotary 0.5, intermediate 96.
TP_MODEL = dict(hidden=128, heads=4, kv_heads=2)


def _write(folder, cfg, weights):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """HF-layout tiny model with 2 KV heads, its converted twin and a GPTQ int4 twin (every decoder projection)."""
    from gptq_pack import quantize_folder
    from glm4v_ms.apps.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("tp")
    cfg = tiny_config_dict(**TP_MODEL)
    hf = _write(root / "hf", cfg, random_weights(cfg, seed=3))
    conv = str(root / "converted")
    convert_checkpoint(hf, conv, progress=False)
    proj = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_up_proj",
            "mlp.down_proj")
    mods = {f"model.language_model.layers.{i}.{p}": dict(bits=4, group_size=32, sym=True, desc_act=False)
            for i in range(2) for p in proj}
    gptq = str(root / "gptq")
    quantize_folder(hf, gptq, mods, {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                                     "desc_act": False, "checkpoint_format": "gptq", "pack_dtype": "int32"}, seed=1)
    return {"hf": hf, "converted": conv, "gptq": gptq}


def _rank_model(folder, rank, tp=2, **kw):
    """A rank's model built in this process (no communication until a forward reaches tp_all_reduce)."""
    return Glm4vForConditionalGeneration.from_pretrained(folder, tensor_parallel=TPContext(tp_rank=rank, tp_size=tp),
                                                         **kw)


# ---------------------------------------------------------------------------------------------------------------
# Without msrun
# ---------------------------------------------------------------------------------------------------------------

def test_slices_reassemble():
    rng = np.random.default_rng(0)
    for tp in (1, 2, 4):
        w, b = rng.standard_normal((8 * tp, 6)), rng.standard_normal(8 * tp)
        np.testing.assert_array_equal(np.concatenate([shard_rows(w, r, tp) for r in range(tp)], 0), w)
        np.testing.assert_array_equal(np.concatenate([shard_rows(b, r, tp) for r in range(tp)], 0), b)
        o = rng.standard_normal((6, 8 * tp))
        np.testing.assert_array_equal(np.concatenate([shard_cols(o, r, tp) for r in range(tp)], 1), o)
        gu = rng.standard_normal((2 * 6 * tp, 5))  # [gate | up], inner 6*tp
        inner = 6 * tp
        parts = [shard_gate_up(gu, r, tp) for r in range(tp)]
        for r, p in enumerate(parts):  # rank r: its gate rows then the matching up rows
            assert p.shape == (2 * 6, 5)
            np.testing.assert_array_equal(p[:6], gu[r * 6:(r + 1) * 6])
            np.testing.assert_array_equal(p[6:], gu[inner + r * 6:inner + (r + 1) * 6])
        np.testing.assert_array_equal(np.concatenate([p[:6] for p in parts], 0), gu[:inner])
        np.testing.assert_array_equal(np.concatenate([p[6:] for p in parts], 0), gu[inner:])


def test_split_plan_covers_the_model():
    """full_shape maps every local parameter to the full model's shape; only the six decoder projections split."""
    from glm4v_ms.model.config import Glm4vConfig

    cfg = Glm4vConfig.from_dict(tiny_config_dict(**TP_MODEL))
    full = {k: tuple(p.shape) for k, p in Glm4vForConditionalGeneration(cfg).parameters_and_names()}
    split = TPSplit(cfg.text, 1, 2)
    import dataclasses

    local = {k: tuple(p.shape) for k, p in
             Glm4vForConditionalGeneration(dataclasses.replace(cfg, text=split.local)).parameters_and_names()}
    assert local.keys() == full.keys()
    assert {k: split.full_shape(k, s) for k, s in local.items()} == full
    kinds = {k.split(".", 4)[-1]: split.kind(k) for k in local if split.kind(k)}
    assert kinds == {"self_attn.q_proj.weight": "rows", "self_attn.q_proj.bias": "rows",
                     "self_attn.k_proj.weight": "rows", "self_attn.k_proj.bias": "rows",
                     "self_attn.v_proj.weight": "rows", "self_attn.v_proj.bias": "rows",
                     "self_attn.o_proj.weight": "cols", "mlp.gate_up_proj.weight": "gate_up",
                     "mlp.down_proj.weight": "cols"}
    assert split.local.num_attention_heads == 2 and split.local.num_key_value_heads == 1
    assert split.local.intermediate_size == 48 and split.local.head_dim == cfg.text.head_dim
    assert split.local.tp_size == 2 and cfg.text.tp_size == 1


def test_divisibility_errors(folders):
    glm9b = TextConfig(num_attention_heads=32, num_key_value_heads=2, intermediate_size=13696, head_dim=128)
    check_divisible(glm9b, 1)
    check_divisible(glm9b, 2)
    assert local_text_config(glm9b, 2).num_key_value_heads == 1
    with pytest.raises(ValueError, match=r"'text_config.num_key_value_heads'.*replicated.*\[1, 2\]"):
        check_divisible(glm9b, 4)
    with pytest.raises(ValueError, match="'text_config.num_attention_heads'"):
        check_divisible(TextConfig(num_attention_heads=6, num_key_value_heads=2, head_dim=16), 4)
    with pytest.raises(ValueError, match="'text_config.intermediate_size'"):
        check_divisible(TextConfig(num_attention_heads=4, num_key_value_heads=2, intermediate_size=99, head_dim=16), 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            check_divisible(glm9b, bad)
    with pytest.raises(ValueError, match="'text_config.num_key_value_heads'"):  # before joining any process group
        load_tp_model(folders["hf"], 4)
    with pytest.raises(RuntimeError, match="msrun"):
        init_tensor_parallel(2)
    from glm4v_ms.model.quant import QuantConfigError

    with pytest.raises(QuantConfigError, match="tensor parallelism.*dequantize"):
        _rank_model(folders["gptq"], 0, quantized_weights="int")


def test_checkpoint_errors_name_full_tensors(tmp_path):
    """A rank checks the checkpoint against the full model: errors name the tensor with its full shape."""
    from glm4v_ms import CheckpointError

    cfg = tiny_config_dict(**TP_MODEL)
    w = random_weights(cfg, seed=0)
    w["model.language_model.layers.0.self_attn.q_proj.weight"] = w[
        "model.language_model.layers.0.self_attn.q_proj.weight"][:120]
    del w["model.language_model.layers.1.mlp.down_proj.weight"]
    folder = _write(tmp_path / "bad", cfg, w)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.down_proj\.weight.*"
                                              r"layers\.0\.self_attn\.q_proj\.weight \(checkpoint \[120, 128\], "
                                              r"model \[128, 128\]\)"):
        _rank_model(folder, 1)


@pytest.mark.parametrize("name", ["hf", "converted", "gptq"])
def test_rank_parameters_reassemble(folders, name):
    """The loader gives each rank its rows / columns / gate-up slices: they reassemble to the full model's."""
    full = dict(Glm4vForConditionalGeneration.from_pretrained(folders[name]).parameters_and_names())
    ranks = [dict(_rank_model(folders[name], r).parameters_and_names()) for r in range(2)]
    for k, p in full.items():
        kind = TPSplit.kind(k)
        parts = [rk[k].asnumpy() for rk in ranks]
        if kind is None:
            for part in parts:
                np.testing.assert_array_equal(part, p.asnumpy(), err_msg=k)
        elif kind == "rows":
            np.testing.assert_array_equal(np.concatenate(parts, 0), p.asnumpy(), err_msg=k)
        elif kind == "cols":
            np.testing.assert_array_equal(np.concatenate(parts, 1), p.asnumpy(), err_msg=k)
        else:
            half = parts[0].shape[0] // 2
            glued = np.concatenate([pt[:half] for pt in parts] + [pt[half:] for pt in parts], 0)
            np.testing.assert_array_equal(glued, p.asnumpy(), err_msg=k)


def test_split_math_in_one_process(folders, monkeypatch):
    """The two ranks' decoder sublayers run one after the other in this process, the all-reduce replaced by an
    explicit sum of their partial outputs, reproduce the full model's logits (relative 1e-5); each rank's KV cache
    holds only its KV head."""
    import mindspore as ms
    from mindspore import Tensor

    monkeypatch.setitem(ops._TP, "op", lambda x: x)  # each rank's o_proj / down_proj returns its partial sum
    folder = folders["hf"]
    full = Glm4vForConditionalGeneration.from_pretrained(folder)
    ranks = [_rank_model(folder, r) for r in range(2)]
    assert KVCache(ranks[0].config.text, 2, 16).k[0].shape == (2, 1, 16, 32)
    inputs = tp_inputs()
    ref = full(**inputs).logits.asnumpy()

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    x, _ = full.embed(ids, inputs["pixel_values"], inputs["image_grid_thw"])
    pos, _ = full.rope_index(ids, inputs["image_grid_thw"], None, mask)
    cos, sin = full.rotary_tables(Tensor(pos.astype(np.int32)))
    m = Tensor(additive_causal_mask(mask, 0, ids.shape[1])).astype(ms.float32)
    layers = [[rk.language_model.layers[i] for rk in ranks] for i in range(full.config.text.num_hidden_layers)]
    for lay in layers:
        h = lay[0].self_attn(lay[0].input_layernorm(x), cos, sin, m) + \
            lay[1].self_attn(lay[1].input_layernorm(x), cos, sin, m)
        x = x + lay[0].post_self_attn_layernorm(h)
        h = lay[0].mlp(lay[0].post_attention_layernorm(x)) + lay[1].mlp(lay[1].post_attention_layernorm(x))
        x = x + lay[0].post_mlp_layernorm(h)
    got = ranks[0].logits(ranks[0].language_model.norm(x)).asnumpy()
    keep = mask.astype(bool)
    err = rel_err(got[keep], ref[keep])
    record("TP=2 emulated (one process)", "logits", err, max_abs(got[keep], ref[keep]))
    print(f"\nTP=2 emulated in one process vs single model: logits relative error {err:.2e}")
    assert err <= TOL, err


# ---------------------------------------------------------------------------------------------------------------
# With msrun: two processes
# ---------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp2(folders, tmp_path_factory):
    """Run tests/tp_worker.py on 2 ranks with msrun once; rank -> its results."""
    bindir = os.path.dirname(sys.executable)
    msrun = os.path.join(bindir, "msrun")
    if not os.path.isfile(msrun):
        pytest.fail(f"msrun not found next to {sys.executable}")
    out = tmp_path_factory.mktemp("tp_out")
    logs = out / "logs"
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "--join=True", "--cluster_time_out=60", f"--log_dir={logs}",
           os.path.join(ROOT, "tests", "tp_worker.py"), str(out), "2"] + [f"{k}={v}" for k, v in folders.items()]
    # msrun starts the workers as "python <script>": the venv's python must come first on PATH
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.perf_counter() - t0
    if rc != 0 or not all((out / f"rank{r}.npz").is_file() for r in range(2)):
        tails = []
        for f in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            lines = [ln for ln in f.read_text(errors="replace").splitlines() if "WARNING" not in ln]
            tails.append(f"--- {f.name}\n" + "\n".join(lines[-25:]))
        pytest.fail(f"msrun failed ({rc}): {' '.join(cmd)}\n" + "\n".join(tails))
    print(f"\nmsrun TP=2 run: {seconds:.1f} s")
    return {r: dict(np.load(out / f"rank{r}.npz")) for r in range(2)}


def test_tp2_ranks_agree(tp2):
    """Every rank computes the same logits and tokens (the all-reduce gives each rank the same sum), and an unseeded
    sampled request draws the same tokens on both (the seed is shared over the TP group)."""
    assert tp2[0]["ctx"].tolist() == [0, 2, 0, 2, 0, 1] and tp2[1]["ctx"].tolist() == [1, 2, 1, 2, 0, 1]
    for k in tp2[0]:
        if k not in ("ctx", "seconds"):
            np.testing.assert_array_equal(tp2[0][k], tp2[1][k], err_msg=k)
    assert int(tp2[0]["hf.kv_heads"]) == 1  # each rank's config (and so its KV cache) holds one of the 2 KV heads


def test_tp2_equals_single_process(folders, tp2):
    inputs = tp_inputs()
    keep = inputs["attention_mask"].astype(bool)
    lines = []
    for name in folders:
        full = Glm4vForConditionalGeneration.from_pretrained(folders[name])
        ref = full(**inputs).logits.asnumpy()
        got = tp2[0][f"{name}.prefill_logits"]
        err = rel_err(got[keep], ref[keep])
        record(f"TP=2 vs single ({name})", "prefill logits", err, max_abs(got[keep], ref[keep]))
        lines.append(f"{name} prefill logits rel {err:.2e}")
        assert err <= TOL, (name, err)
        if name != "hf":
            continue
        tokens, logits = graph_greedy(full, inputs)
        err = rel_err(tp2[0]["graph_logits"], logits)
        record(f"TP=2 vs single ({name})", f"graph decode {STEPS} steps", err, max_abs(tp2[0]["graph_logits"], logits))
        lines.append(f"{name} graph-mode logits over {STEPS} steps rel {err:.2e}")
        assert err <= TOL, err
        np.testing.assert_array_equal(tp2[0]["graph_tokens"], tokens)
        np.testing.assert_array_equal(tp2[0]["eager_tokens"], eager_greedy(full, inputs))
    print("\nTP=2 vs single process: " + "; ".join(lines))
