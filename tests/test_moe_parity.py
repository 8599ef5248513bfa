"""GLM-4.5V / GLM-4.6V (glm4v_moe): fp32 parity with transformers 4.57.6's Glm4vMoeForConditionalGeneration (eager).

Tiny configs reach every path of the MoE decoder: first_k_dense_replace 1 (a dense first layer), n_group 4 with
topk_group 2 (group-limited top-k), norm_topk_prob on and off, routed_scaling_factor 2.5, a non-zero
e_score_correction_bias, 2 shared experts, an explicit head_dim (32, not hidden / heads), partial rotary 0.5 with
mrope_section [2, 3, 3] (NeoX pairs on the rotary dims), images, a video and a left-padded batch. Per case: every
layer's output, the logits (relative error <= 1e-5), the expert choices of every MoE layer (identical sets per
token) and 32 greedy tokens (eager and graph mode) against the reference.
"""

import numpy as np
import pytest
import torch

from conftest import record
from reference import (build_moe_reference, image_prompt, left_pad, max_abs, pixels, rel_err, video_span, _text)
from glm4v_ms import Glm4vMoeForConditionalGeneration, generate, load_model
from glm4v_ms.model import moe_ops
from glm4v_ms.model.weights import CheckpointError

TOL = 1e-5
GREEDY = 32


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    cache = {}

    def get(name: str, **kwargs):
        if name not in cache:
            folder = str(tmp_path_factory.mktemp(name))
            cache[name] = (folder, build_moe_reference(folder, **kwargs), load_model(folder))
        return cache[name]

    return get


def _hf(model, kw):
    """Reference logits, every decoder layer's output and each MoE layer's chosen experts (hooks)."""
    lm = model.model.language_model
    st = {"layers": [], "choices": []}
    hooks = [l.register_forward_hook(lambda m, i, o: st["layers"].append(o[0] if isinstance(o, tuple) else o))
             for l in lm.layers]
    hooks += [l.mlp.gate.register_forward_hook(lambda m, i, o: st["choices"].append(o[0].numpy()))
              for l in lm.layers if hasattr(l.mlp, "gate")]
    hooks.append(model.model.visual.merger.register_forward_hook(lambda m, i, o: st.__setitem__("features", o)))
    try:
        with torch.no_grad():
            st["logits"] = model(**{k: torch.tensor(v) for k, v in kw.items() if v is not None}).logits.numpy()
    finally:
        for h in hooks:
            h.remove()
    return st


def _check(case, stage, a, b, rows=None):
    a = a.asnumpy() if hasattr(a, "asnumpy") else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, f"{case}/{stage}: shape {a.shape} != reference {b.shape}"
    if rows is not None:
        a, b = a[rows], b[rows]
    rel, mx = rel_err(a, b), max_abs(a, b)
    record(f"MoE {case}", stage, rel, mx)
    assert rel <= TOL, f"{case}/{stage}: relative error {rel:.3e} > {TOL:.0e} (max abs {mx:.3e})"


def run_case(case, entry, ids, mask=None, pv=None, grid=None, pvv=None, vgrid=None):
    folder, ref, model = entry
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, pixel_values_videos=pvv,
              video_grid_thw=vgrid)
    out = model(**kw, output_hidden_states=True, output_router_choices=True, output_vision_stages=True)
    st = _hf(ref, kw)
    rows = None if mask is None else mask.astype(bool)
    if pv is not None or pvv is not None:
        _check(case, "vision.features", out.vision_stages["merger"], st["features"])
    for i, (a, b) in enumerate(zip(out.hidden_states[1:], st["layers"])):
        _check(case, f"text.layer{i}", a, b, rows)
    _check(case, "logits", out.logits, st["logits"], rows)
    real = np.ones(ids.size, bool) if mask is None else mask.reshape(-1).astype(bool)
    assert len(out.router_choices) == len(st["choices"]) > 0
    for layer, ((ours, _), theirs) in enumerate(zip(out.router_choices, st["choices"])):
        a, b = np.sort(ours, -1)[real], np.sort(theirs, -1)[real]
        bad = np.flatnonzero((a != b).any(-1))
        assert bad.size == 0, f"{case}: MoE layer {layer} chose other experts for tokens {bad.tolist()[:8]}"
    return out


