"""GLM-4.5V / GLM-4.6V (glm4v_moe) through everything a user touches: the built-in tiny-random-4.5v, generate.py
(eager and graph), one batch job, one server request, and the one-line refusals of tools/convert.py and of a
quantised MoE folder. Subprocesses as a user runs them; servers on 127.0.0.1, free ports, bounded waits."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from glm4v_ms.apps.preflight import TINY_RANDOM_45V, resolve_model
from glm4v_ms.model.config import Glm4vConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, GLOG_v="3", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(*args, cwd=ROOT, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny45():
    return resolve_model(TINY_RANDOM_45V)  # built on first use, as generate.py does


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "pic.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((224, 280, 3)) * 255).astype("uint8")).save(path)
    return str(path)


def test_tiny_45v_is_a_glm45v_folder(tiny45):
    """The config reaches the MoE paths, GLM-4.5V's ids sit at their real offsets from <|endoftext|> (151329),
    and the weights are in the HF per-expert layout that transformers 4.57 loads completely."""
    cfg = Glm4vConfig.from_pretrained(tiny45)
    t = cfg.text
    assert cfg.is_moe and cfg.model_type == "glm4v_moe"
    assert (t.first_k_dense_replace, t.n_group, t.topk_group, t.n_shared_experts) == (1, 2, 1, 2)
    assert t.num_hidden_layers > t.first_k_dense_replace  # at least one MoE layer
    eot = t.pad_token_id
    real = {"image_token_id": 151363, "video_token_id": 151364, "image_start_token_id": 151339,
            "image_end_token_id": 151340, "video_start_token_id": 151341, "video_end_token_id": 151342}
    assert {k: getattr(cfg, k) - eot for k in real} == {k: v - 151329 for k, v in real.items()}
    from safetensors import safe_open

    with safe_open(os.path.join(tiny45, "model.safetensors"), "np") as f:
        keys = set(f.keys())
        bias = f.get_tensor("model.language_model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == np.float32 and bias.shape == (t.n_routed_experts,) and np.abs(bias).min() > 0
    assert "model.language_model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert "model.language_model.layers.1.mlp.shared_experts.gate_proj.weight" in keys
    assert "model.language_model.layers.0.mlp.gate_proj.weight" in keys  # the dense first layer, HF's split form
    torch = pytest.importorskip("torch")
    import transformers

    _, info = transformers.Glm4vMoeForConditionalGeneration.from_pretrained(
        tiny45, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_tiny_45v_routes_within_the_kept_group(tiny45):
    """One forward of the loaded model: every token's 2 experts come from one group of 4 (topk_group 1 of
    n_group 2), and the other group's choice scores are zeroed."""
    import glm4v_ms

    model = glm4v_ms.load_model(tiny45)
    assert isinstance(model, glm4v_ms.Glm4vMoeForConditionalGeneration)
    ids = np.random.default_rng(0).integers(10, 250, size=(1, 24))
    out = model(input_ids=ids, output_router_choices=True)
    (topk, scores), = out.router_choices  # one MoE layer
    assert topk.shape == (24, 2) and scores.shape == (24, 8)
    groups = topk // 4
    assert (groups[:, 0] == groups[:, 1]).all()
    other = scores.reshape(24, 2, 4)[np.arange(24), 1 - groups[:, 0]]
    assert (other == 0).all()
    assert len(set(groups[:, 0].tolist())) == 2, "every token picked the same group: the router is not exercised"


def test_make_tiny_model_cli_45v(tmp_path):
    p = _run("tools/make_tiny_model.py", str(tmp_path / "m"), "--variant", "4.5v", timeout=300)
    assert p.returncode == 0, p.stderr
    with open(tmp_path / "m" / "config.json") as f:
        raw = json.load(f)
    assert raw["model_type"] == "glm4v_moe" and raw["architectures"] == ["Glm4vMoeForConditionalGeneration"]


