"""A GPTQ checkpoint writer for tests, written from the format description (not from any GPTQ library).

Quantisation here is round-to-nearest per group (no Hessian): what the tests need is the *storage format*, which
GPTQ's solver does not change. For a float weight W [N, K] (torch layout), ``bits`` in {4, 8}, groups of
``group_size`` inputs (-1: one group):

* per group g and output n: asymmetric range [min(0, w), max(0, w)] -> scale = range / maxq, zero = round(-min /
  scale); symmetric: scale = 2 max|w| / maxq, zero = (maxq + 1) / 2. The scale is stored as float16 and the integers
  are computed with the stored scale: q = clip(round(w / scale) + zero, 0, maxq);
* act-order (``desc_act``): inputs are visited in a random permutation ``perm`` and g_idx[perm[i]] = i // group_size;
* qweight int32 [K / pack, N]: input k at bits (k % pack) * bits of row k // pack;
* qzeros int32 [G, N / pack]: output n at bits (n % pack) * bits of column n // pack, holding ``(zero - 1) & maxq``
  in the v1 format ("gptq"; readers add 1 back without wrapping) or ``zero`` in "gptq_v2";
* reference dequantisation: (q - z_read) * scale in float32, with z_read the zero a reader recovers.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import numpy as np
from safetensors.numpy import load_file, save_file


def quantize(w: np.ndarray, bits: int, group_size: int, sym: bool, desc_act: bool, v1: bool = True,
             rng: Optional[np.random.Generator] = None) -> Dict[str, np.ndarray]:
    """Float W [N, K] -> {"qweight", "qzeros", "scales", "g_idx", "reference" (float32 [N, K])}."""
    n, k = w.shape
    maxq = (1 << bits) - 1
    pack = 32 // bits
    size = k if group_size == -1 else group_size
    g = -(-k // size)
    order = rng.permutation(k) if desc_act else np.arange(k)
    g_idx = np.empty(k, np.int32)
    g_idx[order] = np.arange(k) // size
    wt = w.astype(np.float32).T  # [K, N]
    scales = np.empty((g, n), np.float16)
    zeros = np.empty((g, n), np.int64)
    q = np.empty((k, n), np.int64)
    for gi in range(g):
        rows = np.flatnonzero(g_idx == gi)
        blk = wt[rows]
        lo, hi = np.minimum(blk.min(0), 0), np.maximum(blk.max(0), 0)
        if sym:
            amax = np.maximum(-lo, hi)
            scale = 2 * amax / maxq
            zero = np.full(n, (maxq + 1) // 2)
        else:
            scale = (hi - lo) / maxq
        scale = np.where(scale == 0, 1.0, scale).astype(np.float16)
        s32 = scale.astype(np.float32)
        if not sym:
            zero = np.clip(np.round(-lo / s32), 0, maxq).astype(np.int64)
        scales[gi], zeros[gi] = scale, zero
        q[rows] = np.clip(np.round(blk / s32) + zero, 0, maxq)
    stored = ((zeros - 1) & maxq) if v1 else zeros
    z_read = stored + 1 if v1 else stored  # readers do not wrap: a stored maxq means maxq + 1
    qweight = np.zeros((k // pack, n), np.uint32)
    for j in range(pack):
        qweight |= (q[j::pack].astype(np.uint32) << np.uint32(j * bits))
    qzeros = np.zeros((g, n // pack), np.uint32)
    for j in range(pack):
        qzeros |= (stored[:, j::pack].astype(np.uint32) << np.uint32(j * bits))
    ref = ((q.astype(np.float32) - z_read[g_idx].astype(np.float32)) * scales[g_idx].astype(np.float32)).T
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32), "scales": scales, "g_idx": g_idx,
            "reference": np.ascontiguousarray(ref), "q": q, "zeros": z_read}


def quantize_folder(src: str, dst: str, modules: Dict[str, dict], quantization_config: dict, seed: int = 0,
                    v1: bool = True, write_g_idx: bool = True) -> Dict[str, np.ndarray]:
    """Copy the HF folder ``src`` to ``dst`` with ``modules`` (name -> dict(bits, group_size, sym, desc_act))
    quantised; returns name -> reference float32 weight [N, K] (what an exact reader must dequantise to).

    The other tensors are written as float16 like GPTQ checkpoints' (biases of quantised modules too)."""
    rng = np.random.default_rng(seed)
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f.endswith(".safetensors") or f.endswith(".index.json") or f == "config.json":
            continue
        p = os.path.join(src, f)
        if os.path.isfile(p):
            with open(p, "rb") as a, open(os.path.join(dst, f), "wb") as b:
                b.write(a.read())
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quantization_config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out, refs = {}, {}
    for name, arr in tensors.items():
        mod = name.rsplit(".", 1)[0]
        if mod in modules and name.endswith(".weight"):
            p = quantize(arr, rng=rng, v1=v1, **modules[mod])
            for key in ("qweight", "qzeros", "scales") + (("g_idx",) if write_g_idx else ()):
                out[f"{mod}.{key}"] = p[key]
            refs[mod] = p["reference"]
        else:
            out[name] = arr.astype(np.float16)
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return refs
