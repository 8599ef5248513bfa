"""GLM-4.1V configuration read from a Hugging Face ``config.json``.

Accepted layouts (all seen in the wild, all giving the same model):

* nested: ``{"text_config": {...}, "vision_config": {...}, "image_token_id": ...}`` (transformers >= 4.57 saves this);
* flat: text fields at top level next to ``vision_config`` (the original hub file, written for 4.53.0dev);
* rope given as ``rope_scaling`` + ``rope_theta`` + ``partial_rotary_factor`` (4.x) or as one ``rope_parameters``
  dict holding all of them (5.x).

Unknown keys are ignored. A config that cannot describe a working model raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

_SUPPORTED_TEXT_ACT = ("silu",)
_SUPPORTED_VISION_ACT = ("silu",)


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"config field '{name}': {msg}")


def _pick(cls, d: Dict[str, Any]) -> Dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    # Only the patch merger's inner width. The vision blocks' MLP width is ``out_hidden_size``.
    intermediate_size: int = 13696
    out_hidden_size: int = 4096
    hidden_act: str = "silu"
    attention_bias: bool = False
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    image_size: int = 336
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_positions_side(self) -> int:
        """Side of the learned square position table (24 for the 336 px / 14 px model)."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "VisionConfig":
        d = dict(d)
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and "rope_theta" in rp:  # 5.x spells the vision rope as rope_parameters (axial)
            d.setdefault("rope_theta", rp["rope_theta"])
        cfg = cls(**_pick(cls, d))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size", "in_channels",
                     "patch_size", "temporal_patch_size", "spatial_merge_size", "image_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"vision_config.{name}",
                   f"must be a positive integer, got {v!r}")
        _check(self.hidden_size % self.num_heads == 0, "vision_config.hidden_size",
               f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        _check(self.head_dim % 4 == 0, "vision_config.num_heads",
               f"head_dim {self.head_dim} must be divisible by 4 for the 2D rotary embedding")
        _check(self.image_size % self.patch_size == 0, "vision_config.image_size",
               f"{self.image_size} is not a multiple of patch_size={self.patch_size}")
        _check(self.hidden_act in _SUPPORTED_VISION_ACT, "vision_config.hidden_act",
               f"{self.hidden_act!r} is not supported (GLM-4.1V uses one of {_SUPPORTED_VISION_ACT})")
        _check(self.rms_norm_eps > 0, "vision_config.rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")


@dataclass
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    mrope_section: List[int] = field(default_factory=lambda: [8, 12, 12])
    rope_type: str = "default"
    pad_token_id: Optional[int] = None
    eos_token_id: Optional[List[int]] = None
    tie_word_embeddings: bool = False
    # Not a config.json field: > 1 for a tensor-parallel rank's local config (parallel.py), whose head counts and
    # intermediate size are already divided by it; the decoder then all-reduces its row-parallel outputs.
    tp_size: int = 1

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TextConfig":
        d = dict(d)
        for key in ("tp_size", "ep_size", "ep_rank"):  # set by parallel.py only, never read from a file
            d.pop(key, None)
        # rope: 4.x -> rope_scaling {type|rope_type, mrope_section} + top-level rope_theta / partial_rotary_factor;
        #       5.x -> rope_parameters {rope_type, rope_theta, partial_rotary_factor, mrope_section}.
        for key in ("rope_parameters", "rope_scaling"):
            rope = d.get(key)
            if rope is None:
                continue
            if not isinstance(rope, dict):
                raise ValueError(f"config field '{key}': expected a JSON object, got {type(rope).__name__}")
            for sub in ("mrope_section", "rope_theta", "partial_rotary_factor"):
                if sub in rope:
                    d.setdefault(sub, rope[sub])
            rtype = rope.get("rope_type", rope.get("type"))
            if rtype is not None:
                d.setdefault("rope_type", rtype)
        if d.get("partial_rotary_factor") is None:
            d.pop("partial_rotary_factor", None)  # the class default (1.0; GLM-4.5V's 0.5), as transformers'
        eos = d.get("eos_token_id")
        if isinstance(eos, int) and not isinstance(eos, bool):
            d["eos_token_id"] = [eos]
        cfg = cls(**_pick(cls, d))
        for name in ("hidden_size", "num_attention_heads"):
            v = getattr(cfg, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"text_config.{name}",
                   f"must be a positive integer, got {v!r}")
        cfg.head_dim = cfg.resolve_head_dim()
        cfg.mrope_section = list(cfg.mrope_section) if cfg.mrope_section is not None else None
        cfg.validate()
        return cfg

    def resolve_head_dim(self) -> int:
        _check(self.hidden_size % self.num_attention_heads == 0, "text_config.hidden_size",
               f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        # GLM-4.1V's attention derives head_dim = hidden_size / num_attention_heads (an explicit head_dim is a
        # GLM-4.5V field); a file that says otherwise describes a different model.
        derived = self.hidden_size // self.num_attention_heads
        _check(self.head_dim in (None, derived), "text_config.head_dim",
               f"{self.head_dim} differs from hidden_size / num_attention_heads = {derived}, which GLM-4.1V uses")
        return derived

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"text_config.{name}",
                   f"must be a positive integer, got {v!r}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "text_config.num_key_value_heads",
               f"num_attention_heads={self.num_attention_heads} is not a multiple of "
               f"num_key_value_heads={self.num_key_value_heads}")
        _check(0.0 < float(self.partial_rotary_factor) <= 1.0, "text_config.partial_rotary_factor",
               f"must be in (0, 1], got {self.partial_rotary_factor}")
        _check(self.rotary_dim % 2 == 0 and self.rotary_dim > 0, "text_config.partial_rotary_factor",
               f"head_dim {self.head_dim} x {self.partial_rotary_factor} = rotary dim {self.rotary_dim} must be even")
        _check(isinstance(self.mrope_section, list) and len(self.mrope_section) == 3
               and all(isinstance(s, int) and s >= 0 for s in self.mrope_section),
               "text_config.rope_scaling.mrope_section",
               f"must be three non-negative integers (t, h, w frequency counts), got {self.mrope_section!r}")
        _check(sum(self.mrope_section) == self.rotary_dim // 2, "text_config.rope_scaling.mrope_section",
               f"{self.mrope_section} sums to {sum(self.mrope_section)} but the rotary dim {self.rotary_dim} "
               f"has {self.rotary_dim // 2} frequencies")
        _check(self.rope_type in ("default", "mrope"), "text_config.rope_scaling.rope_type",
               f"{self.rope_type!r} is not supported (only the default M-RoPE of GLM-4.1V)")
        _check(self.hidden_act in _SUPPORTED_TEXT_ACT, "text_config.hidden_act",
               f"{self.hidden_act!r} is not supported (GLM-4.1V uses one of {_SUPPORTED_TEXT_ACT})")
        _check(self.rms_norm_eps > 0, "text_config.rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        _check(self.rope_theta > 0, "text_config.rope_theta", f"must be > 0, got {self.rope_theta}")
        if self.eos_token_id is not None:
            _check(all(isinstance(e, int) and 0 <= e < self.vocab_size for e in self.eos_token_id),
                   "text_config.eos_token_id", f"ids must lie in [0, vocab_size={self.vocab_size}), "
                   f"got {self.eos_token_id}")


_MOE_INT_FIELDS = ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "n_group",
                   "topk_group")


@dataclass
class MoeTextConfig(TextConfig):
    """The decoder of GLM-4.5V / GLM-4.6V (``glm4v_moe``): pre-norm layers, NeoX rotate_half on the partial rotary dims,
    q/k/v bias per ``attention_bias``, an explicit ``head_dim``; layers from ``first_k_dense_replace`` on are mixtures
    of experts. Defaults are transformers 4.57's Glm4vMoeTextConfig defaults (GLM-4.5V), used when the file omits a
    field."""
    vocab_size: int = 151424
    intermediate_size: int = 10944
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    max_position_embeddings: int = 65536
    partial_rotary_factor: float = 0.5
    attention_bias: bool = True
    moe_intermediate_size: int = 1408
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_routed_experts: int = 128
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    # Not config.json fields: > 1 for an expert-parallel rank's local config (parallel.py): the rank holds routed
    # experts [ep_rank * E / ep_size, (ep_rank + 1) * E / ep_size) and all-reduces its partial MoE outputs.
    ep_size: int = 1
    ep_rank: int = 0

    @property
    def num_local_experts(self) -> int:
        return self.n_routed_experts // self.ep_size

    @property
    def expert_start(self) -> int:
        return self.ep_rank * self.num_local_experts

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    def resolve_head_dim(self) -> int:
        if self.head_dim is not None:  # the reference: getattr(config, "head_dim", hidden_size // num_attention_heads)
            return self.head_dim
        _check(self.hidden_size % self.num_attention_heads == 0, "text_config.hidden_size",
               f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; give "
               "head_dim explicitly")
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        super().validate()
        for name in _MOE_INT_FIELDS:
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"text_config.{name}",
                   f"must be a positive integer, got {v!r}")
        f = self.first_k_dense_replace
        _check(isinstance(f, int) and not isinstance(f, bool) and f >= 0, "text_config.first_k_dense_replace",
               f"must be a non-negative integer, got {f!r}")
        _check(self.n_routed_experts % self.n_group == 0, "text_config.n_group",
               f"{self.n_group} groups do not divide n_routed_experts={self.n_routed_experts}")
        per_group = self.n_routed_experts // self.n_group
        _check(per_group >= 2, "text_config.n_group",
               f"each group needs at least 2 experts (the group score is the sum of its top 2), got {per_group}")
        _check(self.topk_group <= self.n_group, "text_config.topk_group",
               f"{self.topk_group} exceeds n_group={self.n_group}")
        _check(self.num_experts_per_tok <= self.topk_group * per_group, "text_config.num_experts_per_tok",
               f"{self.num_experts_per_tok} exceeds the {self.topk_group * per_group} experts of the "
               f"topk_group={self.topk_group} chosen groups")
        r = self.routed_scaling_factor
        _check(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0, "text_config.routed_scaling_factor",
               f"must be a positive number, got {r!r}")
        _check(isinstance(self.norm_topk_prob, bool), "text_config.norm_topk_prob",
               f"must be true or false, got {self.norm_topk_prob!r}")
        _check(isinstance(self.attention_bias, bool), "text_config.attention_bias",
               f"must be true or false, got {self.attention_bias!r}")


