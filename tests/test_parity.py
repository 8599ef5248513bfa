"""Stage-by-stage fp32 parity with transformers 4.57.6 (eager attention) on tiny random models.

Each case reaches a different path: merge size 2 with non-square grids and >= 4 images in one forward, grids larger
than the 24x24 position table (bicubic upsampling) and smaller (downsampling), a video with 3 temporal groups, a
left-padded batch of two prompts with different images, text only, partial rotary 0.5 with mrope_section [2, 3, 3],
tied and untied lm_head, flat and 5.x-style config files. Models are saved by HF and loaded by our from_pretrained.
"""

import numpy as np
import pytest
import torch

from conftest import record
from reference import (IMAGE, image_prompt, image_span, left_pad, max_abs, pixels, rel_err, video_span, _text)
from glm4v_ms import Glm4vForConditionalGeneration

TOL = 1e-5  # relative error bound of the issue, for vision features and logits (and every stage)

UNTIED = dict(merge=2, tie=False, partial=0.5, mrope=(2, 3, 3))


def _hf_stages(model, kwargs):
    """Run the torch model once, capturing every stage with forward hooks."""
    st = {"blocks": [], "layers": []}
    vis = model.model.visual
    lm = model.model.language_model
    hooks = [
        vis.post_conv_layernorm.register_forward_hook(lambda m, i, o: st.__setitem__("patch_embed", o)),
        vis.embeddings.register_forward_hook(lambda m, i, o: st.__setitem__("pos_embed", o)),
        vis.downsample.register_forward_hook(lambda m, i, o: st.__setitem__("downsample", o.reshape(o.shape[0], -1))),
        vis.merger.register_forward_hook(lambda m, i, o: st.setdefault("merger", []).append(o)),
        lm.layers[0].register_forward_pre_hook(
            lambda m, a, k: st.__setitem__("embeds", a[0] if a else k["hidden_states"]), with_kwargs=True),
    ]
    hooks += [b.register_forward_hook(lambda m, i, o: st["blocks"].append(o)) for b in vis.blocks]
    hooks += [l.register_forward_hook(lambda m, i, o: st["layers"].append(o[0] if isinstance(o, tuple) else o))
              for l in lm.layers]
    try:
        with torch.no_grad():
            out = model(**{k: torch.tensor(v) for k, v in kwargs.items() if v is not None})
    finally:
        for h in hooks:
            h.remove()
    st["logits"] = out.logits
    return st


def _np(x):
    return x.detach().numpy() if isinstance(x, torch.Tensor) else x.asnumpy()


def _check(case, stage, ours, ref, mask=None, tol=TOL):
    a, b = _np(ours), _np(ref)
    assert a.shape == b.shape, f"{case}/{stage}: shape {a.shape} != reference {b.shape}"
    if mask is not None:  # compare real (non-pad) positions only; pad rows are masked out and unused
        a, b = a[mask.astype(bool)], b[mask.astype(bool)]
    rel, mx = rel_err(a, b), max_abs(a, b)
    record(case, stage, rel, mx)
    assert rel <= tol, f"{case}/{stage}: relative error {rel:.3e} > {tol:.0e} (max abs {mx:.3e})"
    return rel


def run_case(case, folder, ref, ids, mask=None, pv=None, grid=None, pvv=None, vgrid=None, vision_stages=True):
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
              pixel_values_videos=pvv, video_grid_thw=vgrid)
    out = model(**kw, output_hidden_states=True, output_vision_stages=vision_stages)
    st = _hf_stages(ref, kw)

    # Positions must be identical (4.57 convention: pads get 1, delta uses the padded length).
    ref_pos, ref_delta = ref.model.get_rope_index(
        torch.tensor(ids), None if grid is None else torch.tensor(grid),
        None if vgrid is None else torch.tensor(vgrid), None if mask is None else torch.tensor(mask))
    np.testing.assert_array_equal(out.position_ids, ref_pos.numpy(), err_msg=f"{case}: position ids differ")
    np.testing.assert_array_equal(out.rope_deltas, ref_delta.numpy(), err_msg=f"{case}: rope deltas differ")

    if pv is not None or pvv is not None:
        vs = out.vision_stages
        for name in ("patch_embed", "pos_embed", "downsample"):
            _check(case, f"vision.{name}", vs[name], st[name])
        assert len(vs["blocks"]) == len(st["blocks"])
        for i, (a, b) in enumerate(zip(vs["blocks"], st["blocks"])):
            _check(case, f"vision.block{i}", a, b)
        _check(case, "vision.features", vs["merger"], st["merger"][-1])
    row_mask = None if mask is None else mask
    _check(case, "text.embeds+features", out.hidden_states[0], st["embeds"], row_mask)
    # Our hidden_states: embeddings, then each layer's output (pre final norm), like the hooks capture.
    for i, (a, b) in enumerate(zip(out.hidden_states[1:], st["layers"])):
        _check(case, f"text.layer{i}", a, b, row_mask)
    _check(case, "logits", out.logits, st["logits"], row_mask)
    return out


def test_four_images_non_square_merge2(ref_models):
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    rng = np.random.default_rng(1)
    # (1,30,20) upsamples the 24x24 table along h, (1,4,4) downsamples; all non-square except one.
    grids = [(1, 6, 10), (1, 4, 4), (1, 8, 6), (1, 30, 20)]
    ids = np.array([image_prompt(rng, grids, 2)])
    run_case("4 images, merge 2", folder, ref, ids, pv=pixels(rng, grids), grid=np.array(grids))


