"""Glm4vMoeForConditionalGeneration: GLM-4.5V and GLM-4.6V (model_type ``glm4v_moe``, 106B total / 12B active).

The vision tower, the feature scatter, the 3D positions and the logits are GLM-4.1V's (glm4v.py, inherited); the
decoder is text_moe.py's. The public API is the dense model's: ``from_pretrained(folder, dtype=...)``,
``model(...).logits``, ``glm4v_ms.generate(model, ...)``, plus ``output_router_choices=True`` (each MoE layer's
expert choices and choice scores, for parity checks).

Loading is strict by the checkpoint's names and shapes (transformers 4.57's module tree): ``mlp.gate.weight``,
``mlp.gate.e_score_correction_bias``, ``mlp.experts.{e}.{gate,up,down}_proj.weight``,
``mlp.shared_experts.{gate,up,down}_proj.weight``, the dense first layers' ``mlp.{gate,up,down}_proj.weight``. Each
checkpoint tensor (or the rank's slice of it) is mapped to a region of our fused parameters (weights.Piece): the
experts of a layer into one [L, H, 2I] and one [L, I, H] tensor, gate and up projections into one gate_up_proj.

Parallelism (a parallel.TPContext from init_tensor_parallel(tp, ep) under msrun): ``ep`` splits the routed experts
(rank r holds experts [r E/ep, (r+1) E/ep) and reads only their tensors), ``tp`` splits attention heads, the dense
MLPs and the shared experts as for GLM-4.1V (parallel.py), reading only the rank's rows / columns with
``safe_open(...).get_slice``. Not supported (clear errors): GPTQ / quantised MoE checkpoints and tools/convert.py
folders (the HF folder loads directly).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import numpy as np
import mindspore as ms

from .config import Glm4vConfig, MoeTextConfig
from .generation_config import GenerationConfig
from .glm4v import Glm4vForConditionalGeneration, read_folder_config
from .parallel import TPContext, check_divisible_moe
from .rope import neox_layout_permutation
from .text_moe import Glm4vMoeTextModel
from .weights import CheckpointError, Piece, load_pieces

_LM = "model.language_model."


class Glm4vMoeForConditionalGeneration(Glm4vForConditionalGeneration):
    """GLM-4.5V / GLM-4.6V. Same call signature and outputs as Glm4vForConditionalGeneration."""

    text_model_class = Glm4vMoeTextModel

    def __init__(self, config: Glm4vConfig, dtype=ms.float32):
        if not isinstance(config.text, MoeTextConfig):
            raise ValueError("Glm4vMoeForConditionalGeneration needs a glm4v_moe config (GLM-4.5V / GLM-4.6V); "
                             "use Glm4vForConditionalGeneration for GLM-4.1V / GLM-4.6V-Flash")
        super().__init__(config, dtype)

    @classmethod
    def from_pretrained(cls, folder: str, dtype=ms.float32, quantized_weights: str = "auto",
                        tensor_parallel: TPContext = None, progress=None) -> "Glm4vMoeForConditionalGeneration":
        """Load a GLM-4.5V / GLM-4.6V Hugging Face folder (config.json + safetensors). ``tensor_parallel``: a
        parallel.TPContext (its tp_size / ep_size) to build and read only this rank's part; ``progress`` as for the
        dense model. ``quantized_weights`` exists for the dense API's sake: quantised MoE checkpoints are refused."""
        folder, config = read_folder_config(folder, quantized_weights)
        if not config.is_moe:
            raise ValueError(f"{folder} holds a dense GLM-V model (model_type {config.model_type!r}); load it with "
                             "Glm4vForConditionalGeneration (glm4v_ms.load_model picks the class)")
        if config.quantization is not None:
            raise CheckpointError(f"{folder} is a quantised GLM-4.5V/4.6V checkpoint (quantization_config "
                                  f"{config.quantization.get('quant_method', '?')!r}); glm4v_ms loads the bf16 MoE "
                                  "checkpoint only (see the README's card counts)")
        if config.converted:
            raise CheckpointError(f"{folder} was written by tools/convert.py, which does not handle MoE models; load "
                                  "the original Hugging Face folder")
        ctx = tensor_parallel if tensor_parallel is not None and tensor_parallel.enabled else None
        if ctx is not None:
            config = dataclasses.replace(config, text=local_moe_config(config.text, ctx))
        model = cls(config, dtype)
        model.tensor_parallel = ctx
        pieces, expected = model.checkpoint_plan()
        ignore = ("lm_head.weight",) if config.tie_word_embeddings else ()
        load_pieces(model, folder, pieces, expected, ignore=ignore, transform=model.checkpoint_transform,
                    progress=progress)
        if model.dtype != ms.float32:  # the reference holds the router weight in the model dtype (ours: fp32)
            for layer in model.language_model.layers:
                if layer.is_moe:
                    w = layer.mlp.gate.weight
                    w.set_data(w.astype(model.dtype).astype(ms.float32))
        model.generation_config = GenerationConfig.from_pretrained(folder, text_config=config.text)
        return model

    def checkpoint_transform(self, name: str, arr: np.ndarray) -> np.ndarray:
        """The decoder's q/k projection rows (weight and bias; whole heads) are permuted per head from GLM-4.5V's
        partial NeoX layout into the whole-head half layout (rope.neox_layout_permutation)."""
        if name.startswith(_LM) and ".self_attn." in name and name.rsplit(".", 2)[-2] in ("q_proj", "k_proj"):
            t = self.config.text
            perm = neox_layout_permutation(t.head_dim, t.rotary_dim)
            return arr.reshape(arr.shape[0] // t.head_dim, t.head_dim, *arr.shape[1:])[:, perm].reshape(arr.shape)
        return arr

    # ----------------------------------------------------------------------------------------------------------
    def checkpoint_plan(self) -> Tuple[List[Piece], Dict[str, Tuple[int, ...]]]:
        """(pieces this process reads, every checkpoint tensor the full config implies with its full shape)."""
        t: MoeTextConfig = self.config.text
        params = {k: tuple(p.shape) for k, p in self.parameters_and_names()}
        pieces: List[Piece] = []
        expected: Dict[str, Tuple[int, ...]] = {}
        decoder = [k for k in params if k.startswith(_LM + "layers.")]
        for name, shape in params.items():  # everything outside the decoder layers: identity, replicated
            if name not in decoder:
                pieces.append(Piece(name, name))
                expected[name] = shape
        tp, r = t.tp_size, (self.tensor_parallel.tp_rank if self.tensor_parallel is not None else 0)
        full_heads, full_kv = t.num_attention_heads * tp, t.num_key_value_heads * tp
        for i in range(t.num_hidden_layers):
            p = f"{_LM}layers.{i}."
            h, hd = t.hidden_size, t.head_dim
            for norm in ("input_layernorm", "post_attention_layernorm"):
                pieces.append(Piece(p + norm + ".weight", p + norm + ".weight"))
                expected[p + norm + ".weight"] = (h,)
            for proj, heads in (("q_proj", full_heads), ("k_proj", full_kv), ("v_proj", full_kv)):
                rows = heads * hd // tp
                names = ["weight", "bias"] if t.attention_bias else ["weight"]
                for kind in names:
                    key = f"{p}self_attn.{proj}.{kind}"
                    expected[key] = (heads * hd, h) if kind == "weight" else (heads * hd,)
                    pieces.append(Piece(key, key, src=(slice(r * rows, (r + 1) * rows),) if tp > 1 else ()))
            key = f"{p}self_attn.o_proj.weight"
            expected[key] = (h, full_heads * hd)
            cols = full_heads * hd // tp
            pieces.append(Piece(key, key, src=(slice(None), slice(r * cols, (r + 1) * cols)) if tp > 1 else ()))
            if t.is_moe_layer(i):
                self._plan_moe(p + "mlp.", t, tp, r, pieces, expected)
            else:
                self._plan_mlp(p + "mlp.", p + "mlp.", t.intermediate_size * tp, h, tp, r, pieces, expected)
        return pieces, expected

    @staticmethod
    def _plan_mlp(src: str, dst: str, inner: int, h: int, tp: int, r: int, pieces, expected) -> None:
        """A SiLU-GLU stored as gate_proj / up_proj / down_proj (full inner width ``inner``) -> our gate_up_proj
        [2 i, h] (the rank's gate rows, then its up rows) and down_proj [h, i], i = inner / tp."""
        i = inner // tp
        rows = slice(r * i, (r + 1) * i)
        for k, proj in enumerate(("gate_proj", "up_proj")):
            expected[f"{src}{proj}.weight"] = (inner, h)
            pieces.append(Piece(f"{src}{proj}.weight", f"{dst}gate_up_proj.weight",
                                src=(rows,) if tp > 1 else (), dst=(slice(k * i, (k + 1) * i),)))
        expected[f"{src}down_proj.weight"] = (h, inner)
        pieces.append(Piece(f"{src}down_proj.weight", f"{dst}down_proj.weight",
                            src=(slice(None), rows) if tp > 1 else ()))

    def _plan_moe(self, p: str, t: MoeTextConfig, tp: int, r: int, pieces, expected) -> None:
        h, inner, n_exp = t.hidden_size, t.moe_intermediate_size, t.n_routed_experts
        for key, shape in ((p + "gate.weight", (n_exp, h)), (p + "gate.e_score_correction_bias", (n_exp,))):
            expected[key] = shape
            pieces.append(Piece(key, key))
        start, local = t.expert_start, t.num_local_experts
        for e in range(n_exp):
            src = f"{p}experts.{e}."
            expected[src + "gate_proj.weight"] = (inner, h)
            expected[src + "up_proj.weight"] = (inner, h)
            expected[src + "down_proj.weight"] = (h, inner)
            if not start <= e < start + local:
                continue  # another expert-parallel rank's expert: checked by name and shape, never read
            j = e - start
            pieces.append(Piece(src + "gate_proj.weight", p + "experts.gate_up_proj", dst=(j, slice(None),
                                slice(0, inner)), transpose=True))
            pieces.append(Piece(src + "up_proj.weight", p + "experts.gate_up_proj", dst=(j, slice(None),
                                slice(inner, 2 * inner)), transpose=True))
            pieces.append(Piece(src + "down_proj.weight", p + "experts.down_proj", dst=(j,), transpose=True))
        self._plan_mlp(p + "shared_experts.", p + "shared_experts.", inner * t.n_shared_experts, h, tp, r, pieces,
                       expected)

    # ----------------------------------------------------------------------------------------------------------
    def _run_decoder(self, embeds, cos, sin, mask, caches, index, kv_len, causal_only, output_hidden_states,
                     router_log):
        return self.language_model(embeds, cos, sin, mask, caches, index, kv_len, causal_only, output_hidden_states,
                                   router_log)


def local_moe_config(cfg: MoeTextConfig, ctx: TPContext) -> MoeTextConfig:
    """A rank's decoder config: with tp > 1 the heads, KV heads and the dense MLP's inner width divided by tp
    (tp_size = tp); with ep > 1 the rank's share of the routed experts (ep_size, ep_rank)."""
    if cfg.tp_size != 1 or cfg.ep_size != 1:
        raise ValueError("the text config is already a model-parallel rank's local config")
    tp, ep = ctx.tp_size, ctx.ep_size
    check_divisible_moe(cfg, tp, ep)
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // tp,
                               num_key_value_heads=cfg.num_key_value_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp, tp_size=tp, ep_size=ep,
                               ep_rank=ctx.ep_rank)
