"""NumPy models of the Ascend kernels the fused path calls, written from their documented semantics (MindSpore 2.10
docstrings of mindspore.ops.flash_attention_score, fused_infer_attention_score, rms_norm,
rotary_position_embedding, swiglu; MindSpore's WeightQuantBatchMatmul type inference
(mindspore/ops/infer/ops_func_impl/weight_quant_batch_matmul.cc) and CANN's aclnnWeightQuantBatchMatmulV2 page
(hicann/ops-nn, matmul/weight_quant_batch_matmul_v2/docs) for the weight-quant matmul). They stand in for the
kernels in tests (PyNative only): ``simulated_kernels()`` puts them into ``glm4v_ms.model.ops.KERNELS`` and
switches the fused path on.

Documented constraints are enforced: layouts, the 2048 x 2048 compressed causal mask for sparse modes 2/3,
cumulative actual_seq lengths in TND, N2 dividing N1, D a multiple of 16, the rotary kernel's cos layouts and its
refusal of BNSD with B * N > 8 S (also when x and cos have shapes that read as BNSD as well as BSND: the kernel
infers the layout from the shapes), and the dtypes (checked at the top of each model, each rule naming its source).
A fully-masked attention row gives NaN: its output is not defined by MindSpore's documentation (CANN defines it
only with inner_precise 2, which MindSpore lists as reserved), so the models take the worst case.

The arithmetic is fp32 whatever the input dtype (bf16 inputs are widened, the result rounded back to the input
dtype). The one deliberate relaxation: inside ``simulated_kernels(fp32=True)`` (the default, used to compare the
whole fp32 model's fused path with its eager path on CPU, where MindSpore has no bf16 matmul) float32 tensors are
accepted where the kernels take float16/bfloat16 and then stand for bfloat16, the model's dtype on Ascend, so every
rule that depends on x's dtype is applied as for bf16. With ``fp32=False`` the documented dtypes alone pass.
Each call is recorded in ``CALLS`` (kernel name, layout/mode, shapes, dtypes) for the tests to inspect.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor

from glm4v_ms.model import ops
from glm4v_ms.model.quant import unpack_int4_pairs

CALLS: List[dict] = []
# float32 stands in for bfloat16 where the kernels take float16/bfloat16 only (set by simulated_kernels(fp32=True))
FP32_STANDS_IN = {"on": False}
COMPRESSED = np.triu(np.ones((2048, 2048), dtype=bool), 1)


def _np(t) -> np.ndarray:
    return t.astype(ms.float32).asnumpy() if isinstance(t, Tensor) else np.asarray(t, np.float32)


def _back(a: np.ndarray, like: Tensor) -> Tensor:
    return Tensor(a.astype(np.float32)).astype(like.dtype)


def _softmax_rows(scores: np.ndarray, discard: Optional[np.ndarray]) -> np.ndarray:
    """fp32 softmax over the last axis; discarded entries get probability 0. A row that discards every key gives
    NaN: the kernels' output for it is undefined (see the module docstring), and NaN is the worst case."""
    s = scores.astype(np.float32)
    if discard is not None:
        s = np.where(discard, -np.inf, s)
    m = np.max(s, -1, keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.exp(s - m)  # a fully-masked row: -inf - (-inf) = NaN
        return e / e.sum(-1, keepdims=True)


class KernelDtypeError(TypeError):
    """A dtype the real kernel (or MindSpore's type inference in front of it) refuses."""


def _dt(t):
    return None if t is None else t.dtype


def _half(t, what, rule, extra=()) -> None:
    """t must be float16/bfloat16 (or ``extra``); float32 passes when it stands in for bfloat16."""
    ok = (ms.float16, ms.bfloat16) + tuple(extra)
    if not (t.dtype in ok or (t.dtype == ms.float32 and FP32_STANDS_IN["on"])):
        raise KernelDtypeError(f"{what} dtype {t.dtype} not in {ok} ({rule})")


def _same(a, b, what, rule) -> None:
    if a.dtype != b.dtype:
        raise KernelDtypeError(f"{what}: {a.dtype} != {b.dtype} ({rule})")


def _bf16_like(t) -> bool:
    return t.dtype == ms.bfloat16 or (t.dtype == ms.float32 and FP32_STANDS_IN["on"])


def _attend(q, k, v, scale, discard):
    """q [N1, S1, D], k/v [N2, S2, D], discard broadcastable to [N1, S1, S2]. Query head h uses kv head
    h // (N1 / N2) (grouped-query attention)."""
    n1, n2 = q.shape[0], k.shape[0]
    assert n1 % n2 == 0, f"N2={n2} must divide N1={n1}"
    kk, vv = np.repeat(k, n1 // n2, 0), np.repeat(v, n1 // n2, 0)
    p = _softmax_rows(scale * q @ kk.transpose(0, 2, 1), discard)
    return p @ vv


def _causal(s1: int, s2: int, mode: int) -> np.ndarray:
    """Discard pattern of sparse_mode 2 (leftUpCausal: j > i) or 3 (rightDownCausal: j > i + s2 - s1)."""
    i, j = np.arange(s1)[:, None], np.arange(s2)[None, :]
    return j > i if mode == 2 else j > i + (s2 - s1)


def _check_compressed(attn_mask):
    m = np.asarray(attn_mask.asnumpy() if isinstance(attn_mask, Tensor) else attn_mask)
    assert m.shape[-2:] == (2048, 2048), f"sparse_mode 2/3 needs the 2048x2048 compressed mask, got {m.shape}"
    assert np.array_equal(m.reshape(2048, 2048).astype(bool), COMPRESSED), "compressed mask is not upper-triangular"


def flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                          attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, keep_prob=1.0,
                          scalar_value=1.0, pre_tokens=2147483647, next_tokens=2147483647, inner_precise=0,
                          input_layout="BSH", sparse_mode=0):
    assert real_shift is None and drop_mask is None and keep_prob == 1.0 and prefix is None
    assert input_layout in ("BSH", "BNSD", "SBH", "BSND", "TND"), input_layout
    assert sparse_mode in (0, 2, 3), f"sparse_mode {sparse_mode} not modelled"
    # MindSpore 2.10 flash_attention_score docstring, Raises: query float16/bfloat16; query, key, value the same
    # dtype; attn_mask bool or uint8
    fa = "mindspore.ops.flash_attention_score"
    _half(query, "query", fa)
    _same(key, query, "key vs query", fa)
    _same(value, query, "value vs query", fa)
    if attn_mask is not None and attn_mask.dtype not in (ms.bool_, ms.uint8):
        raise KernelDtypeError(f"attn_mask dtype {attn_mask.dtype} must be bool or uint8 ({fa})")
    q, k, v = _np(query), _np(key), _np(value)
    d = q.shape[-1]
    assert d % 16 == 0 and d <= 512, f"D={d} must be a multiple of 16 (<= 512)"
    if sparse_mode in (2, 3):
        _check_compressed(attn_mask)
    empty = 0  # query rows whose every key is discarded (sparse_mode 0 with a full mask)
    if sparse_mode == 0 and attn_mask is not None:
        empty = int(np.asarray(attn_mask.asnumpy()).astype(bool).all(-1).sum())
    CALLS.append(dict(kernel="flash_attention_score", layout=input_layout, sparse_mode=sparse_mode,
                      q=q.shape, k=k.shape, qlen=actual_seq_qlen, kvlen=actual_seq_kvlen, dtype=query.dtype,
                      empty_rows=empty))
    if input_layout == "TND":
        assert actual_seq_qlen is not None and actual_seq_kvlen is not None, "TND needs actual_seq_qlen/kvlen"
        qe, ke = list(actual_seq_qlen), list(actual_seq_kvlen)
        assert len(qe) == len(ke) and qe[-1] == q.shape[0] and ke[-1] == k.shape[0], "cumulative ends != T"
        assert all(b > a for a, b in zip([0] + qe, qe)) and all(b > a for a, b in zip([0] + ke, ke)), \
            "actual_seq lengths must be cumulative, increasing, without empty sequences"
        assert q.shape[1] == head_num
        out = np.zeros_like(q)
        for qs, qend, ks, kend in zip([0] + qe[:-1], qe, [0] + ke[:-1], ke):
            disc = None if sparse_mode == 0 else _causal(qend - qs, kend - ks, sparse_mode)
            o = _attend(q[qs:qend].transpose(1, 0, 2), k[ks:kend].transpose(1, 0, 2), v[ks:kend].transpose(1, 0, 2),
                        scalar_value, disc)
            out[qs:qend] = o.transpose(1, 0, 2)
        return _back(out, query)
    assert input_layout == "BNSD", "only TND and BNSD are modelled"
    assert q.shape[1] == head_num
    b, _, s1, _ = q.shape
    s2 = k.shape[2]
    out = np.zeros_like(q)
    for i in range(b):
        if sparse_mode == 0:
            disc = None
            if attn_mask is not None:
                m = np.asarray(attn_mask.asnumpy()).astype(bool)
                disc = m if m.ndim == 2 else m[i] if m.shape[0] == b else m[0]
                assert disc.shape[-2:] == (s1, s2), f"sparse_mode 0 mask must be full S1 x S2, got {m.shape}"
        else:
            disc = _causal(s1, s2, sparse_mode)
        out[i] = _attend(q[i], k[i], v[i], scalar_value, disc)
    return _back(out, query)


def fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None,
                                actual_seq_lengths_kv=None, num_heads=1, scale=1.0, pre_tokens=2147483647,
                                next_tokens=2147483647, input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
                                inner_precise=1, **unused):
    assert pse_shift is None and not any(v is not None for v in unused.values()), "unmodelled arguments"
    assert input_layout == "BNSD", "only BNSD is modelled"
    key = key[0] if isinstance(key, (list, tuple)) else key
    value = value[0] if isinstance(value, (list, tuple)) else value
    # MindSpore 2.10 fused_infer_attention_score docstring: query float16/bfloat16/int8, key and value the same (the
    # int8-KV antiquant variants are not modelled, so key/value must have query's dtype); atten_mask int8/uint8/bool
    fia = "mindspore.ops.fused_infer_attention_score"
    _half(query, "query", fia)
    _same(key, query, "key vs query", fia)
    _same(value, query, "value vs query", fia)
    if atten_mask is not None and atten_mask.dtype not in (ms.bool_, ms.int8, ms.uint8):
        raise KernelDtypeError(f"atten_mask dtype {atten_mask.dtype} must be bool, int8 or uint8 ({fia})")
    q, k, v = _np(query), _np(key), _np(value)
    b, n1, s1, d = q.shape
    n2 = num_key_value_heads or n1
    assert q.shape[1] == num_heads, f"num_heads {num_heads} != query N {q.shape[1]}"
    assert k.shape[1] == n2, f"BNSD: num_key_value_heads {n2} must equal the key's N {k.shape[1]}"
    assert n1 % n2 == 0 and n1 // n2 <= 64
    assert s1 == 1, "the decode branch (Q_S = 1) is modelled"
    CALLS.append(dict(kernel="fused_infer_attention_score", layout=input_layout, q=q.shape, k=k.shape,
                      kv_heads=num_key_value_heads))
    s2 = k.shape[2]
    out = np.zeros_like(q)
    for i in range(b):
        disc = np.zeros((1, s2), bool)
        if atten_mask is not None:
            disc = np.asarray(atten_mask.asnumpy()).astype(bool)[i].reshape(1, s2)
        if actual_seq_lengths_kv is not None:
            disc = disc | (np.arange(s2) >= int(actual_seq_lengths_kv[i]))[None]
        out[i] = _attend(q[i], k[i], v[i], scale, disc)
    return _back(out, query), Tensor(np.zeros(1, np.float32))


