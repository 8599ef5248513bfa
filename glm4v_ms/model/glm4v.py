"""Glm4vForConditionalGeneration: vision features -> scatter into <|image|> slots -> decoder -> logits."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops as msops

from . import ops, quant
from .generation_config import GenerationConfig
from .kv_cache import KVCache, additive_causal_mask, mask_fill
from .config import Glm4vConfig
from .layers import Linear
from .rope import get_rope_index, half_layout_permutation, inv_freq, mrope_axis_of_frequency, text_cos_sin
from .text import Glm4vTextModel
from .vision import Glm4vVisionModel
from .parallel import TPSplit
from .weights import CheckpointError, checkpoint_files, load_weights

_DTYPES = {"float32": ms.float32, "fp32": ms.float32, "bfloat16": ms.bfloat16, "bf16": ms.bfloat16,
           "float16": ms.float16, "fp16": ms.float16}


def resolve_dtype(dtype) -> Any:
    if dtype is None:
        return ms.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use float32 or bfloat16")
        return _DTYPES[dtype.lower()]
    if dtype not in (ms.float32, ms.bfloat16, ms.float16):
        raise ValueError(f"dtype {dtype} is not supported; use mindspore.float32 or mindspore.bfloat16")
    return dtype


def read_folder_config(folder, quantized_weights: str = "auto"):
    """from_pretrained's argument checks: (folder as str, its Glm4vConfig); errors name the folder or the value."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    if quantized_weights not in ("auto", "dequantize", "int"):
        raise ValueError(f"quantized_weights must be 'auto', 'dequantize' or 'int', got {quantized_weights!r}")
    return folder, Glm4vConfig.from_pretrained(folder)


@dataclass
class Glm4vOutput:
    logits: Tensor                       # [B, S or logits_to_keep, vocab]
    rope_deltas: np.ndarray              # [B, 1]: decode position = absolute cache index + delta
    position_ids: np.ndarray             # [3, B, S]
    hidden_states: Optional[List[Tensor]] = None  # embeddings, then each decoder layer's output (before final norm)
    vision_stages: Dict[str, Any] = field(default_factory=dict)
    # MoE models with output_router_choices: per MoE layer (topk_ids [B*S, K], choice scores [B*S, E]) as numpy
    router_choices: Optional[List[Any]] = None


class Glm4vModel(nn.Cell):
    def __init__(self, config: Glm4vConfig, dtype, text_model=Glm4vTextModel):
        super().__init__()
        self.visual = Glm4vVisionModel(config.vision, dtype)
        self.language_model = text_model(config.text, dtype)


