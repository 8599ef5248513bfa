"""GLM-4 text decoder of GLM-4.1V: sandwich-norm layers, GQA attention with q/k/v bias, M-RoPE.

Module attribute paths equal the checkpoint keys below ``model.language_model.``. The model holds no per-request
state: positions (as cos/sin) and the attention mask are computed by the caller and passed in.
"""

from __future__ import annotations

from typing import List

import mindspore as ms
from mindspore import nn

from . import ops
from .config import TextConfig
from .layers import Embedding, Linear, RMSNorm


class TextAttention(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        h = cfg.hidden_size
        # The reference hard-codes bias on q/k/v and none on o_proj (config.attention_bias is not read).
        self.q_proj = Linear(h, self.num_heads * self.head_dim, True, dtype)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, True, dtype)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, True, dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, False, dtype)

    def construct(self, x, cos, sin, mask, cache=None, layer: int = 0, start: int = 0):
        b, s, _ = x.shape
        # [B, S, heads*D] -> [B, heads, S, D]
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = ops.rotary_interleaved(q, cos, sin)
        k = ops.rotary_interleaved(k, cos, sin)
        if cache is not None:  # store post-rotary keys at [start, start+s) and attend over everything filled
            k, v = cache.update(layer, start, k, v)
        return self.o_proj(ops.masked_attention(q, k, v, mask, self.scale))


class TextMLP(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype):
        super().__init__()
        self.inner = cfg.intermediate_size
        # One fused projection: output rows [0, inner) are the gate, [inner, 2*inner) the up projection.
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, dtype)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, dtype)

    def construct(self, x):
        gu = self.gate_up_proj(x)
        gate, up = gu[..., :self.inner], gu[..., self.inner:]
        return self.down_proj(up * ops.silu(gate))


class DecoderLayer(nn.Cell):
    """GLM-4 'sandwich' layer: each sublayer's output is normalised again before the residual add."""

    def __init__(self, cfg: TextConfig, dtype):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = TextAttention(cfg, dtype)
        self.mlp = TextMLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, eps, dtype)

    def construct(self, x, cos, sin, mask, cache=None, layer: int = 0, start: int = 0):
        h = self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start))
        x = x + h
        h = self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))
        return x + h


class Glm4vTextModel(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype=ms.float32):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.CellList([DecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def construct(self, inputs_embeds, cos, sin, mask, cache=None, start: int = 0, output_hidden_states: bool = False):
        """inputs_embeds: [B, S, hidden]; cos/sin: [B, S, rotary_dim]; mask: additive [B, 1, S, T] or None;
        cache: a KVCache receiving this chunk's keys/values at positions [start, start + S) (T = start + S).

        Returns the final-normed hidden states, or (hidden, all) where ``all`` holds the embeddings and each layer's
        output (before the final norm)."""
        x = inputs_embeds
        hidden: List = [x] if output_hidden_states else []
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, start)
            if output_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        return (x, hidden) if output_hidden_states else x