def rms_norm(x, gamma, epsilon=1e-6):
    """y = x / sqrt(mean(x^2) + eps) * gamma, in fp32, one cast to x's dtype; rstd in fp32."""
    # MindSpore 2.10 rms_norm docstring, Raises: x and gamma float16/float32/bfloat16, and the same dtype
    rn = "mindspore.ops.rms_norm"
    _half(x, "x", rn, (ms.float32,))
    _same(gamma, x, "gamma vs x", rn)
    a, g = _np(x), _np(gamma)
    rstd = 1.0 / np.sqrt(np.mean(a * a, -1, keepdims=True) + np.float32(epsilon))
    CALLS.append(dict(kernel="rms_norm", shape=a.shape))
    return _back(a * rstd * g, x), Tensor(rstd.astype(np.float32))


def rotary_position_embedding(x, cos, sin, mode=0):
    """mode 0: rotate_half (dim j pairs with j + D/2); mode 1: interleaved pairs. cos/sin layouts as documented.

    The kernel has no layout argument: x's layout is inferred from the shapes of x and cos. When cos fits a BNSD
    reading of x (11SD / B1SD, or cos with x's own shape), the BNSD rule is applied, also when a BSND reading
    fits too: x [B, 1, 1, D] with cos [B, 1, 1, D] (one head, one position) is such an ambiguous shape, refused for
    B > 8 as the worst case."""
    # MindSpore 2.10 rotary_position_embedding docstring: x float16/bfloat16/float32, cos the same type as x, sin
    # the same as cos
    rp = "mindspore.ops.rotary_position_embedding"
    _half(x, "x", rp, (ms.float32,))
    _same(cos, x, "cos vs x", rp)
    _same(sin, cos, "sin vs cos", rp)
    a, c, s = _np(x), _np(cos), _np(sin)
    assert a.ndim == 4 and c.shape == s.shape and c.ndim == 4 and c.shape[-1] == a.shape[-1]
    assert a.shape[-1] % 2 == 0 and a.shape[-1] < 896
    bsnd = c.shape[1] == a.shape[1] and c.shape[2] in (1, a.shape[2])  # 1S1D / BS1D / BSND
    bnsd = c.shape[1] in (1, a.shape[1]) and c.shape[2] == a.shape[2]  # 11SD / B1SD / BNSD
    assert bsnd or bnsd, f"cos layout {c.shape} does not fit x {a.shape}"
    assert c.shape[0] in (1, a.shape[0])
    if mode == 1:
        assert c.shape[0] == 1, "mode 1 takes 11SD / 1S1D cos only"
    if bnsd:
        bb, n, sq = a.shape[0], a.shape[1], a.shape[2]
        assert not (bb * n > 8 * sq), ("BNSD with B*N > 8S is refused by the kernel" +
                                       (" (x and cos shapes read as BNSD as well as BSND: ambiguous layout)"
                                        if bsnd else ""))
    CALLS.append(dict(kernel="rotary_position_embedding", mode=mode, x=a.shape, cos=c.shape))
    if mode == 0:
        h = a.shape[-1] // 2
        rot = np.concatenate([-a[..., h:], a[..., :h]], -1)
    else:
        rot = np.stack([-a[..., 1::2], a[..., 0::2]], -1).reshape(a.shape)
    return _back(a * c + rot * s, x)


