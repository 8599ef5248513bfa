"""Expert parallelism for GLM-4.5V / GLM-4.6V (glm4v_moe; parallel.init_tensor_parallel(tp, ep), loading.py).

* Without msrun: each rank's parameters (its experts; with tp its rows / columns) reassemble to the single model's,
  and a bad split is one error naming the config field (ep not dividing the routed experts, tp not dividing the
  heads, ep on a dense model, tp and ep of different sizes).
* With msrun (2 CPU processes, mccl), EP=2 (attention replicated), EP=2 x TP=2 (attention, dense MLP and shared
  experts split too; the same 2 ranks) and TP=2 alone on the MoE model (every rank holds every expert): prefill
  logits of a text prompt, an image prompt and a left-padded batch of 2 equal the single process's within relative
  1e-5 (fp32; only the order of the partial sums differs), 32 greedy tokens equal in eager and in graph mode, both
  ranks bitwise identical (unseeded sampling included). With EP the peak resident growth of each rank's load is
  below 60% of the single process's on a synthetic checkpoint whose routed experts are 94% of its bytes
  (tests/ep_worker.py measures it in a fresh process). 4 processes with ep 2 form two groups, each computing what
  the 2-process run computed.
* tools/batch_infer.py --ep 2 under msrun on a tiny MoE model (with tokenizer): one shard, one writer, the results of
  one process; --ep errors are one line.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import record
from ep_worker import STEPS, ep_inputs, greedy
from reference import rel_err, max_abs, tiny_config_dict, tiny_moe_config_dict
from glm4v_ms import Glm4vMoeForConditionalGeneration, load_tp_model
from glm4v_ms.model.config import Glm4vConfig
from glm4v_ms.model.loading import check_parallel
from glm4v_ms.model.parallel import TPContext, init_tensor_parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
MEMORY_RATIO = 0.6  # a rank's peak load growth over the single process's
# name -> (tp, ep). TP alone on a MoE model keeps every routed expert on every rank (only the memory-light parts
# split): its logits are checked, its memory is not.
SPLITS = {"ep2": (1, 2), "ep2_tp2": (2, 2), "tp2": (2, 1)}
MEMORY_SPLITS = ("ep2", "ep2_tp2")


def moe_checkpoint(folder, cfg, seed=0, scale=None):
    """Write config.json and random weights for every tensor the glm4v_moe checkpoint of ``cfg`` holds (names and
    shapes from the model's own checkpoint plan, so the checkpoint is in the Hugging Face layout): 1/sqrt(fan_in)
    matrices, norms near 1, small biases (the router's e_score_correction_bias too), unit-variance embeddings.
    ``scale``: one fixed scale for every tensor instead (the memory test only needs bytes)."""
    model = Glm4vMoeForConditionalGeneration(Glm4vConfig.from_dict(cfg))  # lazy parameters: allocates nothing
    _, expected = model.checkpoint_plan()
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected.items():
        w = rng.standard_normal(shape, dtype=np.float32)
        if scale is not None:
            w *= scale
        elif name.endswith(("position_embedding.weight", "embed_tokens.weight")):
            pass
        elif len(shape) == 1 and "norm" in name:
            w = 1.0 + 0.1 * w
        elif len(shape) == 1:
            w *= 0.1
        else:
            w /= math.sqrt(int(np.prod(shape[1:])))
        out[name] = w
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(out, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return str(folder), out


def synthetic_config():
    """Routed experts dominate: 64 experts of width 192 on hidden 256 in 3 MoE layers (113 of 121 MB in fp32)."""
    cfg = tiny_moe_config_dict(text_layers=4, n_routed=64, n_group=1, topk_group=1, top_k=4)
    cfg["text_config"].update(hidden_size=256, moe_intermediate_size=192)
    cfg["vision_config"]["out_hidden_size"] = 256
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return moe_checkpoint(tmp_path_factory.mktemp("ep") / "tiny", tiny_moe_config_dict(), seed=5)[0]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder, weights = moe_checkpoint(tmp_path_factory.mktemp("ep") / "synthetic", synthetic_config(), scale=0.02)
    experts = sum(a.nbytes for k, a in weights.items() if ".mlp.experts." in k)
    total = sum(a.nbytes for a in weights.values())
    assert experts / total > 0.9, (experts, total)
    return folder


@pytest.fixture(scope="module")
def single(tiny):
    import glm4v_ms

    glm4v_ms.set_device("CPU")
    return Glm4vMoeForConditionalGeneration.from_pretrained(tiny)


# ---------------------------------------------------------------------------------------------------------------
# Without msrun
# ---------------------------------------------------------------------------------------------------------------

def _rank(folder, r, tp, ep):
    ctx = TPContext(rank=r, world=2, tp_rank=r if tp > 1 else 0, tp_size=tp, ep_rank=r if ep > 1 else 0, ep_size=ep)
    return Glm4vMoeForConditionalGeneration.from_pretrained(folder, tensor_parallel=ctx)


@pytest.mark.parametrize("split", list(SPLITS))
def test_rank_parameters_reassemble(tiny, single, split):
    """With ep, rank r holds experts [8 r, 8 r + 8) of 16 (with tp alone, all 16); with tp also its heads' q/k/v rows
    and o_proj columns, and its slice of the dense MLP's and the shared experts' inner width ([gate_r | up_r] rows,
    down_proj columns)."""
    tp, ep = SPLITS[split]
    full = {k: p.asnumpy() for k, p in single.parameters_and_names()}
    ranks = [{k: p.asnumpy() for k, p in _rank(tiny, r, tp, ep).parameters_and_names()} for r in range(2)]
    assert ranks[0].keys() == full.keys()
    kinds = set()
    for k, want in full.items():
        parts = [rk[k] for rk in ranks]
        # the vision tower is replicated; the routed experts are split by ep only
        split_tp = tp > 1 and k.startswith("model.language_model.layers.") and ".mlp.experts." not in k
        if ".mlp.experts." in k and ep > 1:
            kind = "experts"
            got = np.concatenate(parts, 0)
        elif split_tp and any(s in k for s in ("q_proj", "k_proj", "v_proj")):
            kind = "rows"
            got = np.concatenate(parts, 0)
        elif split_tp and ("o_proj" in k or "down_proj" in k):
            kind = "cols"
            got = np.concatenate(parts, 1)
        elif split_tp and "gate_up_proj" in k:
            kind = "gate_up"
            h = parts[0].shape[0] // 2
            got = np.concatenate([p[:h] for p in parts] + [p[h:] for p in parts], 0)
        else:
            kind = "replicated"
            for p in parts:
                np.testing.assert_array_equal(p, want, err_msg=k)
            got = want
        kinds.add(kind)
        np.testing.assert_array_equal(got, want, err_msg=k)
    want = {"replicated"} | ({"experts"} if ep > 1 else set()) | ({"rows", "cols", "gate_up"} if tp > 1 else set())
    assert kinds == want


def test_bad_splits_name_the_field(tiny, tmp_path):
    moe = Glm4vConfig.from_dict(tiny_moe_config_dict())
    check_parallel(moe, 2, 2)
    check_parallel(moe, 1, 16)
    with pytest.raises(ValueError, match=r"'text_config.n_routed_experts': 16 .*expert_parallel=3"):
        check_parallel(moe, 1, 3)
    with pytest.raises(ValueError, match=r"'text_config.num_attention_heads': 4 .*tensor_parallel=3"):
        check_parallel(moe, 3, 1)
    with pytest.raises(ValueError, match=r"'text_config.num_key_value_heads': 2 .*tensor_parallel=4"):
        check_parallel(moe, 4, 4)
    dense = Glm4vConfig.from_dict(tiny_config_dict())
    with pytest.raises(ValueError, match=r"expert parallelism \(ep=2\) needs a mixture-of-experts model.*'glm4v'"):
        check_parallel(dense, 1, 2)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="expert parallel size must be a positive integer"):
            check_parallel(moe, 1, bad)
    # load_tp_model refuses before joining any process group (no msrun here)
    with pytest.raises(ValueError, match="'text_config.n_routed_experts'"):
        load_tp_model(tiny, 1, ep=3)
    with pytest.raises(ValueError, match="each must be 1 or the same size"):
        init_tensor_parallel(2, 4)
    with pytest.raises(RuntimeError, match="msrun --worker_num=2"):
        load_tp_model(tiny, 1, ep=2)


# ---------------------------------------------------------------------------------------------------------------
# With msrun: two processes
# ---------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    bindir = os.path.dirname(sys.executable)
    # msrun starts the workers as "python <script>": the venv's python must come first on PATH
    return dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), GLOG_v="3")


def _msrun(out, tp, ep, *folders, workers=2):
    """tests/ep_worker.py on ``workers`` ranks under msrun; rank -> its results (the test fails with the logs'
    tails)."""
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    if not os.path.isfile(msrun):
        pytest.fail(f"msrun not found next to {sys.executable}")
    logs = out / "logs"
    cmd = [msrun, f"--worker_num={workers}", f"--local_worker_num={workers}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "--join=True", "--cluster_time_out=60", f"--log_dir={logs}",
           os.path.join(ROOT, "tests", "ep_worker.py"), str(out), str(tp), str(ep), *folders]
    t0 = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if rc != 0 or not all((out / f"rank{r}.npz").is_file() for r in range(workers)):
        tails = []
        for f in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            lines = [ln for ln in f.read_text(errors="replace").splitlines()
                     if "WARNING" not in ln and "[INFO]" not in ln]
            tails.append(f"--- {f.name}\n" + "\n".join(lines[-25:]))
        pytest.fail(f"msrun failed ({rc}): {' '.join(cmd)}\n" + "\n".join(tails))
    print(f"\nmsrun {workers} workers tp={tp} ep={ep}: {time.perf_counter() - t0:.1f} s")
    return {r: dict(np.load(out / f"rank{r}.npz")) for r in range(workers)}


@pytest.fixture(scope="module")
def runs(tiny, synthetic, tmp_path_factory):
    """One msrun run per split: the synthetic checkpoint's load first (a fresh process), then the tiny model."""
    return {name: _msrun(tmp_path_factory.mktemp(name), tp, ep, tiny, *((synthetic,) if name in MEMORY_SPLITS else ()))
            for name, (tp, ep) in SPLITS.items()}


@pytest.fixture(scope="module")
def single_load(synthetic, tmp_path_factory):
    """The single-process load of the synthetic checkpoint, measured by the same code in a fresh process."""
    out = tmp_path_factory.mktemp("single_load")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "ep_worker.py"), str(out), "1", "1", "-",
                           synthetic], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out / "rank0.npz"))