def test_video_three_temporal_groups(ref_models):
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    rng = np.random.default_rng(2)
    vgrid = [(3, 6, 4)]
    ids = np.array([_text(rng, 4) + video_span(vgrid[0], 2, [0, 1, 12]) + _text(rng, 5)])
    run_case("video, 3 groups", folder, ref, ids, pvv=pixels(rng, vgrid), vgrid=np.array(vgrid))


def test_left_padded_batch_different_images(ref_models):
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    rng = np.random.default_rng(3)
    g0 = [(1, 4, 4)]
    g1 = [(1, 6, 10), (1, 4, 8)]
    ids, mask = left_pad([image_prompt(rng, g0, 2, pre=2, post=3), image_prompt(rng, g1, 2, pre=5, post=2)])
    assert mask[0, 0] == 0, "the first prompt must be left-padded for this case"
    grids = np.array(g0 + g1)
    run_case("left-padded batch of 2", folder, ref, ids, mask, pv=pixels(rng, g0 + g1), grid=grids)


def test_text_only_padded_batch(ref_models):
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    rng = np.random.default_rng(4)
    ids, mask = left_pad([_text(rng, 7), _text(rng, 12)])
    run_case("text only, padded batch", folder, ref, ids, mask)


def test_text_only_no_mask(ref_models):
    folder, ref = ref_models("untied", seed=0, **UNTIED)
    rng = np.random.default_rng(5)
    run_case("text only, no mask", folder, ref, np.array([_text(rng, 9)]))


def test_tied_lm_head(ref_models):
    folder, ref = ref_models("tied", seed=7, merge=2, tie=True, partial=0.5, mrope=(2, 3, 3))
    rng = np.random.default_rng(6)
    grids = [(1, 4, 6), (1, 10, 8)]
    ids = np.array([image_prompt(rng, grids, 2)])
    run_case("tied lm_head", folder, ref, ids, pv=pixels(rng, grids), grid=np.array(grids))
    from glm4v_ms.model.weights import checkpoint_files

    assert "lm_head.weight" not in checkpoint_files(folder), "HF drops the tied lm_head from the file"


def test_flat_config_rope_parameters_full_rotary(ref_models):
    # Flat hub layout, 5.x rope_parameters spelling, full rotary (partial 1.0: 16 freqs over [4, 6, 6]),
    # 2 query heads on 2 kv heads (no grouping).
    folder, ref = ref_models("flat", seed=11, merge=2, tie=False, partial=1.0, mrope=(4, 6, 6), heads=2,
                             kv_heads=2, flat=True, rope_key="rope_parameters")
    rng = np.random.default_rng(7)
    grids = [(1, 8, 4)]
    ids = np.array([image_prompt(rng, grids, 2)])
    run_case("flat cfg, rope_parameters", folder, ref, ids, pv=pixels(rng, grids), grid=np.array(grids))


def test_merge_size_one_gqa(ref_models):
    # transformers' own test geometry: merge 1 (1x1 downsample), 4 query heads on 1 kv head.
    folder, ref = ref_models("merge1", seed=13, merge=1, tie=False, partial=0.5, mrope=(1, 2, 1), heads=4,
                             kv_heads=1)
    rng = np.random.default_rng(8)
    grids = [(1, 3, 5), (1, 7, 2)]
    ids = np.array([image_prompt(rng, grids, 1)])
    run_case("merge 1, GQA 4:1", folder, ref, ids, pv=pixels(rng, grids), grid=np.array(grids))


def test_image_token_count_mismatch_is_a_clear_error(ref_models):
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    rng = np.random.default_rng(9)
    grids = [(1, 4, 4)]
    ids = image_prompt(rng, grids, 2)
    ids.remove(IMAGE)  # one placeholder short
    with pytest.raises(ValueError, match=r"image features and image tokens do not match.*3 <\|image\|> tokens.*4 features"):
        model(input_ids=np.array([ids]), pixel_values=pixels(rng, grids), image_grid_thw=np.array(grids))


def test_images_and_video_together_rejected(ref_models):
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    rng = np.random.default_rng(10)
    g = [(1, 4, 4)]
    vg = [(2, 4, 4)]
    ids = np.array([image_span(g[0], 2) + video_span(vg[0], 2, [0, 1])])
    with pytest.raises(ValueError, match="images and video in the same forward"):
        model(input_ids=ids, pixel_values=pixels(rng, g), image_grid_thw=np.array(g),
              pixel_values_videos=pixels(rng, vg), video_grid_thw=np.array(vg))


def test_pixel_rows_must_match_grid(ref_models):
    folder, _ = ref_models("untied", seed=0, **UNTIED)
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    rng = np.random.default_rng(11)
    g = [(1, 4, 4)]
    ids = np.array([image_span(g[0], 2)])
    with pytest.raises(ValueError, match=r"image pixel values has shape \(15, 1176\).*16 patches"):
        model(input_ids=ids, pixel_values=pixels(rng, g)[:15], image_grid_thw=np.array(g))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        model(input_ids=np.array([image_span((1, 2, 8), 2)]), pixel_values=pixels(rng, [(1, 3, 4)]),
              image_grid_thw=np.array([(1, 3, 4)]))