def swiglu(x, dim=-1):
    # MindSpore 2.10 swiglu docstring, Raises: input float16, float32 or bfloat16
    _half(x, "input", "mindspore.ops.swiglu", (ms.float32,))
    a = _np(x)
    g, u = np.split(a, 2, axis=dim)
    CALLS.append(dict(kernel="swiglu", shape=a.shape))
    return _back(g / (1 + np.exp(-g)) * u, x)


def weight_quant_batch_matmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None,
                              bias=None, transpose_x=False, transpose_weight=False, antiquant_group_size=0):
    """y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias (aclnnWeightQuantBatchMatmulV2 / MindSpore
    WeightQuantBatchMatmul). x [M, K] float16/bfloat16; weight [K, N] int8, or qint4x2 [K, N/2] holding two int4
    values per byte along N (element 2j in the low nibble: an assumption about the packing order, checked on a
    device by tools/ascend_check.py); per-channel: group size 0, scale/offset [N] or [1, N]; per-group: group size a
    multiple of 32 in [32, K - 1], scale/offset [ceil(K / group), N]; dtypes as checked below."""
    assert not transpose_x and not transpose_weight and quant_scale is None and quant_offset is None
    # dtypes: MindSpore 2.10 WeightQuantBatchMatmulFuncImpl::InferType: x float16/bfloat16; weight int4 (qint4x2) /
    # int8 / int32; antiquant_scale, antiquant_offset and bias all of x's dtype. CANN aclnnWeightQuantBatchMatmulV2
    # (Atlas A2/A3): antiquant scale/offset float16/bfloat16 equal to x's; bias float16 when x is float16 and float32
    # when x is bfloat16. For a bf16 x no bias dtype satisfies both, so a bf16 call must pass no bias.
    ms_rule = "MindSpore WeightQuantBatchMatmul InferType"
    _half(x, "x", ms_rule)
    if weight.dtype not in (ms.int8, ms.qint4x2):
        raise KernelDtypeError(f"weight dtype {weight.dtype} must be int8 or qint4x2 ({ms_rule})")
    _same(antiquant_scale, x, "antiquant_scale vs x", ms_rule + "; CANN: must equal x's dtype")
    if antiquant_offset is not None:
        _same(antiquant_offset, x, "antiquant_offset vs x", ms_rule + "; CANN: must equal antiquant_scale's")
    if bias is not None:
        if _bf16_like(x):
            raise KernelDtypeError(f"bias {bias.dtype} with x {x.dtype} (bfloat16): MindSpore's type inference "
                                   "requires bias of x's dtype, CANN's aclnnWeightQuantBatchMatmulV2 on A2/A3 requires "
                                   "float32; pass no bias")
        _same(bias, x, "bias vs x", ms_rule + "; CANN: float16 bias for float16 x")
    a = _np(x)
    assert a.ndim == 2
    raw = weight.asnumpy()
    assert raw.dtype == np.int8
    w = unpack_int4_pairs(raw) if weight.dtype == ms.qint4x2 else raw
    k, n = w.shape
    assert a.shape[1] == k, f"x {a.shape} does not fit weight [{k}, {n}]"
    sc = _np(antiquant_scale).reshape(-1, n)
    off = np.zeros_like(sc) if antiquant_offset is None else _np(antiquant_offset).reshape(-1, n)
    gs = int(antiquant_group_size)
    if gs == 0:
        assert sc.shape[0] == 1, "per-channel scales are [N] or [1, N]"
        rows = np.zeros(k, np.int64)
    else:
        assert gs % 32 == 0 and 32 <= gs <= k - 1, f"group size {gs} must be a multiple of 32 in [32, K-1]"
        assert sc.shape[0] == -(-k // gs), f"per-group scales must be [ceil(K/{gs}), N]"
        rows = np.arange(k) // gs
    deq = (w.astype(np.float32) + off[rows]) * sc[rows]
    y = a @ deq
    if bias is not None:
        y = y + _np(bias)
    CALLS.append(dict(kernel="weight_quant_batch_matmul", bits=4 if weight.dtype == ms.qint4x2 else 8, group=gs,
                      x=a.shape, w=(k, n), dtype=x.dtype, bias=bias is not None))
    return _back(y, x)


SIMS = dict(flash_attention_score=flash_attention_score, fused_infer_attention_score=fused_infer_attention_score,
            rms_norm=rms_norm, rotary_position_embedding=rotary_position_embedding, swiglu=swiglu,
            weight_quant_batch_matmul=weight_quant_batch_matmul)


@contextlib.contextmanager
def simulated_kernels(fp32: bool = True):
    """Fused path on, with the NumPy models in place of the Ascend kernels (restored afterwards). ``fp32``: float32
    inputs stand in for bfloat16 (see the module docstring); False: only the documented dtypes pass."""
    saved = {k: getattr(ops.KERNELS, k) for k in SIMS}
    state, stand_in = dict(ops._FUSED), dict(FP32_STANDS_IN)
    for k, f in SIMS.items():
        setattr(ops.KERNELS, k, f)
    ops.set_fused(True, any_dtype=fp32)
    FP32_STANDS_IN["on"] = fp32
    CALLS.clear()
    try:
        yield CALLS
    finally:
        for k, f in saved.items():
            setattr(ops.KERNELS, k, f)
        ops._FUSED.update(state)
        FP32_STANDS_IN.update(stand_in)
