"""GPTQ checkpoints (e.g. GLM-4.1V-9B-Thinking-GPTQ-Int4-Int8Mix): configuration, unpacking, dequantisation, and
the integer-weight linear layer for Ascend's weight-quant matmul.

The format, as AutoGPTQ / GPTQModel write it (``quant_method: "gptq"``), for a linear layer with K inputs, N outputs,
``bits`` in {4, 8} (``pack = 32 / bits`` values per int32) and groups of ``group_size`` inputs (-1: one group):

* ``qweight`` int32 [K / pack, N]: input k of output n sits in row k // pack at bits (k % pack) * bits;
* ``qzeros``  int32 [G, N / pack]: the zero point of group g, output n, in column n // pack at bits (n % pack) * bits;
  ``checkpoint_format: "gptq"`` (v1, the common one) stores zero - 1 and readers add 1 back without wrapping
  (so a stored 0xF means 16 at 4 bits, as every GPTQ kernel reads it); ``"gptq_v2"`` stores the zero itself;
* ``scales``  float16 [G, N];
* ``g_idx``   int32 [K]: the group of each input (act-order / ``desc_act`` checkpoints permute it; otherwise
  k // group_size, which is assumed when the tensor is absent);
* ``bias``    float16 [N] if the layer has one.

The weight is ``W[n, k] = (q[k, n] - zero[g_idx[k], n]) * scale[g_idx[k], n]``. Dequantisation computes it in fp32
(the integer difference is exact, the product one rounding) and casts to the model's dtype.

Per-module overrides (GPTQModel's ``dynamic``, used by the Int4/Int8 mixes): an ordered object of regular
expressions matched (``re.match``) against the module name; ``"-:pattern"`` leaves matching modules unquantised,
``"+:pattern"`` or a bare pattern applies its overrides (bits, group_size, sym, desc_act); the first match wins.

Which modules are quantised is read from the checkpoint (a module with ``<name>.qweight``); the configuration gives
their bits and group size, and the tensor shapes must agree with it (an error names the module otherwise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, nn

from . import ops
from .layers import new_param

QUANT_KEYS = ("qweight", "qzeros", "scales", "g_idx")
_OVERRIDE_KEYS = ("bits", "group_size", "sym", "desc_act")


class QuantConfigError(ValueError):
    """quantization_config cannot be read or describes a variant glm4v_ms does not support."""


@dataclass(frozen=True)
class GPTQSpec:
    bits: int
    group_size: int  # -1: one group over all inputs
    sym: bool
    desc_act: bool

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else -(-k // self.group_size)


def _spec_from(d: Dict[str, Any], where: str, base: Optional[GPTQSpec] = None) -> GPTQSpec:
    vals = {} if base is None else dict(bits=base.bits, group_size=base.group_size, sym=base.sym,
                                        desc_act=base.desc_act)
    for key in _OVERRIDE_KEYS:
        if key in d:
            vals[key] = d[key]
    vals.setdefault("group_size", -1)
    vals.setdefault("sym", True)
    vals.setdefault("desc_act", False)
    bits, gs = vals.get("bits"), vals["group_size"]
    if bits not in (4, 8) or isinstance(bits, bool):
        raise QuantConfigError(f"{where}.bits is {bits!r}; glm4v_ms reads GPTQ checkpoints with 4 or 8 bits")
    if isinstance(gs, bool) or not isinstance(gs, int) or not (gs == -1 or gs > 0):
        raise QuantConfigError(f"{where}.group_size is {gs!r}; expected -1 (one group) or a positive integer")
    for key in ("sym", "desc_act"):
        if not isinstance(vals[key], bool):
            raise QuantConfigError(f"{where}.{key} is {vals[key]!r}; expected true or false")
    return GPTQSpec(bits=bits, group_size=gs, sym=vals["sym"], desc_act=vals["desc_act"])


class GPTQConfig:
    """A checkpoint's ``quantization_config``: the default spec, the zero-point convention and the overrides."""

    def __init__(self, default: GPTQSpec, zero_offset: int, rules: List[Tuple[bool, "re.Pattern", GPTQSpec]]):
        self.default = default
        self.zero_offset = zero_offset  # added to stored zeros: 1 for checkpoint_format "gptq" (v1), 0 for v2
        self.rules = rules

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GPTQConfig":
        if not isinstance(d, dict):
            raise QuantConfigError("quantization_config must be a JSON object")
        method = str(d.get("quant_method", "")).lower()
        if method != "gptq":
            raise QuantConfigError(f"quantization_config.quant_method is {d.get('quant_method')!r}; glm4v_ms reads "
                                   "GPTQ checkpoints only (AWQ, FP8, bitsandbytes and others are not supported)")
        fmt = str(d.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise QuantConfigError(f"quantization_config.checkpoint_format is {fmt!r}; supported: 'gptq' and "
                                   "'gptq_v2' (repacked kernel formats such as marlin cannot be read)")
        pack_dtype = str(d.get("pack_dtype", "int32")).lower().replace("torch.", "")
        if pack_dtype != "int32":
            raise QuantConfigError(f"quantization_config.pack_dtype is {pack_dtype!r}; only int32 packing is "
                                   "supported")
        default = _spec_from(d, "quantization_config")
        rules = []
        dynamic = d.get("dynamic") or {}
        if not isinstance(dynamic, dict):
            raise QuantConfigError("quantization_config.dynamic must be an object of pattern -> overrides")
        for pattern, overrides in dynamic.items():
            negative = pattern.startswith("-:")
            body = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
            try:
                rx = re.compile(body)
            except re.error as e:
                raise QuantConfigError(f"quantization_config.dynamic pattern {pattern!r} is not a valid regular "
                                       f"expression: {e}") from None
            if not isinstance(overrides, dict):
                raise QuantConfigError(f"quantization_config.dynamic[{pattern!r}] must be an object")
            spec = default if negative else _spec_from(overrides, f"quantization_config.dynamic[{pattern!r}]",
                                                        default)
            rules.append((negative, rx, spec))
        return cls(default, 1 if fmt == "gptq" else 0, rules)

    def for_module(self, name: str) -> Optional[GPTQSpec]:
        """The spec of module ``name``, or None if an override excludes it from quantisation."""
        for negative, rx, spec in self.rules:
            if rx.match(name):
                return None if negative else spec
        return self.default


# ------------------------------------------------------------------------------------------------------------------
# Unpacking and dequantisation (numpy, one module at a time)

def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 [R, C] packed along rows -> uint8 [R * 32/bits, C] (value j of word r at bits j*bits)."""
    pack, mask = 32 // bits, (1 << bits) - 1
    words = packed.view(np.uint32)
    shifts = (np.arange(pack, dtype=np.uint32) * bits)[None, :, None]
    return ((words[:, None, :] >> shifts) & mask).astype(np.uint8).reshape(-1, packed.shape[1])


def unpack_cols(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 [R, C] packed along columns -> uint8 [R, C * 32/bits]."""
    pack, mask = 32 // bits, (1 << bits) - 1
    words = packed.view(np.uint32)
    shifts = (np.arange(pack, dtype=np.uint32) * bits)[None, None, :]
    return ((words[:, :, None] >> shifts) & mask).astype(np.uint8).reshape(packed.shape[0], -1)


@dataclass
class QuantTensors:
    """One module's unpacked GPTQ tensors: q [K, N] uint8, zeros [G, N] int16 (offset applied), scales [G, N] fp32,
    g_idx [K] int64."""
    q: np.ndarray
    zeros: np.ndarray
    scales: np.ndarray
    g_idx: np.ndarray

    def dequantize(self) -> np.ndarray:
        """W [N, K] float32 = (q - zero[g_idx]) * scale[g_idx], transposed to the torch layout."""
        z = self.zeros[self.g_idx].astype(np.float32)  # [K, N]
        s = self.scales[self.g_idx]
        return ((self.q.astype(np.float32) - z) * s).T

    @property
    def groups_contiguous(self) -> bool:
        return bool(np.all(np.diff(self.g_idx) >= 0))


def expected_shapes(spec: GPTQSpec, n: int, k: int) -> Dict[str, Tuple[int, ...]]:
    g = spec.groups(k)
    return {"qweight": (k // spec.pack, n), "qzeros": (g, n // spec.pack), "scales": (g, n), "g_idx": (k,)}


def check_module(name: str, spec: Optional[GPTQSpec], shapes: Dict[str, Tuple[int, ...]], n: int, k: int) -> None:
    """The checkpoint's tensors of quantised module ``name`` agree with its spec and the model's [n, k] layer."""
    if spec is None:
        raise QuantConfigError(f"module {name} has GPTQ tensors but quantization_config.dynamic excludes it from "
                               "quantisation; the checkpoint and its config disagree")
    if k % spec.pack or n % spec.pack:
        raise QuantConfigError(f"module {name}: [{n} x {k}] cannot be packed at {spec.bits} bits")
    want = expected_shapes(spec, n, k)
    for key in ("qweight", "qzeros", "scales"):
        if f"{name}.{key}" not in shapes:
            raise QuantConfigError(f"module {name}: tensor {name}.{key} is missing")
    if spec.desc_act and f"{name}.g_idx" not in shapes:
        raise QuantConfigError(f"module {name}: desc_act (act-order) checkpoints need {name}.g_idx, which is "
                               "missing")
    bad = [f"{name}.{key} {list(shapes[f'{name}.{key}'])} (expected {list(want[key])})" for key in QUANT_KEYS
           if f"{name}.{key}" in shapes and tuple(shapes[f"{name}.{key}"]) != want[key]]
    if bad:
        raise QuantConfigError(f"module {name} does not match bits={spec.bits}, group_size={spec.group_size} of "
                               f"quantization_config (check its per-module overrides): {', '.join(bad)}")


def read_module(name: str, spec: GPTQSpec, tensors: Dict[str, np.ndarray], zero_offset: int) -> QuantTensors:
    """Unpack one module's tensors (``tensors``: key without the module prefix -> array)."""
    q = unpack_rows(np.ascontiguousarray(tensors["qweight"], dtype=np.int32), spec.bits)
    k = q.shape[0]
    zeros = unpack_cols(np.ascontiguousarray(tensors["qzeros"], dtype=np.int32), spec.bits).astype(np.int16)
    zeros += zero_offset
    scales = np.asarray(tensors["scales"]).astype(np.float32)
    g = scales.shape[0]
    if tensors.get("g_idx") is not None:
        g_idx = np.asarray(tensors["g_idx"]).astype(np.int64)
        if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= g):
            raise QuantConfigError(f"module {name}: g_idx has groups outside [0, {g})")
    else:
        g_idx = np.zeros(k, np.int64) if spec.group_size == -1 else np.arange(k) // spec.group_size
    return QuantTensors(q=q, zeros=zeros, scales=scales, g_idx=g_idx)


# ------------------------------------------------------------------------------------------------------------------
# Integer weights kept on the device (Ascend WeightQuantBatchMatmul; an eager twin dequantises per call)

def pack_int4_pairs(values: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], last dim even -> int8 bytes holding pairs along the last dim, element 2j in the low
    nibble and 2j+1 in the high nibble (MindSpore's qint4x2 layout as documented for the weight-quant matmul)."""
    v = values.astype(np.int16) & 0xF
    return ((v[..., 1::2] << 4) | v[..., 0::2]).astype(np.uint8).view(np.int8)


def unpack_int4_pairs(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_int4_pairs: int8 bytes [..., C] -> int8 values [..., 2C] in [-8, 7]."""
    b = packed.view(np.uint8).astype(np.int16)
    lo, hi = b & 0xF, b >> 4
    out = np.stack([lo, hi], -1).reshape(*packed.shape[:-1], -1)
    return np.where(out >= 8, out - 16, out).astype(np.int8)


class QuantLinear(nn.Cell):
    """y = x W^T + b with W kept as signed integers: W[n, k] = (w[k, n] + offset[g, n]) * scale[g, n], groups of
    ``group_size`` consecutive inputs (after ``act_perm``, the act-order permutation, if any).

    Parameters: ``weight`` [K, N] int8 (8 bits) or [K, N/2] (4 bits, two values per byte along N; typed qint4x2 when
    built with the fused kernels on, plain int8 bytes otherwise), ``scale``
    and ``offset`` [G, N] in the compute dtype, ``bias`` [N], ``act_perm`` [K] int32 or None. The weight is stored
    as q - 2^(bits-1) and offset = 2^(bits-1) - zero, which is the kernel's ANTIQUANT(w) = (w + offset) * scale.

    Fused (Ascend): one ``weight_quant_batch_matmul`` (x in bf16/fp16, antiquant_group_size = group_size, no bias),
    then the bias added in the compute dtype.
    Eager (the reference twin, any device): the weight is dequantised per call and multiplied in the compute dtype;
    it saves memory, not time."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: GPTQSpec, act_order: bool, dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.spec = spec.bits, spec
        self.group_size = in_features if spec.group_size == -1 else spec.group_size
        g = spec.groups(in_features)
        if spec.bits == 4:
            # qint4x2 for the kernel; the eager twin keeps the same bytes as int8 (a dtype view does not compile)
            shape = (in_features, out_features // 2)
            self.weight = ms.Parameter(Tensor(np.zeros(shape, np.int8), dtype=ms.qint4x2), requires_grad=False) \
                if ops.fused() else new_param(shape, ms.int8)
        else:
            self.weight = new_param((in_features, out_features), ms.int8)
        self.scale = new_param((g, out_features), dtype)
        self.offset = new_param((g, out_features), dtype)
        self.bias = new_param((out_features,), dtype) if bias else None
        self.act_perm = new_param((in_features,), ms.int32) if act_order else None

    def dequantized(self) -> Tensor:
        """W^T [K, N] in the compute dtype (eager path)."""
        w = self.weight.astype(ms.float32)
        if self.bits == 4:  # two's complement nibbles: high = floor(b / 16), low = b - 16 * high, then sign the low
            hi = mint.floor(w / 16.0)
            lo = w - hi * 16.0
            lo = lo - (lo >= 8.0).astype(ms.float32) * 16.0
            w = mint.cat([lo.expand_dims(-1), hi.expand_dims(-1)], -1).reshape(self.in_features, self.out_features)
        k, n = self.in_features, self.out_features
        g = self.scale.shape[0]
        pad = g * self.group_size - k
        if pad:  # a last, shorter group
            w = mint.cat([w, mint.zeros((pad, n), dtype=ms.float32)], 0)
        w = (w.reshape(g, self.group_size, n) + self.offset.astype(ms.float32).expand_dims(1)) \
            * self.scale.astype(ms.float32).expand_dims(1)
        w = w.reshape(g * self.group_size, n)
        if pad:
            w = w[:k]
        return w.astype(self.scale.dtype)

    def construct(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.act_perm is not None:
            x2 = ops.embedding(x2.transpose(1, 0), self.act_perm).transpose(1, 0)  # inputs in group order
        if ops.fused() and ops.fused_dtype(x2):
            # one group over all inputs is the kernel's per-channel mode (group size 0, scale [1, N])
            gs = 0 if self.scale.shape[0] == 1 else self.group_size
            # No bias into the kernel: MindSpore 2.10's type inference for WeightQuantBatchMatmul requires bias,
            # antiquant_scale and antiquant_offset to have x's dtype (ops/infer/ops_func_impl/
            # weight_quant_batch_matmul.cc, InferType), while CANN's aclnnWeightQuantBatchMatmulV2 on Atlas A2/A3
            # requires a float32 bias when x is bfloat16 (docs/aclnnWeightQuantBatchMatmulV2.md, biasOptional). No
            # bias dtype satisfies both for bf16, so the bias is added after the kernel, in the compute dtype.
            y = ops.KERNELS.weight_quant_batch_matmul(x2, self.weight, self.scale, self.offset, None, None, None,
                                                      False, False, gs)
        else:
            y = mint.matmul(x2, self.dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def int_parameters(qt: QuantTensors, spec: GPTQSpec, name: str, dtype_np) -> Dict[str, np.ndarray]:
    """QuantLinear's arrays (``weight``, ``scale``, ``offset``, ``act_perm``) for one module, in the N-major layout
    the model's load transform permutes ([N, ...]): weight [N, K] int8 values, scale/offset [N, G]; ``act_perm`` [K].
    """
    half = 1 << (spec.bits - 1)
    q, g_idx = qt.q, qt.g_idx
    out = {}
    size = q.shape[0] if spec.group_size == -1 else spec.group_size
    if spec.desc_act:
        # act-order: sort the inputs by group; the layer gathers x's columns in the same order at run time
        perm = np.argsort(g_idx, kind="stable")
        q, g_idx = q[perm], g_idx[perm]
        out["act_perm"] = perm.astype(np.int32)
    if not np.array_equal(g_idx, np.arange(q.shape[0]) // size):
        raise QuantConfigError(f"module {name}: its g_idx does not form consecutive groups of {size} inputs, so the "
                               "integer weights cannot be kept; load it with quantized_weights='dequantize'")
    out["weight"] = (q.astype(np.int16) - half).astype(np.int8).T
    out["scale"] = qt.scales.T.astype(dtype_np)
    out["offset"] = (half - qt.zeros.astype(np.float32)).T.astype(dtype_np)
    return out
