"""Tensor parallelism (TP) for the GLM-4 decoder: one process per rank, launched with ``msrun``.

Launch (CPU: backend mccl; Ascend: HCCL, one NPU per process, msrun exports ``DEVICE_ID`` = local rank)::

    msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 --master_port=8118 --join=True \\
          --cluster_time_out=60 --log_dir=tp_logs  my_script.py ...

and in the script (every rank runs the same code on the same inputs)::

    glm4v_ms.set_device("CPU")                     # or "Ascend"
    model, ctx = glm4v_ms.load_tp_model(folder, tp=2, dtype=mindspore.float32)
    ids = glm4v_ms.generate(model, **inputs, max_new_tokens=64)   # identical on every rank; print on ctx.tp_rank == 0

What is split (Megatron style, per decoder layer):

* attention: q_proj, k_proj, v_proj are column-parallel: rank r holds query heads [r H/tp, (r+1) H/tp) and the
  matching KV heads [r KV/tp, (r+1) KV/tp) (weight rows and bias), so every query head's KV head is local and GQA
  runs unchanged on the rank's heads. o_proj is row-parallel: the rank holds the input columns of its heads and its
  output is a partial sum; one AllReduce(sum) over the TP group follows (ops.tp_all_reduce). o_proj has no bias, so
  nothing is added twice.
* MLP: gate_up_proj stores [gate | up] rows; the rank holds its slice of the gate rows AND the matching slice of the
  up rows, concatenated as [gate_r | up_r], so swiglu (eager and Ascend's fused kernel, which split the last dim in
  half) works unchanged; down_proj is row-parallel over the same inner slice, followed by one AllReduce(sum).
* KV cache: the rank's model is built from a local copy of the text config (``TextConfig.tp_size`` = tp, heads, KV
  heads and intermediate_size divided by tp, head_dim kept), so the attention cells, the static KV cache (KVCache and
  the graph runner's caches are sized from the config: each rank holds only its KV heads) and the compiled graphs
  are right-sized without further code. The Ascend fused kernels need nothing special: flash_attention_score and
  fused_infer_attention_score get the local num_heads / num_key_value_heads from the tensors' shapes.

What is replicated (a simplification): the embeddings, every norm, the final norm, lm_head (a vocab-parallel lm_head
with an all-gather of the logits is a possible later step; on the 9B model it is 1.24 GB in bf16 per rank) and the
whole ViT (each rank runs it on the same pixels). Per layer the ranks exchange two [B, S, hidden] all-reduces.

Constraints: tp must divide num_attention_heads, num_key_value_heads and intermediate_size (an error names the
field). GLM-4.1V-9B has 32 heads, 2 KV heads and intermediate size 13696: tp 2 is the only split; tp > 2 would need
KV heads replicated across ranks, which is not implemented.

Loading: every rank reads the FULL checkpoint tensors; names and shapes are checked against the full model (errors
still name the tensor and give full shapes), the model's layout transform (q/k half rotary rows) runs on the full
tensor, then the rank's rows (column-parallel, biases too) or columns (row-parallel) are cut (``TPSplit.take``).
Converted folders (tools/convert.py) load the same way. GPTQ folders are dequantised at load and then cut (integer
weights under TP are refused with a clear error).

Results: the all-reduce changes only the order of the partial sums, so the logits equal the single-process model's
to fp32 rounding (tests/test_tensor_parallel.py, TP=2 on CPU: relative error 5.2e-7 on prefill logits, 3.3e-7 over
8 graph-mode decode steps, greedy tokens equal), and the sum is the same on every rank, so every rank computes
bitwise identical logits and tokens. Sampling is seeded on the host: an unseeded sampled request in graph mode gets
a seed drawn by TP rank 0 and shared over the group (``request_seed`` in engine.GraphSession), so every rank draws
the same uniforms. Eager-mode sampling (generation.EagerSession) does not do this yet: under TP give it a seed.

Data parallelism: with world > tp, TP groups are consecutive ranks (group g = ranks [g tp, (g+1) tp)), created with
``mindspore.communication.create_group``; ``ctx.dp_rank`` / ``ctx.dp_size`` tell a driver which requests are its
own (the library does not distribute requests).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from . import ops
from .config import TextConfig

_DECODER = "model.language_model.layers."
# parameter suffix (after "layers.N.") -> how it is split
_COLUMN_Q = ("self_attn.q_proj.weight", "self_attn.q_proj.bias")
_COLUMN_KV = ("self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias")
_ROW_O = ("self_attn.o_proj.weight",)
_GATE_UP = ("mlp.gate_up_proj.weight",)
_ROW_DOWN = ("mlp.down_proj.weight",)


@dataclass(frozen=True)
class TPContext:
    """Where this process sits: global ``rank`` of ``world``; ``tp_rank`` of ``tp_size`` in its TP group (the
    communication group ``group``); ``dp_rank`` of ``dp_size`` TP groups. MoE models (glm4v_moe): ``ep_rank`` of
    ``ep_size`` expert-parallel ranks, over the same group (its size is max(tp_size, ep_size))."""
    rank: int = 0
    world: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    group: Optional[str] = None
    ep_rank: int = 0
    ep_size: int = 1

    @property
    def group_size(self) -> int:
        return max(self.tp_size, self.ep_size)

    @property
    def enabled(self) -> bool:
        return self.group_size > 1

    def shared_seed(self) -> int:
        """A fresh random 48-bit seed, equal on every rank of the TP group (drawn by TP rank 0, summed over the
        group as two 24-bit halves: AllReduce on CPU takes float32 only, which holds 24-bit integers exactly)."""
        from mindspore import Tensor

        seed = int(np.random.SeedSequence().entropy % (1 << 48)) if self.tp_rank == 0 and self.ep_rank == 0 else 0
        if not self.enabled:
            return seed
        halves = np.array([seed >> 24, seed & 0xFFFFFF], np.float32)
        hi, lo = (int(v) for v in ops.tp_all_reduce(Tensor(halves)).asnumpy())
        return (hi << 24) | lo


_STATE = {"ctx": None}


def _launched_by_msrun() -> bool:
    return "MS_ROLE" in os.environ or "MS_SCHED_HOST" in os.environ


def _positive(value, what: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} size must be a positive integer, got {value!r}")
    return int(value)


def init_tensor_parallel(tp: int, ep: int = 1) -> TPContext:
    """Join the process group (``mindspore.communication.init``) and set up the model-parallel group of
    g = max(tp, ep) consecutive ranks; returns the context. ``tp``: attention heads and dense MLPs split over the
    group (1: replicated); ``ep`` (MoE models only): routed experts split over the group (1: every rank holds all).
    Each of tp and ep is 1 or g. Call once per process after ``glm4v_ms.set_device`` (default CPU); a repeated call
    with the same sizes returns the same context. tp == ep == 1 outside msrun: no communication."""
    tp, ep = _positive(tp, "tensor parallel"), _positive(ep, "expert parallel")
    g = max(tp, ep)
    if tp not in (1, g) or ep not in (1, g):
        raise ValueError(f"tensor parallel {tp} and expert parallel {ep}: each must be 1 or the same size "
                         "(attention and experts split over one group of ranks)")
    tp = int(tp)
    ctx = _STATE["ctx"]
    if ctx is not None:
        if (ctx.tp_size, ctx.ep_size) != (tp, ep):
            raise ValueError(f"model parallelism is already set up with tp={ctx.tp_size}, ep={ctx.ep_size} in this "
                             f"process; cannot switch to tp={tp}, ep={ep}")
        return ctx
    if g == 1 and not _launched_by_msrun():
        ctx = TPContext()
        _STATE["ctx"] = ctx
        return ctx
    if not _launched_by_msrun():
        raise RuntimeError(f"{'tensor' if tp > 1 else 'expert'} parallelism (tp={tp}, ep={ep}) runs one process per "
                           f"rank: launch the script with msrun --worker_num={g} --local_worker_num={g} "
                           "--master_addr=127.0.0.1 --master_port=<free port> --join=True --cluster_time_out=60 "
                           "<script> ...")
    ops.device_target()  # the backend must be chosen before the communication library starts (CPU by default)
    from mindspore.communication import GlobalComm, create_group, get_group_size, get_rank, init

    init()
    rank, world = int(get_rank()), int(get_group_size())
    if world % g:
        raise ValueError(f"model parallel size {g} does not divide the number of processes {world} "
                         "(msrun --worker_num); each group is max(tp, ep) consecutive ranks")
    dp_rank, g_rank = divmod(rank, g)
    group = None
    if g > 1:
        if world == g:
            group = GlobalComm.WORLD_COMM_GROUP
        else:
            group = f"glm4v_tp{dp_rank}"
            try:
                create_group(group, list(range(dp_rank * g, (dp_rank + 1) * g)))
            except Exception as e:  # a backend without sub-groups
                raise RuntimeError(f"data x model parallelism (world {world}, group {g}) needs a communication "
                                   f"group per model-parallel group, which this backend refused ({type(e).__name__}: "
                                   f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); run with "
                                   f"--worker_num={g} (one group) instead") from None
    ops.set_tensor_parallel(g, group)
    ctx = TPContext(rank=rank, world=world, tp_rank=g_rank if tp > 1 else 0, tp_size=tp, dp_rank=dp_rank,
                    dp_size=world // g, group=group, ep_rank=g_rank if ep > 1 else 0, ep_size=ep)
    _STATE["ctx"] = ctx
    return ctx


def check_divisible(cfg: TextConfig, tp: int) -> None:
    """Raise ValueError naming the first text-config field ``tp`` does not divide."""
    if not isinstance(tp, (int, np.integer)) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor parallel size must be a positive integer, got {tp!r}")
    ok = [t for t in range(1, cfg.num_attention_heads + 1)
          if not (cfg.num_attention_heads % t or cfg.num_key_value_heads % t or cfg.intermediate_size % t)]
    hint = f"tensor parallel sizes this model allows: {ok}"
    if cfg.num_attention_heads % tp:
        raise ValueError(f"config field 'text_config.num_attention_heads': {cfg.num_attention_heads} query heads "
                         f"cannot be divided among tensor_parallel={tp} ranks; {hint}")
    if cfg.num_key_value_heads % tp:
        raise ValueError(f"config field 'text_config.num_key_value_heads': {cfg.num_key_value_heads} KV heads "
                         f"cannot be divided among tensor_parallel={tp} ranks (each rank holds whole KV heads; "
                         f"tp > num_key_value_heads would need the KV heads replicated across ranks, which is not "
                         f"implemented); {hint}")
    if cfg.intermediate_size % tp:
        raise ValueError(f"config field 'text_config.intermediate_size': {cfg.intermediate_size} is not divisible "
                         f"by tensor_parallel={tp}; {hint}")


def check_divisible_moe(cfg, tp: int, ep: int) -> None:
    """The MoE decoder's (config.MoeTextConfig) checks: tp divides the heads, KV heads, the dense layers' and the
    shared experts' inner widths; ep divides the routed experts. ValueError names the field."""
    tp, ep = _positive(tp, "tensor parallel"), _positive(ep, "expert parallel")
    fields = [("num_attention_heads", cfg.num_attention_heads, tp), ("num_key_value_heads", cfg.num_key_value_heads, tp),
              ("intermediate_size", cfg.intermediate_size, tp),
              ("moe_intermediate_size x n_shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts, tp),
              ("n_routed_experts", cfg.n_routed_experts, ep)]
    for name, value, size in fields:
        if value % size:
            what = "expert_parallel" if name == "n_routed_experts" else "tensor_parallel"
            raise ValueError(f"config field 'text_config.{name}': {value} cannot be divided among {what}={size} "
                             "ranks")


def local_text_config(cfg: TextConfig, tp: int) -> TextConfig:
    """A rank's text config: heads, KV heads and intermediate size divided by ``tp`` (head_dim, rope and everything
    else kept), ``tp_size`` = tp. The same for every rank."""
    if cfg.tp_size != 1:
        raise ValueError("the text config is already a tensor-parallel rank's local config")
    check_divisible(cfg, tp)
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // tp,
                               num_key_value_heads=cfg.num_key_value_heads // tp,
                               intermediate_size=cfg.intermediate_size // tp, tp_size=tp)


# ---------------------------------------------------------------------------------------------------------------
# Slicing full tensors into a rank's part (pure numpy)
# ---------------------------------------------------------------------------------------------------------------

def shard_rows(arr: np.ndarray, rank: int, tp: int) -> np.ndarray:
    """Column-parallel: rank's contiguous block of output rows (dim 0) of a weight [out, in] or a bias [out]."""
    n = arr.shape[0] // tp
    return arr[rank * n:(rank + 1) * n]


def shard_cols(arr: np.ndarray, rank: int, tp: int) -> np.ndarray:
    """Row-parallel: rank's contiguous block of input columns (dim 1) of a weight [out, in]."""
    n = arr.shape[1] // tp
    return arr[:, rank * n:(rank + 1) * n]


def shard_gate_up(arr: np.ndarray, rank: int, tp: int) -> np.ndarray:
    """gate_up_proj [2 I, in] stored as [gate | up]: the rank's gate rows and the matching up rows, as
    [gate_r | up_r] ([2 I / tp, in])."""
    inner = arr.shape[0] // 2
    return np.concatenate([shard_rows(arr[:inner], rank, tp), shard_rows(arr[inner:], rank, tp)], 0)


class TPSplit:
    """The split of one GLM-4.1V checkpoint for TP rank ``rank`` of ``tp``: ``local`` (the rank's TextConfig),
    ``kind(name)``, ``full_shape(name, local_shape)`` and ``take(name, full_array)``."""

    def __init__(self, full: TextConfig, rank: int, tp: int):
        if not 0 <= rank < tp:
            raise ValueError(f"tensor parallel rank {rank} outside [0, {tp})")
        self.full, self.rank, self.tp = full, rank, tp
        self.local = local_text_config(full, tp)

    @staticmethod
    def kind(name: str) -> Optional[str]:
        """"rows", "cols", "gate_up" for a split decoder tensor; None for a replicated one."""
        if not name.startswith(_DECODER):
            return None
        suffix = name[len(_DECODER):].split(".", 1)[-1]
        if suffix in _COLUMN_Q or suffix in _COLUMN_KV:
            return "rows"
        if suffix in _ROW_O or suffix in _ROW_DOWN:
            return "cols"
        if suffix in _GATE_UP:
            return "gate_up"
        return None

    def full_shape(self, name: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
        kind = self.kind(name)
        shape = tuple(int(s) for s in shape)
        if kind in ("rows", "gate_up"):
            return (shape[0] * self.tp,) + shape[1:]
        if kind == "cols":
            return (shape[0], shape[1] * self.tp) + shape[2:]
        return shape

    def take(self, name: str, arr: np.ndarray) -> np.ndarray:
        kind = self.kind(name)
        if kind == "rows":
            return shard_rows(arr, self.rank, self.tp)
        if kind == "cols":
            return shard_cols(arr, self.rank, self.tp)
        if kind == "gate_up":
            return shard_gate_up(arr, self.rank, self.tp)
        return arr


def request_seed(model, seed: Optional[int], do_sample: bool) -> Optional[int]:
    """The host sampler's seed for one request: ``seed`` itself, except for an unseeded sampled request on a
    tensor-parallel model, which gets a seed shared by the TP group (every rank must draw the same uniforms)."""
    ctx = getattr(model, "tensor_parallel", None)
    if seed is not None or not do_sample or ctx is None or not ctx.enabled:
        return seed
    return ctx.shared_seed()
