"""Glm4vConfig from config.json: nested and flat layouts, rope_scaling (4.x) and rope_parameters (5.x), checks."""

import json

import pytest

from reference import tiny_config_dict
from glm4v_ms import Glm4vConfig

# The 9B hub file as it is believed to be: flat text fields, rope_scaling (spec section 1).
HUB_9B_FLAT = {
    "architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v", "attention_bias": True,
    "attention_dropout": 0.0, "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338, 151348],
    "image_start_token_id": 151339, "image_end_token_id": 151340, "video_start_token_id": 151341,
    "video_end_token_id": 151342, "image_token_id": 151343, "video_token_id": 151344, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 65536,
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2, "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": {"type": "default", "mrope_section": [8, 12, 12]},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.53.0dev", "use_cache": True,
    "vocab_size": 151552,
    "vision_config": {"hidden_size": 1536, "depth": 24, "num_heads": 12, "attention_bias": False,
                      "intermediate_size": 13696, "hidden_act": "silu", "hidden_dropout_prob": 0.0,
                      "initializer_range": 0.02, "image_size": 336, "patch_size": 14, "out_hidden_size": 4096,
                      "rms_norm_eps": 1e-05, "spatial_merge_size": 2, "temporal_patch_size": 2},
}


def test_9b_flat_hub_layout():
    c = Glm4vConfig.from_dict(HUB_9B_FLAT)
    t, v = c.text, c.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (4096, 40, 32, 2)
    assert (t.head_dim, t.rotary_dim, t.mrope_section) == (128, 64, [8, 12, 12])
    assert t.max_position_embeddings == 65536 and t.eos_token_id == [151329, 151336, 151338, 151348]
    assert t.pad_token_id == 151329 and not c.tie_word_embeddings
    assert (v.depth, v.hidden_size, v.head_dim, v.out_hidden_size, v.intermediate_size) == (24, 1536, 128, 4096, 13696)
    assert v.num_positions_side == 24 and v.patch_dim == 1176
    assert (c.image_token_id, c.video_start_token_id, c.video_end_token_id) == (151343, 151341, 151342)


def test_nested_and_5x_layouts_give_the_same_config():
    flat = Glm4vConfig.from_dict(HUB_9B_FLAT)
    text = {k: v for k, v in HUB_9B_FLAT.items() if k not in ("vision_config",) and not k.endswith("token_id")
            or k in ("pad_token_id", "eos_token_id")}
    nested = {k: v for k, v in HUB_9B_FLAT.items() if k.endswith("token_id") and k not in ("pad_token_id", "eos_token_id")}
    nested.update({"model_type": "glm4v", "vision_config": HUB_9B_FLAT["vision_config"], "text_config": text})
    assert Glm4vConfig.from_dict(nested) == flat
    v5 = json.loads(json.dumps(nested))
    tc = v5["text_config"]
    tc["rope_parameters"] = {"rope_type": "default", "mrope_section": tc.pop("rope_scaling")["mrope_section"],
                             "rope_theta": tc.pop("rope_theta"), "partial_rotary_factor": tc.pop("partial_rotary_factor")}
    assert Glm4vConfig.from_dict(v5) == flat


def test_unknown_keys_ignored_and_defaults():
    d = tiny_config_dict()
    d["some_future_field"] = {"x": 1}
    d["text_config"]["another_one"] = 3
    d["text_config"].pop("partial_rotary_factor")  # absent means 1.0
    d["text_config"]["rope_scaling"]["mrope_section"] = [4, 6, 6]
    c = Glm4vConfig.from_dict(d)
    assert c.text.partial_rotary_factor == 1.0 and c.text.rotary_dim == 32


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d["text_config"].update(num_attention_heads=3), "text_config.hidden_size"),
    (lambda d: d["text_config"]["rope_scaling"].update(mrope_section=[2, 2, 2]), "mrope_section"),
    (lambda d: d["text_config"].update(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (lambda d: d["text_config"].update(hidden_act="gelu"), "text_config.hidden_act"),
    (lambda d: d["text_config"].update(num_hidden_layers=0), "text_config.num_hidden_layers"),
    (lambda d: d["vision_config"].update(num_heads=5), "vision_config.hidden_size"),
    (lambda d: d["vision_config"].update(out_hidden_size=32), "vision_config.out_hidden_size"),
    (lambda d: d.update(image_token_id=10 ** 6), "image_token_id"),
    (lambda d: d.update(model_type="qwen2_vl"), "model_type"),
    (lambda d: d["text_config"].update(head_dim=16), "text_config.head_dim"),
])
def test_impossible_config_names_the_field(mutate, field):
    d = tiny_config_dict()
    mutate(d)
    with pytest.raises(ValueError, match=rf"config field '[^']*({field})"):
        Glm4vConfig.from_dict(d)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Glm4vConfig.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Glm4vConfig.from_pretrained(str(tmp_path))
