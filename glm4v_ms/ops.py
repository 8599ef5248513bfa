"""The one place where the device matters.

Every op below has the semantics of the PyTorch reference (transformers 4.57, eager attention, fp32) and is
written with MindSpore ops that have CPU kernels (see shared/reference/mindspore-cpu.md). The Ascend fast path
(flash-attention kernels, fused rms_norm / rotary, bf16) replaces the bodies here, per device target, and nothing
else in the package needs to know.

Substitutes for ops MindSpore lacks on CPU, and their measured error against torch (fp32):
* Conv3d / Conv2d with kernel == stride: a linear layer on flattened patches (see vision.py), ~1e-6 abs.
* grid_sample(bicubic): a hand-written separable resampler (rope.py / vision.py), ~3e-6 abs on unit tables.
* scaled_dot_product_attention: matmul, additive mask, fp32 softmax, matmul (exactly eager_attention_forward).
* fused rotary: the two rotation conventions written out (half-split for the ViT, interleaved for the decoder).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops

_DEVICE = {"target": None}


def set_device(target: str = "CPU", device_id: int = 0) -> str:
    """Select the MindSpore backend once per process. ``target`` is ``"CPU"`` or ``"Ascend"``.

    On CPU, PyNative runs synchronously: asynchronous launches on 2 cores are ~10x slower and report errors at
    the wrong op (measured: 1.0 s vs 80 ms for a 32-layer tiny stack).
    """
    target = {"cpu": "CPU", "ascend": "Ascend", "npu": "Ascend"}.get(str(target).lower())
    if target is None:
        raise ValueError("device must be 'CPU' or 'Ascend'")
    if _DEVICE["target"] == target:
        return target
    try:
        ms.set_device(target, device_id) if target == "Ascend" else ms.set_device(target)
    except RuntimeError as e:  # e.g. a CPU-only MindSpore wheel asked for Ascend
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"device {target} is not available: {first.split('. ')[0]}; install the Ascend build of "
                         "MindSpore with CANN, or use the CPU device") from None
    if target == "CPU":
        ms.set_context(pynative_synchronize=True)
    _DEVICE["target"] = target
    return target


def device_target() -> str:
    if _DEVICE["target"] is None:
        set_device("CPU")
    return _DEVICE["target"]


def to_tensor(x, dtype=None) -> Tensor:
    """numpy array / python list / Tensor -> Tensor (optionally cast)."""
    if isinstance(x, Tensor):
        return x.astype(dtype) if dtype is not None and x.dtype != dtype else x
    arr = np.asarray(x)
    t = Tensor(arr)
    return t.astype(dtype) if dtype is not None and t.dtype != dtype else t


def to_numpy(x) -> Optional[np.ndarray]:
    if x is None:
        return None
    if isinstance(x, Tensor):
        return x.asnumpy()
    return np.asarray(x)


_MATMUL_TB = ops.MatMul(transpose_b=True)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b with W in torch layout [out, in].

    A 2-D MatMul with transpose_b: in PyNative on CPU, ``mint.nn.functional.linear`` and ``matmul(x, W.T)`` copy
    the transposed weight on every call (measured: 1.8 s instead of 35 ms for a 151552 x 1024 lm_head GEMV)."""
    shape = x.shape
    y = _MATMUL_TB(x.reshape(-1, shape[-1]), weight)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight.shape[0])


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Reference RMSNorm: normalise in fp32, cast back to the input dtype, *then* multiply by the weight."""
    dtype = x.dtype
    h = x.astype(ms.float32)
    var = mint.mean(h * h, -1, keepdim=True)
    h = h * mint.rsqrt(var + eps)
    return weight * h.astype(dtype)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """torch.nn.LayerNorm over the last dim (biased variance), computed in fp32 and cast back."""
    dtype = x.dtype
    h = x.astype(ms.float32)
    mean = mint.mean(h, -1, keepdim=True)
    c = h - mean
    var = mint.mean(c * c, -1, keepdim=True)
    y = c * mint.rsqrt(var + eps)
    return (y * weight.astype(ms.float32) + bias.astype(ms.float32)).astype(dtype)


def gelu_exact(x: Tensor) -> Tensor:
    """GELU with the erf form (torch.nn.GELU() default); mint gelu has no CPU kernel."""
    return ops.gelu(x, approximate="none")


def silu(x: Tensor) -> Tensor:
    return mint.nn.functional.silu(x)


def embedding(weight: Tensor, ids: Tensor) -> Tensor:
    return ops.gather(weight, ids, 0)


def _softmax_fp32(scores: Tensor, dtype) -> Tensor:
    return ops.softmax(scores.astype(ms.float32), axis=-1).astype(dtype)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, segments: Sequence[int], scale: float) -> Tensor:
    """Bidirectional attention confined to segments of a packed sequence (the ViT's cu_seqlens).

    q, k, v: [N, heads, head_dim]; ``segments`` are host ints with cu_seqlens semantics ([0, e1, e2, ..., N]).
    Each segment attends only to itself; no N x N mask is ever built. Returns [N, heads * head_dim].
    """
    n, heads, hd = q.shape
    outs = []
    for s, e in zip(segments[:-1], segments[1:]):
        if e <= s:
            continue
        qs = q[s:e].transpose(1, 0, 2)  # [L, H, D] -> [H, L, D]
        ks = k[s:e].transpose(1, 0, 2)
        vs = v[s:e].transpose(1, 0, 2)
        w = mint.matmul(qs, ks.transpose(0, 2, 1)) * scale  # [H, L, L]
        w = _softmax_fp32(w, q.dtype)
        outs.append(mint.matmul(w, vs).transpose(1, 0, 2))  # [H, L, D] -> [L, H, D]
    out = outs[0] if len(outs) == 1 else mint.cat(outs, 0)
    return out.reshape(n, heads * hd)


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, KVH, T, D] -> [B, KVH * n_rep, T, D], each kv head repeated n_rep times consecutively (HF repeat_kv)."""
    if n_rep == 1:
        return x
    b, kvh, t, d = x.shape
    x = x.reshape(b, kvh, 1, t, d)
    x = mint.broadcast_to(x, (b, kvh, n_rep, t, d))
    return x.reshape(b, kvh * n_rep, t, d)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """Eager GQA attention. q: [B, H, S, D]; k, v: [B, KVH, T, D]; mask: additive [B, 1, S, T] or None.

    Returns [B, S, H * D]."""
    b, h, s, d = q.shape
    n_rep = h // k.shape[1]
    k = repeat_kv(k, n_rep)
    v = repeat_kv(v, n_rep)
    w = mint.matmul(q, k.transpose(0, 1, 3, 2)) * scale
    if mask is not None:
        w = w + mask
    w = _softmax_fp32(w, q.dtype)
    out = mint.matmul(w, v)  # [B, H, S, D]
    return out.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def rotary_half_split(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Vision rotary. x: [N, heads, head_dim]; cos/sin: [N, head_dim] fp32. Dim d pairs with d + head_dim/2; the
    rotation runs in fp32 and the result is cast back (as the reference)."""
    dtype = x.dtype
    x = x.astype(ms.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rot = mint.cat([-x2, x1], -1)
    c, s = cos[:, None, :], sin[:, None, :]
    return (x * c + rot * s).astype(dtype)


def rotary_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Text M-RoPE rotation. x: [B, H, S, D]; cos/sin: [B, S, R] interleaved. Pairs (2j, 2j+1) of the first R dims
    rotate, in the activation dtype (no fp32 upcast, as the reference); the rest pass through."""
    b, h, s, d = x.shape
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    pairs = x_rot.reshape(b, h, s, r // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = ops.stack([-odd, even], -1).reshape(b, h, s, r)  # mint.stack has no CPU kernel
    c, sn = cos[:, None], sin[:, None]
    out = x_rot * c + rotated * sn
    return mint.cat([out, x_pass], -1) if r < d else out
