"""Image processing and prompts against transformers 4.57.6 (slow PIL ``Glm4vImageProcessor`` + the tiny tokenizer).

Expected ids are built from HF pieces only: the HF tokenizer's chat-template text, placeholders expanded with HF's
image grids, then tokenised by the HF tokenizer loaded with AutoTokenizer from the saved folder.
Where we deliberately differ from 4.57 (EXIF on PIL inputs, 16-bit images, images under 28 px) HF is fed the
corrected image, and a separate test pins the difference.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from glm4v_ms.processing.image_processing import ImageProcessorConfig, smart_resize, to_rgb
from glm4v_ms.processing.media import AspectRatioError
from glm4v_ms.processing.processor import Glm4vProcessor, PromptError
from glm4v_ms.processing.tiny_tokenizer import (CHAT_TEMPLATE, SPECIAL_TOKENS, THINKING_TOKENS, build_tiny_tokenizer,
                                     model_token_ids, special_token_ids)

HUB_SIZE = {"shortest_edge": 12544, "longest_edge": 9633792}  # GLM-4.1V-9B-Thinking preprocessor_config.json
TOL = 1e-6


def _write_preprocessor_config(folder, size):
    config = {"size": size, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
              "image_processor_type": "Glm4vImageProcessor", "processor_class": "Glm4vProcessor"}
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("glm4v_tiny"))
    build_tiny_tokenizer(path)
    _write_preprocessor_config(path, HUB_SIZE)
    return path


@pytest.fixture(scope="module")
def processor(folder):
    return Glm4vProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoTokenizer
    from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor
    return AutoTokenizer.from_pretrained(folder), Glm4vImageProcessor.from_pretrained(folder)


def _rng_image(height, width, seed, mode="RGB"):
    """Smooth gradients plus noise, so bicubic resizing has both edges and ramps to get right."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        return Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    return image.convert(mode) if mode != "RGB" else image


