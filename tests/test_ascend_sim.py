"""The fused (Ascend) path, verified on CPU with NumPy models of the kernels' documented semantics standing in for
the kernels (tests/ascend_sim.py): first the models against plain definitions, then the whole model with the fused
path on against the eager path (vision features, logits, greedy generation). What this cannot verify: that the real
kernels behave as documented, bf16 numerics on the NPU, and the fused path inside compiled graphs (see
tools/ascend_check.py, which checks all three on a device)."""

import json
import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor
from safetensors.numpy import save_file

import ascend_sim
from conftest import record
from reference import image_prompt, left_pad, pixels, rel_err, max_abs, tiny_config_dict, video_span, _text
from glm4v_ms import Glm4vForConditionalGeneration, generate
from glm4v_ms.model import ops
from glm4v_ms.apps.tiny import random_weights
from glm4v_ms.model.vision import cu_seqlens

TOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# the kernel models against plain definitions
# ---------------------------------------------------------------------------------------------------------------

def _naive(q, k, v, scale, keep):
    """q [H, S1, D], k/v [H, S2, D] (already one kv head per query head), keep [S1, S2] bool."""
    s = scale * q @ k.transpose(0, 2, 1)
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_fa_tnd_is_attention_within_each_segment():
    rng = np.random.default_rng(0)
    cu = [0, 5, 12, 20]
    q, k, v = (rng.standard_normal((20, 2, 16)).astype(np.float32) for _ in range(3))
    out = ascend_sim.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), 2, actual_seq_qlen=cu[1:],
                                           actual_seq_kvlen=cu[1:], scalar_value=0.25, input_layout="TND").asnumpy()
    for s, e in zip(cu[:-1], cu[1:]):
        want = _naive(q[s:e].transpose(1, 0, 2), k[s:e].transpose(1, 0, 2), v[s:e].transpose(1, 0, 2), 0.25,
                      np.ones((e - s, e - s), bool))
        np.testing.assert_allclose(out[s:e], want.transpose(1, 0, 2), rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="cumulative"):
        ascend_sim.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), 2, actual_seq_qlen=[5, 5, 20],
                                         actual_seq_kvlen=[5, 5, 20], input_layout="TND")


@pytest.mark.parametrize("mode,s1,s2", [(2, 6, 6), (3, 6, 6), (3, 2, 7)])
def test_fa_causal_sparse_modes_and_gqa(mode, s1, s2):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, s1, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, s2, 16)).astype(np.float32) for _ in range(2))
    out = ascend_sim.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), 4, attn_mask=ops.compressed_causal_mask(),
                                           scalar_value=0.5, input_layout="BNSD", sparse_mode=mode).asnumpy()
    i, j = np.arange(s1)[:, None], np.arange(s2)[None, :]
    keep = j <= i if mode == 2 else j <= i + (s2 - s1)  # leftUp vs rightDown (the chunk after a cached prefix)
    want = _naive(q[0], np.repeat(k[0], 2, 0), np.repeat(v[0], 2, 0), 0.5, keep)  # heads 0,1 -> kv 0; 2,3 -> kv 1
    np.testing.assert_allclose(out[0], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="2048x2048"):
        ascend_sim.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), 4, attn_mask=Tensor(np.triu(
            np.ones((s1, s2), bool), 1)), input_layout="BNSD", sparse_mode=mode)


def test_fia_decode_masks_and_native_gqa():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 4, 1, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, 1, 9, 16)).astype(np.float32) for _ in range(2))
    discard = np.zeros((2, 1, 1, 9), bool)
    discard[0, ..., :3] = True  # left padding of row 0
    discard[:, ..., 7:] = True  # not yet filled
    out, _ = ascend_sim.fused_infer_attention_score(Tensor(q), [Tensor(k)], [Tensor(v)], atten_mask=Tensor(discard),
                                                    num_heads=4, scale=0.3, input_layout="BNSD",
                                                    num_key_value_heads=1)
    for b in range(2):
        want = _naive(q[b], np.repeat(k[b], 4, 0), np.repeat(v[b], 4, 0), 0.3, ~discard[b, 0])
        np.testing.assert_allclose(out.asnumpy()[b], want, rtol=1e-5, atol=1e-6)


def test_rms_norm_rotary_swiglu_models():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    g = rng.standard_normal(32).astype(np.float32)
    y, rstd = ascend_sim.rms_norm(Tensor(x), Tensor(g), 1e-5)
    np.testing.assert_allclose(y.asnumpy(), x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g, rtol=1e-5)
    xr = rng.standard_normal((1, 6, 4, 16)).astype(np.float32)  # BSND
    ang = rng.standard_normal((1, 6, 1, 8)).astype(np.float32)
    c, s = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    out = ascend_sim.rotary_position_embedding(Tensor(xr), Tensor(c), Tensor(s), 0).asnumpy()
    x1, x2 = xr[..., :8], xr[..., 8:]
    np.testing.assert_allclose(out, np.concatenate([x1 * c[..., :8] - x2 * s[..., :8],
                                                    x2 * c[..., 8:] + x1 * s[..., 8:]], -1), rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError, match="B\\*N > 8S"):  # a decode step in BNSD: what ops.rotary_half avoids
        ascend_sim.rotary_position_embedding(Tensor(np.zeros((1, 32, 1, 16), np.float32)),
                                             Tensor(np.zeros((1, 1, 1, 16), np.float32)),
                                             Tensor(np.zeros((1, 1, 1, 16), np.float32)), 0)
    gu = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(ascend_sim.swiglu(Tensor(gu)).asnumpy(),
                               gu[:, :4] / (1 + np.exp(-gu[:, :4])) * gu[:, 4:], rtol=1e-6)


