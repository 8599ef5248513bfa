"""GLM-4 text decoder of GLM-4.1V: sandwich-norm layers, GQA attention with q/k/v bias, M-RoPE.

Module attribute paths equal the checkpoint keys below ``model.language_model.``. The model holds no per-request
state: positions (as cos/sin), the attention mask and the KV cache tensors are passed in by the caller.
Built from a tensor-parallel rank's local config (parallel.py) the same cells hold the rank's heads and inner width
and all-reduce the outputs of o_proj and down_proj.
"""

from __future__ import annotations

from typing import List

import mindspore as ms
from mindspore import nn

from . import ops
from .config import TextConfig
from .layers import Embedding, Linear, RMSNorm


class TextAttention(nn.Cell):
    """GQA attention. q/k projection rows are stored in the half rotary layout (rope.half_layout_permutation; the
    checkpoint loader permutes them), so one rotate_half over the whole head applies GLM's partial interleaved
    M-RoPE."""

    def __init__(self, cfg: TextConfig, dtype, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        h = cfg.hidden_size
        # GLM-4.1V's reference hard-codes bias on q/k/v (config.attention_bias is not read); GLM-4.5V's reads
        # attention_bias (text_moe.py passes it). o_proj never has a bias.
        self.q_proj = Linear(h, self.num_heads * self.head_dim, qkv_bias, dtype)
        self.k_proj = Linear(h, self.num_kv_heads * self.head_dim, qkv_bias, dtype)
        self.v_proj = Linear(h, self.num_kv_heads * self.head_dim, qkv_bias, dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, h, False, dtype)
        self.tp = cfg.tp_size > 1  # a tensor-parallel rank's block of heads: o_proj gives a partial sum

    def construct(self, x, cos, sin, mask, k_cache=None, v_cache=None, index=None, kv_len: int = 0,
                  causal_only: bool = False):
        b, s, _ = x.shape
        # [B, S, heads*D] -> [B, S, heads, D] (BSND, where the rotation runs) -> [B, heads, S, D]
        q, k = ops.rotary_qk(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim),
                             self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim), cos, sin)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if k_cache is not None:  # store post-rotary keys at ``index``; attend over the first kv_len positions
            k, v = ops.cache_write(k_cache, v_cache, index, k, v, kv_len)
        out = self.o_proj(ops.attention(q, k, v, mask, self.scale, causal_only))
        return ops.tp_all_reduce(out) if self.tp else out


class TextMLP(nn.Cell):
    """SiLU-GLU MLP. ``inner``: the (rank's) inner width, default cfg.intermediate_size; ``reduce``: all-reduce the
    output of a tensor-parallel rank (default: when cfg.tp_size > 1; the MoE's shared experts reduce together with
    the routed experts instead)."""

    def __init__(self, cfg: TextConfig, dtype, inner: int = 0, reduce=None):
        super().__init__()
        inner = inner or cfg.intermediate_size
        # One fused projection: output rows [0, inner) are the gate, [inner, 2*inner) the up projection.
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inner, False, dtype)
        self.down_proj = Linear(inner, cfg.hidden_size, False, dtype)
        # a tensor-parallel rank's slice of the inner width: down_proj gives a partial sum
        self.tp = cfg.tp_size > 1 if reduce is None else bool(reduce)

    def construct(self, x):
        out = self.down_proj(ops.swiglu(self.gate_up_proj(x)))
        return ops.tp_all_reduce(out) if self.tp else out


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

    def construct(self, x, cos, sin, mask, k_cache=None, v_cache=None, index=None, kv_len: int = 0,
                  causal_only: bool = False):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, k_cache, v_cache, index, kv_len, causal_only)
        x = x + self.post_self_attn_layernorm(h)
        h = self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))
        return x + h


class Glm4vTextModel(nn.Cell):
    def __init__(self, cfg: TextConfig, dtype=ms.float32):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nn.CellList([DecoderLayer(cfg, dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def construct(self, inputs_embeds, cos, sin, mask, caches=None, index=None, kv_len: int = 0,
                  causal_only: bool = False, output_hidden_states: bool = False):
        """inputs_embeds: [B, S, hidden]; cos/sin: [B, S, head_dim] (rope.text_cos_sin); mask: additive
        [B, 1, S, T] or None; caches: None (attend within the chunk) or the static cache tensors
        (k_0, v_0, k_1, v_1, ...) each [B, kv_heads, max_len, D], written at ``index`` ([B, kv_heads, S, 3]) and
        attended over their first ``kv_len`` = T positions; ``causal_only``: the mask has no padding (lets the
        fused kernels use their compressed causal mask). Usable eagerly and inside ``mindspore.jit``.

        Returns the final-normed hidden states, or (hidden, all) where ``all`` holds the embeddings and each layer's
        output (before the final norm)."""
        x = inputs_embeds
        hidden: List = [x] if output_hidden_states else []
        for i, layer in enumerate(self.layers):
            if caches is None:
                x = layer(x, cos, sin, mask, None, None, None, 0, causal_only)
            else:
                x = layer(x, cos, sin, mask, caches[2 * i], caches[2 * i + 1], index, kv_len, causal_only)
            if output_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        return (x, hidden) if output_hidden_states else x
