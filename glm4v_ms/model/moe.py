"""The mixture-of-experts block of GLM-4.5V / GLM-4.6V (glm4v_moe): router, routed experts, shared experts.

Semantics of transformers 4.57.6's Glm4vMoeTextTopkRouter / Glm4vMoeTextMoE:

* router: logits = x_fp32 W_fp32^T (W [E, H], no bias), scores = sigmoid(logits); the choice uses
  scores + e_score_correction_bias (fp32 [E]): group score = sum of the top 2 choice scores of each of ``n_group``
  groups, the ``topk_group`` best groups are kept, the others' choice scores set to 0 (4.57 uses 0; 5.x uses -inf,
  the same whenever the chosen experts' scores are positive, always so with n_group = 1), then the top
  ``num_experts_per_tok`` experts. Their weights are the *unbiased* scores, normalised to sum 1 (+1e-20) when
  ``norm_topk_prob``, times ``routed_scaling_factor``.
* out = sum_k w_k f_{e_k}(x) (moe_ops.routed_experts: fp32 accumulation, cast back) + shared_experts(x).

Parallelism (parallel.py): an expert-parallel rank holds experts [ep_rank E/ep, (ep_rank + 1) E/ep) and computes
their share for *every* token (attention is replicated or tensor-parallel, so every rank has all tokens); the
partial outputs are summed with one AllReduce, which with tensor parallelism also carries the shared experts'
partial sum (their inner width split like the dense MLP's). Without tensor parallelism the shared experts are
replicated and added after the AllReduce. Tensor parallelism alone (ep 1) keeps every routed expert on every rank:
their output is whole on each rank and only the shared experts' partial sum is reduced.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops as msops

from . import moe_ops, ops
from .config import MoeTextConfig
from .layers import new_param
from .text import TextMLP

_MATMUL_TB = msops.MatMul(transpose_b=True)


class TopkRouter(nn.Cell):
    """``gate``: weight [E, H] and e_score_correction_bias [E], both held in fp32 whatever the model dtype: the
    reference computes the router in fp32 (a bf16 checkpoint's weight widens exactly), and holding it so saves
    casting it on every step. ``construct(x [N, H])`` -> (topk_ids [N, K] int32, topk_weights [N, K] fp32, choice
    scores [N, E])."""

    def __init__(self, cfg: MoeTextConfig, dtype):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm, self.scale = cfg.norm_topk_prob, float(cfg.routed_scaling_factor)
        self.weight = new_param((cfg.n_routed_experts, cfg.hidden_size), ms.float32)
        self.e_score_correction_bias = new_param((cfg.n_routed_experts,), ms.float32)

    def construct(self, x):
        n = x.shape[0]
        # fp32 on both sides, not ops.linear: the reference's router is fp32 and never rounded to bf16
        scores = msops.sigmoid(_MATMUL_TB(x.astype(ms.float32), self.weight))  # [N, E]
        choice = scores + self.e_score_correction_bias.reshape(1, -1)
        if self.topk_group < self.n_group:  # group-limited: keep the experts of the topk_group best groups
            per = self.n_experts // self.n_group
            grouped = choice.reshape(n, self.n_group, per)
            group_scores = msops.topk(grouped, 2)[0].sum(-1)  # [N, G]
            best = msops.topk(group_scores, self.topk_group)[1]  # [N, topk_group]
            keep = msops.one_hot(best, self.n_group, ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32)).sum(1)
            keep = msops.broadcast_to(keep.reshape(n, self.n_group, 1), (n, self.n_group, per)).reshape(n, -1)
            choice = msops.where(keep > 0, choice, msops.zeros_like(choice))
        ids = msops.topk(choice, self.top_k)[1]  # [N, K]
        w = msops.gather_elements(scores, 1, ids)
        if self.norm:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        w = w * self.scale
        return ids.astype(ms.int32), w, choice


class RoutedExperts(nn.Cell):
    """The rank's routed experts, fused per layer: gate_up_proj [L, H, 2I] (gate columns, then up), down_proj
    [L, I, H] ("in x out"; weights.load_pieces fills them from the checkpoint's per-expert tensors)."""

    def __init__(self, cfg: MoeTextConfig, dtype):
        super().__init__()
        n, h, inner = cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = new_param((n, h, 2 * inner), dtype)
        self.down_proj = new_param((n, inner, h), dtype)


class MoE(nn.Cell):
    def __init__(self, cfg: MoeTextConfig, dtype):
        super().__init__()
        self.gate = TopkRouter(cfg, dtype)
        self.experts = RoutedExperts(cfg, dtype)
        # tp: the shared experts' inner width is split like the dense MLP's (their partial sum joins the reduce)
        self.shared_experts = TextMLP(cfg, dtype, inner=cfg.moe_intermediate_size * cfg.n_shared_experts // cfg.tp_size,
                                      reduce=False)
        self.expert_start, self.num_experts = cfg.expert_start, cfg.n_routed_experts
        self.tp, self.ep = cfg.tp_size > 1, cfg.ep_size > 1

    def construct(self, x, router_log=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        ids, w, choice = self.gate(x2)
        if router_log is not None:  # eager only (parity checks): the layer's choices and their scores
            router_log.append((ids, choice))
        routed = moe_ops.routed_experts(x2, ids, w, self.experts.gate_up_proj, self.experts.down_proj,
                                        self.expert_start, self.num_experts)
        shared = self.shared_experts(x2)
        if self.tp and self.ep:  # routed: this rank's experts; shared: this rank's slice of the inner width
            out = ops.tp_all_reduce(routed + shared)
        elif self.tp:  # every rank holds every expert: routed is already whole, only the shared part is partial
            out = ops.tp_all_reduce(shared) + routed
        elif self.ep:
            out = ops.tp_all_reduce(routed) + shared
        else:
            out = routed + shared
        return out.reshape(shape)
