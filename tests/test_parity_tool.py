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


def _report(prompt_err_row, step_err, margin_ours):
    """build_report on synthetic arrays: 5 prompt positions x 6 logits; the reference's greedy tokens [2, 3] and
    ours [2, x], with our logits at the diverging step off by ``step_err``. ``prompt_err_row``: an error put on one
    prompt position's logits (a position that has nothing to do with the divergence)."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1, 5, 4)).astype(np.float32)
    prompt = rng.standard_normal((1, 5, 6)).astype(np.float32)
    ours_prompt = prompt.copy()
    ours_prompt[0, 1, 0] += prompt_err_row
    step1 = np.array([0, 0, 0, 2.0, 2.0 - margin_ours, 0], np.float32)  # the reference prefers 3 by margin_ours
    ref = {"embeddings": emb, "layers": {}, "logits": prompt, "new_tokens": [2, 3],
           "step_logits": [np.eye(6, dtype=np.float32)[2], step1]}
    ours_step1 = step1 + np.float32(step_err) * np.array([1, -1, 1, -1, 1, -1], np.float32)
    ours = {"embeddings": emb, "layers": {}, "logits": ours_prompt, "new_tokens": [2, 4], "divergence": (1, ours_step1)}
    th = {"hidden": 1e-1, "logits": 1e-1, "cosine": 0.9}
    return parity.build_report(ref, ours, [], th, None)["tokens"]


def test_token_tolerance_is_the_error_at_the_diverging_position():
    # a real divergence (margin 1.0) where our logits are exact to 1e-5: it FAILS, although another prompt position
    # is off by 3.0 (the old rule, 2 x the worst prompt error = 6.0, excused it)
    real = _report(prompt_err_row=3.0, step_err=1e-5, margin_ours=1.0)
    assert not real["pass"] and not real["near_tie"], real
    assert real["position_max_abs"] == pytest.approx(1e-5, rel=1e-2)
    assert real["margin_tolerance"] == pytest.approx(2e-5, rel=1e-2) and real["margin"] == pytest.approx(1.0)
    # a near-tie (margin 1e-5) at a position whose logits are off by 1e-5: rounding can flip it, it passes
    tie = _report(prompt_err_row=0.0, step_err=1e-5, margin_ours=1e-5)
    assert tie["pass"] and tie["near_tie"] and tie["first_divergence"] == 1, tie
    # the same margin at an exact position is not excused
    exact = _report(prompt_err_row=0.0, step_err=1e-7, margin_ours=1e-5)
    assert not exact["pass"], exact


def test_a_wrong_decoded_token_fails_end_to_end(setup, capsys, monkeypatch):
    """Our greedy tokens changed at step 2 (as a broken decode step would): the stages all pass, the token check
    measures our logits at that position with a plain forward, finds them close to the reference's, and FAILS."""
    folder, image = setup
    real = parity.our_greedy

    def broken(model, inputs, tokens, eos, pad, mode):
        toks = real(model, inputs, tokens, eos, pad, mode)
        toks[2] = (toks[2] + 7) % model.config.text.vocab_size
        return toks

    monkeypatch.setattr(parity, "our_greedy", broken)
    rc, rep, err = _run_json(capsys, folder, image, "--tokens", "5", "--mode", "eager")
    tok = rep["tokens"]
    assert rc == 1 and rep["failed"] == ["tokens"], (rep["failed"], err[-2000:])
    assert tok["first_divergence"] == 2 and not tok["near_tie"], tok
    assert tok["position_max_abs"] < 1e-4 and tok["margin"] > tok["margin_tolerance"], tok


