"""Static KV cache: preallocated per-layer key/value buffers plus the per-request bookkeeping the model must not keep.

One object per request (or left-padded batch). It holds:
* ``k[layer]``, ``v[layer]``: [B, kv_heads, max_len, head_dim] in the model dtype, allocated once (static shapes);
  keys are stored after the rotary rotation, as the reference's cache does;
* ``length``: how many positions are filled (the absolute cache index of the next token);
* ``key_mask``: [B, max_len] host ints, 1 where a filled position may be attended (0 for left padding);
* ``rope_deltas``: [B, 1], set at prefill by the model; decode position = cache index + delta on all 3 axes.
"""

from __future__ import annotations

import itertools
from typing import Optional

import ml_dtypes
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, ops

from .config import TextConfig


def mask_fill(dtype) -> float:
    """The additive-mask value of a compute dtype: its most negative finite value (torch.finfo(dtype).min, as the
    reference). fp32's would overflow to -inf in bf16 and turn fully masked (padding) rows into NaN."""
    if dtype in (ms.bfloat16, ml_dtypes.bfloat16):
        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).min)
    if dtype in (ms.float16, np.float16):
        return float(np.finfo(np.float16).min)
    return float(np.finfo(np.float32).min)


def additive_causal_mask(key_mask: np.ndarray, start: int, n_new: int, fill: float = mask_fill(ms.float32)) -> np.ndarray:
    """Additive [B, 1, n_new, start + n_new] mask for queries at positions start .. start+n_new-1 over keys
    0 .. start+n_new-1: 0 where key j is visible (j <= the query's position and key_mask[:, j] == 1), else ``fill``
    (mask_fill of the compute dtype), as the reference's eager mask (fully masked pad rows stay finite, no NaN).
    Without a cache it is the start = 0 case with key_mask = attention_mask."""
    total = start + n_new
    q_pos = np.arange(start, total)[:, None]
    allowed = (np.arange(total)[None, :] <= q_pos)[None] & (key_mask[:, None, :total] == 1)
    return np.where(allowed, 0.0, fill).astype(np.float32)[:, None]


def write_index(start: Tensor, batch: int, kv_heads: int, n_new: int) -> Tensor:
    """[B, kv_heads, n_new, 3] int32 (b, head, position) triples addressing positions start .. start+n_new-1 of a
    [B, kv_heads, max_len, D] cache (ScatterNdUpdate indices). ``start``: int32 scalar tensor. Graph-safe."""
    shape = (batch, kv_heads, n_new, 1)
    bi = ops.arange(batch).astype(ms.int32).reshape(batch, 1, 1, 1).broadcast_to(shape)
    hi = ops.arange(kv_heads).astype(ms.int32).reshape(1, kv_heads, 1, 1).broadcast_to(shape)
    pi = (ops.arange(n_new).astype(ms.int32) + start).reshape(1, 1, n_new, 1).broadcast_to(shape)
    return ops.concat([bi, hi, pi], -1)


_IDS = itertools.count()


class CacheFullError(ValueError):
    """More tokens than the cache was allocated for (prompt + max_new_tokens)."""


class CacheTooLargeError(ValueError):
    """The KV cache asked for does not fit in the memory there is (e.g. an absurd max_position_embeddings)."""


def cache_bytes(cfg: TextConfig, batch: int, max_len: int, itemsize: int) -> int:
    """Bytes of the K and V buffers of every layer for ``batch`` rows of ``max_len`` positions."""
    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * max_len * cfg.head_dim * itemsize


