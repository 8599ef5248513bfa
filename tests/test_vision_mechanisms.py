"""The two vision mechanisms other ports got wrong, pinned directly and shown to be caught by the parity tests:
bicubic (not bilinear) position-table resampling, and attention confined to each image / temporal group."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reference import pixels, rel_err
from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.model import ops as gops
from glm4v_ms.model import vision
from glm4v_ms.model.vision import bicubic_matrix

UNTIED = dict(merge=2, tie=False, partial=0.5, mrope=(2, 3, 3))


def _torch_resample(table: np.ndarray, h: int, w: int) -> np.ndarray:
    """The reference lookup: grid_sample(bicubic, align_corners=False, border) at patch centres, [h, w, E]."""
    s = int(round(table.shape[0] ** 0.5))
    t2d = torch.tensor(table).view(s, s, -1).permute(2, 0, 1)[None]
    hh, ww = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    gx = ((ww + 0.5) / w) * 2 - 1
    gy = ((hh + 0.5) / h) * 2 - 1
    grid = torch.stack([gx, gy], -1).reshape(1, -1, 1, 2)
    out = F.grid_sample(t2d, grid, mode="bicubic", align_corners=False, padding_mode="border")
    return out[0, :, :, 0].T.reshape(h, w, -1).numpy()


@pytest.mark.parametrize("h,w", [(24, 24), (4, 6), (30, 20), (2, 58), (61, 3), (1, 1)])
def test_bicubic_matrix_equals_torch_grid_sample(h, w):
    rng = np.random.default_rng(h * 100 + w)
    table = rng.standard_normal((576, 16)).astype(np.float32)
    t = table.reshape(24, 24, 16)
    ours = np.einsum("ha,wb,abe->hwe", bicubic_matrix(h, 24), bicubic_matrix(w, 24), t.astype(np.float64))
    ref = _torch_resample(table, h, w)
    err = np.abs(ours - ref).max()
    assert err < 1e-5, f"bicubic resampling differs from torch grid_sample by {err:.2e} at grid {h}x{w}"


def test_bicubic_on_native_grid_reproduces_table():
    assert np.abs(bicubic_matrix(24, 24) - np.eye(24)).max() < 1e-6


def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """What the existing MindSpore port computes instead (grid_sample bilinear, border): the wrong kernel."""
    k = np.arange(out_size, dtype=np.float64)
    src = np.clip((k + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    x0 = np.floor(src).astype(int)
    x1 = np.minimum(x0 + 1, in_size - 1)
    t = src - x0
    m = np.zeros((out_size, in_size), np.float32)
    np.add.at(m, (np.arange(out_size), x0), 1 - t)
    np.add.at(m, (np.arange(out_size), x1), t)
    return m


def _vision_error(ref_models, monkeypatch=None, patch=None):
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    rng = np.random.default_rng(21)
    grids = np.array([(1, 6, 10), (1, 4, 4), (1, 8, 6), (1, 8, 6)])
    pv = pixels(rng, grids)
    if patch is not None:
        patch(monkeypatch)
    ours = model.visual(pv, grids).asnumpy()
    with torch.no_grad():
        theirs = ref.model.visual(torch.tensor(pv), grid_thw=torch.tensor(grids)).numpy()
    return rel_err(ours, theirs)


def test_parity_catches_a_bilinear_resampler(ref_models, monkeypatch):
    good = _vision_error(ref_models)
    bad = _vision_error(ref_models, monkeypatch,
                        lambda mp: mp.setattr(vision, "bicubic_matrix", _bilinear_matrix))
    assert good <= 1e-5
    assert bad > 1e-2, f"a bilinear position resampler changed vision features by only {bad:.2e}: the test " \
                       "weights are too weak to catch it"


def test_parity_catches_attention_leaking_across_segments(ref_models, monkeypatch):
    real = gops.vision_attention

    def leaky(q, k, v, segments, scale):  # one big segment: images / temporal groups see each other
        return real(q, k, v, [segments[0], segments[-1]], scale)

    bad = _vision_error(ref_models, monkeypatch, lambda mp: mp.setattr(gops, "vision_attention", leaky))
    assert bad > 1e-2, f"attention leaking across images changed vision features by only {bad:.2e}"


def test_video_temporal_groups_are_separate_segments():
    assert vision.cu_seqlens(np.array([(2, 4, 6), (1, 2, 2)])) == [0, 24, 48, 52]
