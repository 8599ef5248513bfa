"""NumPy models of the Ascend kernels the fused path calls, written from their documented semantics (MindSpore 2.10
docstrings of mindspore.ops.flash_attention_score, fused_infer_attention_score, rms_norm,
rotary_position_embedding, swiglu, moe_init_routing_v2, moe_token_unpermute and grouped_matmul_v4, with CANN's
aclnn pages for the last three (hicann/ops-transformer, moe/ and gmm/ docs); MindSpore's WeightQuantBatchMatmul type
inference (mindspore/ops/infer/ops_func_impl/weight_quant_batch_matmul.cc) and CANN's aclnnWeightQuantBatchMatmulV2 page
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


# ---------------------------------------------------------------------------------------------------------------
# mixture-of-experts kernels (glm4v_ms/model/moe_kernels.py)
# ---------------------------------------------------------------------------------------------------------------

_FLOATS = (ms.float16, ms.bfloat16, ms.float32)


def moe_init_routing_v2(x, expert_idx, active_num, expert_capacity, expert_num, drop_pad_mode,
                        expert_tokens_count_or_cumsum_flag, expert_tokens_before_capacity_flag):
    """Dropless routing (drop_pad_mode 0, active_num 0), returning what the functional form returns
    (mindspore/ops/function/other_func.py): (expanded_x, expanded_row_idx, counts) with a count flag, else the first
    two. CANN aclnnMoeInitRoutingV2: sortedExpertIdx, sortedRowIdx = keyValueSort(flatten(expert_idx));
    expanded_x[i] = x[sortedRowIdx[i] // K]; expanded_row_idx[sortedRowIdx[i]] = i; counts = histogram (flag 2) or
    its cumsum (flag 1) over expert_num bins. The order of the rows of one expert is not documented; this model keeps
    source order (a stable sort)."""
    rule = "mindspore.ops.moe_init_routing_v2 docstring"
    if x.dtype not in _FLOATS:
        raise KernelDtypeError(f"x dtype {x.dtype} not in {_FLOATS} ({rule})")
    if expert_idx.dtype != ms.int32:
        raise KernelDtypeError(f"expert_idx dtype {expert_idx.dtype} must be int32 ({rule})")
    assert drop_pad_mode == 0 and active_num == 0, "only the dropless scenario (drop_pad_mode 0, active_num 0) is " \
                                                   "modelled"
    flag = int(expert_tokens_count_or_cumsum_flag)
    assert flag in (0, 1, 2), f"expert_tokens_count_or_cumsum_flag {flag} must be 0, 1 or 2 ({rule})"
    a, ids = _np(x), expert_idx.asnumpy()
    assert a.ndim == 2 and ids.ndim == 2 and ids.shape[0] == a.shape[0], \
        f"x {a.shape} must be [NUM_ROWS, H] and expert_idx {ids.shape} [NUM_ROWS, K] ({rule})"
    if flag:
        assert expert_num > 0 and ids.min(initial=0) >= 0 and ids.max(initial=0) < expert_num, \
            f"with a count flag the ids must lie in [0, expert_num - 1 = {expert_num - 1}] ({rule})"
    assert ids.min(initial=0) >= 0, f"expert ids must be >= 0 ({rule})"
    k = ids.shape[1]
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")  # sortedRowIdx
    row_idx = np.empty_like(order)
    row_idx[order] = np.arange(order.size)
    expanded = a[order // k]
    CALLS.append(dict(kernel="moe_init_routing_v2", x=a.shape, k=k, expert_num=expert_num, flag=flag, dtype=x.dtype))
    outs = (_back(expanded, x), Tensor(row_idx.astype(np.int32)))
    if flag:
        hist = np.bincount(flat, minlength=expert_num)[:expert_num]
        outs += (Tensor((hist if flag == 2 else np.cumsum(hist)).astype(np.int32)),)
    return outs


def grouped_matmul_v4(x, weight, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                      pre_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                      activation_quant_offset=None, split_item=0, group_type=-1, group_list_type=0, act_type=0,
                      output_dtype=None):
    """One matmul per group of consecutive rows (split_item 3, group_type 0: x [M, K], weight [E, K, N], group_list
    [E] int64): y[rows of group e] = x[rows of group e] @ weight[e], in fp32, one rounding to x's dtype. Group sizes
    are group_list (type 1) or its differences (type 0). Rows after the last group are left undefined by the kernel
    (NaN here, the worst case)."""
    assert all(t is None for t in (bias, scale, offset, antiquant_scale, antiquant_offset, pre_token_scale,
                                   activation_input, activation_quant_scale, activation_quant_offset, output_dtype)), \
        "only the non-quantised form without bias is modelled"
    assert split_item == 3 and group_type == 0 and act_type == 0, \
        "only single-tensor m-axis grouping (split_item 3, group_type 0) is modelled"
    rule = "mindspore.ops.auto_generate.grouped_matmul_v4 docstring"
    assert group_list_type in (0, 1), f"group_list_type {group_list_type} must be 0 or 1 ({rule})"
    assert isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)) and len(x) == len(weight) == 1, \
        f"split_item 3 takes a list of one x and one weight ({rule}, Parameter limitations 1)"
    xs, ws = x[0], weight[0]
    # Parameter limitations 2 and 3: float16 x float16 -> float16, bfloat16 x bfloat16 -> bfloat16, float32 x
    # float32 -> float32 (the last only with split_item 3, group_type 0)
    if xs.dtype not in _FLOATS or ws.dtype != xs.dtype:
        raise KernelDtypeError(f"x {xs.dtype} / weight {ws.dtype}: both float16, bfloat16 or float32 ({rule})")
    if group_list is None or group_list.dtype != ms.int64:
        raise KernelDtypeError(f"group_list must be an int64 tensor, got {_dt(group_list)} ({rule})")
    a, w, g = _np(xs), _np(ws), group_list.asnumpy().astype(np.int64)
    assert a.ndim == 2 and w.ndim == 3 and a.shape[1] == w.shape[1], \
        f"x {a.shape} must be [M, K] and weight {w.shape} [E, K, N] ({rule})"
    assert g.ndim == 1 and g.shape[0] == w.shape[0], f"group_list {g.shape} must have weight.shape[0] = {w.shape[0]} " \
                                                     f"entries ({rule})"
    # CANN aclnnGroupedMatmulV4: at most 1024 groups; last dims below 65536
    assert g.shape[0] <= 1024 and a.shape[1] < 65536 and w.shape[2] < 65536, "aclnnGroupedMatmulV4 size limits"
    # CANN aclnnGroupedMatmulV4: group_list non-negative (type 1), non-negative non-decreasing (type 0). MindSpore's
    # docstring says "positive"; empty groups (every decode step has them) are what vllm-mindspore and mindformers
    # pass, and CANN allows them.
    assert (g >= 0).all(), f"group_list {g.tolist()} must be non-negative (aclnnGroupedMatmulV4)"
    if group_list_type == 0:
        assert (np.diff(g) >= 0).all(), f"group_list {g.tolist()} (cumulative) must be non-decreasing"
    ends = g if group_list_type == 0 else np.cumsum(g)
    assert ends[-1] <= a.shape[0], f"the groups cover {ends[-1]} rows, x has {a.shape[0]} ({rule}: sum <= M)"
    y = np.full((a.shape[0], w.shape[2]), np.nan, np.float32)
    start = 0
    for e, end in enumerate(ends):
        y[start:end] = a[start:end] @ w[e]
        start = end
    CALLS.append(dict(kernel="grouped_matmul_v4", x=a.shape, w=w.shape, rows=int(ends[-1]),
                      group_list_type=group_list_type, dtype=xs.dtype))
    return [_back(y, xs)]


def moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """CANN aclnnMoeTokenUnpermute: out[i] = sum_j probs[i, j] * T[S[i * topK + j]] (topK = probs.shape[1], 1
    without probs), in fp32 with one rounding to the tokens' dtype. The documented formula multiplies every row,
    so a non-finite row with probability 0 gives NaN (the kernel source skips such rows; the documents do not say
    so, and the model takes the worst case)."""
    assert not padded_mode and restore_shape is None, "padded_mode must be False (mindspore.ops.moe_token_unpermute)"
    # dtypes: CANN aclnnMoeTokenUnpermute: tokens and probs bfloat16/float16/float32, every combination on Atlas A2/A3
    # (op_host/moe_token_unpermute_def.cpp); MindSpore 2.10 InferType: sorted_indices int32
    rule = "aclnnMoeTokenUnpermute / MindSpore MoeTokenUnpermute InferType"
    if permuted_tokens.dtype not in _FLOATS:
        raise KernelDtypeError(f"permuted_tokens dtype {permuted_tokens.dtype} not in {_FLOATS} ({rule})")
    if probs is not None and probs.dtype not in _FLOATS:
        raise KernelDtypeError(f"probs dtype {probs.dtype} not in {_FLOATS} ({rule})")
    if sorted_indices.dtype != ms.int32:
        raise KernelDtypeError(f"sorted_indices dtype {sorted_indices.dtype} must be int32 ({rule})")
    t, s = _np(permuted_tokens), sorted_indices.asnumpy().astype(np.int64)
    assert t.ndim == 2 and s.ndim == 1 and s.shape[0] == t.shape[0], \
        f"permuted_tokens {t.shape} must be [N * topK, H] and sorted_indices {s.shape} [N * topK] ({rule})"
    topk = 1 if probs is None else probs.shape[1]
    assert topk <= 512 and s.shape[0] % topk == 0, f"topK {topk} (<= 512) must divide {s.shape[0]} ({rule})"
    n = s.shape[0] // topk
    p = np.ones((n, 1), np.float32) if probs is None else _np(probs)
    assert p.shape == (n, topk), f"probs {p.shape} must be [N = {n}, topK = {topk}] ({rule})"
    assert np.array_equal(np.sort(s), np.arange(s.shape[0])), \
        "sorted_indices must be a permutation of [0, N * topK) (in range, no duplicates)"
    with np.errstate(invalid="ignore"):
        out = (t[s].reshape(n, topk, -1) * p[..., None]).sum(1)
    CALLS.append(dict(kernel="moe_token_unpermute", tokens=t.shape, topk=topk, dtype=permuted_tokens.dtype,
                      probs_dtype=_dt(probs)))
    return _back(out, permuted_tokens)


SIMS = dict(flash_attention_score=flash_attention_score, fused_infer_attention_score=fused_infer_attention_score,
            rms_norm=rms_norm, rotary_position_embedding=rotary_position_embedding, swiglu=swiglu,
            weight_quant_batch_matmul=weight_quant_batch_matmul, moe_init_routing_v2=moe_init_routing_v2,
            grouped_matmul_v4=grouped_matmul_v4, moe_token_unpermute=moe_token_unpermute)


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