def available_memory() -> Optional[int]:
    """Bytes of host memory available now (Linux MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", "r", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_cache_size(cfg: TextConfig, batch: int, max_len: int, itemsize: int, host: bool = True) -> None:
    """Refuse a cache that cannot fit, with one line saying why, before anything is allocated: more positions than
    max_position_embeddings, or (``host``: the cache lives in host memory, as on CPU) more bytes than are free."""
    if max_len > cfg.max_position_embeddings:
        raise CacheFullError(f"requested context of {max_len} tokens exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}; shorten the prompt or "
                             "lower max_new_tokens")
    need = cache_bytes(cfg, batch, max_len, itemsize)
    free = available_memory() if host else None
    if free is not None and need > free:
        raise CacheTooLargeError(
            f"the KV cache for {batch} x {max_len} tokens needs {need / 2**30:.1f} GiB ({cfg.num_hidden_layers} "
            f"layers x {cfg.num_key_value_heads} KV heads x {cfg.head_dim} dims), more than the "
            f"{free / 2**30:.1f} GiB of memory available; lower --max_new_tokens (config max_position_embeddings="
            f"{cfg.max_position_embeddings})")


class KVCache:
    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype=ms.float32, buffers=None):
        """``buffers``: the (k, v) lists of an earlier cache of the same shape to reuse (engine.GraphRunner pools
        them: a compiled graph is bound to its Parameter objects, so new buffers would mean a new compile)."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        if buffers is None:
            from .ops import device_target

            itemsize = 2 if dtype in (ms.bfloat16, ms.float16) else 4
            check_cache_size(cfg, batch, max_len, itemsize, host=device_target() in (None, "CPU"))
            uid = next(_IDS)

            def buf(kind, i):  # Parameters: updated in place by ScatterNdUpdate, eagerly and inside jit
                return Parameter(mint.zeros(shape, dtype=dtype), name=f"kvcache{uid}.{kind}{i}", requires_grad=False)

            try:
                buffers = ([buf("k", i) for i in range(cfg.num_hidden_layers)],
                           [buf("v", i) for i in range(cfg.num_hidden_layers)])
            except RuntimeError as e:  # device memory (Ascend) is not checked above: MindSpore's allocation says
                if "memory" not in str(e).lower():
                    raise
                need = cache_bytes(cfg, batch, max_len, itemsize)
                raise CacheTooLargeError(f"the KV cache for {batch} x {max_len} tokens ({need / 2**30:.1f} GiB) "
                                         "could not be allocated on the device; lower --max_new_tokens") from None
        elif max_len > cfg.max_position_embeddings:
            raise CacheFullError(f"requested context of {max_len} tokens exceeds the model's "
                                 f"max_position_embeddings={cfg.max_position_embeddings}; shorten the prompt or "
                                 "lower max_new_tokens")
        self.k, self.v = buffers
        if tuple(self.k[0].shape) != shape or self.k[0].dtype != dtype:
            raise ValueError(f"reused cache buffers have shape {tuple(self.k[0].shape)} / {self.k[0].dtype}, "
                             f"need {shape} / {dtype}")
        self.tensors = tuple(t for pair in zip(self.k, self.v) for t in pair)  # (k_0, v_0, k_1, v_1, ...)
        self.kv_heads = cfg.num_key_value_heads
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        self.length = 0
        self.key_mask = np.zeros((batch, max_len), dtype=np.int64)
        self.rope_deltas: Optional[np.ndarray] = None

    def begin(self, n_new: int, mask: Optional[np.ndarray]) -> int:
        """Reserve ``n_new`` positions for the next forward; returns their start index. ``mask`` ([B, n_new], 1 =
        real token) marks padding; None means all real."""
        start = self.length
        if start + n_new > self.max_len:
            raise CacheFullError(f"the KV cache holds {self.max_len} positions; {start} are used and {n_new} more "
                                 "were requested (prompt + max_new_tokens is too long for this cache)")
        self.key_mask[:, start:start + n_new] = 1 if mask is None else mask
        return start

    def attention_mask(self, start: int, n_new: int) -> np.ndarray:
        """Additive mask of the chunk at ``start`` over everything filled so far (see additive_causal_mask)."""
        return additive_causal_mask(self.key_mask, start, n_new, mask_fill(self.dtype))

    @property
    def buffers(self):
        return self.k, self.v

    def index(self, start: int, n_new: int) -> Tensor:
        """Write positions of a chunk of ``n_new`` tokens at ``start`` (see write_index)."""
        return write_index(Tensor(start, ms.int32), self.batch, self.kv_heads, n_new)

    def causal_only(self, start: int, n_new: int) -> bool:
        """True when no key up to start + n_new is padding: the mask is then purely causal."""
        return bool(self.key_mask[:, :start + n_new].all())

    def commit(self, n_new: int) -> None:
        self.length += n_new

    def decode_positions(self, start: int, n_new: int) -> np.ndarray:
        """[3, B, n_new] positions of tokens after the prefill: absolute cache index + rope delta on every axis."""
        if self.rope_deltas is None:
            raise ValueError("the cache has no rope deltas: run the prompt (prefill) through the model first")
        p = np.arange(start, start + n_new, dtype=np.int64)[None, :] + self.rope_deltas  # [B, n_new]
        return np.broadcast_to(p, (3,) + p.shape).copy()


def kv_cache_bytes(cfg: TextConfig, batch: int, positions: int, dtype_bytes: int = 2) -> int:
    """Bytes of a KV cache holding ``positions`` tokens per row: layers x (k, v) x kv_heads x head_dim x dtype.

    The 9B decoder (40 layers, 2 KV heads of 128): 40 KiB per position in bf16, so 5 GiB for a full 131072-token
    GLM-4.6V-Flash context (10 GiB in fp32). Caches are allocated per request (prompt + max_new_tokens, rounded
    up to a power of two in graph mode), never the whole configured context up front."""
    return batch * positions * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes
