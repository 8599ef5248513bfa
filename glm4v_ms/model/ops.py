"""The one place where the device matters.

Two implementations of every device-dependent op, chosen here and nowhere else:

* eager (CPU, and Ascend in fp32): the semantics of the PyTorch reference (transformers 4.57, eager attention),
  written with MindSpore ops that have CPU kernels (see shared/reference/mindspore-cpu.md). It is the reference twin
  of every fast path and runs unchanged inside ``mindspore.jit`` (graph mode, engine.py).
* fused (Ascend, on by default there): ``weight_quant_batch_matmul`` (GPTQ int4/int8 weights, quant.py),
  ``flash_attention_score`` (ViT in layout TND over cu_seqlens; causal prefill
  with the compressed 2048 x 2048 mask, sparse_mode 3), ``fused_infer_attention_score`` (decode over the static cache
  with native GQA), ``rms_norm``, ``rotary_position_embedding`` (mode 0) and ``swiglu``. The kernels are looked up in
  ``KERNELS`` at call time; the tests put NumPy models of their documented semantics there (tests/ascend_sim.py).

Substitutes for ops MindSpore lacks on CPU, and their measured error against torch (fp32):
* Conv3d / Conv2d with kernel == stride: a linear layer on flattened patches (see vision.py), ~1e-6 abs.
* grid_sample(bicubic): a hand-written separable resampler (rope.py / vision.py), ~3e-6 abs on unit tables.
* scaled_dot_product_attention: matmul, additive mask, fp32 softmax, matmul (exactly eager_attention_forward).
* rotary: one half-split rotation for the ViT and (after a per-head q/k permutation, rope.py) the decoder.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops
from mindspore.ops.auto_generate import grouped_matmul_v4, weight_quant_batch_matmul

_DEVICE = {"target": None}
# Fused Ascend kernels on/off (on by default on Ascend). ``any_dtype`` lets NumPy models of the kernels (tests) run
# the fused path in fp32; the real flash-attention kernels take float16/bfloat16 only.
_FUSED = {"on": False, "any_dtype": False}

# The Ascend kernels the fused path calls, looked up here at call time so that tests can put NumPy models of their
# documented semantics in their place (tests/ascend_sim.py).
KERNELS = SimpleNamespace(
    flash_attention_score=ops.flash_attention_score,
    fused_infer_attention_score=ops.fused_infer_attention_score,
    grouped_matmul_v4=grouped_matmul_v4,
    moe_init_routing_v2=ops.moe_init_routing_v2,
    moe_token_unpermute=ops.moe_token_unpermute,
    rms_norm=ops.rms_norm,
    rotary_position_embedding=ops.rotary_position_embedding,
    swiglu=ops.swiglu,
    weight_quant_batch_matmul=weight_quant_batch_matmul,
)


# bf16 emulation on CPU (MindSpore has no bf16 matmul there): the model computes in fp32, and the outputs of linear
# layers, norms, attention (its probabilities too), swiglu and rotary are rounded to bf16, as a bf16 model stores
# them. Residual additions and the reference's fp32 islands are not rounded. Used by tools/parity.py --dtype bfloat16
# on CPU, so that its bf16 thresholds are exercised where no NPU exists; it approximates, and does not replace, a
# real bf16 run on Ascend.
_BF16_EMULATION = {"on": False}


def set_bf16_emulation(on: bool) -> None:
    """Round activations to bf16 at every op output listed above (fp32 models only; read at call/trace time)."""
    _BF16_EMULATION["on"] = bool(on)


def bf16_emulation() -> bool:
    return _BF16_EMULATION["on"]


def _r(x: Tensor) -> Tensor:
    if _BF16_EMULATION["on"] and x.dtype == ms.float32:
        return x.astype(ms.bfloat16).astype(ms.float32)
    return x


def fused() -> bool:
    """True when the fused Ascend kernels are in use (read at trace time inside ``mindspore.jit``)."""
    return _FUSED["on"]


def set_fused(on: bool, any_dtype: bool = False) -> None:
    """Switch the fused kernels on or off for cells built and graphs compiled from now on."""
    _FUSED["on"], _FUSED["any_dtype"] = bool(on), bool(any_dtype)


# Graph tracing (runtime/engine.py and runtime/slots.py set it around every mindspore.jit call): ops whose eager
# form reads tensors back to the host (the MoE's expert grouping, moe_ops.py) switch to a static-shape form while a
# graph is traced. Read at call/trace time like fused().
_TRACING = {"on": 0}


def tracing() -> bool:
    """True while a graph is being traced (or run) by a mindspore.jit entry point of the runtime."""
    return _TRACING["on"] > 0


class graph_trace:
    """``with ops.graph_trace(): jit_fn(...)``: the static-shape forms of host-dependent ops are used inside."""

    def __enter__(self):
        _TRACING["on"] += 1
        return self

    def __exit__(self, *exc):
        _TRACING["on"] -= 1
        return False


def jit(fn):
    """``mindspore.jit(fn)`` whose every call runs inside ``graph_trace()`` (the runtime's graph entry points)."""
    compiled = ms.jit(fn)

    def run(*args, **kwargs):
        with graph_trace():
            return compiled(*args, **kwargs)

    run.__wrapped__ = compiled
    return run


# MindSpore's configuration of the Ascend fast path, applied by set_device("Ascend"): every entry point that runs on
# Ascend (generate.py, pipeline.load, tools/batch_infer.py, the library via glm4v_ms.set_device) and
# tools/ascend_check.py, which validates it on a device, run the same one: jit_level "O0" and infer_boost "on"
# (MindSpore 2.10's set_context(jit_config=...); 2.10 logs that infer_boost there is deprecated and still applies
# it). Not verified on an NPU here: tools/ascend_check.py is the check.
ASCEND_JIT_CONFIG = {"jit_level": "O0", "infer_boost": "on"}


def apply_ascend_config() -> None:
    """Set ASCEND_JIT_CONFIG in MindSpore's context (global, before any graph is compiled)."""
    ms.set_context(jit_config=dict(ASCEND_JIT_CONFIG))


def set_device(target: str = "CPU", device_id: Optional[int] = None) -> str:
    """Select the MindSpore backend once per process. ``target`` is ``"CPU"`` or ``"Ascend"``; ``device_id``
    (Ascend) defaults to ``$DEVICE_ID`` (msrun exports each worker's local rank there), else 0. On Ascend it also
    applies ``ASCEND_JIT_CONFIG``.

    On CPU, PyNative runs synchronously: asynchronous launches on 2 cores are ~10x slower and report errors at
    the wrong op (measured: 1.0 s vs 80 ms for a 32-layer tiny stack).
    """
    target = {"cpu": "CPU", "ascend": "Ascend", "npu": "Ascend"}.get(str(target).lower())
    if target is None:
        raise ValueError("device must be 'CPU' or 'Ascend'")
    if _DEVICE["target"] == target:
        return target
    try:
        if target == "Ascend":
            ms.set_device(target, int(os.environ.get("DEVICE_ID", 0)) if device_id is None else device_id)
        else:
            ms.set_device(target)
    except RuntimeError as e:  # e.g. a CPU-only MindSpore wheel asked for Ascend
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"device {target} is not available: {first.split('. ')[0]}; install the Ascend build of "
                         "MindSpore with CANN, or use the CPU device") from None
    if target == "CPU":
        ms.runtime.launch_blocking()
    else:
        apply_ascend_config()
    set_fused(target == "Ascend")
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


