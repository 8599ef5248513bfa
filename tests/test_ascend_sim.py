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


@pytest.fixture
def fp32_models():
    """Call the kernel models directly with float32 tensors (standing in for bfloat16, as inside
    simulated_kernels())."""
    saved = dict(ascend_sim.FP32_STANDS_IN)
    ascend_sim.FP32_STANDS_IN["on"] = True
    yield
    ascend_sim.FP32_STANDS_IN.update(saved)


# ---------------------------------------------------------------------------------------------------------------
# the kernel models against plain definitions
# ---------------------------------------------------------------------------------------------------------------

def _naive(q, k, v, scale, keep):
    """q [H, S1, D], k/v [H, S2, D] (already one kv head per query head), keep [S1, S2] bool."""
    s = scale * q @ k.transpose(0, 2, 1)
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_fa_tnd_is_attention_within_each_segment(fp32_models):
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
def test_fa_causal_sparse_modes_and_gqa(fp32_models, mode, s1, s2):
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


def test_fia_decode_masks_and_native_gqa(fp32_models):
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


def test_rms_norm_rotary_swiglu_models(fp32_models):
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


# ---------------------------------------------------------------------------------------------------------------
# documented dtypes, fully-masked rows, the rotary layout (issue 12)
# ---------------------------------------------------------------------------------------------------------------

def _bf(a):
    return Tensor(np.asarray(a, np.float32)).astype(ms.bfloat16)


def _f32(t):
    return t.astype(ms.float32).asnumpy()


def test_models_enforce_the_documented_dtypes():
    rng = np.random.default_rng(20)
    q = rng.standard_normal((1, 2, 4, 16)).astype(np.float32)
    err = ascend_sim.KernelDtypeError
    fa = ascend_sim.flash_attention_score
    with pytest.raises(err, match="query dtype"):  # float32 is not a flash-attention dtype
        fa(Tensor(q), Tensor(q), Tensor(q), 2, input_layout="BNSD")
    with pytest.raises(err, match="key vs query"):
        fa(_bf(q), Tensor(q).astype(ms.float16), Tensor(q).astype(ms.float16), 2, input_layout="BNSD")
    with pytest.raises(err, match="attn_mask dtype"):
        fa(_bf(q), _bf(q), _bf(q), 2, attn_mask=Tensor(np.zeros((4, 4), np.float32)), input_layout="BNSD")
    out = fa(_bf(q), _bf(q), _bf(q), 2, attn_mask=Tensor(np.zeros((4, 4), bool)), input_layout="BNSD")
    assert out.dtype == ms.bfloat16
    with pytest.raises(err, match="atten_mask dtype"):
        ascend_sim.fused_infer_attention_score(_bf(q[:, :, :1]), [_bf(q)], [_bf(q)], num_heads=2,
                                               atten_mask=Tensor(np.zeros((1, 1, 1, 4), np.float16)),
                                               input_layout="BNSD")
    with pytest.raises(err, match="gamma vs x"):
        ascend_sim.rms_norm(_bf(q), Tensor(np.ones(16, np.float32)))
    with pytest.raises(err, match="cos vs x"):
        c = Tensor(np.ones((1, 1, 4, 16), np.float32))
        ascend_sim.rotary_position_embedding(_bf(q), c, c, 0)
    # the weight-quant matmul: x float16/bfloat16; scale/offset of x's dtype; with a bf16 x no bias at all
    w = Tensor(rng.integers(-8, 8, (64, 32)).astype(np.int8))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    sc, off, b = np.full((2, 32), 0.01, np.float32), np.zeros((2, 32), np.float32), np.ones(32, np.float32)
    wq = ascend_sim.weight_quant_batch_matmul
    with pytest.raises(err, match="x dtype"):
        wq(Tensor(x), w, Tensor(sc), Tensor(off), antiquant_group_size=32)
    with pytest.raises(err, match="antiquant_scale vs x"):
        wq(_bf(x), w, Tensor(sc).astype(ms.float16), Tensor(off).astype(ms.float16), antiquant_group_size=32)
    for bias in (_bf(b), Tensor(b)):  # MindSpore wants bf16, CANN float32: neither passes both
        with pytest.raises(err, match="pass no bias"):
            wq(_bf(x), w, _bf(sc), _bf(off), bias=bias, antiquant_group_size=32)
    h = lambda a: Tensor(a).astype(ms.float16)  # noqa: E731
    y = wq(h(x), w, h(sc), h(off), bias=h(b), antiquant_group_size=32)  # float16 x with a float16 bias is documented
    np.testing.assert_allclose(_f32(y), x.astype(np.float16).astype(np.float32) @ (w.asnumpy() * 0.01) + 1,
                               rtol=2e-2, atol=2e-2)


def test_a_fully_masked_row_gives_nan(fp32_models):
    """The worst case the kernel's documentation leaves open: a query row with no visible key."""
    rng = np.random.default_rng(21)
    q, k, v = (rng.standard_normal((1, 2, 4, 16)).astype(np.float32) for _ in range(3))
    discard = np.triu(np.ones((4, 4), bool), 1)
    discard[:2, :2] = True  # rows 0 and 1 see nothing (left padding of 2)
    out = ascend_sim.flash_attention_score(Tensor(q), Tensor(k), Tensor(v), 2, attn_mask=Tensor(discard),
                                           input_layout="BNSD", sparse_mode=0).asnumpy()
    assert np.isnan(out[0, :, :2]).all() and np.isfinite(out[0, :, 2:]).all()
    assert ascend_sim.CALLS[-1]["empty_rows"] == 2


