"""The half rotary layout of the decoder: a per-head permutation of q/k that turns GLM's partial interleaved M-RoPE
into one full-width rotate_half (what Ascend's fused rotary kernel computes with per-row positions)."""

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from glm4v_ms.model import ops
from glm4v_ms.model.rope import half_layout_permutation, inv_freq, mrope_axis_of_frequency, text_cos_sin


def test_permutation_worked_example():
    assert half_layout_permutation(8, 4).tolist() == [0, 2, 4, 5, 1, 3, 6, 7]
    assert half_layout_permutation(8, 8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    p = half_layout_permutation(128, 64)
    assert sorted(p.tolist()) == list(range(128))
    with pytest.raises(ValueError, match="rotary_dim"):
        half_layout_permutation(8, 3)


def _interleaved_reference(x, pos, inv, axis):
    """GLM's text rotary written the reference way: pairs (2j, 2j+1) of the first 2F dims, angle of frequency j
    from position row axis[j]; the rest passes through. x: [B, S, H, D]; pos: [3, B, S]."""
    ang = pos[axis].transpose(1, 2, 0).astype(np.float32) * inv  # [B, S, F]
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    f = inv.shape[0]
    out = x.copy()
    even, odd = x[..., 0:2 * f:2], x[..., 1:2 * f:2]
    out[..., 0:2 * f:2] = even * c - odd * s
    out[..., 1:2 * f:2] = odd * c + even * s
    return out


@pytest.mark.parametrize("head_dim,rotary_dim,section", [(16, 8, (2, 1, 1)), (128, 64, (8, 12, 12)), (8, 8, (2, 1, 1))])
def test_half_layout_rotation_equals_interleaved_partial_rotation(head_dim, rotary_dim, section):
    rng = np.random.default_rng(0)
    b, s, h = 2, 5, 3
    x = rng.standard_normal((b, s, h, head_dim)).astype(np.float32)
    pos = rng.integers(0, 50, size=(3, b, s)).astype(np.int32)  # rows differ per batch row, as with left padding
    inv = inv_freq(rotary_dim, 10000.0)
    axis = mrope_axis_of_frequency(section)
    want = _interleaved_reference(x, pos, inv, axis)
    perm = half_layout_permutation(head_dim, rotary_dim)
    cos, sin = text_cos_sin(Tensor(pos), Tensor(inv), Tensor(axis), head_dim, ms.float32)
    got_perm = ops.rotary_half(Tensor(x[..., perm]), cos, sin).asnumpy()
    got = np.empty_like(got_perm)
    got[..., perm] = got_perm  # back to the original order
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # cos/sin from numpy vs MindSpore: ~1 ulp


def test_scores_are_invariant_under_the_permutation():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 4, 16)).astype(np.float32)
    perm = half_layout_permutation(16, 8)
    np.testing.assert_allclose(q[:, perm] @ k[:, perm].T, q @ k.T, rtol=1e-5, atol=1e-6)
