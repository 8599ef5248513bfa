"""tools/parity.py: the per-stage parity report against transformers, on a complete tiny random folder (3 decoder
layers, GLM tokenizer, chat template, preprocessor config) that both glm4v_ms and transformers load."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("parity_tool", os.path.join(ROOT, "tools", "parity.py"))
parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parity)

LAYERS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, image path): make_tiny_model's folder grown to 3 decoder layers, and a 70x100 picture."""
    from glm4v_ms.apps.tiny import make_tiny_model, random_weights

    base = tmp_path_factory.mktemp("parity_tool")
    folder = make_tiny_model(str(base / "tiny"), seed=5)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_config"]["num_hidden_layers"] = LAYERS
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(random_weights(cfg, seed=5), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    yy, xx = np.mgrid[0:70, 0:100]
    rgb = np.stack([xx * 2.5, yy * 3.6, (xx + yy) * 1.5], -1) % 256
    image = str(base / "picture.png")
    Image.fromarray(rgb.astype(np.uint8)).save(image)
    return folder, image


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _run(capsys, *argv):
    rc = parity.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _run_json(capsys, folder, image, *extra):
    rc, out, err = _run(capsys, folder, "--image", image, "--prompt", "What is in this picture?", "--json", *extra)
    assert out.strip(), err[-2000:]
    return rc, json.loads(out), err


def test_fp32_passes_with_identical_tokens(setup, capsys):
    folder, image = setup
    rc, rep, err = _run_json(capsys, folder, image, "--layers", "all")
    stages = {s["stage"]: s for s in rep["stages"]}
    assert rc == 0, (rep["failed"], err[-2000:])
    assert rep["verdict"] == "PASS" and rep["failed"] == []
    assert rep["dtype"] == "float32" and rep["emulated"] is False
    assert list(stages) == ["vision.features", "embeddings"] + [f"layer.{i}" for i in range(LAYERS)] + ["logits"]
    for name, s in stages.items():
        assert s["rel_err"] < 1e-5, (name, s)
        assert s["cosine"] > 0.99999 and s["passed"], (name, s)
    tok = rep["tokens"]
    assert len(tok["reference"]) > 0 and tok["ours"] == tok["reference"] and tok["first_divergence"] is None
    assert tok["ours_text"] == tok["reference_text"]


def test_bf16_emulated_on_cpu(setup, capsys):
    folder, image = setup
    rc, rep, err = _run_json(capsys, folder, image, "--dtype", "bfloat16")
    assert "EMULATED" in err  # the one-line note (stderr with --json, so stdout stays one JSON object)
    assert rep["emulated"] is True and rep["dtype"] == "bfloat16"
    assert rc == 0, (rep["failed"], err[-2000:])
    logits = next(s for s in rep["stages"] if s["stage"] == "logits")
    assert rep["thresholds"]["logits"] == 5e-2
    assert 1e-4 < logits["rel_err"] < 5e-2, logits  # > 1e-4: the bf16 rounding really happened
    # default layer sample: every 4th from 0 plus the last
    assert [s["stage"] for s in rep["stages"] if s["stage"].startswith("layer.")] == ["layer.0", f"layer.{LAYERS - 1}"]
    tok = rep["tokens"]
    if tok["first_divergence"] is not None:  # bf16 may flip a near-tie; it must then be reported as one
        assert tok["near_tie"] and tok["margin"] <= tok["margin_tolerance"]


def test_perturbed_layer_is_the_first_failing_stage(setup, capsys, tmp_path):
    folder, image = setup
    broken = _copy(folder, tmp_path / "broken")
    weights = load_file(os.path.join(broken, "model.safetensors"))
    # Scaling a whole projection (e.g. mlp.down_proj) would change nothing: GLM-4's sandwich norms (post_mlp_layernorm,
    # post_self_attn_layernorm) normalise its output. Scale the norm weight that sets the MLP's share of the residual.
    weights["model.language_model.layers.1.post_mlp_layernorm.weight"] *= np.float32(1.05)
    save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    rc, out, err = _run(capsys, broken, "--reference_dir", folder, "--image", image, "--prompt", "Describe.",
                        "--layers", "all", "--mode", "eager", "--tokens", "4")
    assert rc == 1, out + err[-2000:]
    rows = [line.split() for line in out.splitlines()]
    results = [(r[0], r[-1]) for r in rows
               if r and (r[0] in ("vision.features", "embeddings", "logits") or r[0].startswith("layer."))]
    assert results[:3] == [("vision.features", "PASS"), ("embeddings", "PASS"), ("layer.0", "PASS")], results
    assert results[3] == ("layer.1", "FAIL"), results
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("verdict: FAIL (layer.1, layer.2, logits"), verdict


def test_token_check_near_tie_passes_and_real_divergence_fails():
    logits = [np.zeros(8, np.float32), np.array([0, 0, 0, 1.0, 0.9999, 0, 0, 0], np.float32)]
    same = parity.token_check([1, 3], [1, 3], logits, 1e-3)
    assert same["pass"] and same["first_divergence"] is None
    tie = parity.token_check([1, 4], [1, 3], logits, 1e-3)
    assert tie["pass"] and tie["near_tie"] and tie["first_divergence"] == 1
    assert tie["margin"] == pytest.approx(1e-4, abs=1e-6)
    real = parity.token_check([1, 5], [1, 3], logits, 1e-3)
    assert not real["pass"] and not real["near_tie"] and real["margin"] == pytest.approx(1.0)


def test_layer_selection():
    assert parity.parse_layers("every:4", 40) == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 39]
    assert parity.parse_layers("all", 3) == [0, 1, 2]
    assert parity.parse_layers("0,5,-1", 40) == [0, 5, 39]
    for bad in ("every:0", "some", "0,40"):
        with pytest.raises(parity.UsageError):
            parity.parse_layers(bad, 40)