def _greedy(case, entry, ids, mask=None, **vision):
    folder, ref, model = entry
    with torch.no_grad():
        r = ref.generate(**{k: torch.tensor(v) for k, v in dict(input_ids=ids, attention_mask=mask, **vision).items()
                            if v is not None}, max_new_tokens=GREEDY, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    want = r[:, ids.shape[1]:].numpy()
    for mode in ("eager", "graph"):
        got = np.asarray(generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=GREEDY, do_sample=False,
                                  eos_token_id=[], mode=mode, **vision))[:, ids.shape[1]:]
        np.testing.assert_array_equal(got, want, err_msg=f"{case}: {mode} greedy tokens differ from the reference")


NORM = dict(norm_topk_prob=True)
NO_NORM = dict(norm_topk_prob=False, n_group=2, topk_group=1, scaling=1.7)


def test_images_norm_topk(moe_models):
    entry = moe_models("moe_norm", seed=0, **NORM)
    rng = np.random.default_rng(1)
    grids = [(1, 6, 10), (1, 4, 4), (1, 30, 20)]
    ids = np.array([image_prompt(rng, grids, 2)])
    run_case("images, norm_topk_prob", entry, ids, pv=pixels(rng, grids), grid=np.array(grids))


def test_video_no_norm_topk(moe_models):
    entry = moe_models("moe_nonorm", seed=3, **NO_NORM)
    rng = np.random.default_rng(2)
    vgrid = [(3, 6, 4)]
    ids = np.array([_text(rng, 4) + video_span(vgrid[0], 2, [0, 1, 12]) + _text(rng, 5)])
    run_case("video, no norm_topk_prob", entry, ids, pvv=pixels(rng, vgrid), vgrid=np.array(vgrid))


def test_left_padded_batch(moe_models):
    entry = moe_models("moe_norm", seed=0, **NORM)
    rng = np.random.default_rng(3)
    g0, g1 = [(1, 4, 4)], [(1, 6, 10), (1, 4, 8)]
    ids, mask = left_pad([image_prompt(rng, g0, 2, pre=2, post=3), image_prompt(rng, g1, 2, pre=5, post=2)])
    assert mask[0, 0] == 0
    run_case("left-padded batch", entry, ids, mask, pv=pixels(rng, g0 + g1), grid=np.array(g0 + g1))


def test_greedy_32_tokens_image_and_padded_text(moe_models):
    entry = moe_models("moe_norm", seed=0, **NORM)
    rng = np.random.default_rng(4)
    grids = [(1, 4, 6)]
    ids = np.array([image_prompt(rng, grids, 2)])
    _greedy("image", entry, ids, pixel_values=pixels(rng, grids), image_grid_thw=np.array(grids))
    ids, mask = left_pad([_text(rng, 6), _text(rng, 11)])
    _greedy("left-padded text batch", entry, ids, mask)


def test_greedy_32_tokens_video_no_norm(moe_models):
    entry = moe_models("moe_nonorm", seed=3, **NO_NORM)
    rng = np.random.default_rng(5)
    vgrid = [(2, 4, 6)]
    ids = np.array([_text(rng, 3) + video_span(vgrid[0], 2, [0, 2]) + _text(rng, 4)])
    _greedy("video", entry, ids, pixel_values_videos=pixels(rng, vgrid), video_grid_thw=np.array(vgrid))


# ---------------------------------------------------------------------------------------------------------------
# The three forms of the routed experts agree (eager host grouping; static: gathered weights / all experts)
# ---------------------------------------------------------------------------------------------------------------

def _numpy_experts(x, ids, w, w13, w2, start):
    out = np.zeros(x.shape, np.float64)
    inner = w2.shape[1]
    for n in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[n, k] - start
            if 0 <= e < w13.shape[0]:
                g = x[n] @ w13[e]
                h = g[:inner] / (1 + np.exp(-g[:inner])) * g[inner:]
                out[n] += w[n, k] * (h @ w2[e])
    return out