# Tensor parallelism (parallel.py): the sum over this process's tensor-parallel group, set once per process by
# parallel.init_tensor_parallel. Only a model built from a rank's local config (TextConfig.tp_size > 1) calls it.
_TP = {"size": 1, "group": None, "op": None}


def set_tensor_parallel(size: int, group: Optional[str] = None) -> None:
    """Use an AllReduce(sum) over ``group`` (a MindSpore communication group of ``size`` ranks) in tp_all_reduce."""
    _TP["size"], _TP["group"] = int(size), group
    _TP["op"] = ops.AllReduce(ops.ReduceOp.SUM, group) if size > 1 else None


def tp_all_reduce(x: Tensor) -> Tensor:
    """Sum the partial outputs of a row-parallel projection (o_proj, down_proj) over the tensor-parallel group: one
    AllReduce, traced into the graph inside ``mindspore.jit``. Every rank gets the same sum."""
    if _TP["op"] is None:
        raise RuntimeError("this decoder was split for tensor parallelism but the process has no tensor-parallel "
                           "group: load it with glm4v_ms.load_tp_model under msrun")
    return _r(_TP["op"](x))


_MATMUL_TB = ops.MatMul(transpose_b=True)


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b with W in torch layout [out, in].

    A 2-D MatMul with transpose_b: in PyNative on CPU, ``mint.nn.functional.linear`` and ``matmul(x, W.T)`` copy
    the transposed weight on every call (measured: 1.8 s instead of 35 ms for a 151552 x 1024 lm_head GEMV)."""
    shape = x.shape
    y = _MATMUL_TB(x.reshape(-1, shape[-1]), weight)
    if bias is not None:
        y = y + bias
    return _r(y.reshape(*shape[:-1], weight.shape[0]))


_MATMUL = ops.MatMul()


def matmul_plain(x: Tensor, weight: Tensor) -> Tensor:
    """y = x W with W stored "in x out" [in, out] (the MoE's expert weights): a 2-D MatMul over x's last dim."""
    shape = x.shape
    return _r(_MATMUL(x.reshape(-1, shape[-1]), weight).reshape(*shape[:-1], weight.shape[-1]))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm. Reference: normalise in fp32, cast back to the input dtype, *then* multiply by the weight.

    Fused (Ascend ``ops.rms_norm``): one kernel that multiplies by the weight before the single cast back, i.e. one
    rounding instead of two in bf16 (equal in fp32; tests/test_ascend_sim.py bounds the bf16 difference)."""
    if fused():
        return KERNELS.rms_norm(x, weight, eps)[0]
    dtype = x.dtype
    h = x.astype(ms.float32)
    var = mint.mean(h * h, -1, keepdim=True)
    h = h * mint.rsqrt(var + eps)
    return _r(weight * _r(h.astype(dtype)))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """torch.nn.LayerNorm over the last dim (biased variance), computed in fp32 and cast back."""
    dtype = x.dtype
    h = x.astype(ms.float32)
    mean = mint.mean(h, -1, keepdim=True)
    c = h - mean
    var = mint.mean(c * c, -1, keepdim=True)
    y = c * mint.rsqrt(var + eps)
    return _r((y * weight.astype(ms.float32) + bias.astype(ms.float32)).astype(dtype))


def gelu_exact(x: Tensor) -> Tensor:
    """GELU with the erf form (torch.nn.GELU() default); mint gelu has no CPU kernel."""
    return ops.gelu(x, approximate="none")


def silu(x: Tensor) -> Tensor:
    return mint.nn.functional.silu(x)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for a fused projection whose last dim is [gate | up] (Ascend: ``ops.swiglu``)."""
    if fused():
        return KERNELS.swiglu(gate_up, -1)
    inner = gate_up.shape[-1] // 2
    return _r(_r(silu(gate_up[..., :inner])) * gate_up[..., inner:])


def embedding(weight: Tensor, ids: Tensor) -> Tensor:
    return ops.gather(weight, ids, 0)


def _softmax_fp32(scores: Tensor, dtype) -> Tensor:
    return _r(ops.softmax(scores.astype(ms.float32), axis=-1).astype(dtype))


def fused_dtype(t: Tensor) -> bool:
    """The flash-attention kernels take float16/bfloat16 only; fp32 runs the eager math even on Ascend."""
    return t.dtype in (ms.float16, ms.bfloat16) or _FUSED["any_dtype"]


def vision_attention(q: Tensor, k: Tensor, v: Tensor, segments: Sequence[int], scale: float) -> Tensor:
    """Bidirectional attention confined to segments of a packed sequence (the ViT's cu_seqlens).

    q, k, v: [N, heads, head_dim]; ``segments`` are host ints with cu_seqlens semantics ([0, e1, e2, ..., N]).
    Each segment attends only to itself; no N x N mask is ever built. Returns [N, heads * head_dim].
    Fused: one ``flash_attention_score`` call in layout TND with actual_seq_qlen = actual_seq_kvlen = the cumulative
    end offsets, no mask, sparse_mode 0. Eager: a loop over the segments."""
    n, heads, hd = q.shape
    bounds = [int(e) for i, e in enumerate(segments) if i == 0 or e > segments[i - 1]]  # drop empty segments
    if fused() and fused_dtype(q):
        ends = tuple(bounds[1:])
        out = KERNELS.flash_attention_score(q, k, v, heads, actual_seq_qlen=ends, actual_seq_kvlen=ends,
                                            scalar_value=scale, input_layout="TND", sparse_mode=0)
        return out.reshape(n, heads * hd)
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs = q[s:e].transpose(1, 0, 2)  # [L, H, D] -> [H, L, D]
        ks = k[s:e].transpose(1, 0, 2)
        vs = v[s:e].transpose(1, 0, 2)
        w = mint.matmul(qs, ks.transpose(0, 2, 1)) * scale  # [H, L, L]
        w = _softmax_fp32(w, q.dtype)
        outs.append(mint.matmul(w, vs).transpose(1, 0, 2))  # [H, L, D] -> [L, H, D]
    out = outs[0] if len(outs) == 1 else mint.cat(outs, 0)
    return _r(out.reshape(n, heads * hd))


_COMPRESSED_CAUSAL = {}


def compressed_causal_mask() -> Tensor:
    """The 2048 x 2048 mask the flash-attention kernels take with sparse_mode 2/3: True (discard) above the
    diagonal. The kernel applies the causal pattern to any sequence length from it; no S x S mask is built."""
    if "m" not in _COMPRESSED_CAUSAL:
        _COMPRESSED_CAUSAL["m"] = Tensor(np.triu(np.ones((2048, 2048), dtype=np.bool_), 1))
    return _COMPRESSED_CAUSAL["m"]


def padded_prefill_discard(mask: Tensor) -> Tensor:
    """The flash-attention kernel's bool mask (True = discard) for an additive mask [B, 1, S, T] whose query
    positions are the last S of the T keys, with every query's own key kept.

    In a left-padded prefill the query rows of padding positions see no key at all (every key up to them is
    padding). CANN defines the output of such a fully-masked row only with inner_precise 2, which MindSpore 2.10
    documents as reserved ("inner_precise: the parameter is reserved and not implemented yet"), so it may be NaN/Inf;
    the next layer would then write NaN K/V for those positions into the cache, and since the probability 0 of a
    masked key times a NaN value is NaN, every real row of the batch would be corrupted. Keeping the own position
    gives every row at least one key. Real rows already see their own position (causal, and their key is real), so
    only padding rows change, and their outputs are never read (their logits are not used and their keys stay
    masked for every real query)."""
    s, t = mask.shape[-2], mask.shape[-1]
    own = (ops.arange(s).reshape(s, 1) + (t - s)) == ops.arange(t).reshape(1, t)
    return mint.logical_and(mask < 0, mint.logical_not(own))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
              causal_only: bool = False) -> Tensor:
    """Decoder attention with native GQA. q: [B, H, S, D]; k, v: [B, KVH, T, D] (query head h uses kv head
    h // (H / KVH), as HF's repeat_kv); mask: additive [B, 1, S, T] (0 keep, most negative value discard) or None.
    ``causal_only`` says the mask is exactly causal aligned bottom-right (no padding). Returns [B, S, H * D].

    Fused, S == 1 (decode): ``fused_infer_attention_score`` over the cache with num_key_value_heads (no repeated KV
    heads) and the bool mask. Fused, S > 1 (prefill): ``flash_attention_score`` with the compressed 2048 x 2048 mask
    and sparse_mode 3 when ``causal_only``, else the full bool mask with sparse_mode 0 (left-padded batches), in
    which each padding query keeps its own key so that no row is fully masked (``padded_prefill_discard``).
    Eager: queries grouped per KV head ([B, KVH, rep * S, D]), matmul, additive mask, fp32 softmax, matmul."""
    b, h, s, d = q.shape
    kvh, t = k.shape[1], k.shape[2]
    if fused() and fused_dtype(q):
        if s == 1:
            out = KERNELS.fused_infer_attention_score(q, [k], [v], atten_mask=mask < 0, num_heads=h, scale=scale,
                                                      input_layout="BNSD", num_key_value_heads=kvh)[0]
        elif causal_only:
            out = KERNELS.flash_attention_score(q, k, v, h, attn_mask=compressed_causal_mask(), scalar_value=scale,
                                                input_layout="BNSD", sparse_mode=3)
        else:
            out = KERNELS.flash_attention_score(q, k, v, h, attn_mask=padded_prefill_discard(mask),
                                                scalar_value=scale, input_layout="BNSD", sparse_mode=0)
        return out.transpose(0, 2, 1, 3).reshape(b, s, h * d)
    rep = h // kvh
    qg = q.reshape(b, kvh, rep * s, d)  # heads kvh*rep .. kvh*rep+rep-1 share kv head kvh
    w = mint.matmul(qg, k.transpose(0, 1, 3, 2)) * scale  # [B, KVH, rep*S, T]
    if mask is not None:
        w = (w.reshape(b, kvh, rep, s, t) + mask.reshape(b, 1, 1, s, t)).reshape(b, kvh, rep * s, t)
    w = _softmax_fp32(w, q.dtype)
    out = mint.matmul(w, v).reshape(b, h, s, d)  # [B, KVH, rep*S, D] -> [B, H, S, D]
    return _r(out.transpose(0, 2, 1, 3).reshape(b, s, h * d))


def rotary_half(x: Tensor, cos: Tensor, sin: Tensor, upcast: bool = False) -> Tensor:
    """Half-split ("rotate_half") rotation over the whole head: dim j pairs with j + D/2.

    x: [S, H, D] (ViT, packed patches) or [B, S, H, D] (decoder, BSND); cos/sin: [S, D] or [B, S, D]. ``upcast``
    rotates in fp32 and casts back (the ViT's reference); otherwise in the activation dtype (the decoder's).
    Fused: ``rotary_position_embedding`` mode 0 in layout BSND with cos 1S1D / BS1D (BNSD is avoided: the kernel
    refuses B * N > 8 S, which every decode step is)."""
    dtype = x.dtype
    if upcast:
        x = x.astype(ms.float32)
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    c, sn = cos.expand_dims(-2), sin.expand_dims(-2)  # [.., S, 1, D]
    if fused():
        x4, c4, s4 = (x, c, sn) if x.ndim == 4 else (x.expand_dims(0), c.expand_dims(0), sn.expand_dims(0))
        out = KERNELS.rotary_position_embedding(x4, c4, s4, 0).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        rot = mint.cat([-x[..., half:], x[..., :half]], -1)
        out = x * c + rot * sn
    return _r(out.astype(dtype))


def rotary_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
    """The decoder's rotation of q [B, S, H, D] and k [B, S, KVH, D] (BSND) with cos/sin [B, S, D].

    Fused: q and k are rotated together, concatenated along the head axis ([B, S, H + KVH, D], cos BS1D), then split.
    ``rotary_position_embedding`` infers the layout of x from the shapes of x and cos (MindSpore 2.10 docstring,
    "Config layout constraints": x BNSD takes cos 11SD / B1SD / BNSD, x BSND takes 1S1D / BS1D / BSND). k alone has
    one KV head per rank under tensor parallelism (GLM-4.1V-9B, TP 2), and in a decode step (S = 1) k [B, 1, 1, D]
    and cos [B, 1, 1, D] then have the same shape: that is BSND with cos BSND, but equally BNSD with cos BNSD, and
    read as BNSD with B * 1 > 8 * 1 (B > 8) it is the case the docstring's note excludes ("When the layout is BNSD,
    B * N > 8S ... this interface cannot be called"). With H + KVH >= 2 heads, x's head axis differs from cos's 1,
    so the only layout that fits is BSND with cos BS1D, which the docstring lists for mode 0. Eager: each rotated
    on its own (identical arithmetic: the rotation is per head)."""
    if fused():
        h = q.shape[2]
        qk = rotary_half(mint.cat([q, k.astype(q.dtype)], 2), cos, sin)
        return qk[:, :, :h], qk[:, :, h:]
    return rotary_half(q, cos, sin), rotary_half(k, cos, sin)


_SCATTER = ops.ScatterNdUpdate()


def cache_write(k_cache: Tensor, v_cache: Tensor, index: Tensor, k: Tensor, v: Tensor, kv_len: int):
    """Write k, v [B, KVH, S, D] into static caches [R >= B, KVH, max_len, D] in place at ``index`` ([B, KVH, S, 3]
    int32 (b, head, position) triples) and return the first ``kv_len`` positions of the first B rows, read after
    the write.

    ScatterNdUpdate updates its input in place in PyNative and in graph mode (measured on CPU; plain slice
    assignment inside ``jit`` is not ordered before later reads), so the cache never grows or gets copied."""
    k_cache = ops.depend(k_cache, _SCATTER(k_cache, index, k))
    v_cache = ops.depend(v_cache, _SCATTER(v_cache, index, v))
    b = index.shape[0]
    if b < k_cache.shape[0]:  # a shared cache of more rows (the server's slots): attend over the first b rows
        k_cache, v_cache = k_cache[:b], v_cache[:b]
    if kv_len == k_cache.shape[2]:  # a full-range slice is ~10x slower than a partial one in CPU graph mode
        return k_cache, v_cache
    return k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
