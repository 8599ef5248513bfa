"""GLM-4.6V-Flash's files: config under both model_type names, ids from the files, parity with transformers 4.57.6.

The tiny GLM-4.6V-Flash model (apps/tiny.py, variant "4.6v") has 4.6V's token ids at their real offsets from
<|endoftext|> (video span at +32 / +33 instead of 4.1V's +12 / +13), its processor files (size form, Glm46V
processor class) and its 131072-position context. transformers 4.57.6's Glm4vForConditionalGeneration reads those
ids from config.json; our model must match it on prompts built by our processor from an image and from a video.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from reference import rel_err
from test_parity import run_case
from glm4v_ms import Glm4vConfig, Glm4vForConditionalGeneration, generate
from glm4v_ms.apps.tiny import make_tiny_model
from glm4v_ms.model.rope import get_rope_index
from glm4v_ms.processing.processor import Glm4vProcessor
from glm4v_ms.processing.video_processing import Video

TOL = 1e-5


@pytest.fixture(scope="module")
def folder46(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny46") / "m"), variant="4.6v")


@pytest.fixture(scope="module")
def folder46_5x(folder46, tmp_path_factory):
    """The same checkpoint as transformers 5.x saves it: model_type glm46v (Glm46VConfig), rope_parameters, one
    processor_config.json instead of the two preprocessor files."""
    dst = str(tmp_path_factory.mktemp("tiny46_5x") / "m")
    shutil.copytree(folder46, dst)
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    text = cfg["text_config"]
    rope = text.pop("rope_scaling")
    text["rope_parameters"] = {"rope_type": rope["type"], "mrope_section": rope["mrope_section"],
                               "rope_theta": text.pop("rope_theta"),
                               "partial_rotary_factor": text.pop("partial_rotary_factor")}
    cfg.update(model_type="glm46v", architectures=["Glm46VForConditionalGeneration"])
    cfg["vision_config"]["model_type"] = "glm4v_vision"
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    image = json.load(open(os.path.join(dst, "preprocessor_config.json")))
    video = json.load(open(os.path.join(dst, "video_preprocessor_config.json")))
    os.remove(os.path.join(dst, "preprocessor_config.json"))
    os.remove(os.path.join(dst, "video_preprocessor_config.json"))
    with open(os.path.join(dst, "processor_config.json"), "w") as f:
        json.dump({"image_processor": image, "video_processor": video, "processor_class": "Glm46VProcessor"}, f)
    return dst


@pytest.fixture(scope="module")
def ref46(folder46):
    from transformers import Glm4vForConditionalGeneration as HF

    model = HF.from_pretrained(folder46, torch_dtype=torch.float32, attn_implementation="eager").eval()
    for sub in (model.config, model.model.visual.config, model.model.language_model.config):
        sub._attn_implementation = "eager"
    return model


def _image_inputs(processor):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)


def _video_inputs(processor):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (6, 64, 84, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video", "video": Video.from_frames(frames, 2.0)},
                                             {"type": "text", "text": "Describe the video."}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)


def test_files_of_the_tiny_46v_model(folder46):
    cfg = Glm4vConfig.from_pretrained(folder46)
    proc = Glm4vProcessor.from_pretrained(folder46)
    eot = proc.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    offsets = {k: getattr(cfg, k) - eot for k in ("image_start_token_id", "image_end_token_id", "image_token_id",
                                                  "video_token_id", "video_start_token_id", "video_end_token_id")}
    # GLM-4.6V-Flash: 151339, 151340, 151343, 151344, 151361, 151362 - 151329
    assert offsets == {"image_start_token_id": 10, "image_end_token_id": 11, "image_token_id": 14,
                       "video_token_id": 15, "video_start_token_id": 32, "video_end_token_id": 33}
    assert proc.tokenizer.convert_tokens_to_ids("<|begin_of_video|>") == cfg.video_start_token_id
    assert cfg.text.max_position_embeddings == 131072
    assert proc.family == "glm46v"
    assert (proc.image_config.min_pixels, proc.image_config.max_pixels) == (12544, 9633792)
    assert (proc.video_config.min_pixels, proc.video_config.max_pixels) == (12544, 100352000)
    assert proc.video_config.sampling == "glm46v"


def test_5x_saved_folder_reads_the_same(folder46, folder46_5x):
    a, b = Glm4vConfig.from_pretrained(folder46), Glm4vConfig.from_pretrained(folder46_5x)
    assert b.model_type == "glm46v" and a.model_type == "glm4v"
    assert (a.text, a.vision) == (b.text, b.vision)
    assert [getattr(a, k) for k in ("image_token_id", "video_start_token_id", "video_end_token_id")] == \
        [getattr(b, k) for k in ("image_token_id", "video_start_token_id", "video_end_token_id")]
    pa, pb = Glm4vProcessor.from_pretrained(folder46), Glm4vProcessor.from_pretrained(folder46_5x)
    assert (pa.image_config, pa.video_config, pa.family) == (pb.image_config, pb.video_config, pb.family)


@pytest.mark.parametrize("layout", ["4.x", "5.x"])
@pytest.mark.parametrize("media", ["image", "video"])
def test_parity_with_transformers(folder46, folder46_5x, ref46, layout, media):
    folder = folder46 if layout == "4.x" else folder46_5x
    processor = Glm4vProcessor.from_pretrained(folder)
    inputs = _image_inputs(processor) if media == "image" else _video_inputs(processor)
    ids = inputs["input_ids"]
    cfg = Glm4vConfig.from_pretrained(folder)
    if media == "video":
        assert (ids == cfg.video_start_token_id).sum() == 1 and (ids == cfg.video_end_token_id).sum() == 1
        assert "0.0 seconds" in processor.decode(ids[0]), "GLM-4.6V writes frame times as '0.0 seconds'"
        # With 4.1V's video ids (offset +12 / +13) the video's tokens would be taken for images, which have no
        # grids here: the ids the files give are the ones that count.
        eot = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        with pytest.raises(ValueError, match="more image token runs"):
            get_rope_index(ids, None, inputs["video_grid_thw"], inputs["attention_mask"],
                           image_token_id=cfg.image_token_id, video_start_token_id=eot + 12,
                           video_end_token_id=eot + 13, spatial_merge_size=cfg.vision.spatial_merge_size)
        get_rope_index(ids, None, inputs["video_grid_thw"], inputs["attention_mask"],  # the right ids: no error
                       image_token_id=cfg.image_token_id, video_start_token_id=cfg.video_start_token_id,
                       video_end_token_id=cfg.video_end_token_id, spatial_merge_size=cfg.vision.spatial_merge_size)
    kw = {k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    run_case(f"4.6V {layout} {media}", folder, ref46, ids, inputs["attention_mask"],
             pv=kw["pixel_values"], grid=kw["image_grid_thw"], pvv=kw["pixel_values_videos"],
             vgrid=kw["video_grid_thw"])


@pytest.mark.parametrize("media", ["image", "video"])
def test_greedy_tokens_equal_transformers(folder46_5x, ref46, media):
    processor = Glm4vProcessor.from_pretrained(folder46_5x)
    inputs = _image_inputs(processor) if media == "image" else _video_inputs(processor)
    model = Glm4vForConditionalGeneration.from_pretrained(folder46_5x)
    new = 12
    ours = generate(model, **inputs, max_new_tokens=new, eos_token_id=[], do_sample=False)
    t = {k: torch.tensor(v) for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        theirs = ref46.generate(**t, do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_short_request_on_128k_context_allocates_what_it_needs(folder46):
    """A 131072-position model: the cache of a short request is sized to the request, in both modes."""
    from glm4v_ms.model.kv_cache import kv_cache_bytes
    from glm4v_ms.runtime.generation import GenerationConfig, open_session

    model = Glm4vForConditionalGeneration.from_pretrained(folder46)
    t = model.config.text
    gen = GenerationConfig(max_new_tokens=40, do_sample=False)
    for mode, expect in (("eager", 100 + 40), ("graph", 256)):
        _, cache = open_session(model, gen, 1, 100, mode=mode)
        assert cache.max_len == expect, (mode, cache.max_len)
        assert cache.k[0].shape[2] == expect
    per_token = kv_cache_bytes(t, batch=1, positions=1, dtype_bytes=4)
    assert per_token == t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * 4
    assert kv_cache_bytes(t, 1, 131072, 4) == 131072 * per_token


def test_kv_cache_estimate_of_the_9b_at_128k():
    cfg = Glm4vConfig.from_dict({"model_type": "glm4v", "text_config": {
        "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 2, "num_hidden_layers": 40,
        "max_position_embeddings": 131072, "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "default", "mrope_section": [8, 12, 12]}}})
    from glm4v_ms.model.kv_cache import kv_cache_bytes

    # 40 layers x (k, v) x 2 KV heads x 128 dims x 2 bytes = 40 KiB per position; 131072 positions = 5 GiB
    assert kv_cache_bytes(cfg.text, 1, 1, 2) == 40 * 1024
    assert kv_cache_bytes(cfg.text, 1, 131072, 2) == 5 * 1024 ** 3


def _hub_46v(**top):
    text = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 2, "num_hidden_layers": 40,
            "max_position_embeddings": 131072, "model_type": "glm4v_text",
            "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 500000.0,
                                "partial_rotary_factor": 0.5}}
    return dict({"model_type": "glm46v", "architectures": ["Glm46VForConditionalGeneration"], "text_config": text,
                 "vision_config": {"model_type": "glm4v_vision"}}, **top)


def test_glm46v_config_ids_defaults_and_file_values():
    c = Glm4vConfig.from_dict(_hub_46v())
    # Glm46VConfig's class defaults when the file omits the ids
    assert (c.video_start_token_id, c.video_end_token_id, c.image_token_id) == (151361, 151362, 151343)
    assert (c.text.rope_theta, c.text.rotary_dim, c.text.max_position_embeddings) == (500000.0, 64, 131072)
    # a value in the file wins, under either model_type
    c = Glm4vConfig.from_dict(_hub_46v(video_start_token_id=151341, video_end_token_id=151342))
    assert (c.video_start_token_id, c.video_end_token_id) == (151341, 151342)
    c = Glm4vConfig.from_dict(_hub_46v(model_type="glm4v", architectures=["Glm4vForConditionalGeneration"],
                                       video_start_token_id=151361, video_end_token_id=151362))
    assert (c.model_type, c.video_start_token_id) == ("glm4v", 151361)
    # glm4v without the ids keeps Glm4vConfig's defaults (4.1V's)
    assert Glm4vConfig.from_dict(_hub_46v(model_type="glm4v")).video_start_token_id == 151341


@pytest.mark.parametrize("change, field", [
    ({"model_type": "qwen2_vl"}, "model_type"),
    ({"architectures": ["Qwen2VLForConditionalGeneration"]}, "architectures"),
    # a dense folder whose text config is a MoE one, and the other way round: refused, never half-read
    ({"text_config": {"model_type": "glm4v_moe_text", "hidden_size": 64, "num_attention_heads": 2}},
     "text_config.model_type"),
    ({"model_type": "glm4v_moe", "architectures": ["Glm4vMoeForConditionalGeneration"],
      "text_config": {"model_type": "glm4v_text", "hidden_size": 64, "num_attention_heads": 2}},
     "text_config.model_type"),
])
def test_foreign_and_mixed_configs_are_refused_by_name(change, field):
    with pytest.raises(ValueError, match=f"config field '{field}'"):
        Glm4vConfig.from_dict(_hub_46v(**change))


def test_parity_tool_on_a_5x_saved_46v_folder(folder46_5x, tmp_path, capsys):
    """tools/parity.py reads a glm46v / rope_parameters folder for the 4.57 reference through our parser, so the
    reference gets the M-RoPE sections and the file's video ids (4.57 alone would ignore both)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("parity_tool_46v", os.path.join(root, "tools", "parity.py"))
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    legacy = parity.reference_config_457(folder46_5x)
    cfg = Glm4vConfig.from_pretrained(folder46_5x)
    assert legacy["video_start_token_id"] == cfg.video_start_token_id
    assert legacy["text_config"]["rope_scaling"]["mrope_section"] == cfg.text.mrope_section
    image = str(tmp_path / "p.png")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(image)
    rc = parity.main([folder46_5x, "--image", image, "--prompt", "What is this?", "--json", "--tokens", "6"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert rc == 0 and report["verdict"] == "PASS", (report.get("failed"), err[-1500:])
    assert report["tokens"]["ours"] == report["tokens"]["reference"]