def _hf_expected(hf, conversations, hf_images):
    """input_ids / attention_mask / pixels / grids as transformers' processor would build them."""
    tokenizer, image_processor = hf
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    result = image_processor(images=hf_images, return_tensors="np")
    grids = iter(result["image_grid_thw"])
    expanded = []
    for text in texts:  # HF's rule: one placeholder at a time, left to right
        while "<|image|>" in text:
            text = text.replace("<|image|>", "<|placeholder|>" * (int(np.prod(next(grids))) // 4), 1)
        expanded.append(text.replace("<|placeholder|>", "<|image|>"))
    encoded = tokenizer(expanded, padding=True, return_tensors="np")
    return encoded, result


def _assert_parity(ours, encoded, result):
    np.testing.assert_array_equal(ours["input_ids"], encoded["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], encoded["attention_mask"])
    np.testing.assert_array_equal(ours["image_grid_thw"], result["image_grid_thw"])
    assert ours["input_ids"].dtype == np.int64 and ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == result["pixel_values"].shape
    diff = float(np.abs(ours["pixel_values"] - result["pixel_values"]).max())
    assert diff <= TOL, f"max |pixel diff| {diff} vs HF (resize or normalisation order changed?)"
    return diff


def _conversation(n_images, text="What kind of dog is this?"):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


# ---------------------------------------------------------------------------------------------------- tokenizer
def test_tiny_tokenizer_layout(processor):
    tok = processor.tokenizer
    ids = special_token_ids(tok)
    base = len(tok) - len(SPECIAL_TOKENS) - len(THINKING_TOKENS)
    assert [ids[t] for t in SPECIAL_TOKENS + THINKING_TOKENS] == list(range(base, len(tok)))
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left" and tok.model_max_length == 65536
    assert tok.encode("\n") == [tok.convert_tokens_to_ids("Ċ")]  # byte-level newline is one base token
    text = "<|user|>\n<think>hmm</think><answer>42</answer><|endoftext|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "\n<think>hmm</think><answer>42</answer>"
    config_ids = model_token_ids(tok)
    assert config_ids["image_token_id"] == ids["<|image|>"] == processor.image_token_id
    assert config_ids["eos_token_id"] == [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"],
                                          ids["</answer>"]]


def test_tiny_tokenizer_is_deterministic(tmp_path, folder):
    build_tiny_tokenizer(str(tmp_path))
    with open(tmp_path / "tokenizer.json") as a, open(os.path.join(folder, "tokenizer.json")) as b:
        assert json.load(a)["model"] == json.load(b)["model"]


def test_tiny_tokenizer_reloads_offline(folder):
    code = ("import sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "print(t.convert_tokens_to_ids('<|image|>'), t.chat_template is not None, t.padding_side)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code, folder], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    tok = Glm4vProcessor.from_pretrained(folder).tokenizer
    assert out.stdout.split() == [str(tok.convert_tokens_to_ids("<|image|>")), "True", "left"]


def test_chat_template_matches_spec_examples(processor):
    one = [{"role": "user", "content": [{"type": "image", "image": "unused.png"},
                                        {"type": "text", "text": "What kind of dog is this?"}]}]
    assert processor.apply_chat_template(one, add_generation_prompt=True) == (
        "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>What kind of dog is this?<|assistant|>\n")
    multi = [{"role": "system", "content": "You are a helpful assistant."},
             {"role": "user", "content": [{"type": "video", "video": "unused.mp4"},
                                          {"type": "text", "text": "Describe."}]},
             {"role": "assistant", "content": "<think>x</think><answer>y</answer>"},
             {"role": "user", "content": "Q2"}]
    assert processor.apply_chat_template(multi, add_generation_prompt=True) == (
        "[gMASK]<sop><|system|>\nYou are a helpful assistant.<|user|>\n<|begin_of_video|><|video|><|end_of_video|>"
        "Describe.<|assistant|>\n<think>x</think><answer>y</answer><|user|>\nQ2<|assistant|>\n")
    assert processor.chat_template == CHAT_TEMPLATE
    ids = processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, return_dict=True)
    tok = processor.tokenizer
    assert ids["input_ids"][0, :4].tolist() == tok.convert_tokens_to_ids(["[gMASK]", "<sop>", "<|user|>", "Ċ"])
    assert set(ids) == {"input_ids", "attention_mask"}


# ------------------------------------------------------------------------------------------------- smart_resize
@pytest.mark.parametrize("hw, resized, tokens", [
    # spec 6.1 table (hub min 12544 / max 9,633,792)
    ((480, 640), (476, 644), 391), ((1080, 1920), (1092, 1932), 2691), ((3000, 4000), (1876, 2520), 6030),
    ((6000, 6000), (2184, 2184), 6084), ((100, 100), (112, 112), 16), ((60, 90), (84, 112), 12)])
def test_smart_resize_spec_table(hw, resized, tokens):
    got = smart_resize(2, *hw, min_pixels=12544, max_pixels=9633792)
    assert got == resized and (got[0] // 14) * (got[1] // 14) // 4 == tokens


def test_smart_resize_class_default_max():
    h, w = smart_resize(2, 3000, 4000, max_pixels=ImageProcessorConfig().max_pixels)
    assert (h // 14) * (w // 14) // 4 == 7500  # spec: 7500 tokens with the class default 28*28*15000


# Inputs under 28 px (transformers 5.x rule), worked by hand:
#   15x53: scale 28/15 -> 28x98; round -> 28x112 (round(3.5) = 4); 2*28*112 < 12544 -> beta = sqrt(12544/5488)
#          = 1.512 -> ceil(1.512)*28 = 56, ceil(98*1.512/28 = 5.29)*28 = 168
#   10x10: scale 2.8 -> 28x28; 1568 < 12544 -> beta = sqrt(8) = 2.83 -> 3*28 = 84 each side
#   20x27: scale 1.4 -> 28x37; round -> 28x28; beta = sqrt(12544/2072) = 2.46 -> ceil(2.46) = 3 -> 84,
#          ceil(37*2.46/28 = 3.25) = 4 -> 112
#   1x100: scale 28 -> 28x2800 (ratio 100); 2*28*2800 is inside the limits -> 28x2800
TINY_TABLE = [((15, 53), (56, 168)), ((10, 10), (84, 84)), ((20, 27), (84, 112)), ((1, 100), (28, 2800))]


@pytest.mark.parametrize("hw, resized", TINY_TABLE)
def test_smart_resize_scales_up_tiny_images(hw, resized):
    assert smart_resize(2, *hw, min_pixels=12544, max_pixels=9633792) == resized
    from transformers.models.glm4v.image_processing_glm4v import smart_resize as hf_smart_resize
    with pytest.raises(ValueError, match="larger than factor"):  # the 4.57 behaviour we replace
        hf_smart_resize(2, *hw, min_pixels=12544, max_pixels=9633792)


def test_smart_resize_aspect_ratio_limit():
    assert smart_resize(2, 28, 5600, min_pixels=12544, max_pixels=9633792) == (28, 5600)  # exactly 200
    with pytest.raises(AspectRatioError, match="aspect ratio"):
        smart_resize(2, 28, 5629, source="wide.png")
    with pytest.raises(AspectRatioError, match="2x500"):
        smart_resize(2, 2, 500, source="thin.png")  # scaled to 28x7000 first: ratio 250


def test_tiny_image_end_to_end(processor):
    out = processor(text="<|image|>", images=[_rng_image(15, 53, 3)])
    assert out["image_grid_thw"].tolist() == [[1, 4, 12]]  # 56x168 -> 4x12 patches
    assert out["pixel_values"].shape == (48, 1176) and int((out["input_ids"] == processor.image_token_id).sum()) == 12


# ---------------------------------------------------------------------------------------------------- HF parity
def _exif_rotated_jpeg(path):
    image = _rng_image(60, 100, 7)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(path, exif=exif, quality=95)
    return path


def _sixteen_bit_png(path):
    ramp = (np.arange(64 * 96).reshape(64, 96) * 10 % 65536).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    return path


def _palette_with_transparency():
    image = _rng_image(50, 70, 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    image.info["transparency"] = 0
    return image


CASES = {
    "rgb_480x640": lambda tmp: _rng_image(480, 640, 0),
    "rgb_odd_333x517": lambda tmp: _rng_image(333, 517, 1),
    "min_28x28": lambda tmp: _rng_image(28, 28, 2),
    "small_30x45": lambda tmp: _rng_image(30, 45, 3),
    "very_wide_28x5000": lambda tmp: _rng_image(28, 5000, 5),
    "very_tall_2000x30": lambda tmp: _rng_image(2000, 30, 6),
    "rgba": lambda tmp: _rng_image(90, 120, 8, "RGBA"),
    "la": lambda tmp: _rng_image(90, 120, 9, "RGBA").convert("LA"),
    "palette_transparency": lambda tmp: _palette_with_transparency(),
    "grayscale": lambda tmp: _rng_image(77, 55, 10, "L"),
    "bilevel": lambda tmp: _rng_image(64, 64, 11, "1"),
    "cmyk": lambda tmp: _rng_image(64, 80, 12, "CMYK"),
    "png_file": lambda tmp: (_rng_image(99, 150, 13).save(tmp / "x.png"), str(tmp / "x.png"))[1],
    "exif_rotated_jpeg": lambda tmp: _exif_rotated_jpeg(str(tmp / "rot.jpg")),
    "sixteen_bit_png": lambda tmp: _sixteen_bit_png(str(tmp / "deep.png")),
}


def _hf_view(source):
    """What HF is fed: EXIF already applied and 16-bit already reduced (our two deliberate fixes)."""
    image = Image.open(source) if isinstance(source, str) else source
    image = ImageOps.exif_transpose(image)
    return to_rgb(image) if image.mode.startswith("I") else image


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_image_matches_transformers(case, processor, hf, tmp_path):
    source = CASES[case](tmp_path)
    conversation = [{"role": "user", "content": [{"type": "image", "image": source},
                                                 {"type": "text", "text": "Describe this image in detail."}]}]
    ours = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    encoded, result = _hf_expected(hf, [conversation], [_hf_view(source)])
    _assert_parity(ours, encoded, result)


def test_exif_orientation_is_applied(processor, tmp_path):
    path = _exif_rotated_jpeg(str(tmp_path / "rot.jpg"))
    grid = processor(text="<|image|>", images=[path])["image_grid_thw"][0].tolist()
    upright = processor(text="<|image|>", images=[Image.open(path)])["image_grid_thw"][0].tolist()
    assert grid == upright == [1, smart_resize(2, 100, 60, min_pixels=12544, max_pixels=9633792)[0] // 14,
                               smart_resize(2, 100, 60, min_pixels=12544, max_pixels=9633792)[1] // 14]


def test_sixteen_bit_keeps_detail_where_transformers_clips(hf, tmp_path):
    path = _sixteen_bit_png(str(tmp_path / "deep.png"))
    raw = Image.open(path)
    ours = np.asarray(to_rgb(raw))[..., 0]
    np.testing.assert_array_equal(ours, (np.asarray(raw).astype(np.int64) >> 8).astype(np.uint8))
    clipped = np.asarray(raw.convert("RGB"))[..., 0]  # what 4.57's convert_to_rgb does
    assert (clipped == 255).mean() > 0.9 and len(np.unique(ours)) > 100


def test_multi_image_prompt_matches_transformers(processor, hf, tmp_path):
    sources = [_rng_image(480, 640, 20), str(tmp_path / "b.png"), _rng_image(40, 1200, 21, "L"),
               _rng_image(300, 90, 22, "RGBA")]
    _rng_image(200, 260, 23).save(sources[1])
    conversation = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": [{"type": "text", "text": "Compare "},
                                                 {"type": "image", "image": sources[0]},
                                                 {"type": "image", "path": sources[1]},
                                                 {"type": "text", "text": " with "},
                                                 {"type": "image", "image": sources[2]},
                                                 {"type": "image", "image": sources[3]}]}]
    ours = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    encoded, result = _hf_expected(hf, [conversation], [_hf_view(s) for s in sources])
    _assert_parity(ours, encoded, result)
    assert len(ours["image_grid_thw"]) == 4


def test_left_padded_batch_matches_transformers(processor, hf):
    images = [_rng_image(100, 100, 30), _rng_image(480, 640, 31), _rng_image(64, 200, 32)]
    batch = [[{"role": "user", "content": [{"type": "image", "image": images[0]},
                                           {"type": "text", "text": "What is this?"}]}],
             [{"role": "user", "content": [{"type": "image", "image": images[1]},
                                           {"type": "image", "image": images[2]},
                                           {"type": "text", "text": "How many apples are on the plate?"}]}],
             [{"role": "user", "content": "Text only, no image."}]]
    ours = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True)
    encoded, result = _hf_expected(hf, batch, images)
    _assert_parity(ours, encoded, result)
    pad = processor.tokenizer.pad_token_id
    lengths = ours["attention_mask"].sum(axis=1)
    for row, n in zip(ours["input_ids"], lengths):  # padding sits on the left, content on the right
        assert (row[: len(row) - n] == pad).all() and ours["input_ids"].shape[1] == lengths.max()
    assert ours["attention_mask"][0, 0] == 0 and ours["attention_mask"][1].all()


def test_downscaling_path_matches_transformers(folder, tmp_path, hf):
    small = str(tmp_path / "small")
    os.makedirs(small)
    for name in os.listdir(folder):
        if name != "preprocessor_config.json":
            os.symlink(os.path.join(folder, name), os.path.join(small, name))
    _write_preprocessor_config(small, {"shortest_edge": 3136, "longest_edge": 200_000})
    from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor
    hf_small = (hf[0], Glm4vImageProcessor.from_pretrained(small))
    processor = Glm4vProcessor.from_pretrained(small)
    images = [_rng_image(800, 1000, 40), _rng_image(1500, 333, 41)]
    conversation = _conversation(2)
    conversation[0]["content"] = [{"type": "image", "image": im} for im in images] + conversation[0]["content"][2:]
    ours = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    diff = _assert_parity(ours, *_hf_expected(hf_small, [conversation], images))
    assert diff <= TOL and (ours["image_grid_thw"][:, 1:] * 14).prod(axis=1).max() * 2 <= 200_000


def test_call_equals_chat_template(processor):
    image = _rng_image(120, 160, 50)
    conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "Describe."}]}]
    via_template = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    via_call = processor(text=prompt, images=image)
    for key in via_template:
        np.testing.assert_array_equal(via_template[key], via_call[key])
    assert via_call.input_ids is via_call["input_ids"]