@pytest.mark.parametrize("split", list(SPLITS))
def test_ranks_agree(runs, split):
    """Every rank computes the same logits and tokens (the all-reduce gives each the same sum), and an unseeded
    sampled request draws the same tokens on both ranks (the seed is shared over the group)."""
    tp, ep = SPLITS[split]
    res = runs[split]
    assert res[0]["ctx"].tolist() == [0, 2, 0, tp, 0, ep] and res[1]["ctx"].tolist() == [1, 2, tp - 1, tp, ep - 1, ep]
    # each rank's config: its heads / KV heads (halved with tp), with ep 8 of the 16 experts from 8 r
    for r in range(2):
        assert res[r]["local"].tolist() == [4 // tp, 2 // tp, 16 // ep, r * 8 if ep > 1 else 0]
    for k in res[0]:
        if k not in ("ctx", "local", "seconds", "load_peak_bytes"):
            np.testing.assert_array_equal(res[0][k], res[1][k], err_msg=k)


@pytest.mark.parametrize("split", list(SPLITS))
def test_equals_single_process(single, runs, split):
    got = runs[split][0]
    lines = []
    for name, inputs in ep_inputs().items():
        keep = inputs["attention_mask"].astype(bool)
        ref = single(**inputs).logits.asnumpy()
        err = rel_err(got[f"{name}.prefill_logits"][keep], ref[keep])
        record(f"{split} vs single", f"{name} prefill logits", err, max_abs(got[f"{name}.prefill_logits"][keep],
                                                                             ref[keep]))
        lines.append(f"{name} {err:.1e}")
        assert err <= TOL, (name, err)
    batch = ep_inputs()["batch"]
    eager = greedy(single, batch, "eager")
    assert eager.shape[1] == batch["input_ids"].shape[1] + STEPS
    np.testing.assert_array_equal(got["eager_tokens"], eager)
    np.testing.assert_array_equal(got["graph_tokens"], greedy(single, batch, "graph"))
    print(f"\n{split} vs single process, prefill logits relative error: " + ", ".join(lines) +
          f"; {STEPS} greedy tokens equal (eager, graph)")


def test_two_data_parallel_groups(tiny, runs, tmp_path):
    """4 processes with ep 2: two expert-parallel groups of 2 consecutive ranks (communication sub-groups), each
    computing what the 2-process run computed; an unseeded sampled request draws one seed per group."""
    res = _msrun(tmp_path, 1, 2, tiny, workers=4)
    assert [res[r]["ctx"].tolist() for r in range(4)] == [[r, 4, 0, 1, r % 2, 2] for r in range(4)]
    for r in range(4):
        for k in ("text.prefill_logits", "image.prefill_logits", "batch.prefill_logits", "eager_tokens",
                  "graph_tokens"):
            np.testing.assert_array_equal(res[r][k], runs["ep2"][0][k], err_msg=f"rank {r} {k}")
    np.testing.assert_array_equal(res[0]["sampled_tokens"], res[1]["sampled_tokens"])
    np.testing.assert_array_equal(res[2]["sampled_tokens"], res[3]["sampled_tokens"])


@pytest.mark.parametrize("split", MEMORY_SPLITS)
def test_rank_peak_memory(runs, single_load, split):
    """Each rank reads only its experts (and with tp its rows / columns): its peak resident growth while loading is
    below 60% of the single process's."""
    whole = float(single_load["load_peak_bytes"])
    assert float(single_load["load_param_bytes"]) > 100e6
    for r in range(2):
        peak = float(runs[split][r]["load_peak_bytes"])
        ratio = peak / whole
        held = float(runs[split][r]["load_param_bytes"])
        print(f"\n{split} rank {r}: load peak +{peak / 1e6:.1f} MB (parameters {held / 1e6:.1f}"
              f" MB) vs single process +{whole / 1e6:.1f} MB (parameters {single_load['load_param_bytes'] / 1e6:.1f}"
              f" MB): {ratio:.2f}")
        assert ratio < MEMORY_RATIO, (split, r, peak, whole)


# ---------------------------------------------------------------------------------------------------------------
# tools/batch_infer.py --ep
# ---------------------------------------------------------------------------------------------------------------

TOOL = os.path.join(ROOT, "tools", "batch_infer.py")
GEN = ["--greedy", "--max_new_tokens", "6"]
SAME = ("id", "index", "thinking", "answer", "prompt_tokens", "new_tokens", "error")


def test_layout_group_is_max_of_tp_and_ep():
    from glm4v_ms.apps.batch import JobError, make_layout

    for kw in (dict(ep=2), dict(tp=2, ep=2)):
        lay = make_layout(3, 4, **kw)  # groups of 2 consecutive ranks share a shard; the group's first rank writes
        assert (lay.dp_rank, lay.dp_size, lay.writer) == (1, 2, False), kw
        assert make_layout(2, 4, **kw).writer and make_layout(0, 4, **kw).coordinator
    assert (make_layout(5, 8, ep=4).dp_rank, make_layout(5, 8, ep=4).dp_size) == (1, 2)
    with pytest.raises(JobError, match="world size 3 is not a multiple of the expert-parallel size 2"):
        make_layout(0, 3, ep=2)
    with pytest.raises(JobError, match="must be >= 1"):
        make_layout(0, 2, ep=0)


@pytest.fixture(scope="module")
def moe_app_model(tmp_path_factory):
    """The tiny GLM-4.1V folder (tokenizer, chat template, processor configs) with a glm4v_moe config and weights:
    4 heads / 2 KV heads of head_dim 32, 16 routed experts (top 4 in 2 of 4 groups), 2 shared, layer 0 dense."""
    from glm4v_ms.apps.tiny import make_tiny_model

    folder = make_tiny_model(str(tmp_path_factory.mktemp("batch_ep") / "tiny_moe"))
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    moe = tiny_moe_config_dict()
    keep = ("vocab_size", "pad_token_id", "eos_token_id")
    cfg["text_config"] = dict(moe["text_config"], **{k: cfg["text_config"][k] for k in keep})
    cfg["vision_config"]["model_type"] = "glm4v_moe"
    cfg.update(model_type="glm4v_moe", architectures=["Glm4vMoeForConditionalGeneration"])
    return moe_checkpoint(folder, cfg, seed=9)[0]


def _run_tool(cwd, *args, timeout=300):
    return subprocess.run([sys.executable, TOOL, *args], cwd=cwd, env=dict(_env(), HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=timeout)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("batch_ep_data")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(d / "a.png")
    lines = [{"id": f"t{i}", "prompt": f"request number {i}: say something"} for i in range(4)]
    lines += [{"id": "img", "prompt": "What is this?", "image": "a.png"},
              {"id": "bad", "prompt": "x", "image": "no.png"}]
    (d / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def test_batch_job_ep2_equals_single_process(moe_app_model, batch_dir):
    """--ep 2 under msrun: the 2 ranks form one expert-parallel group working on one shard, only rank 0 writes, and
    the results equal one process's."""
    common = ["--input", "in.jsonl", "--model_name", moe_app_model, "--mode", "eager", *GEN]
    r = _run_tool(batch_dir, *common, "--output", "single.jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    cmd = [msrun, "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "--join=True", "--cluster_time_out=45", "--log_dir=logs_ep", TOOL, *common, "--output", "ep2.jsonl",
           "--ep", "2"]
    r = subprocess.run(cmd, cwd=batch_dir, env=dict(_env(), HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                       timeout=400)
    logs = {n: (batch_dir / "logs_ep" / n).read_text() for n in ("worker_0.log", "worker_1.log")
            if (batch_dir / "logs_ep" / n).is_file()}
    assert r.returncode == 0, r.stdout[-3000:] + "".join(v[-3000:] for v in logs.values())
    assert sorted(os.listdir(batch_dir / "ep2.jsonl.parts")) == [".merge.lock", "rank-0.jsonl"]  # one shard, one writer
    ref, got = _read(batch_dir / "single.jsonl"), _read(batch_dir / "ep2.jsonl")
    assert len(ref) == 6 and sum("answer" in x for x in ref) == 5 and "error" in ref[-1]
    assert [{k: x.get(k) for k in SAME} for x in got] == [{k: x.get(k) for k in SAME} for x in ref]
    assert "over 1 shard(s)" in r.stdout + logs.get("worker_0.log", "")


@pytest.mark.parametrize("case", ["no_msrun", "dense", "indivisible", "mismatch", "zero"])
def test_batch_ep_errors_are_one_line(case, moe_app_model, batch_dir, tmp_path):
    from glm4v_ms.apps.tiny import make_tiny_model

    model = {"dense": lambda: make_tiny_model(str(tmp_path / "dense"))}.get(case, lambda: moe_app_model)()
    flags = {"no_msrun": ["--ep", "2"], "dense": ["--ep", "2"], "indivisible": ["--ep", "3"],
             "mismatch": ["--tp", "2", "--ep", "4"], "zero": ["--ep", "0"]}[case]
    r = _run_tool(batch_dir, "--input", "in.jsonl", "--output", str(tmp_path / "o.jsonl"), "--model_name", model,
                  *flags, timeout=120)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert "Traceback" not in r.stderr and not (tmp_path / "o.jsonl").exists(), r.stderr
    want = {"no_msrun": (1, "error: --ep 2 runs one process per rank: launch with msrun"),
            "dense": (1, "error: expert parallelism (ep=2) needs a mixture-of-experts model"),
            "indivisible": (1, "error: config field 'text_config.n_routed_experts': 16 cannot be divided among "
                               "expert_parallel=3"),
            "mismatch": (2, "--tp 2 and --ep 4: with both above 1 they must be equal"),
            "zero": (2, "--ep must be >= 1")}[case]
    assert r.returncode == want[0], r.stderr
    assert want[1] in err[-1], r.stderr
    if want[0] == 1:
        assert len(err) == 1, r.stderr