def test_left_padded_prefill_sends_no_fully_masked_row(aligned_model):
    """Left padding: the padding positions' query rows used to reach the kernel with every key discarded. With the
    kernel model's NaN for such rows (the worst case), NaN hidden states at padding positions become NaN K/V for the
    next layer and, through 0 x NaN, poison every real row. Every row must keep a key; everything stays finite and
    equal to the eager path."""
    inputs = _inputs()["left-padded batch"]
    assert (inputs["attention_mask"] == 0).any()
    eager = aligned_model(**inputs, output_hidden_states=True)
    with ascend_sim.simulated_kernels() as calls:
        fused = aligned_model(**inputs, output_hidden_states=True)
    padded = [c for c in calls if c["kernel"] == "flash_attention_score" and c["layout"] == "BNSD"]
    assert padded and all(c["sparse_mode"] == 0 and c["empty_rows"] == 0 for c in padded)
    for h in fused.hidden_states:  # padding positions included: they are the next layer's keys and values
        assert np.isfinite(_f32(h)).all()
    real = inputs["attention_mask"].astype(bool)
    fl, el = fused.logits.asnumpy()[real], eager.logits.asnumpy()[real]
    assert rel_err(fl, el) <= TOL


def test_bf16_attention_norm_and_rotary_through_the_kernel_models():
    """The fused ops in bfloat16 with only the documented dtypes accepted (fp32=False): padded prefill and decode
    attention, rms_norm, the q/k rotation; against the eager path in fp32 on the same (bf16-rounded) values."""
    rng = np.random.default_rng(22)
    b, h, kvh, s, d = 2, 4, 2, 6, 16
    q, k, v = (_bf(rng.standard_normal((b, n, s, d))) for n in (h, kvh, kvh))
    keep = np.tril(np.ones((s, s), bool))[None].repeat(b, 0)
    keep[0, :, :3] = False  # row 0 left-padded by 3
    mask = Tensor(np.where(keep, 0, np.finfo(np.float32).min)[:, None].astype(np.float32))
    want = ops.attention(*(t.astype(ms.float32) for t in (q, k, v)), mask, d ** -0.5).asnumpy()
    with ascend_sim.simulated_kernels(fp32=False) as calls:
        got = ops.attention(q, k, v, mask, d ** -0.5)
        dec = ops.attention(q[:, :, -1:], k, v, mask[:, :, -1:], d ** -0.5)
    assert got.dtype == ms.bfloat16 and {c["kernel"] for c in calls} == {"flash_attention_score",
                                                                          "fused_infer_attention_score"}
    got = _f32(got)
    assert np.isfinite(got).all()
    real = np.concatenate([keep[0].any(-1)[None], keep[1].any(-1)[None]])  # query rows that see a real key
    assert rel_err(got[real], want[real]) < 1e-2
    assert rel_err(_f32(dec), want[:, -1:]) < 1e-2
    x, g = _bf(rng.standard_normal((3, 5, 32))), _bf(1 + 0.1 * rng.standard_normal(32))
    with ascend_sim.simulated_kernels(fp32=False):
        y = ops.rms_norm(x, g, 1e-5)
    xf = _f32(x)
    assert rel_err(_f32(y), xf / np.sqrt((xf * xf).mean(-1, keepdims=True) + 1e-5) * _f32(g)) < 1e-2


def test_rotary_with_one_kv_head_and_batch_16_is_unambiguous():
    """Tensor parallel 2 on GLM-4.1V-9B leaves one KV head per rank: in a decode step k is [B, 1, 1, D] and its cos
    [B, 1, 1, D] has the same shape, which the rotary kernel could read as BNSD, refused for B * N > 8 S. Rotating k
    alone is refused by the kernel model; ops.rotary_qk (q and k together) is not, and equals the eager rotation."""
    rng = np.random.default_rng(23)
    bsz, d = 16, 32
    q, k = _bf(rng.standard_normal((bsz, 1, 2, d))), _bf(rng.standard_normal((bsz, 1, 1, d)))
    ang = rng.standard_normal((bsz, 1, d // 2)).astype(np.float32)
    cos, sin = (Tensor(f(np.concatenate([ang, ang], -1))) for f in (np.cos, np.sin))
    with ascend_sim.simulated_kernels(fp32=False) as calls:
        with pytest.raises(AssertionError, match="ambiguous"):
            ops.rotary_half(k, cos, sin)  # the form used before: k on its own
        gq, gk = ops.rotary_qk(q, k, cos, sin)
    assert calls[-1]["x"] == (bsz, 1, 3, d) and calls[-1]["cos"] == (bsz, 1, 1, d)
    wq, wk = ops.rotary_qk(q.astype(ms.float32), k.astype(ms.float32), cos, sin)
    assert rel_err(_f32(gq), wq.asnumpy()) < 1e-2 and rel_err(_f32(gk), wk.asnumpy()) < 1e-2


def test_fused_batch_of_16_with_one_kv_head_equals_eager(aligned_model):
    """The whole model (one KV head, as a TP rank of the 9B model holds) with a batch of 16: prefill and decode
    through the kernel models, greedy tokens equal to the eager path."""
    assert aligned_model.config.text.num_key_value_heads == 1
    ids = np.random.default_rng(24).integers(10, 250, size=(16, 7))
    want = generate(aligned_model, input_ids=ids, max_new_tokens=3, eos_token_id=[], do_sample=False, mode="eager")
    with ascend_sim.simulated_kernels() as calls:
        got = generate(aligned_model, input_ids=ids, max_new_tokens=3, eos_token_id=[], do_sample=False,
                       mode="eager")
    np.testing.assert_array_equal(got, want)
    rot = [c for c in calls if c["kernel"] == "rotary_position_embedding"]
    assert rot and all(c["x"][2] == 3 for c in rot)  # 2 query heads + 1 KV head, rotated together
