"""The Ascend form of moe_ops.routed_experts (MindSpore's MoE kernels). Being written (issue 18); until it lands the
fused MoE path refuses to run instead of computing something unverified."""

from __future__ import annotations


def fused_routed_experts(x, topk_ids, topk_weights, w13, w2, expert_start, num_experts_total):
    raise NotImplementedError("the fused Ascend MoE path is not in this build yet; run MoE models with the fused "
                              "kernels off (glm4v_ms.model.ops.set_fused(False))")