@pytest.mark.parametrize("n, start, local", [(1, 0, 16), (3, 8, 8), (40, 0, 16), (40, 4, 8)])
def test_routed_expert_forms_agree(n, start, local):
    from mindspore import Tensor
    from glm4v_ms.model import ops

    rng = np.random.default_rng(n + start)
    h, inner, k, total = 16, 12, 4, 16
    x = rng.standard_normal((n, h)).astype(np.float32)
    ids = np.stack([rng.choice(total, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.random((n, k)).astype(np.float32)
    w13 = (rng.standard_normal((local, h, 2 * inner)) / 4).astype(np.float32)
    w2 = (rng.standard_normal((local, inner, h)) / 4).astype(np.float32)
    want = _numpy_experts(x, ids, w, w13, w2, start)
    args = (Tensor(x), Tensor(ids), Tensor(w), Tensor(w13), Tensor(w2), start)
    eager = moe_ops.routed_experts(*args).asnumpy()
    with ops.graph_trace():  # the static forms, run eagerly here (the same ops a graph traces)
        static = moe_ops.routed_experts(*args).asnumpy()
    assert rel_err(eager, want) < 1e-6 and rel_err(static, want) < 1e-6
    assert (3 * n * k <= local) == (n == 1), "both static forms (gathered weights, all experts) must be exercised"


# ---------------------------------------------------------------------------------------------------------------
# Loading is strict by the checkpoint's names and shapes
# ---------------------------------------------------------------------------------------------------------------

def _rewrite(src, dst, edit):
    import json
    import os
    import shutil
    from safetensors.numpy import load_file, save_file

    os.makedirs(dst)
    for f in os.listdir(src):
        if f != "model.safetensors":
            shutil.copy(os.path.join(src, f), dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return json.load(open(os.path.join(dst, "config.json")))


EXPERT = "model.language_model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.pop(EXPERT), ["missing", EXPERT]),
    (lambda t: t.__setitem__(EXPERT, t[EXPERT][:, :-1].copy()), ["shape", EXPERT]),
    (lambda t: t.pop("model.language_model.layers.2.mlp.gate.e_score_correction_bias"),
     ["missing", "e_score_correction_bias"]),
    (lambda t: t.__setitem__("model.language_model.layers.1.mlp.experts.99.up_proj.weight", t[EXPERT]),
     ["unexpected", "experts.99"]),
])
def test_checkpoint_mismatch_names_the_tensor(moe_models, tmp_path, edit, words):
    folder, _, _ = moe_models("moe_norm", seed=0, **NORM)
    _rewrite(folder, str(tmp_path / "bad"), edit)
    with pytest.raises(CheckpointError) as e:
        Glm4vMoeForConditionalGeneration.from_pretrained(str(tmp_path / "bad"))
    for w in words:
        assert w in str(e.value)


def test_the_dense_class_refuses_a_moe_folder_and_the_other_way_round(moe_models, ref_models):
    from glm4v_ms import Glm4vForConditionalGeneration, model_class

    moe_folder = moe_models("moe_norm", seed=0, **NORM)[0]
    dense_folder = ref_models("untied", seed=0, merge=2, tie=False, partial=0.5, mrope=(2, 3, 3))[0]
    with pytest.raises(ValueError, match="Glm4vMoeForConditionalGeneration"):
        Glm4vForConditionalGeneration.from_pretrained(moe_folder)
    with pytest.raises(ValueError, match="dense GLM-V model"):
        Glm4vMoeForConditionalGeneration.from_pretrained(dense_folder)
    assert model_class(moe_folder) is Glm4vMoeForConditionalGeneration
    assert model_class(dense_folder) is Glm4vForConditionalGeneration


def test_router_weight_is_fp32_holding_the_model_dtype_values(moe_models):
    """The router runs in fp32 as the reference's (no per-step cast): its weight is held in fp32, with the values a
    model of the requested dtype holds (a bf16 model: the checkpoint's weight rounded to bf16, as torch's would be)."""
    import mindspore as ms
    from safetensors.numpy import load_file

    folder = moe_models("moe_norm", seed=0, **NORM)[0]
    raw = load_file(folder + "/model.safetensors")["model.language_model.layers.1.mlp.gate.weight"]
    for dtype in (ms.float32, ms.bfloat16):
        model = Glm4vMoeForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        gate = model.language_model.layers[1].mlp.gate
        assert gate.weight.dtype == ms.float32 and gate.e_score_correction_bias.dtype == ms.float32
        assert model.language_model.layers[1].mlp.experts.gate_up_proj.dtype == dtype
        want = ms.Tensor(raw).astype(dtype).astype(ms.float32).asnumpy()
        np.testing.assert_array_equal(gate.weight.asnumpy(), want)
    assert not np.array_equal(want, raw), "bf16 rounding must change this random weight"
