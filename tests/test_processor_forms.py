"""Processor settings in every form seen in checkpoint folders give transformers' result.

* ``preprocessor_config.json`` with ``size: {shortest_edge, longest_edge}`` (GLM-4.1V and GLM-4.6V-Flash hub files);
* ``preprocessor_config.json`` with ``min_pixels`` / ``max_pixels`` (older Qwen2-VL-style writers);
* a transformers 5.x ``processor_config.json`` holding ``image_processor`` and ``video_processor`` objects;
* GLM-4.6V-Flash's files (Glm46V classes, a video_preprocessor_config.json of its own).
Each folder gives the same ids, grids and pixels as transformers 4.57.6's slow ``Glm4vImageProcessor`` built with
the same limits. The limits are chosen so that the image is resized by them: a wrong reading changes the grid.
"""

import json
import os

import numpy as np
import pytest

from test_processing import _assert_parity, _conversation, _rng_image
from glm4v_ms.processing.processor import Glm4vProcessor, read_processor_configs
from glm4v_ms.processing.tiny_tokenizer import build_tiny_tokenizer
from glm4v_ms.processing.video_processing import sample_frame_indices_46v

SIZE = {"shortest_edge": 3136, "longest_edge": 401408}
COMMON = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
          "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
VIDEO = dict(COMMON, size={"shortest_edge": 3136, "longest_edge": 802816}, fps=1.0, max_duration=100,
             video_processor_type="Glm4vVideoProcessor")

FORMS = {
    "size": {"preprocessor_config.json": dict(COMMON, size=SIZE, image_processor_type="Glm4vImageProcessor")},
    "min_max_pixels": {"preprocessor_config.json": dict(COMMON, min_pixels=SIZE["shortest_edge"],
                                                        max_pixels=SIZE["longest_edge"])},
    "5.x processor_config": {"processor_config.json": {
        "processor_class": "Glm4vProcessor",
        "image_processor": dict(COMMON, size=SIZE, image_processor_type="Glm4vImageProcessor"),
        "video_processor": VIDEO}},
    "4.6V files": {
        "preprocessor_config.json": dict(COMMON, size=SIZE, image_processor_type="Glm46VImageProcessor",
                                         processor_class="Glm46VProcessor"),
        "video_preprocessor_config.json": dict(VIDEO, video_processor_type="Glm46VVideoProcessor",
                                               processor_class="Glm46VProcessor")},
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    build_tiny_tokenizer(path)
    return path


def _folder(tmp_path, tokenizer_dir, files):
    for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    return str(tmp_path)


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_equals_transformers(tmp_path, tokenizer_dir, form):
    from transformers import AutoTokenizer
    from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor

    folder = _folder(tmp_path, tokenizer_dir, FORMS[form])
    ours = Glm4vProcessor.from_pretrained(folder)
    images = [_rng_image(700, 900, 5), _rng_image(300, 260, 6)]
    prompt = ours.apply_chat_template(_conversation(2), add_generation_prompt=True)
    out = ours(text=prompt, images=images, add_special_tokens=False)
    tok = AutoTokenizer.from_pretrained(folder)
    hf = Glm4vImageProcessor(size=dict(SIZE), **{k: v for k, v in COMMON.items()})
    result = hf(images=images, return_tensors="np")
    text = tok.apply_chat_template(_conversation(2), tokenize=False, add_generation_prompt=True)
    for grid in result["image_grid_thw"]:
        text = text.replace("<|image|>", "<|placeholder|>" * (int(np.prod(grid)) // 4), 1)
    encoded = tok([text.replace("<|placeholder|>", "<|image|>")], return_tensors="np", add_special_tokens=False)
    assert tuple(result["image_grid_thw"][0]) != (1, 50, 64), "the limits must resize the large image"
    _assert_parity(out, encoded, result)


def test_video_settings_in_each_form(tmp_path, tokenizer_dir):
    got = {}
    for k, (form, files) in enumerate(FORMS.items()):
        (tmp_path / str(k)).mkdir()
        folder = _folder(tmp_path / str(k), tokenizer_dir, files)
        image, video, family = read_processor_configs(folder)
        got[form] = (image.min_pixels, image.max_pixels, video.min_pixels, video.max_pixels, video.fps,
                     video.max_duration, family, video.sampling)
    limits = (3136, 401408)
    # without a video file, 4.57 (and we) take the video settings from preprocessor_config.json
    assert got["size"] == got["min_max_pixels"] == limits + limits + (2.0, 300.0, "glm4v", "glm4v")
    assert got["5.x processor_config"] == limits + (3136, 802816, 1.0, 100, "glm4v", "glm4v")
    assert got["4.6V files"] == limits + (3136, 802816, 1.0, 100, "glm46v", "glm46v")


def test_glm46v_frame_sampling_rule():
    # 3 s at 10 fps: 3 fps x 2 = 18 frames, the first at or after each 1/6 s mark
    assert sample_frame_indices_46v(30, 10.0, duration=3.0) == [0, 2, 4, 5, 7, 9, 10, 12, 14, 15, 17, 19, 20, 22,
                                                                24, 25, 27, 29]
    # fewer source frames than wanted: spread over all of them (repeats dropped), count made even
    assert sample_frame_indices_46v(5, 2.0, duration=2.5) == [0, 1, 2, 3, 4, 4]
    # 20 min at 30 fps: 0.5 fps x 2 = 1200 wanted, capped at 640, spread over the whole clip
    long = sample_frame_indices_46v(36000, 30.0, duration=1200.0)
    assert len(long) == 640 and long[0] == 0 and long[-1] == 35999
    # 100 s at 25 fps: 1 fps x 2 = 200 frames, one every 0.5 s
    mid = sample_frame_indices_46v(2500, 25.0, duration=100.0)
    assert mid[:4] == [0, 13, 25, 38] and len(mid) == 200


def test_tokenizer_saved_by_transformers_5(tmp_path, tokenizer_dir):
    """tokenizer_config.json as 5.x writes it (tokenizer_class TokenizersBackend, extra_special_tokens as a list),
    which 4.57's AutoTokenizer refuses: the same tokenizer.json still loads, with the same ids."""
    from transformers import AutoTokenizer

    folder = _folder(tmp_path, tokenizer_dir, FORMS["size"])
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(tokenizer_class="TokenizersBackend", backend="tokenizers",
                  extra_special_tokens=["<|endoftext|>", "<|image|>", "<|begin_of_video|>"])
    config.pop("added_tokens_decoder", None)
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="TokenizersBackend"):
        AutoTokenizer.from_pretrained(folder)
    ours = Glm4vProcessor.from_pretrained(folder)
    plain = Glm4vProcessor.from_pretrained(tokenizer_dir)
    conv = [{"role": "user", "content": "What kind of dog is this? 这是什么狗？"}]
    np.testing.assert_array_equal(ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True),
                                  plain.apply_chat_template(conv, add_generation_prompt=True, tokenize=True))
    assert ours.tokenizer.padding_side == "left" and ours.image_token_id == plain.image_token_id
