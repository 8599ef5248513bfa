"""Builders for the PyTorch reference (transformers 4.57.6, torch CPU, eager, fp32) used by the parity tests.

Tiny random GLM-4.1V models are created here with weights scaled so that every mechanism matters numerically:
unit-variance position tables (bicubic vs bilinear differ by O(1)), 1/sqrt(fan_in) matrices, norm weights around 1,
non-zero biases. They are saved with ``save_pretrained`` and loaded by our ``from_pretrained``.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

# Token ids of the tiny models (inside their small vocabulary).
VOCAB = 320
IMAGE, VIDEO, BOI, EOI, BOV, EOV = 300, 301, 302, 303, 304, 305
PAD = 0
TEXT_HI = 290  # ordinary text ids are drawn from [1, TEXT_HI)


def tiny_config_dict(merge: int = 2, tie: bool = False, partial: float = 0.5, mrope=(2, 3, 3),
                     text_layers: int = 2, vision_depth: int = 2, hidden: int = 64, heads: int = 2,
                     kv_heads: int = 1, vision_hidden: int = 48, vision_heads: int = 4, flat: bool = False,
                     rope_key: str = "rope_scaling") -> Dict:
    """A GLM-4.1V config.json dict. head_dim = hidden/heads; rotary dim = head_dim*partial; sum(mrope) = rotary/2."""
    text = {
        "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": 96, "num_hidden_layers": text_layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "partial_rotary_factor": partial, "attention_bias": True, "pad_token_id": PAD,
        "eos_token_id": [1, 2], "tie_word_embeddings": tie, "model_type": "glm4v_text",
    }
    if rope_key == "rope_scaling":
        text["rope_scaling"] = {"type": "default", "mrope_section": list(mrope)}
    else:  # 5.x spelling
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": list(mrope),
                                   "rope_theta": text.pop("rope_theta"),
                                   "partial_rotary_factor": text.pop("partial_rotary_factor")}
    vision = {
        "depth": vision_depth, "hidden_size": vision_hidden, "num_heads": vision_heads,
        "intermediate_size": 80, "out_hidden_size": hidden, "hidden_act": "silu", "attention_bias": False,
        "in_channels": 3, "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": merge,
        "image_size": 336, "rms_norm_eps": 1e-5, "model_type": "glm4v",
    }
    top = {"model_type": "glm4v", "architectures": ["Glm4vForConditionalGeneration"],
           "image_token_id": IMAGE, "video_token_id": VIDEO, "image_start_token_id": BOI,
           "image_end_token_id": EOI, "video_start_token_id": BOV, "video_end_token_id": EOV,
           "tie_word_embeddings": tie, "vision_config": vision}
    if flat:
        top.update({k: v for k, v in text.items() if k != "model_type"})
    else:
        top["text_config"] = text
    return top


def scale_init_(model, seed: int = 0) -> None:
    """Re-initialise a torch model so every parameter matters (see module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("position_embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def eager_model(config_cls, model_cls, config_dict: Dict, seed: int):
    """A transformers model of ``config_dict`` (eager attention everywhere, eval), scale-initialised."""
    import torch

    config = config_cls(**{k: v for k, v in config_dict.items() if k != "model_type"})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.config._attn_implementation = "eager"
    for sub in (model.model.visual.config, model.model.language_model.config):
        sub._attn_implementation = "eager"
    scale_init_(model, seed)
    return model


def build_reference(folder: str, seed: int = 0, **cfg_kwargs):
    """Create, scale-initialise and save a tiny HF model into ``folder``; return the torch model (eval, fp32)."""
    import json
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    cfg_dict = tiny_config_dict(**cfg_kwargs)
    # The torch side is always built from the nested 4.57 layout; the layout under test is written afterwards.
    torch_dict = tiny_config_dict(**dict(cfg_kwargs, flat=False, rope_key="rope_scaling"))
    model = eager_model(Glm4vConfig, Glm4vForConditionalGeneration, torch_dict, seed)
    model.save_pretrained(folder, safe_serialization=True)
    if cfg_kwargs.get("flat") or cfg_kwargs.get("rope_key", "rope_scaling") != "rope_scaling":
        # Overwrite with the exact layout under test (save_pretrained always writes the nested 4.57 layout).
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=1)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Prompts built by hand (the processor is tested separately): text, image spans, video spans.
# ---------------------------------------------------------------------------------------------------------------

def _text(rng, n: int) -> List[int]:
    return rng.integers(1, TEXT_HI, size=n).tolist()


def image_span(grid, merge: int) -> List[int]:
    t, h, w = grid
    return [BOI] + [IMAGE] * (t * h * w // (merge * merge)) + [EOI]


def video_span(grid, merge: int, timestamps: Sequence[int]) -> List[int]:
    t, h, w = grid
    out = [BOV]
    for g in range(t):
        out += [BOI] + [IMAGE] * (h * w // (merge * merge)) + [EOI]
        out += [10 + int(d) for d in str(timestamps[g])]  # digits as ordinary text tokens
    return out + [EOV]


def pixels(rng, grids, patch_dim: int = 1176) -> np.ndarray:
    n = int(sum(t * h * w for t, h, w in grids))
    return rng.standard_normal((n, patch_dim)).astype(np.float32)


def image_prompt(rng, grids, merge: int, pre: int = 3, between: int = 2, post: int = 4) -> List[int]:
    ids = _text(rng, pre)
    for i, g in enumerate(grids):
        ids += image_span(g, merge)
        ids += _text(rng, between if i + 1 < len(grids) else post)
    return ids


def left_pad(seqs: List[List[int]]) -> Tuple[np.ndarray, np.ndarray]:
    s = max(len(x) for x in seqs)
    ids = np.full((len(seqs), s), PAD, dtype=np.int64)
    mask = np.zeros((len(seqs), s), dtype=np.int64)
    for i, x in enumerate(seqs):
        ids[i, s - len(x):] = x
        mask[i, s - len(x):] = 1
    return ids, mask


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


# ---------------------------------------------------------------------------------------------------------------
# GLM-4.5V / GLM-4.6V (glm4v_moe) tiny models
# ---------------------------------------------------------------------------------------------------------------

def tiny_moe_config_dict(norm_topk_prob: bool = True, n_group: int = 4, topk_group: int = 2, text_layers: int = 3,
                         n_routed: int = 16, top_k: int = 4, n_shared: int = 2, scaling: float = 2.5,
                         first_dense: int = 1, heads: int = 4, kv_heads: int = 2, head_dim: int = 32,
                         partial: float = 0.5, mrope=(2, 3, 3), merge: int = 2, attention_bias: bool = True) -> Dict:
    """A glm4v_moe config.json dict reaching every path of the MoE decoder: an explicit head_dim (32, not
    hidden / heads = 16), partial rotary 0.5 with an mrope_section, first_k_dense_replace dense layers, n_group > 1
    with topk_group < n_group, 2 shared experts, routed_scaling_factor != 1."""
    cfg = tiny_config_dict(merge=merge, partial=partial, mrope=mrope, text_layers=text_layers, heads=heads,
                           kv_heads=kv_heads)
    text = cfg["text_config"]
    text.update({"model_type": "glm4v_moe_text", "head_dim": head_dim, "moe_intermediate_size": 24,
                 "n_routed_experts": n_routed, "num_experts_per_tok": top_k, "n_shared_experts": n_shared,
                 "n_group": n_group, "topk_group": topk_group, "first_k_dense_replace": first_dense,
                 "norm_topk_prob": norm_topk_prob, "routed_scaling_factor": scaling,
                 "attention_bias": attention_bias})
    cfg["vision_config"]["model_type"] = "glm4v_moe"
    cfg.update({"model_type": "glm4v_moe", "architectures": ["Glm4vMoeForConditionalGeneration"]})
    return cfg


def build_moe_reference(folder: str, seed: int = 0, **cfg_kwargs):
    """Create, scale-initialise (router bias e_score_correction_bias included, non-zero) and save a tiny
    transformers Glm4vMoeForConditionalGeneration (eager, fp32) into ``folder``; return the torch model."""
    import torch
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    model = eager_model(Glm4vMoeConfig, Glm4vMoeForConditionalGeneration, tiny_moe_config_dict(**cfg_kwargs), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
    model.save_pretrained(folder, safe_serialization=True)
    return model
