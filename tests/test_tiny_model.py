"""The built-in tiny model and the smoke tool: the folder is complete, loads strictly, and the CLI reports errors
in one line without a traceback."""

import json
import os

import numpy as np
import pytest

from glm4v_ms import Glm4vForConditionalGeneration
from glm4v_ms.apps.tiny import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_model_folder_loads_and_runs(tmp_path):
    folder = make_tiny_model(str(tmp_path / "tiny"), seed=3)
    for f in ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json"):
        assert os.path.exists(os.path.join(folder, f)), f
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tiny-")], "temporary folder left behind"
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    c = model.config
    ids = np.array([[1, 2, c.image_start_token_id] + [c.image_token_id] * 4 + [c.image_end_token_id, 3]])
    pv = np.random.default_rng(0).standard_normal((16, 1176)).astype(np.float32)
    logits = model(input_ids=ids, pixel_values=pv, image_grid_thw=np.array([[1, 4, 4]])).logits.asnumpy()
    assert logits.shape == (1, ids.shape[1], c.text.vocab_size) and np.isfinite(logits).all()
    with open(os.path.join(folder, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == c.text.eos_token_id
    with pytest.raises(FileExistsError, match="already exists"):
        make_tiny_model(folder)
