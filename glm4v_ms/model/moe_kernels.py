"""The routed experts of a mixture-of-experts layer on Ascend: MindSpore 2.10's MoE kernels, behind ``ops.KERNELS``.

``fused_routed_experts`` computes exactly what ``moe_ops.routed_experts`` specifies (the eager twin), for the L local
experts [expert_start, expert_start + L) of E_total:

    out[n] = sum_k [ids[n, k] is local] * w[n, k] * f_e(x[n]),   e = ids[n, k] - expert_start
    f_e(x) = (silu(x @ w13[e][:, :I]) * (x @ w13[e][:, I:])) @ w2[e]

with four kernels (five calls) and no host synchronisation (every shape is static, so it traces into ``mindspore.jit``):

1. ``moe_init_routing_v2(x, ids, active_num=0, expert_capacity=0, expert_num=E_total, drop_pad_mode=0,
   expert_tokens_count_or_cumsum_flag=2, expert_tokens_before_capacity_flag=True)``: dropless routing. Sorts the N*K
   (token, choice) pairs by expert id and returns the permuted rows ``expanded_x`` [N*K, H] (row i is
   ``x[sorted_row_idx[i] // K]``), ``expanded_row_idx`` [N*K] int32 with ``expanded_row_idx[n*K + k]`` = the row of
   pair (n, k) in ``expanded_x``, and (flag 2) the number of rows of each expert [E_total] int32. The primitive's
   fourth output (tokens before capacity) is defined only in drop/pad mode, and the functional form returns only
   these three in dropless mode with a count flag (mindspore/ops/function/other_func.py); the flags are the ones
   vllm-mindspore and mindformers pass to the primitive.
2. ``grouped_matmul_v4([expanded_x], [w13], group_list=counts[:L] (int64), split_item=3, group_type=0,
   group_list_type=1)``: one matmul per local expert over its consecutive rows (m-axis grouping, one tensor each for
   x / weight / y, weight [L, K, N] "in x out", group_list_type 1 = per-group row counts) -> [N*K, 2I].
3. ``swiglu(h, -1)``: silu of the first half of the last axis times the second half -> [N*K, I].
4. ``grouped_matmul_v4`` again with w2 [L, I, H] -> [N*K, H], then ``moe_token_unpermute(y, expanded_row_idx,
   probs=weights)``: ``out[n] = sum_k probs[n, k] * y[expanded_row_idx[n*K + k]]``, products and sum in fp32 with one
   rounding to y's dtype (CANN's kernel source), i.e. transformers' order (bf16 expert outputs, fp32 weights and
   accumulation, one cast at the end). The weights are passed in float32: CANN's op definition accepts float32 probs
   with bfloat16 tokens, and MindSpore 2.10's type inference accepts them (an older MindSpore wanted bfloat16 for
   both; the jit test in tests/test_ascend_sim_moe.py runs 2.10's inference on exactly these dtypes).

Expert parallelism (L < E_total), as mindformers' ExpertParallelMoE.moe_with_allgather and vllm-mindspore's
FusedExperts.run_tp_mix_ep do it: ids are made local (ids - expert_start); every non-local id becomes E_total - 1,
which is >= L, so after the sort all rows of non-local pairs come after the local experts' rows; the grouped matmuls
get only the L local counts, so they compute only the local rows (MindSpore 2.10's docstring: the group sizes may sum
to less than x's rows); the rows after them are left undefined by the kernel and are zeroed here (a select, NaN-safe:
the references use nan_to_num for the same reason), and the weights of non-local pairs are zeroed (CANN's unpermute
kernel then skips those rows). The caller all-reduces the ranks' partial outputs.

Sources (read for the call arguments and semantics):
- MindSpore 2.10 docstrings (installed wheel): mindspore.ops.moe_init_routing_v2,
  mindspore.ops.auto_generate.grouped_matmul_v4 (Parameter limitations 1-3: split_item 3 / group_type 0 take one
  2-D x, one 3-D weight [E, K, N] and a 1-D int64 group_list of E entries; bf16 x/weight -> bf16; fp32 only in this
  single-tensor mode), mindspore.ops.moe_token_unpermute, mindspore.ops.swiglu.
- CANN ops-transformer docs: aclnnMoeInitRoutingV2.md (expandedRowIdxOut[sortedRowIdx[i]] = i, expandedXOut[i] =
  x[sortedRowIdx[i] // k]), aclnnGroupedMatmulV4.md (group_list non-negative for groupListType 1, at most 1024
  groups), aclnnMoeTokenUnpermute.md (O[i] = sum_j T[S[i*topK + j]] * P[i][j]; indices without duplicates; topK
  <= 512); moe/moe_token_unpermute/op_host/moe_token_unpermute_def.cpp (dtype combinations) and op_kernel/
  moe_token_unpermute.h (fp32 accumulation, zero-weight rows skipped).
- vllm-mindspore vllm_mindspore/model_executor/layers/fused_moe/fused_moe.py (FusedExperts.run_tp, run_tp_mix_ep),
  mindformers mindformers/parallel_core/inference/transformer/moe/{moe_layer.py, experts.py} and
  research/deepseek3/moe.py (ExpertParallelMoE.moe_with_allgather): the same routing, grouped-matmul and unpermute
  calls and arguments. They cast the weights to the tokens' dtype and apply silu(gate) * up with separate ops; here
  the weights stay float32 (transformers' order) and swiglu is one kernel, as ops.swiglu is for the dense MLP.
- vllm-ascend vllm_ascend/ops/fused_moe/token_dispatcher.py (TokenDispatcherWithAllGather: torch_npu's routing
  with active_expert_range, which MindSpore 2.10's moe_init_routing_v2 lacks, then the local experts' counts as
  group sizes and token_unpermute with the non-local weights zeroed) and moe_comm_method.py (token_unpermute chosen
  over moe_finalize_routing, which they found inaccurate).

Not verified without an NPU (tools/ascend_check.py checks it on a device against the fp32 eager routed_experts, in
PyNative and compiled, all experts local and as an expert-parallel rank): that the kernels behave as the documents
say, in particular that the A2/A3 grouped matmul accepts group sizes summing to less than x's rows (CANN's A2/A3
table asks for equality; MindSpore's docstring and the three reference code bases rely on "less or equal"), and that
float32 probs with bfloat16 tokens pass MindSpore's Ascend adapter (MindSpore's type inference accepts them:
tests/test_ascend_sim_moe.py traces the function under mindspore.jit up to kernel selection). tests/ascend_sim.py
holds NumPy models of the four kernels, and tests/test_ascend_sim_moe.py checks this function through them against
the plain definition.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, mint
from mindspore import ops as msops

from . import ops


def _check_layout(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor, expert_start: int,
                  num_experts_total: int) -> None:
    """Static (host) checks of shapes and the expert range; they read no tensor data."""
    if x.ndim != 2:
        raise ValueError(f"routed experts: x must be [N, H], got {tuple(x.shape)}")
    n, h = x.shape
    if topk_ids.ndim != 2 or topk_ids.shape[0] != n or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"routed experts: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [N={n}, K]")
    local, inter2 = w13.shape[0], w13.shape[2]
    if w13.shape[1] != h or inter2 % 2 or tuple(w2.shape) != (local, inter2 // 2, h):
        raise ValueError(f"routed experts: w13 {tuple(w13.shape)} must be [L, H={h}, 2*I] and w2 {tuple(w2.shape)} "
                         "[L, I, H] (in x out layout)")
    if expert_start < 0 or expert_start + local > num_experts_total:
        raise ValueError(f"routed experts: local experts [{expert_start}, {expert_start + local}) do not fit in "
                         f"{num_experts_total} experts; check expert_start and the expert-parallel split")


def fused_routed_experts(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor,
                         expert_start: int, num_experts_total: int) -> Tensor:
    """Routed experts with the Ascend MoE kernels (see the module docstring). x [N, H]; topk_ids [N, K] global ids;
    topk_weights [N, K]; w13 [L, H, 2I]; w2 [L, I, H]. Returns [N, H] in x's dtype; pairs whose expert is not local
    contribute nothing."""
    expert_start, num_experts_total = int(expert_start), int(num_experts_total)
    _check_layout(x, topk_ids, topk_weights, w13, w2, expert_start, num_experts_total)
    n, k = topk_ids.shape
    local = w13.shape[0]
    ids = topk_ids.astype(ms.int32)  # the routing kernel takes int32 ids
    weights = topk_weights.astype(ms.float32)
    partial = local < num_experts_total
    if partial:
        ids = ids - expert_start
        foreign = mint.logical_not(mint.logical_and(ids >= 0, ids < local))  # [N, K]
        # E_total - 1 >= L here: non-local pairs sort after every local expert, inside the kernel's id range
        ids = msops.masked_fill(ids, foreign, num_experts_total - 1)
        weights = msops.masked_fill(weights, foreign, 0.0)
    expanded_x, expanded_row_idx, counts = ops.KERNELS.moe_init_routing_v2(
        x, ids, 0, 0, num_experts_total, 0, 2, True)  # [N*K, H], [N*K], [E_total]
    group_list = counts[:local].astype(ms.int64)  # rows per local expert, in sort order
    gate_up = ops.KERNELS.grouped_matmul_v4([expanded_x], [w13], group_list=group_list, split_item=3, group_type=0,
                                            group_list_type=1)[0]  # [N*K, 2I]
    act = ops.KERNELS.swiglu(gate_up, -1)  # [N*K, I]
    y = ops.KERNELS.grouped_matmul_v4([act], [w2], group_list=group_list, split_item=3, group_type=0,
                                      group_list_type=1)[0]  # [N*K, H]; rows past sum(group_list) undefined
    if partial:
        computed = (msops.arange(n * k) < group_list.sum()).reshape(n * k, 1)  # [N*K, 1]
        y = msops.masked_fill(y, mint.logical_not(computed), 0.0)
    return ops.KERNELS.moe_token_unpermute(y, expanded_row_idx, weights)  # [N, H] in y's dtype
