"""get_rope_index: the spec's worked examples exactly, and equality with transformers 4.57.6 on random batches."""

import numpy as np
import pytest
import torch

from reference import BOI, BOV, EOI, EOV, IMAGE, _text, image_prompt, image_span, left_pad, video_span
from glm4v_ms import get_rope_index

IDS = dict(image_token_id=IMAGE, video_start_token_id=BOV, video_end_token_id=EOV)


def rope(ids, img=None, vid=None, mask=None, merge=2):
    return get_rope_index(np.asarray(ids), img, vid, mask, spatial_merge_size=merge, **IDS)


def test_worked_example_image():
    a, b, c, d, e = 1, 2, 3, 4, 5
    ids = [[a, b, BOI] + [IMAGE] * 15 + [EOI, c, d, e]]
    pos, delta = rope(ids, img=np.array([[1, 6, 10]]))
    img_h = [3] * 5 + [4] * 5 + [5] * 5
    img_w = [3, 4, 5, 6, 7] * 3
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2] + [3] * 15 + [8, 9, 10, 11])
    np.testing.assert_array_equal(pos[1, 0], [0, 1, 2] + img_h + [8, 9, 10, 11])
    np.testing.assert_array_equal(pos[2, 0], [0, 1, 2] + img_w + [8, 9, 10, 11])
    assert delta.tolist() == [[-10]]


def test_worked_example_video():
    x, y, z, d20, d21 = 1, 2, 3, 20, 21
    ids = [[x, BOV, BOI] + [IMAGE] * 6 + [EOI, d20, BOI] + [IMAGE] * 6 + [EOI, d21, EOV, y, z]]
    pos, delta = rope(ids, vid=np.array([[2, 4, 6]]))
    np.testing.assert_array_equal(pos[0, 0], [0, 1, 2] + [3] * 6 + [6, 7, 8] + [9] * 6 + [12, 13, 14, 15, 16])
    np.testing.assert_array_equal(pos[1, 0, :18], [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8, 9, 9, 9, 10, 10, 10])
    np.testing.assert_array_equal(pos[2, 0, :18], [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10, 11, 9, 10, 11])
    assert delta.tolist() == [[-6]]


def test_text_only_with_and_without_mask():
    pos, delta = rope([[5, 6, 7, 8]])
    np.testing.assert_array_equal(pos, np.broadcast_to(np.arange(4), (3, 1, 4)))
    assert delta.tolist() == [[0]]
    ids, mask = left_pad([[5, 6], [5, 6, 7, 8]])
    pos, delta = rope(ids, mask=mask)
    np.testing.assert_array_equal(pos[0], [[1, 1, 0, 1], [0, 1, 2, 3]])  # pads get 1, like the reference
    assert delta.tolist() == [[-2], [0]]


def _hf_rope_index(ids, img, vid, mask):
    from transformers import Glm4vConfig
    from transformers.models.glm4v.modeling_glm4v import Glm4vModel

    cfg = Glm4vConfig(image_token_id=IMAGE, video_start_token_id=BOV, video_end_token_id=EOV,
                      image_start_token_id=BOI, image_end_token_id=EOI,
                      vision_config={"spatial_merge_size": 2})
    fn = Glm4vModel.get_rope_index
    holder = type("H", (), {"config": cfg})()
    t = lambda a: None if a is None else torch.tensor(a)
    p, d = fn(holder, t(ids), t(img), t(vid), t(mask))
    return p.numpy(), d.numpy()


@pytest.mark.parametrize("seed", range(6))
def test_equals_reference_on_random_batches(seed):
    rng = np.random.default_rng(seed)
    seqs, img_grids, vid_grids = [], [], []
    video = seed % 2 == 1
    for _ in range(3):
        if video:
            g = (int(rng.integers(1, 4)), int(rng.integers(1, 4)) * 2, int(rng.integers(1, 4)) * 2)
            vid_grids.append(g)
            seq = _text(rng, int(rng.integers(1, 5))) + video_span(g, 2, list(range(g[0]))) + _text(rng, 3)
        else:
            gs = [(1, int(rng.integers(1, 6)) * 2, int(rng.integers(1, 6)) * 2) for _ in range(int(rng.integers(1, 4)))]
            img_grids += gs
            seq = image_prompt(rng, gs, 2, pre=int(rng.integers(0, 4)))
        seqs.append(seq)
    ids, mask = left_pad(seqs)
    img = np.array(img_grids) if img_grids else None
    vid = np.array(vid_grids) if vid_grids else None
    ours = rope(ids, img, vid, mask)
    ref = _hf_rope_index(ids, img, vid, mask)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])


def test_run_not_matching_grid_is_a_clear_error():
    ids = [[1, BOI] + [IMAGE] * 5 + [EOI]]
    with pytest.raises(ValueError, match=r"run of 5 image tokens .* grid \(t=1, h=4, w=4\) -> 4 tokens"):
        rope(ids, img=np.array([[1, 4, 4]]))
    with pytest.raises(ValueError, match="more image token runs than rows in image_grid_thw"):
        rope([image_span((1, 2, 2), 2) + [7] + image_span((1, 2, 2), 2)], img=np.array([[1, 2, 2]]))