def test_bf16_rms_norm_rounds_once():
    """The fused rms_norm multiplies by the weight before its single cast to bf16; the reference casts, then
    multiplies in bf16 (two roundings). The difference is at most one bf16 rounding step of the result."""
    import ml_dtypes
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 256)).astype(ml_dtypes.bfloat16)
    g = (1 + 0.1 * rng.standard_normal(256)).astype(ml_dtypes.bfloat16)
    y, _ = ascend_sim.rms_norm(Tensor(x), Tensor(g), 1e-5)
    xf, gf = x.astype(np.float32), g.astype(np.float32)
    normed = (xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-5)).astype(ml_dtypes.bfloat16)
    ref = (normed.astype(np.float32) * gf).astype(ml_dtypes.bfloat16).astype(np.float32)
    got = y.astype(ms.float32).asnumpy()
    assert np.all(np.abs(got - ref) <= 2 ** -7 * np.abs(ref) + 1e-30)  # bf16 has 8 significant bits


# ---------------------------------------------------------------------------------------------------------------
# the model with the fused path on (kernel models) against the eager path
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aligned_model(tmp_path_factory):
    """Head dims the kernels accept (multiples of 16): vision 64/4 = 16, text 64/2 = 32 with GQA 2:1."""
    folder = tmp_path_factory.mktemp("aligned")
    cfg = tiny_config_dict(vision_hidden=64, vision_heads=4)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(random_weights(cfg, seed=1), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return Glm4vForConditionalGeneration.from_pretrained(str(folder))


def _inputs():
    rng = np.random.default_rng(11)
    g = [(1, 4, 6), (1, 6, 4)]
    vg = [(2, 4, 4)]
    gb0, gb1 = [(1, 4, 4)], [(1, 6, 4)]
    ids_b, mask_b = left_pad([image_prompt(rng, gb0, 2, pre=2, post=3), image_prompt(rng, gb1, 2, pre=5, post=2)])
    return {
        "two images": dict(input_ids=np.array([image_prompt(rng, g, 2)]), pixel_values=pixels(rng, g),
                           image_grid_thw=np.array(g)),
        "video": dict(input_ids=np.array([_text(rng, 3) + video_span(vg[0], 2, [0, 1]) + _text(rng, 4)]),
                      pixel_values_videos=pixels(rng, vg), video_grid_thw=np.array(vg)),
        "left-padded batch": dict(input_ids=ids_b, attention_mask=mask_b, pixel_values=pixels(rng, gb0 + gb1),
                                  image_grid_thw=np.array(gb0 + gb1)),
    }


@pytest.mark.parametrize("case", list(_inputs()))
def test_fused_forward_equals_eager(aligned_model, case):
    inputs = _inputs()[case]
    eager = aligned_model(**inputs, logits_to_keep=1, output_vision_stages=True)
    with ascend_sim.simulated_kernels() as calls:
        fused = aligned_model(**inputs, logits_to_keep=1, output_vision_stages=True)
    kinds = {(c["kernel"], c.get("layout"), c.get("sparse_mode")) for c in calls}
    assert ("flash_attention_score", "TND", 0) in kinds, "the ViT must use FA in layout TND"
    padded = "attention_mask" in inputs
    assert ("flash_attention_score", "BNSD", 0 if padded else 3) in kinds, kinds
    tnd = [c for c in calls if c.get("layout") == "TND"][0]
    grid = inputs.get("image_grid_thw", inputs.get("video_grid_thw"))
    assert list(tnd["qlen"]) == cu_seqlens(grid)[1:] == list(tnd["kvlen"])
    assert {"rms_norm", "rotary_position_embedding", "swiglu"} <= {c["kernel"] for c in calls}
    fv, ev = fused.vision_stages["merger"].asnumpy(), eager.vision_stages["merger"].asnumpy()
    fl, el = fused.logits.asnumpy(), eager.logits.asnumpy()
    record(f"fused sim: {case}", "vision.features", rel_err(fv, ev), max_abs(fv, ev))
    record(f"fused sim: {case}", "logits", rel_err(fl, el), max_abs(fl, el))
    assert rel_err(fv, ev) <= TOL and rel_err(fl, el) <= TOL


def test_fused_decode_uses_fia_with_native_gqa_and_equals_eager(aligned_model):
    inputs = _inputs()["left-padded batch"]
    want = generate(aligned_model, **inputs, max_new_tokens=12, eos_token_id=[], do_sample=False, mode="eager")
    with ascend_sim.simulated_kernels() as calls:
        got = generate(aligned_model, **inputs, max_new_tokens=12, eos_token_id=[], do_sample=False, mode="eager")
    np.testing.assert_array_equal(got, want)
    fia = [c for c in calls if c["kernel"] == "fused_infer_attention_score"]
    assert len(fia) == 11 * aligned_model.config.text.num_hidden_layers
    kvh = aligned_model.config.text.num_key_value_heads
    assert all(c["k"][1] == kvh and c["kv_heads"] == kvh for c in fia), "KV heads must not be repeated"
