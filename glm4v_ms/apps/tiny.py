"""A tiny random GLM-4.1V checkpoint in the Hugging Face layout, made from numpy (no torch, no network).

Used by the README's main command and by tests. Its weights are random: whatever it generates is random text.
The folder is written to a temporary sibling and renamed into place, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Dict

import numpy as np
from safetensors.numpy import save_file

TINY_TEXT = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "hidden_act": "silu", "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_scaling": {"type": "default", "mrope_section": [2, 3, 3]},
    "attention_bias": True, "tie_word_embeddings": False, "model_type": "glm4v_text",
}
TINY_VISION = {
    "depth": 2, "hidden_size": 48, "num_heads": 4, "intermediate_size": 80, "out_hidden_size": 64, "hidden_act": "silu",
    "attention_bias": False, "in_channels": 3, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2,
    "image_size": 336, "rms_norm_eps": 1e-5, "model_type": "glm4v",
}


# GLM-4.6V-Flash's differences that live in the files: a 128K context (the hub lists 131072 positions) and the
# image processor's size form. The tiny model keeps a small rope theta: its positions stay short.
TINY_46V_TEXT = {"max_position_embeddings": 131072}
# GLM-4.5V (glm4v_moe, the mixture-of-experts decoder, transformers 4.57's Glm4vMoeTextConfig fields), scaled down
# so that every MoE path runs: layer 0 dense (first_k_dense_replace 1), layer 1 a mixture of 8 routed experts in
# 2 groups of which the router keeps 1 (n_group 2, topk_group 1), top 2, 2 shared experts, a non-zero
# e_score_correction_bias (random, in the weights). 65536 positions as GLM-4.5V's config.json.
TINY_45V_TEXT = {
    "model_type": "glm4v_moe_text", "head_dim": 32, "max_position_embeddings": 65536, "moe_intermediate_size": 32,
    "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 2, "n_group": 2, "topk_group": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
}
VARIANTS = ("4.1v", "4.6v", "4.5v")


def tiny_config(vocab_size: int, token_ids: Dict, variant: str = "4.1v") -> Dict:
    """config.json of the tiny model (nested 4.57 layout); token ids come from its tokenizer."""
    extra = {"4.6v": TINY_46V_TEXT, "4.5v": TINY_45V_TEXT}.get(variant, {})
    text = dict(TINY_TEXT, vocab_size=vocab_size, pad_token_id=token_ids["pad_token_id"],
                eos_token_id=list(token_ids["eos_token_id"]), **extra)
    top = {k: token_ids[k] for k in ("image_token_id", "video_token_id", "image_start_token_id",
                                     "image_end_token_id", "video_start_token_id", "video_end_token_id")}
    moe = variant == "4.5v"
    return dict({"architectures": ["Glm4vMoeForConditionalGeneration" if moe else "Glm4vForConditionalGeneration"],
                 "model_type": "glm4v_moe" if moe else "glm4v", "tie_word_embeddings": False,
                 "torch_dtype": "float32", "text_config": text,
                 "vision_config": dict(TINY_VISION, model_type="glm4v_moe" if moe else "glm4v")}, **top)


def checkpoint_shapes(config_dict: Dict) -> Dict[str, tuple]:
    """Name -> shape of every tensor of the Hugging Face checkpoint of the model ``config_dict`` describes. Dense
    models: our parameters (their names and shapes are the checkpoint's). MoE models: the checkpoint's per-expert
    and separate gate / up tensors, as the loader expects them (Glm4vMoeForConditionalGeneration.checkpoint_plan),
    not our fused parameters."""
    from ..model.config import Glm4vConfig
    from ..model.loading import model_class

    config = Glm4vConfig.from_dict(config_dict)
    model = model_class(config)(config)  # lazy: allocates nothing
    if config.is_moe:
        return dict(model.checkpoint_plan()[1])
    return {name: tuple(p.shape) for name, p in model.parameters_and_names()}


def random_weights(config_dict: Dict, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random weights for every tensor of the checkpoint of the model ``config_dict`` describes
    (``checkpoint_shapes``): 1/sqrt(fan_in) matrices, norm weights near 1, small biases (the MoE router's
    e_score_correction_bias among them), a unit-variance position table."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in checkpoint_shapes(config_dict).items():
        if name.endswith("position_embedding.weight") or name.endswith("embed_tokens.weight"):
            w = rng.standard_normal(shape)
        elif len(shape) == 1 and "norm" in name and name.endswith("weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            w = 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / math.sqrt(int(np.prod(shape[1:])))
        out[name] = w.astype(np.float32)
    return out


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _check_target(folder: str, overwrite: bool) -> None:
    """Refuse, with one line naming the path, what would fail half-way or destroy data: a path under a file, an
    existing file, and (even with ``overwrite``) an existing folder that is not a model folder (no config.json; an
    empty folder is fine), the working or the home directory."""
    probe = os.path.dirname(folder)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe) if os.path.dirname(probe) != probe else ""
    if probe and not os.path.isdir(probe):
        raise NotADirectoryError(f"cannot create {folder}: {probe} is a file, not a folder; choose another path")
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder) or os.path.islink(folder):
        raise FileExistsError(f"{folder} already exists and is not a folder; choose another path")
    real = os.path.realpath(folder)
    for special, what in ((os.getcwd(), "the working directory"), (os.path.expanduser("~"), "the home directory")):
        if real == os.path.realpath(special):
            raise FileExistsError(f"{folder} is {what}; it is never replaced: choose a new folder path")
    if not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True (--force) to replace it")
    if os.listdir(folder) and not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileExistsError(f"{folder} is not a model folder (no config.json) and is not empty; it is never "
                              "replaced, even with --force: choose another path")


def make_tiny_model(folder: str, seed: int = 0, overwrite: bool = False, variant: str = "4.1v") -> str:
    """Create a complete HF-layout GLM-4.1V folder at ``folder``: config.json, model.safetensors, tokenizer files
    with the chat template, preprocessor_config.json and generation_config.json. Returns the folder.

    ``variant="4.6v"``: GLM-4.6V-Flash's files instead: its token ids (video span at <|endoftext|> + 32 / 33), tool
    tokens and a tool-calling chat template, a 131072-position context, the processor configs as published
    (``processor_class`` Glm46VProcessor, image ``size`` 12544 .. 9,633,792, a video_preprocessor_config.json with
    ``size`` 12544 .. 100,352,000).

    ``variant="4.5v"``: a tiny GLM-4.5V (glm4v_moe: the mixture-of-experts decoder, TINY_45V_TEXT) with GLM-4.5V's
    token ids at their real offsets (<|image|> / <|video|> at <|endoftext|> + 34 / 35), 4.6V's tool-calling
    template and GLM-4.1V's processor file (GLM-4.5V uses Glm4vProcessor). Its weights are in the Hugging Face
    MoE layout (per-expert gate / up / down tensors, fp32 e_score_correction_bias)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny model variant {variant!r}; use one of {VARIANTS}")
    folder = os.path.abspath(folder)
    _check_target(folder, overwrite)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        token_ids, vocab = _write_tokenizer(tmp, variant)
        cfg = tiny_config(vocab, token_ids, variant)
        _write_json(os.path.join(tmp, "config.json"), cfg)
        save_file(random_weights(cfg, seed), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "generation_config.json"), {
            "_from_model_config": False, "do_sample": True, "eos_token_id": cfg["text_config"]["eos_token_id"],
            "pad_token_id": cfg["text_config"]["pad_token_id"], "top_k": 2, "top_p": 1e-5,
            "repetition_penalty": 1.1, "max_new_tokens": 8192})
        common = {"size": {"shortest_edge": 12544, "longest_edge": 9633792}, "do_rescale": True, "patch_size": 14,
                  "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                  "image_std": [0.26862954, 0.26130258, 0.27577711]}
        if variant in ("4.1v", "4.5v"):
            _write_json(os.path.join(tmp, "preprocessor_config.json"), dict(
                common, image_processor_type="Glm4vImageProcessor", processor_class="Glm4vProcessor",
                do_resize=True, do_normalize=True, do_convert_rgb=True, resample=3, rescale_factor=1 / 255))
        else:  # the two files of the GLM-4.6V-Flash hub folder, as published
            _write_json(os.path.join(tmp, "preprocessor_config.json"), dict(
                common, image_processor_type="Glm46VImageProcessor", processor_class="Glm46VProcessor"))
            _write_json(os.path.join(tmp, "video_preprocessor_config.json"), dict(
                common, size={"shortest_edge": 12544, "longest_edge": 100352000},
                video_processor_type="Glm46VVideoProcessor", processor_class="Glm46VProcessor"))
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _write_tokenizer(folder: str, variant: str = "4.1v"):
    """Writes the offline GLM-4.1V test tokenizer (with its chat template); returns (config token ids, vocab size).
    The embedding gets a few spare rows beyond the tokenizer, as the real model has (151552 > 151329 + specials)."""
    from ..processing.tiny_tokenizer import build_tiny_tokenizer, model_token_ids

    tok = build_tiny_tokenizer(folder, vocab_size=320 if variant == "4.1v" else 352, variant=variant)
    return model_token_ids(tok), (len(tok) // 64 + 1) * 64