class Glm4vForConditionalGeneration(nn.Cell):
    """GLM-4.1V. ``model(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...,
    pixel_values_videos=..., video_grid_thw=...)`` returns a :class:`Glm4vOutput` with ``.logits``.

    Inputs may be numpy arrays or MindSpore tensors. The model keeps no per-request state."""

    text_model_class = Glm4vTextModel  # the decoder; Glm4vMoeForConditionalGeneration builds GLM-4.5V's

    def __init__(self, config: Glm4vConfig, dtype=ms.float32):
        super().__init__()
        self.config = config
        self._dtype = resolve_dtype(dtype)
        self.model = Glm4vModel(config, self._dtype, self.text_model_class)
        t = config.text
        self.lm_head = None if t.tie_word_embeddings else Linear(t.hidden_size, t.vocab_size, False, self._dtype)
        self._inv_freq = Tensor(inv_freq(t.rotary_dim, t.rope_theta))
        self._axis_of_freq = Tensor(mrope_axis_of_frequency(t.mrope_section))
        self.generation_config = None  # set by from_pretrained from generation_config.json
        self.tensor_parallel = None  # parallel.TPContext of a tensor-parallel rank's model (from_pretrained)

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str, dtype=ms.float32, quantized_weights: str = "auto",
                        tensor_parallel=None, progress=None) -> "Glm4vForConditionalGeneration":
        """Load a GLM-4.1V folder: as saved by Hugging Face (config.json + model.safetensors or a sharded index), as
        written by tools/convert.py (its config.json carries the layout marker and the tensors are already in our
        layout), or a GPTQ checkpoint (``quantization_config``; int4 / int8 / mixed, see quant.py). Float tensors are
        cast to ``dtype`` (default float32).

        ``quantized_weights`` (GPTQ only): ``"dequantize"`` turns every quantised layer into a float layer of
        ``dtype`` at load time (exact: (q - zero) * scale in fp32, then cast); ``"int"`` keeps the integer weights
        (quant.QuantLinear: Ascend's weight-quant matmul, or per-call dequantisation elsewhere, which saves memory
        but not time); ``"auto"``: ``"int"`` when the fused Ascend kernels are on, else ``"dequantize"``.

        ``tensor_parallel`` (a parallel.TPContext with tp_size > 1; see parallel.load_tp_model): build and load only
        this rank's part of the decoder (its block of heads and of the MLP's inner width); everything else is
        replicated. GPTQ checkpoints are then dequantised ("auto" means "dequantize"; "int" is refused).

        ``progress`` (silent when None): ``progress(total_bytes)`` returns an object told of each tensor read, e.g.
        ``lambda n: glm4v_ms.progress.Progress(n, unit="B", desc="loading")`` (see weights.load_weights)."""
        folder, config = read_folder_config(folder, quantized_weights)
        if config.is_moe:
            raise ValueError(f"{folder} holds GLM-4.5V / GLM-4.6V (model_type 'glm4v_moe', a mixture of experts): load it "
                             "with Glm4vMoeForConditionalGeneration, or glm4v_ms.load_model, which picks the class")
        split = None
        if tensor_parallel is not None and tensor_parallel.tp_size > 1:
            split = TPSplit(config.text, tensor_parallel.tp_rank, tensor_parallel.tp_size)
            if quantized_weights == "int" and config.quantization is not None:
                raise quant.QuantConfigError("GPTQ integer weights (quantized_weights='int') are not supported with tensor "
                                       "parallelism; load with quantized_weights='dequantize'")
            config = dataclasses.replace(config, text=split.local)
        model = cls(config, dtype)
        model.tensor_parallel = tensor_parallel
        ignore = ("lm_head.weight",) if config.tie_word_embeddings else ()
        keep_int = split is None and (quantized_weights == "int" or (quantized_weights == "auto" and ops.fused()))
        quantized, zero_offset = model._plan_quantized(folder, keep_int, split)
        # A converted folder already stores the decoder's q/k rows in the half rotary layout: never permute twice.
        load_weights(model, folder, ignore=ignore, transform=None if config.converted else model.checkpoint_transform,
                     quantized=quantized, zero_offset=zero_offset, split=split, progress=progress)
        # Static defaults of the checkpoint (like HF's model.generation_config); not per-request state.
        model.generation_config = GenerationConfig.from_pretrained(folder, text_config=config.text)
        return model

    def _plan_quantized(self, folder: str, keep_int: bool, split=None):
        """GPTQ modules of the checkpoint in ``folder`` -> {name: (spec, keep_int, out, in)} and the zero offset;
        with ``keep_int`` their Linear cells are replaced by quant.QuantLinear. Nothing for a float checkpoint.
        ``split`` (tensor parallelism): out/in are the full (checkpoint) sizes, not the rank's."""
        names = sorted(k[:-len(".qweight")] for k in checkpoint_files(folder) if k.endswith(".qweight"))
        qc = self.config.quantization
        if not names and qc is None:
            return {}, 1
        if qc is None:
            raise CheckpointError(f"{folder} holds GPTQ tensors ({names[0]}.qweight, ...) but its config.json has no "
                                  "quantization_config; restore the config.json that came with the checkpoint")
        cfg = quant.GPTQConfig.from_dict(qc)
        if not names:
            raise CheckpointError(f"config.json in {folder} declares GPTQ quantization but the checkpoint has no "
                                  ".qweight tensors")
        cells = dict(self.cells_and_names())
        plan = {}
        for name in names:
            cell = cells.get(name)
            if not isinstance(cell, Linear):
                raise CheckpointError(f"quantised tensor {name}.qweight does not belong to a linear layer of this "
                                      "model; the checkpoint is not a GLM-4.1V GPTQ checkpoint")
            spec = cfg.for_module(name)
            n, k = cell.out_features, cell.in_features
            if split is not None:
                n, k = split.full_shape(f"{name}.weight", (n, k))
            plan[name] = (spec, keep_int, n, k)
            if keep_int and spec is not None and ops.fused() and spec.group_size != -1 and spec.group_size % 32:
                raise quant.QuantConfigError(
                    f"module {name}: group_size {spec.group_size} is not a multiple of 32, which Ascend's weight-quant "
                    "matmul needs; load with quantized_weights='dequantize'")
            if keep_int and spec is not None:
                parent, _, child = name.rpartition(".")
                cells[parent].insert_child_to_cell(child, quant.QuantLinear(
                    cell.in_features, cell.out_features, cell.bias is not None, spec, spec.desc_act, self.dtype))
        return plan, cfg.zero_offset

    def checkpoint_transform(self, name: str, arr: np.ndarray) -> np.ndarray:
        """HF tensor -> our parameter: the decoder's q/k projection rows (weight and bias) are permuted per head into
        the half rotary layout (rope.half_layout_permutation); every other tensor is used as is."""
        if ".self_attn." in name and name.startswith("model.language_model.") and \
                name.rsplit(".", 2)[-2] in ("q_proj", "k_proj"):
            t = self.config.text
            perm = half_layout_permutation(t.head_dim, t.rotary_dim)
            rows = arr.shape[0]
            return arr.reshape(rows // t.head_dim, t.head_dim, *arr.shape[1:])[:, perm].reshape(arr.shape)
        return arr

    def round_parameters(self, dtype) -> None:
        """Round every parameter to ``dtype`` and back, in place (with ops.set_bf16_emulation: a bf16 model
        emulated in fp32 on CPU). Parameters read from a bf16 checkpoint are unchanged by it."""
        for _, p in self.parameters_and_names():
            p.set_data(p.astype(dtype).astype(p.dtype))

    @property
    def dtype(self):
        return self._dtype

    @property
    def visual(self) -> Glm4vVisionModel:
        return self.model.visual

    @property
    def language_model(self) -> Glm4vTextModel:
        return self.model.language_model

    # ----------------------------------------------------------------------------------------------------------
    def rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        c = self.config
        return get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask,
                              image_token_id=c.image_token_id, video_start_token_id=c.video_start_token_id,
                              video_end_token_id=c.video_end_token_id,
                              spatial_merge_size=c.vision.spatial_merge_size)

    def _features(self, pixel_values, grid, what: str, n_tokens: int, return_stages: bool, graph=False):
        self.visual.check_inputs(tuple(pixel_values.shape), grid, f"{what} pixel values")
        merge2 = self.config.vision.spatial_merge_size ** 2
        n_feat = int(np.prod(grid, axis=1).sum()) // merge2
        if n_feat != n_tokens:
            raise ValueError(f"{what} features and image tokens do not match: input_ids has {n_tokens} <|image|> "
                             f"tokens (id {self.config.image_token_id}) but the grids {grid.tolist()} give {n_feat} "
                             "features; the prompt must expand each placeholder to t*h*w/merge^2 tokens")
        return self.visual(pixel_values, grid, return_stages=return_stages, graph=graph)

    def embed(self, input_ids: np.ndarray, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, return_stages: bool = False, graph=False):
        """Token embeddings with the vision features written into the <|image|> slots (batch-major order).
        ``graph``: run the ViT's block stack as a compiled graph (engine.py's prefill passes a callable that runs
        it, see vision.Glm4vVisionModel.construct)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        emb = self.language_model.embed_tokens(Tensor(ids.astype(np.int32)))
        stages: Dict[str, Any] = {}
        has_img, has_vid = pixel_values is not None, pixel_values_videos is not None
        if not (has_img or has_vid):
            return emb, stages
        if has_img and has_vid:
            raise ValueError("images and video in the same forward are not supported: GLM-4.1V uses the same "
                             "<|image|> placeholder for both; send them as separate requests")
        pv, grid, what = ((pixel_values, image_grid_thw, "image") if has_img
                          else (pixel_values_videos, video_grid_thw, "video"))
        if grid is None:
            raise ValueError(f"{what} pixel values were given without {what}_grid_thw")
        grid = np.asarray(ops.to_numpy(grid), dtype=np.int64).reshape(-1, 3)
        slots = np.flatnonzero(ids.reshape(-1) == self.config.image_token_id)
        feats = self._features(pv, grid, what, len(slots), return_stages, graph)
        if return_stages:
            feats, stages = feats
        b, s = ids.shape
        flat = emb.reshape(b * s, -1)
        flat = msops.tensor_scatter_update(flat, Tensor(slots.astype(np.int32)[:, None]), feats.astype(flat.dtype))
        return flat.reshape(b, s, -1), stages

    def check_ids(self, input_ids, attention_mask=None):
        """input_ids / attention_mask (numpy or Tensor, 1-D or 2-D) -> int64 numpy [B, S] and [B, S'] or None."""
        if input_ids is None:
            raise ValueError("input_ids is required")
        ids = np.asarray(ops.to_numpy(input_ids), dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        vocab = self.config.text.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids contain ids outside [0, vocab_size={vocab}): min {ids.min()}, max {ids.max()}")
        mask = None if attention_mask is None else np.asarray(ops.to_numpy(attention_mask), dtype=np.int64)
        if mask is not None and mask.ndim == 1:
            mask = mask[None]
        return ids, mask

    def construct(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None,
                  pixel_values_videos=None, video_grid_thw=None, position_ids=None, cache: Optional[KVCache] = None,
                  logits_to_keep: int = 0, output_hidden_states: bool = False,
                  output_vision_stages: bool = False, output_router_choices: bool = False) -> Glm4vOutput:
        """Forward over ``input_ids`` [B, S]. Without ``cache``: the whole sequence, causal. With a
        :class:`KVCache`: the chunk is appended to the cache; the first chunk (prefill) computes the 3D positions and
        stores the rope deltas in the cache, later chunks get position = cache index + delta. ``attention_mask`` may
        cover the chunk ([B, S]) or everything so far ([B, cache.length + S], HF style)."""
        ids, mask = self.check_ids(input_ids, attention_mask)
        start = 0 if cache is None else cache.length
        if mask is not None and cache is not None and start and mask.shape == (ids.shape[0], start + ids.shape[1]):
            mask = mask[:, start:]  # HF-style full-length mask: keep the new chunk's columns
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        if cache is not None:
            if cache.batch != ids.shape[0]:
                raise ValueError(f"the cache was allocated for batch {cache.batch}, input_ids has {ids.shape[0]} rows")
            if start and (pixel_values is not None or pixel_values_videos is not None):
                raise ValueError("images/videos can only be given with the first chunk (prefill) of a cached request")
            cache.begin(ids.shape[1], mask)

        embeds, stages = self.embed(ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                    return_stages=output_vision_stages)
        if position_ids is None and start:
            position_ids, deltas = cache.decode_positions(start, ids.shape[1]), cache.rope_deltas
        elif position_ids is None:
            position_ids, deltas = self.rope_index(
                ids, None if pixel_values is None else ops.to_numpy(image_grid_thw),
                None if pixel_values_videos is None else ops.to_numpy(video_grid_thw), mask)
        else:
            position_ids = np.asarray(ops.to_numpy(position_ids), dtype=np.int64)
            deltas = position_ids.max(axis=(0, 2))[:, None] + 1 - ids.shape[1]
        if cache is not None and not start:
            cache.rope_deltas = deltas
        cos, sin = self.rotary_tables(Tensor(position_ids.astype(np.int32)))
        n = ids.shape[1]
        if cache is None:
            m = additive_causal_mask(mask if mask is not None else np.ones_like(ids), 0, n, mask_fill(self.dtype))
            caches, index, causal_only = None, None, mask is None or bool(mask.all())
        else:
            m = cache.attention_mask(start, n)
            caches, index, causal_only = cache.tensors, cache.index(start, n), cache.causal_only(start, n)
        router_log = [] if output_router_choices else None
        out = self._run_decoder(embeds, cos, sin, Tensor(m).astype(self.dtype), caches, index, start + n, causal_only,
                           output_hidden_states, router_log)
        if cache is not None:
            cache.commit(ids.shape[1])
        hidden, all_hidden = out if output_hidden_states else (out, None)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.logits(hidden)
        choices = None if router_log is None else [(ids.asnumpy(), sc.asnumpy()) for ids, sc in router_log]
        return Glm4vOutput(logits=logits, rope_deltas=deltas, position_ids=position_ids, hidden_states=all_hidden,
                           vision_stages=stages, router_choices=choices)

    def _run_decoder(self, embeds, cos, sin, mask, caches, index, kv_len, causal_only, output_hidden_states, router_log):
        """The decoder stack over one chunk (eager); a MoE model also fills ``router_log``."""
        if router_log is not None:
            raise ValueError("output_router_choices: GLM-4.1V's decoder has no experts (a glm4v_moe model has)")
        return self.language_model(embeds, cos, sin, mask, caches, index, kv_len, causal_only, output_hidden_states)

    def rotary_tables(self, position_ids: Tensor):
        """cos/sin [B, S, head_dim] of the decoder for 3D positions [3, B, S] (graph-safe)."""
        return text_cos_sin(position_ids, self._inv_freq, self._axis_of_freq, self.config.text.head_dim, self.dtype)

    def logits(self, hidden: Tensor) -> Tensor:
        w = self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return ops.linear(hidden, w)