# The marker tools/convert.py writes into config.json: {"glm4v_ms": {"layout": CONVERTED_LAYOUT, ...}}. A folder with
# it holds tensors already in our layout (decoder q/k rows permuted into the half rotary layout); loading then skips
# the transform and converting it again is refused.
LAYOUT_KEY = "glm4v_ms"
CONVERTED_LAYOUT = "half_rotary_qk/v1"


# model_type values of the dense GLM-V family. "glm4v": GLM-4.1V-9B-Thinking / -Base and GLM-4.6V-Flash as
# published; "glm46v": the same folder as transformers 5.x's Glm46VConfig writes it (it composes the glm4v_text and
# glm4v_vision configs, so the network is the same); "glm4v_text": a text-only sub-config.
# "glm4v_moe": GLM-4.5V and GLM-4.6V (the mixture-of-experts decoder, model/glm4v_moe.py).
MODEL_TYPES = ("glm4v", "glm46v", "glm4v_text", "glm4v_moe")
MOE_MODEL_TYPE = "glm4v_moe"
ARCHITECTURES = ("Glm4vForConditionalGeneration", "Glm46VForConditionalGeneration", "Glm4vModel", "Glm46VModel",
                 "Glm4vMoeForConditionalGeneration", "Glm4vMoeModel")