def test_missing_image_is_one_error_line(setup, tmp_path):
    folder, _ = setup
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "parity.py"), folder, "--image",
                        str(tmp_path / "nope.png"), "--prompt", "Hi"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.png" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


@pytest.mark.parametrize("marker", [{"glm4v_ms": {"layout": "half_rotary_qk/v1"}},
                                    {"quantization_config": {"quant_method": "gptq", "bits": 4}}])
def test_converted_or_quantised_folder_needs_reference_dir(setup, capsys, tmp_path, marker):
    folder, image = setup
    marked = _copy(folder, tmp_path / "marked")
    with open(os.path.join(marked, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(marker)
    with open(os.path.join(marked, "config.json"), "w") as f:
        json.dump(cfg, f)
    rc, out, err = _run(capsys, marked, "--image", image, "--prompt", "Hi")
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--reference_dir" in lines[0], err
    assert "original Hugging Face folder" in lines[0]


def test_other_usage_errors(setup, capsys, tmp_path, monkeypatch):
    folder, image = setup
    for argv, needle in [((folder, "--image", image, "--prompt", "Hi", "--layers", "3"), "out of range"),
                         ((tmp_path / "absent", "--image", image, "--prompt", "Hi"), "folder not found"),
                         ((folder, "--image", image), "--prompt")]:
        rc, out, err = _run(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    rc, out, err = _run(capsys, folder, "--image", image, "--prompt", "Hi")
    assert rc == 2 and "requirements-dev.txt" in err and len(err.strip().splitlines()) == 1, err


def test_converted_folder_against_its_hf_original(setup, capsys, tmp_path):
    """The convert -> verify workflow: a folder written by tools/convert.py (bf16 shards) passes the fp32 report
    against the Hugging Face folder it came from (its bf16-rounded weights are the reference's too)."""
    from glm4v_ms.apps.convert import convert_checkpoint

    folder, image = setup
    bf16 = _copy(folder, tmp_path / "bf16")
    weights = load_file(os.path.join(bf16, "model.safetensors"))
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}, os.path.join(bf16, "model.safetensors"),
              metadata={"format": "pt"})
    converted = str(tmp_path / "converted")
    convert_checkpoint(bf16, converted, shard_size=200_000, progress=False)
    rc, rep, err = _run_json(capsys, converted, image, "--reference_dir", bf16, "--tokens", "6")
    assert rc == 0, (rep["failed"], err[-2000:])
    assert max(s["rel_err"] for s in rep["stages"]) < 1e-5
    assert rep["tokens"]["ours"] == rep["tokens"]["reference"]


def test_gptq_folder_against_the_float_reference(setup, capsys, tmp_path):
    """A GPTQ int8 folder against its float original: the quantisation error fails the default fp32 thresholds and
    passes thresholds loosened to the quantisation's size (what a user checks with an Int4/Int8 checkpoint)."""
    from gptq_pack import quantize_folder

    folder, image = setup
    mods = {f"model.language_model.layers.{i}.{p}": dict(bits=8, group_size=32, sym=True, desc_act=False)
            for i in range(LAYERS) for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    qdir = str(tmp_path / "gptq")
    quantize_folder(folder, qdir, mods, {"quant_method": "gptq", "bits": 8, "group_size": 32, "sym": True,
                                         "desc_act": False}, seed=3)
    rc, rep, err = _run_json(capsys, qdir, image, "--reference_dir", folder, "--tokens", "4", "--mode", "eager")
    assert rc == 1 and "logits" in rep["failed"], rep["failed"]
    rc, rep, err = _run_json(capsys, qdir, image, "--reference_dir", folder, "--tokens", "4", "--mode", "eager",
                             "--max_rel_vision", "0.05", "--max_rel_hidden", "0.1", "--max_rel_logits", "0.1",
                             "--min_cosine", "0.99", "--token_margin", "1.0")
    logits = next(s for s in rep["stages"] if s["stage"] == "logits")
    assert rc == 0 and 1e-4 < logits["rel_err"] < 0.1, (rep["failed"], logits)
