"""The text decoder of GLM-4.5V / GLM-4.6V (glm4v_moe): pre-norm layers, GQA attention, MoE from layer
``first_k_dense_replace`` on.

Differences from GLM-4.1V's decoder (text.py), each pinned by tests/test_moe_parity.py:

* two norms per layer (input_layernorm before attention, post_attention_layernorm before the MLP), no sandwich norms;
* q/k/v bias per ``attention_bias``; an explicit ``head_dim`` (128 with 96 heads in GLM-4.5V);
* rotary: NeoX rotate_half over the first rotary_dim dims (dim i with i + rotary_dim/2), brought into the same
  whole-head half layout as GLM-4.1V by a different per-head q/k row permutation at load time
  (rope.neox_layout_permutation), so attention, the KV cache, the graphs and the Ascend kernels are shared;
* the dense layers' MLP is stored as separate gate_proj / up_proj in the checkpoint and fused into one gate_up_proj
  at load time (the same TextMLP cell as GLM-4.1V's).

The construct signature equals Glm4vTextModel's, so the runtime (eager sessions, graph prefill / decode, the
server's slots) runs either decoder unchanged. No per-request state.
"""

from __future__ import annotations

from typing import List

import mindspore as ms
from mindspore import nn

from .config import MoeTextConfig
from .layers import Embedding, RMSNorm
from .moe import MoE
from .text import TextAttention, TextMLP


class MoeDecoderLayer(nn.Cell):
    def __init__(self, cfg: MoeTextConfig, dtype, moe: bool):
        super().__init__()
        self.self_attn = TextAttention(cfg, dtype, qkv_bias=cfg.attention_bias)
        self.mlp = MoE(cfg, dtype) if moe else TextMLP(cfg, dtype)
        self.is_moe = moe
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def construct(self, x, cos, sin, mask, k_cache=None, v_cache=None, index=None, kv_len: int = 0,
                  causal_only: bool = False, router_log=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, k_cache, v_cache, index, kv_len, causal_only)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, router_log) if self.is_moe else self.mlp(h))


class Glm4vMoeTextModel(nn.Cell):
    def __init__(self, cfg: MoeTextConfig, dtype=ms.float32):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.CellList([MoeDecoderLayer(cfg, dtype, cfg.is_moe_layer(i))
                                   for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def construct(self, inputs_embeds, cos, sin, mask, caches=None, index=None, kv_len: int = 0,
                  causal_only: bool = False, output_hidden_states: bool = False, router_log=None):
        """As Glm4vTextModel.construct. ``router_log`` (eager only): a list that receives, per MoE layer, the
        router's (topk_ids [N, K], choice scores [N, E]) of the chunk's N = B * S tokens."""
        x = inputs_embeds
        hidden: List = [x] if output_hidden_states else []
        for i, layer in enumerate(self.layers):
            if caches is None:
                x = layer(x, cos, sin, mask, None, None, None, 0, causal_only, router_log)
            else:
                x = layer(x, cos, sin, mask, caches[2 * i], caches[2 * i + 1], index, kv_len, causal_only, router_log)
            if output_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        return (x, hidden) if output_hidden_states else x