_SUB_MODEL_TYPES = {"text_config": ("glm4v_text", "glm4v", "glm46v_text", "glm46v"),
                    "vision_config": ("glm4v_vision", "glm4v", "glm46v_vision", "glm46v")}
_MOE_SUB_MODEL_TYPES = {"text_config": ("glm4v_moe_text", "Glm4vMoe_text", "glm4v_moe"),
                        "vision_config": ("glm4v_moe_vision", "glm4v_moe", "glm4v_vision")}

_TOKEN_ID_FIELDS = ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                    "video_start_token_id", "video_end_token_id")

# Class defaults of transformers 5.x's Glm46VConfig where they differ from Glm4vConfig's (used only when the file
# omits the field; a value in the file always wins).
_DEFAULT_IDS = {"glm46v": {"video_start_token_id": 151361, "video_end_token_id": 151362},
                "glm4v_moe": {"image_token_id": 151363, "video_token_id": 151364}}


@dataclass
class Glm4vConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    # the file's model_type ("glm4v", "glm46v" or "glm4v_moe"; "glm4v" when absent)
    model_type: str = "glm4v"
    # "hf" (tensors as transformers stores them) or CONVERTED_LAYOUT (written by tools/convert.py)
    layout: str = "hf"
    # the raw ``quantization_config`` object of a quantised checkpoint (parsed by quant.GPTQConfig), else None
    quantization: Optional[Dict[str, Any]] = None

    @property
    def converted(self) -> bool:
        return self.layout == CONVERTED_LAYOUT

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @property
    def is_moe(self) -> bool:
        return isinstance(self.text, MoeTextConfig)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Glm4vConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt is not None and mt not in MODEL_TYPES:
            raise ValueError(f"config field 'model_type': {mt!r} is not a GLM-V model (expected one of "
                             f"{', '.join(MODEL_TYPES)})")
        arch = d.get("architectures")
        if isinstance(arch, list) and arch and not any(a in ARCHITECTURES for a in arch):
            raise ValueError(f"config field 'architectures': {arch} names no GLM-V model (expected one of "
                             f"{', '.join(ARCHITECTURES)})")
        moe = mt == MOE_MODEL_TYPE or (mt is None and isinstance(arch, list) and any("Moe" in str(a) for a in arch))
        text_d = d.get("text_config")
        if text_d is None:
            # Flat layout: the text fields sit at the top level.
            text_d = {k: v for k, v in d.items() if k not in ("vision_config", "text_config")}
        elif not isinstance(text_d, dict):
            raise ValueError("config field 'text_config': expected a JSON object")
        else:
            # Nested layout; fields the file only gives at top level (older writers) still apply.
            merged = {k: v for k, v in d.items() if k not in ("vision_config", "text_config")}
            merged.update(text_d)
            text_d = merged
        # tie_word_embeddings is a top-level flag in transformers (PretrainedConfig) and wins there.
        if "tie_word_embeddings" in d:
            text_d = dict(text_d, tie_word_embeddings=d["tie_word_embeddings"])
        vision_d = d.get("vision_config") or {}
        if not isinstance(vision_d, dict):
            raise ValueError("config field 'vision_config': expected a JSON object")
        for key, allowed in (_MOE_SUB_MODEL_TYPES if moe else _SUB_MODEL_TYPES).items():
            sub = d.get(key)
            smt = sub.get("model_type") if isinstance(sub, dict) else None
            if smt is not None and smt not in allowed:
                raise ValueError(f"config field '{key}.model_type': {smt!r} is not a "
                                 f"{'GLM-4.5V/4.6V' if moe else 'dense GLM-V'} {key[:-7]} config (expected one of "
                                 f"{', '.join(allowed)})")
        text = (MoeTextConfig if moe else TextConfig).from_dict(text_d)
        vision = VisionConfig.from_dict(vision_d)
        # Ids the file gives win; missing ones take the defaults of the class transformers would build for this
        # model_type (Glm4vConfig: 4.1V's ids; Glm46VConfig: video span 151361 / 151362).
        ids = dict(_DEFAULT_IDS.get(MOE_MODEL_TYPE if moe else mt, {}))
        ids.update({k: d[k] for k in _TOKEN_ID_FIELDS if d.get(k) is not None})
        marker = d.get(LAYOUT_KEY)
        layout = "hf"
        if marker is not None:
            layout = marker.get("layout") if isinstance(marker, dict) else None
            if layout != CONVERTED_LAYOUT:
                raise ValueError(f"config field '{LAYOUT_KEY}.layout': {layout!r} is not a layout this version of "
                                 f"glm4v_ms reads (expected {CONVERTED_LAYOUT!r}); convert the original Hugging Face "
                                 "folder again with tools/convert.py")
        quant = d.get("quantization_config", text_d.get("quantization_config"))
        if quant is not None and not isinstance(quant, dict):
            raise ValueError("config field 'quantization_config': expected a JSON object")
        cfg = cls(text=text, vision=vision, layout=layout, quantization=quant,
                  model_type=MOE_MODEL_TYPE if moe else (mt if mt in ("glm4v", "glm46v") else "glm4v"), **ids)
        cfg.validate()
        return cfg

    @classmethod
    def from_json_file(cls, path: str) -> "Glm4vConfig":
        try:
            with open(path, "r", encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path} (a GLM-4.1V model folder needs config.json)")
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, folder: str) -> "Glm4vConfig":
        return cls.from_json_file(os.path.join(folder, "config.json"))

    def validate(self) -> None:
        for name in _TOKEN_ID_FIELDS:
            v = getattr(self, name)
            _check(isinstance(v, int) and 0 <= v < self.text.vocab_size, name,
                   f"{v!r} must be a token id in [0, vocab_size={self.text.vocab_size})")
        _check(self.vision.out_hidden_size == self.text.hidden_size, "vision_config.out_hidden_size",
               f"{self.vision.out_hidden_size} must equal the text hidden_size {self.text.hidden_size} "
               "(vision features are written into the token embeddings)")