def test_numpy_inputs_match_pil(processor):
    image = _rng_image(70, 90, 60)
    as_pil = processor(text="<|image|>", images=[image])["pixel_values"]
    as_uint8 = processor(text="<|image|>", images=[np.asarray(image)])["pixel_values"]
    as_float = processor(text="<|image|>", images=[np.asarray(image) / 255.0])["pixel_values"]
    np.testing.assert_array_equal(as_pil, as_uint8)
    np.testing.assert_array_equal(as_pil, as_float)


def test_placeholder_count_mismatch(processor):
    with pytest.raises(PromptError, match="2 <\\|image\\|> placeholder"):
        processor(text="<|image|> and <|image|>", images=[_rng_image(40, 40, 70)])


def test_decode_roundtrip(processor):
    out = processor.apply_chat_template(_conversation(0, "The answer is 42."), add_generation_prompt=True,
                                        tokenize=True, return_dict=True)
    text = processor.decode(out["input_ids"][0])
    assert text == "[gMASK]<sop><|user|>\nThe answer is 42.<|assistant|>\n"
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=True) == ["\nThe answer is 42.\n"]
    generated = np.asarray(processor.tokenizer.encode("<think>x</think><answer>7</answer><|endoftext|>"))
    assert processor.post_process_image_text_to_text(generated) == ["<think>x</think><answer>7</answer>"]