# Runs generate.py as if only requirements.txt were installed: the dev-only packages (torch, pytest, openai) are
# "not found" for every import and find_spec (what transformers' availability checks call).
_RUNTIME_ONLY = """
import importlib.machinery, runpy, sys
_find = importlib.machinery.PathFinder.find_spec
def find_spec(name, path=None, target=None):
    return None if name.split('.')[0] in ('torch', 'torchvision', 'pytest', 'openai') else _find(name, path, target)
importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_generate_eager_and_graph(tiny45, picture):
    """generate.py on the built-in MoE model, as a user of the runtime-only install runs it (dev packages hidden);
    both modes give the same greedy tokens."""
    answers = {}
    for mode in ("eager", "graph"):
        p = _run("-c", _RUNTIME_ONLY, "generate.py", "--model_name", TINY_RANDOM_45V, "--image", picture, "--prompt",
                 "What is in this picture?", "--max_new_tokens", "6", "--greedy", "--mode", mode, "--json")
        assert p.returncode == 0, p.stderr[-2000:]
        assert "Traceback" not in p.stderr
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["new_tokens"] >= 1 and out["prompt_tokens"] > 60  # the image's tokens are in the prompt
        answers[mode] = (out["thinking"], out["answer"], out["new_tokens"])
    assert answers["eager"] == answers["graph"]


def test_batch_job(tiny45, picture, tmp_path):
    lines = [{"id": "img", "prompt": "Describe.", "image": picture}, {"id": "txt", "prompt": "Tell a story."},
             {"id": "bad", "prompt": "x", "image": str(tmp_path / "missing.png")}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    p = _run(os.path.join(ROOT, "tools", "batch_infer.py"), "--model_name", TINY_RANDOM_45V, "--input", "in.jsonl",
             "--output", "out.jsonl", "--greedy", "--max_new_tokens", "4", "--mode", "eager", "--batch_size", "2",
             cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-2000:]
    with open(tmp_path / "out.jsonl", encoding="utf-8") as f:
        records = {r["id"]: r for r in map(json.loads, f)}
    assert set(records) == {"img", "txt", "bad"}
    assert "missing.png" in records["bad"]["error"]
    for k in ("img", "txt"):
        assert "error" not in records[k] and records[k]["new_tokens"] >= 1, records[k]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_request(tiny45, picture):
    import base64

    port = _free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--model_name",
                             TINY_RANDOM_45V, "--port", str(port), "--mode", "eager"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    err = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, "server exited: " + "".join(err)
            assert time.time() < deadline, "server not ready in 240 s"
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        with open(picture, "rb") as f:
            uri = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        body = {"model": TINY_RANDOM_45V, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                          {"type": "text", "text": "What is this?"}]}]}
        req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
        assert out["choices"][0]["finish_reason"] in ("stop", "length")
        assert out["usage"]["completion_tokens"] >= 1 and out["usage"]["prompt_tokens"] > 60
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_convert_refuses_a_moe_folder_in_one_line(tiny45, tmp_path):
    p = _run("tools/convert.py", tiny45, str(tmp_path / "out"), timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: SRC ") and "glm4v_moe" in lines[0] and "load directly" in lines[0]
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("flag", ["dequantize", "int"])
def test_quantised_moe_folder_is_one_line(tiny45, picture, tmp_path, flag):
    """A glm4v_moe folder with a GPTQ quantization_config: generate.py (any --quantized_weights) ends in one
    error line naming the folder, no traceback."""
    folder = tmp_path / "q"
    shutil.copytree(tiny45, folder)
    with open(folder / "config.json") as f:
        raw = json.load(f)
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                                  "desc_act": False}
    (folder / "config.json").write_text(json.dumps(raw))
    p = _run("generate.py", "--model_name", str(folder), "--prompt", "Hi", "--max_new_tokens", "2",
             "--quantized_weights", flag, "--mode", "eager", timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[-1].startswith("error: ") and str(folder) in lines[-1] and "quantised" in lines[-1], p.stderr
    assert [l for l in lines if l.startswith("error")] == [lines[-1]]
