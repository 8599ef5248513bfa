"""The device layer of the mixture of experts (GLM-4.5V / GLM-4.6V): the routed experts' computation.

``routed_experts(x, topk_ids, topk_weights, w13, w2, expert_start)`` is the one entry point; three forms, chosen
here and nowhere else:

* eager (PyNative, CPU and Ascend in fp32): the chosen (token, expert) pairs are read to the host, sorted by expert,
  and each *active* expert runs once on all of its tokens (one gather, then per active expert a [m, H] x [H, 2I]
  and a [m, I] x [I, H] matmul, then one scatter-add). No loop over all experts, none per token.
* static (inside a ``mindspore.jit`` graph of the runtime, ``ops.tracing()``; no host reads, static shapes): when
  the batch chooses at most a third as many (token, expert) pairs as there are local experts (small decode
  batches), the chosen experts' weights are gathered and applied with two batched matmuls (gathering moves each
  chosen expert three times); otherwise (larger decode batches, prefill on CPU) every local expert runs on every
  token and the results are weighted by the routing weights (0 where not chosen), which reads each expert once but
  computes E / K times the useful work in a prefill: a simplification for CPU graphs, where the real 106B model
  cannot run anyway; on Ascend the fused form below is used.
* fused (Ascend, bf16): ``moe_kernels.fused_routed_experts`` (MindSpore's MoE routing and grouped-matmul kernels).

Weights are stored "in x out" per local expert: ``w13`` [L, H, 2I] with gate columns [0, I) and up columns [I, 2I),
``w2`` [L, I, H] (the checkpoint's per-expert ``gate_proj / up_proj / down_proj.weight`` transposed at load time;
the layout MindSpore's grouped_matmul takes). Semantics (transformers 4.57's Glm4vMoeTextMoE.moe): for each chosen
local expert e of token n, ``f_e(x) = (silu(x W_gate) * (x W_up)) W_down`` in the activation dtype, times the fp32
routing weight, summed in fp32 and cast back to the activation dtype. Experts outside
[expert_start, expert_start + L) contribute nothing: another expert-parallel rank computes them.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint, ops as msops

from . import moe_kernels, ops

_BMM = msops.BatchMatMul()


def routed_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor,
                   expert_start: int = 0, num_experts: int = 0) -> Tensor:
    """x [N, H]; topk_ids [N, K] int32 global expert ids; topk_weights [N, K] fp32; w13 [L, H, 2I]; w2 [L, I, H];
    the rank's local experts are [expert_start, expert_start + L) of ``num_experts`` (0: L). Returns [N, H] in
    x.dtype (see the module docstring)."""
    if ops.fused() and ops.fused_dtype(x):
        return moe_kernels.fused_routed_experts(x, topk_ids, topk_weights, w13, w2, expert_start,
                                                num_experts or w13.shape[0])
    if ops.tracing():
        return _static(x, topk_ids, topk_weights, w13, w2, expert_start)
    return _eager(x, topk_ids, topk_weights, w13, w2, expert_start)


def _expert_mlp(xe: Tensor, w13e: Tensor, w2e: Tensor) -> Tensor:
    """One expert on its tokens: [m, H] -> [m, H] (swiglu over the fused [gate | up] output)."""
    return ops.matmul_plain(ops.swiglu(ops.matmul_plain(xe, w13e)), w2e)


def _eager(x, topk_ids, topk_weights, w13, w2, expert_start):
    n, h = x.shape
    local_n = w13.shape[0]
    ids = topk_ids.asnumpy().astype(np.int64).reshape(-1) - int(expert_start)  # [N*K] local ids
    k = ids.size // max(n, 1)
    pairs = np.flatnonzero((ids >= 0) & (ids < local_n))
    out = mint.zeros((n, h), dtype=ms.float32)
    if pairs.size == 0:
        return out.astype(x.dtype)
    order = pairs[np.argsort(ids[pairs], kind="stable")]  # (token, slot) pairs grouped by expert
    experts, starts = np.unique(ids[order], return_index=True)
    ends = np.append(starts[1:], order.size)
    tokens = Tensor((order // k).astype(np.int32))
    xs = msops.gather(x, tokens, 0)  # [M, H] the tokens, grouped by expert
    ys = [_expert_mlp(xs[int(s):int(e)], w13[int(ex)], w2[int(ex)]) for ex, s, e in zip(experts, starts, ends)]
    y = ys[0] if len(ys) == 1 else mint.cat(ys, 0)  # [M, H] in x.dtype
    w = msops.gather(topk_weights.reshape(-1).astype(ms.float32), Tensor(order.astype(np.int32)), 0)
    contrib = y.astype(ms.float32) * w.reshape(-1, 1)
    out = msops.tensor_scatter_add(out, tokens.reshape(-1, 1), contrib)
    return out.astype(x.dtype)


def _static(x, topk_ids, topk_weights, w13, w2, expert_start):
    n, h = x.shape
    k = topk_ids.shape[1]
    local_n = w13.shape[0]
    local = topk_ids - expert_start
    valid = mint.logical_and(local >= 0, local < local_n)
    weights = msops.where(valid, topk_weights.astype(ms.float32), msops.zeros_like(topk_weights).astype(ms.float32))
    safe = msops.where(valid, local, msops.zeros_like(local)).astype(ms.int32)
    # Gathering copies each chosen expert's weights (read, write, read again: 3 passes over N*K experts); running all
    # L experts reads each once. Gather when it moves fewer bytes (small decode batches), else run them all.
    if 3 * n * k <= local_n:  # gather the chosen experts' weights ([N*K, H, 2I] and [N*K, I, H])
        flat = safe.reshape(-1)
        xr = msops.broadcast_to(x.reshape(n, 1, 1, h), (n, k, 1, h)).reshape(n * k, 1, h)
        y = _BMM(ops.swiglu(_BMM(xr, msops.gather(w13, flat, 0))), msops.gather(w2, flat, 0))  # [N*K, 1, H]
        y = y.reshape(n, k, h).astype(ms.float32) * weights.reshape(n, k, 1)
        return y.sum(1).astype(x.dtype)
    # every local expert on every token, weighted by the routing weight (0 where not chosen)
    onehot = msops.one_hot(safe, local_n, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))  # [N, K, L]
    dense = (onehot * weights.reshape(n, k, 1)).sum(1)  # [N, L]
    xb = msops.broadcast_to(x.reshape(1, n, h), (local_n, n, h))
    y = _BMM(ops.swiglu(_BMM(xb, w13)), w2)  # [L, N, H]
    y = y.astype(ms.float32) * dense.transpose(1, 0).reshape(local_n, n, 1)
    return y.sum(0).astype(x.dtype)
