"""The files of a checkpoint folder that set up the processor: image / video settings in their 4.x and 5.x forms,
the processor family (GLM-4.1V or GLM-4.6V rules), and the tokenizer (also when saved by transformers 5.x)."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

from .image_processing import ImageProcessorConfig
from .video_processing import VideoProcessorConfig


def read_json(path: str) -> Optional[Dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e}); re-download the checkpoint file") from None


PROCESSOR_FAMILIES = ("glm4v", "glm46v")


def read_processor_configs(folder: str) -> Tuple[ImageProcessorConfig, VideoProcessorConfig, str]:
    """Image and video settings and the processor family of a checkpoint folder, in every form seen in the wild.

    * transformers 4.x: ``preprocessor_config.json`` (image) and ``video_preprocessor_config.json`` (video); without
      the video file, 4.57 takes the video settings from ``preprocessor_config.json`` and so do we.
    * transformers 5.x: one ``processor_config.json`` with ``image_processor`` and ``video_processor`` objects
      (used for whatever the separate files do not give; a separate file wins, it is what 4.x reads).
    * pixel limits as ``min_pixels`` / ``max_pixels`` or ``size: {shortest_edge, longest_edge}``; the video's fps,
      ``max_duration`` and ``do_sample_frames`` from its own config.
    Family: "glm46v" when a ``processor_class`` / ``*_processor_type`` names a Glm46V class (GLM-4.6V's files:
    timestamps "3.0 seconds" and its frame-sampling rule), else "glm4v". Without any file: the class defaults.
    """
    image_dict = read_json(os.path.join(folder, "preprocessor_config.json"))
    video_dict = read_json(os.path.join(folder, "video_preprocessor_config.json"))
    combined = read_json(os.path.join(folder, "processor_config.json")) or {}
    image_name = f"{folder}/preprocessor_config.json"
    if image_dict is None and isinstance(combined.get("image_processor"), dict):
        image_dict, image_name = combined["image_processor"], f"{folder}/processor_config.json: image_processor"
    video_name = f"{folder}/video_preprocessor_config.json"
    if video_dict is None and isinstance(combined.get("video_processor"), dict):
        video_dict, video_name = combined["video_processor"], f"{folder}/processor_config.json: video_processor"
    if video_dict is None:
        video_dict, video_name = image_dict, image_name
    names = [d.get(k) for d in (image_dict or {}, video_dict or {}, combined)
             for k in ("processor_class", "image_processor_type", "video_processor_type")]
    family = "glm46v" if any(isinstance(n, str) and n.startswith("Glm46V") for n in names) else "glm4v"
    image_config = ImageProcessorConfig.from_dict(image_dict or {}, image_name)
    video_config = VideoProcessorConfig.from_dict(dict(video_dict or {}), video_name)
    if family == "glm46v":
        video_config.sampling = "glm46v"
    return image_config, video_config, family


# tokenizer_config.json keys of transformers 5.x that 4.57's PreTrainedTokenizerFast cannot take
_TOKENIZER_5X_KEYS = ("tokenizer_class", "backend", "extra_special_tokens", "auto_map", "processor_class", "is_local")


def load_tokenizer(folder: str, auto, kwargs: Dict):
    """AutoTokenizer; for a folder saved by transformers 5.x (``tokenizer_class: TokenizersBackend``, a list of
    ``extra_special_tokens``; GLM-4.6V-era files), which 4.57 refuses, the same tokenizer.json is loaded as a
    PreTrainedTokenizerFast with the config's plain settings (special tokens stay in tokenizer.json's added
    tokens, so their ids are unchanged)."""
    try:
        return auto.from_pretrained(folder, **kwargs)
    except ValueError as e:
        config = read_json(os.path.join(folder, "tokenizer_config.json")) or {}
        tokenizer_file = os.path.join(folder, "tokenizer.json")
        if "does not exist or is not currently imported" not in str(e) or not os.path.isfile(tokenizer_file):
            raise
    from transformers import PreTrainedTokenizerFast

    settings = {k: v for k, v in config.items() if k not in _TOKENIZER_5X_KEYS and k != "added_tokens_decoder"}
    settings.update(kwargs)
    return PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, name_or_path=folder, **settings)