def _edit_weights(src, dst, edit):
    folder = _copy(src, dst)
    w = load_file(os.path.join(folder, "model.safetensors"))
    edit(w)
    save_file(w, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


DOWN = "model.language_model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("kind", ["missing", "mismatched", "unexpected"])
def test_reference_that_did_not_load_every_tensor_stops(setup, capsys, tmp_path, kind):
    folder, image = setup

    def edit(w):
        if kind == "missing":
            del w[DOWN]
        elif kind == "mismatched":
            w[DOWN] = np.ascontiguousarray(w[DOWN][:, :-2])
        else:
            w["model.language_model.layers.1.mlp.extra_proj.weight"] = w[DOWN].copy()

    ref = _edit_weights(folder, tmp_path / "ref", edit)
    rc, out, err = _run(capsys, folder, "--reference_dir", ref, "--image", image, "--prompt", "Hi", "--tokens", "2")
    lines = err.strip().splitlines()
    assert rc == 2 and out == "", out + err
    assert lines[-1].startswith("error: the reference checkpoint") and "did not load every tensor" in lines[-1], err
    assert [l for l in lines if l.startswith("error")] == [lines[-1]] and "Traceback" not in err
    name = "layers.1.mlp.extra_proj.weight" if kind == "unexpected" else DOWN
    assert name in lines[-1] and {"missing": "missing", "mismatched": "shape mismatch",
                                  "unexpected": "not used"}[kind] in lines[-1], lines[-1]


def test_a_different_model_as_reference_is_refused_before_running(setup, capsys, tmp_path):
    folder, image = setup
    other = _copy(folder, tmp_path / "other")
    with open(os.path.join(other, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_config"]["num_hidden_layers"] = LAYERS - 1
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(cfg, f)
    rc, out, err = _run(capsys, folder, "--reference_dir", other, "--image", image, "--prompt", "Hi")
    lines = err.strip().splitlines()
    assert rc == 2 and out == "" and len(lines) == 1, err
    assert "different models" in lines[0] and f"text.num_hidden_layers {LAYERS} vs {LAYERS - 1}" in lines[0], err
    assert "[parity]" not in err  # refused before the reference ran


def test_a_shape_mismatch_in_the_report_is_one_line():
    ref = {"embeddings": np.zeros((1, 5, 4), np.float32), "layers": {}, "logits": np.zeros((1, 5, 6), np.float32),
           "new_tokens": [], "step_logits": []}
    ours = dict(ref, embeddings=np.zeros((1, 5, 8), np.float32))
    with pytest.raises(parity.ShapeMismatch, match=r"embeddings: our shape \(1, 5, 8\) != the reference's"):
        parity.build_report(ref, ours, [], {"hidden": 1, "logits": 1, "cosine": 0}, None)


def test_reference_failure_and_quant_config_errors_are_one_line(setup, capsys, tmp_path):
    from gptq_pack import quantize_folder

    folder, image = setup
    # a reference whose weights file is cut short: transformers' own error, in one line
    broken = _copy(folder, tmp_path / "broken")
    path = os.path.join(broken, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    rc, out, err = _run(capsys, folder, "--reference_dir", broken, "--image", image, "--prompt", "Hi")
    lines = [l for l in err.strip().splitlines() if not l.startswith("[parity]")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: the reference (transformers, "), err
    assert "Traceback" not in err
    # GPTQ: a quantization_config that does not parse is refused before anything runs ...
    mods = {f"model.language_model.layers.{i}.mlp.down_proj": dict(bits=8, group_size=32, sym=True, desc_act=False)
            for i in range(LAYERS)}
    qdir = str(tmp_path / "gptq")
    quantize_folder(folder, qdir, mods, {"quant_method": "gptq", "bits": 8, "group_size": 32, "sym": True,
                                         "desc_act": False}, seed=3)
    with open(os.path.join(qdir, "config.json")) as f:
        cfg = json.load(f)
    for bits, early in ((3, True), (4, False)):
        cfg["quantization_config"]["bits"] = bits  # 3: not a GPTQ width we read; 4: the int8 tensors do not match
        with open(os.path.join(qdir, "config.json"), "w") as f:
            json.dump(cfg, f)
        rc, out, err = _run(capsys, qdir, "--reference_dir", folder, "--image", image, "--prompt", "Hi",
                            "--tokens", "1")
        lines = [l for l in err.strip().splitlines() if not l.startswith("[parity]")]
        assert rc == 2 and out == "" and len(lines) == 1 and "Traceback" not in err, err
        assert ("bits is 3" if early else "does not match bits=4") in lines[0], lines[0]
        assert ("[parity]" not in err) == early, err  # ... a mismatching tensor is found when ours loads: one line


# ------------------------------------------------------------------------------------------- GLM-4.5V (glm4v_moe)
@pytest.fixture(scope="module")
def moe_setup(setup, tmp_path_factory):
    """(MoE folder, image): make_tiny_model's 4.5v folder grown to 3 decoder layers (1 dense, 2 MoE) with 16 experts
    in 4 groups, topk_group 2, top 4, routed_scaling_factor 2.5; transformers loads it as Glm4vMoe."""
    from glm4v_ms.apps.tiny import make_tiny_model, random_weights

    folder = make_tiny_model(str(tmp_path_factory.mktemp("parity_moe") / "tiny45"), seed=5, variant="4.5v")
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg["text_config"].update(num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                              topk_group=2, routed_scaling_factor=2.5)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(random_weights(cfg, seed=5), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder, setup[1]


def test_moe_fp32_passes_with_identical_choices(moe_setup, capsys):
    folder, image = moe_setup
    rc, rep, err = _run_json(capsys, folder, image, "--layers", "all")
    assert rc == 0 and rep["verdict"] == "PASS", (rep["failed"], err[-2000:])
    stages = {s["stage"]: s for s in rep["stages"]}
    assert list(stages) == ["vision.features", "embeddings"] + [f"layer.{i}" for i in range(3)] + ["logits"]
    assert all(s["rel_err"] < 1e-5 for s in stages.values()), stages
    n = rep["prompt_tokens"]
    assert [r["layer"] for r in rep["router"]] == [1, 2]  # layer 0 is dense (first_k_dense_replace 1)
    for r in rep["router"]:
        assert r["tokens"] == n and r["choices"] == 4 * n and r["differing"] == 0 and r["passed"], r
        assert 0 < r["input_max_abs"] < 1e-4
    assert rep["tokens"]["ours"] == rep["tokens"]["reference"]
    # the stages ran under our routing; in fp32 the choices are the reference's own, so nothing was forced
    assert rep["stage_routing"] == {"routed_as": "ours", "forced_choices": 0, "choices": 8 * n}
    assert [r["forced"] for r in rep["router"]] == [0, 0]
    rc, out, _ = _run(capsys, folder, "--image", image, "--prompt", "What is in this picture?", "--tokens", "2")
    assert rc == 0 and f"router layer 2: {n} tokens, {4 * n} choices compared, 0 differing (0 excused" in out
    assert (f"stages compared under OUR expert choices: the reference's routers were forced to them; 0 of {8 * n} "
            "choices differed from its own") in out


PROMPT = "What is in this picture?"


@pytest.fixture(scope="module")
def moe_fp32_choices(moe_setup):
    """(inputs, {layer: RouterLayer}): the arrays parity.py gives both sides for PROMPT and the image, and our fp32
    model's router side on them (glm4v_ms's own expert choices)."""
    import glm4v_ms
    from glm4v_ms.apps.router_check import forward_with_router
    from glm4v_ms.processing.processor import Glm4vProcessor

    folder, image = moe_setup
    x = Glm4vProcessor.from_pretrained(folder).apply_chat_template(
        parity.messages(PROMPT, [image], None), add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="np")
    inputs = {k: np.asarray(x[k]) for k in parity.MODEL_KEYS if x.get(k) is not None}
    _, router = forward_with_router(glm4v_ms.load_model(folder), inputs)
    return inputs, router


def test_moe_forcing_our_fp32_choices_changes_nothing(moe_setup, moe_fp32_choices):
    """In fp32 our choices are the reference's own: forcing the reference's routers to them leaves every compared
    array bit for bit as the unforced reference computes it (one code path serves fp32 and bf16). Forcing one
    token to other experts does change that token's output (the hooks are really in the forward)."""
    folder, _ = moe_setup
    inputs, router = moe_fp32_choices
    ours = {i: r.ids for i, r in router.items()}
    plain = parity.run_reference(folder, inputs, [0, 1, 2], 0, [], 0, moe=True)
    forced = parity.run_reference(folder, inputs, [0, 1, 2], 0, [], 0, moe=True, force=ours)
    assert forced["forced"] == {1: 0, 2: 0} and "forced" not in plain
    for i in (0, 1, 2):
        assert np.array_equal(forced["layers"][i], plain["layers"][i]), i
    assert np.array_equal(forced["logits"], plain["logits"])
    for i in (1, 2):  # the router check's side is the reference's own choice either way
        assert np.array_equal(forced["router"][i].ids, plain["router"][i].ids)
    other = {i: ids.copy() for i, ids in ours.items()}
    other[1][3] = [e for e in range(16) if e not in ours[1][3]][:4]  # token 3 of layer 1: four other experts
    moved = parity.run_reference(folder, inputs, [0, 1], 0, [], 0, moe=True, force=other)
    assert moved["forced"][1] == 4
    d = np.abs(moved["layers"][1] - plain["layers"][1]).reshape(-1, moved["layers"][1].shape[-1]).max(-1)
    # only that token moved (nothing mixes tokens after layer 1's MoE); the others by rounding at most: an expert's
    # matmul now runs over a different set of rows
    assert d[3] > 0.1 and np.delete(d, 3).max() < 1e-5, d


def test_moe_perturbed_router_weight_is_a_real_divergence(moe_setup, capsys, tmp_path):
    """One router weight of layer 1 changed in MODEL_DIR's copy (the original is the reference): choices flip far
    from any tie, and the report fails at router.layer.1 naming the token, the experts and the gap. The layer's
    router input is unchanged by it, so the tolerance stays at rounding size."""
    folder, image = moe_setup
    bad = _copy(folder, tmp_path / "bad")
    path = os.path.join(bad, "model.safetensors")
    w = load_file(path)
    key = "model.language_model.layers.1.mlp.gate.weight"
    w[key] = w[key].copy()
    w[key][5, 0] += 30.0
    save_file(w, path, metadata={"format": "pt"})
    rc, rep, err = _run_json(capsys, bad, image, "--reference_dir", folder, "--tokens", "2")
    assert rc == 1 and "router.layer.1" in rep["failed"], rep["failed"]
    r1 = rep["router"][0]
    assert r1["layer"] == 1 and r1["real"] > 0 and r1["input_max_abs"] < 1e-4
    f = r1["first_real"]
    assert f["ours"] != f["reference"] and f["gap"] > 100 * f["tolerance"], f
    rc, out, _ = _run(capsys, bad, "--reference_dir", folder, "--image", image, "--prompt", "What is in this picture?",
                      "--tokens", "2")
    line = next(l for l in out.splitlines() if "router layer 1:" in l)
    assert "first real divergence at token" in line and line.rstrip().endswith("FAIL"), line


def test_moe_bf16_routing_flips_are_excused_near_ties(moe_setup, capsys):
    """bf16 (emulated) moves the router inputs enough to flip a few choices; each flip sits within the tolerance the
    measured input error gives, so none is a real divergence. The stages run under our choices (the reference's
    routers forced to them), so a flipped expert no longer moves that token's output by a whole expert: every stage
    is within the dense model's bf16 bounds and the report PASSES (before the forcing, layer 2 failed at 5.7e-2)."""
    folder, image = moe_setup
    rc, rep, err = _run_json(capsys, folder, image, "--dtype", "bfloat16", "--tokens", "2", "--layers", "all")
    routing = rep["router"]
    assert rc == 0 and rep["verdict"] == "PASS" and rep["failed"] == [], (rep["failed"], err[-2000:])
    assert sum(r["differing"] for r in routing) > 0  # the rule was exercised
    assert all(r["excused"] == r["differing"] and r["real"] == 0 for r in routing)
    # every choice of ours the reference did not make was forced on it, and nothing else
    assert [r["forced"] for r in routing] == [r["differing"] for r in routing], routing
    assert rep["stage_routing"]["forced_choices"] == sum(r["differing"] for r in routing) > 0
    for s in rep["stages"]:
        assert s["passed"] and s["rel_err"] <= rep["thresholds"]["vision" if s["stage"] == "vision.features" else
                                                             "logits" if s["stage"] == "logits" else "hidden"], s
    assert next(s for s in rep["stages"] if s["stage"] == "logits")["rel_err"] > 1e-3  # bf16 rounding happened


def test_moe_perturbed_expert_fails_although_the_routing_matches(moe_setup, moe_fp32_choices, capsys, tmp_path):
    """Forcing the reference to our routing must not hide a numeric error of ours: one routed expert of layer 1
    (the one our router picks most often) with its down_proj scaled by 1.05 in MODEL_DIR's copy. Layer 1's router
    input and choices are unchanged (router.layer.1 passes with 0 differing), and the report FAILS at layer.1, the
    first stage that uses the expert."""
    folder, image = moe_setup
    _, router = moe_fp32_choices
    counts = np.bincount(router[1].ids.reshape(-1), minlength=16)
    e = int(np.argmax(counts))
    assert counts[e] > 0
    key = f"model.language_model.layers.1.mlp.experts.{e}.down_proj.weight"

    def scale(w):
        w[key] = w[key] * np.float32(1.05)

    bad = _edit_weights(folder, tmp_path / "bad_expert", scale)
    rc, rep, err = _run_json(capsys, bad, image, "--reference_dir", folder, "--tokens", "2", "--layers", "all",
                             "--mode", "eager")
    stages = {s["stage"]: s for s in rep["stages"]}
    assert rc == 1 and rep["failed"][0] == "layer.1", (rep["failed"], stages)
    assert stages["layer.0"]["passed"] and stages["layer.0"]["rel_err"] < 1e-5
    assert not stages["layer.1"]["passed"] and stages["layer.1"]["rel_err"] > 1e-3, stages["layer.1"]
    r1 = rep["router"][0]
    assert r1["layer"] == 1 and r1["differing"] == 0 and r1["forced"] == 0 and r1["passed"], r1
    assert "router.layer.1" not in rep["failed"]


def test_router_near_tie_rule():
    """router_check on synthetic inputs: a swap of the k-th and (k+1)-th choice within the input error is excused;
    the same swap with a wide score gap is a real divergence; a far-off input error widens the tolerance."""
    from glm4v_ms.apps.router_check import RouterLayer, compare_layer

    rng = np.random.default_rng(0)
    h, e = 16, 8
    w = rng.standard_normal((e, h)) / 4
    x = rng.standard_normal((2, h))
    bias = np.zeros(e)
    ref = RouterLayer(x=x, ids=np.array([[0, 1], [0, 1]]), weight=w, bias=bias)

    def ours(gap, dx):
        choice = np.full((2, e), 0.1)
        choice[:, 0], choice[:, 1], choice[:, 2] = 0.9, 0.5, 0.5 + gap  # we prefer 2 over the reference's 1
        return RouterLayer(x=x + dx, ids=np.array([[0, 2], [0, 1]]), weight=w, bias=bias, choice=choice)

    near = compare_layer(1, ours(1e-4, 1e-3 * rng.standard_normal(h)), ref, 1, 1)
    assert (near["differing"], near["excused"], near["real"], near["passed"]) == (1, 1, 0, True), near
    far = compare_layer(1, ours(0.3, 1e-3 * rng.standard_normal(h)), ref, 1, 1)
    assert (far["differing"], far["excused"], far["real"], far["passed"]) == (1, 0, 1, False), far
    assert far["first_real"]["ours_only"] == 2 and far["first_real"]["reference_only"] == 1
    exact = compare_layer(1, ours(1e-4, 0.0), ref, 1, 1)  # no input error: only rounding is tolerated
    assert exact["real"] == 1


def test_router_group_near_tie_rule():
    """Group-limited routing (2 groups of 2, keep 1): our router kept group 0 where the reference kept group 1. When
    our group scores are within the input error of each other that is an excused near-tie; a wide gap is a real
    divergence of kind "group"."""
    from glm4v_ms.apps.router_check import RouterLayer, compare_layer

    h = 4
    w = np.zeros((4, h))
    w[:, 0] = [2.0, 2.0, 2.0, 2.001]  # the reference's group 1 (experts 2, 3) wins by a hair
    x = np.zeros((1, h))
    x[0, 0] = 1.0
    bias = np.zeros(4)
    ref = RouterLayer(x=x, ids=np.array([[2, 3]]), weight=w, bias=bias)
    s = 1.0 / (1.0 + np.exp(-2.0))

    def ours(delta):
        choice = np.array([[s + delta, s + delta, 0.0, 0.0]])  # our router dropped group 1
        return RouterLayer(x=x + np.array([[1e-3, 0, 0, 0]]), ids=np.array([[0, 1]]), weight=w, bias=bias,
                           choice=choice)

    near = compare_layer(1, ours(1e-3), ref, n_group=2, topk_group=1)  # our group 0 ahead by 1.5e-3, tolerance 4e-3
    assert (near["differing"], near["excused"], near["real"]) == (2, 2, 0), near
    far = compare_layer(1, ours(0.05), ref, n_group=2, topk_group=1)
    assert (far["differing"], far["real"]) == (2, 2) and far["first_real"]["kind"] == "group", far
    assert (far["first_real"]["ours_only"], far["first_real"]["reference_only"]) == (0, 1)


def test_moe_and_dense_folders_are_different_models(setup, moe_setup, capsys):
    rc, out, err = _run(capsys, moe_setup[0], "--reference_dir", setup[0], "--image", setup[1], "--prompt", "x")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "different models" in lines[0] and "glm4v_moe" in lines[0], err


def test_moe_config_of_transformers_5_is_rewritten_for_4_57(moe_setup, tmp_path):
    """A glm4v_moe config.json in 5.x's form (rope_parameters) becomes a 4.57 Glm4vMoeConfig with the M-RoPE sections,
    the MoE fields and the explicit head_dim; a 4.57 file is used as it is."""
    import transformers

    folder = _copy(moe_setup[0], tmp_path / "m5")
    assert parity.reference_config_457(folder) is None
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    text = raw["text_config"]
    rope = text.pop("rope_scaling")
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": rope["mrope_section"],
                               "rope_theta": text.pop("rope_theta"),
                               "partial_rotary_factor": text.pop("partial_rotary_factor")}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f)
    c = transformers.Glm4vMoeConfig(**parity.reference_config_457(folder)).text_config
    assert c.rope_scaling["mrope_section"] == rope["mrope_section"] and c.head_dim == 32
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group, c.routed_scaling_factor,
            c.first_k_dense_replace, c.n_shared_experts) == (16, 4, 4, 2, 2.5, 1, 2)
