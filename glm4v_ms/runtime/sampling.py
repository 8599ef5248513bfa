"""Logits processors and samplers as small functions over host logits [B, V] (fp32 numpy).

Order and semantics follow transformers' generate: repetition penalty, then temperature, top-k, top-p, then a draw
from the softmax (or argmax when not sampling).
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
import mindspore.ops as mops


def repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """For every token id already in the row's sequence (prompt included): score / penalty if positive, score *
    penalty if negative (CTRL, as HF's RepetitionPenaltyLogitsProcessor)."""
    if penalty == 1.0:
        return logits
    out = logits.copy()
    for b in range(logits.shape[0]):
        ids = np.unique(seen[b])
        s = out[b, ids]
        out[b, ids] = np.where(s < 0, s * penalty, s / penalty)
    return out


def temperature(logits: np.ndarray, t: float) -> np.ndarray:
    if t <= 0:
        raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {t}")
    return logits if t == 1.0 else logits / np.float32(t)


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest scores per row (ties with the k-th are kept, as HF's TopKLogitsWarper)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype)


def top_p(logits: np.ndarray, p: float, min_keep: int = 1) -> np.ndarray:
    """Nucleus filter as HF's TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is
    <= 1 - p, always keep the ``min_keep`` most likely."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, -1)
    probs = softmax(sorted_logits)
    cum = np.cumsum(probs, axis=-1)
    remove_sorted = cum <= (1 - p)
    remove_sorted[:, -min_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, -1)
    return np.where(remove, -np.inf, logits).astype(logits.dtype)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(-1, keepdims=True)


def sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from softmax(logits); -inf entries have probability 0."""
    probs = softmax(logits)
    u = rng.random(probs.shape[0])[:, None]
    idx = (np.cumsum(probs, axis=-1) < u).sum(-1)
    return np.minimum(idx, probs.shape[-1] - 1).astype(np.int64)


def next_tokens(logits: np.ndarray, seen: np.ndarray, *, do_sample: bool, temperature_: float = 1.0,
                top_k_: int = 0, top_p_: float = 1.0, repetition_penalty_: float = 1.0,
                rng: np.random.Generator = None) -> np.ndarray:
    """The full pipeline for one step. logits: [B, V] of the last position; seen: [B, L] ids so far."""
    x = repetition_penalty(logits.astype(np.float32), seen, repetition_penalty_)
    if not do_sample:
        return np.argmax(x, axis=-1).astype(np.int64)
    x = top_p(top_k(temperature(x, temperature_), top_k_), top_p_)
    return sample(x, rng if rng is not None else np.random.default_rng())


# ---------------------------------------------------------------------------------------------------------------
# On device: the same pipeline as MindSpore ops, traced into the graph-mode decode step (engine.py), so that only
# the chosen token ([B] int32) is read back per step. Static choices (greedy, top-k size, top-p on/off, penalty
# on/off) are Python values fixed at trace time; the numeric knobs are 0-d tensors, so changing them does not
# recompile. The random draw is Gumbel-max: argmax(x + g), g = -log(-log(u)), is a draw from softmax(x); the
# uniforms ``u`` come from the host generator (seeded), one per candidate: [B, k] with top-k, else [B, V].
# Deviation from the host pipeline (pinned in tests/test_engine.py): top-k keeps exactly k candidates (HF keeps
# ties with the k-th score too); top-p compares an exclusive descending cumulative sum with p, the host an
# inclusive ascending one with 1 - p (they differ only by rounding at the boundary).
# ---------------------------------------------------------------------------------------------------------------

_NEG = float(np.finfo(np.float32).min)


def device_penalty(logits, seen, penalty):
    """Repetition penalty on device. logits: [B, V] fp32; seen: [B, V] fp32, 1 where the token occurred."""
    hit = seen > 0
    return mops.where(hit, mops.where(logits < 0, logits * penalty, logits / penalty), logits)


def device_next_tokens(logits, seen, uniforms, temperature_, top_p_, penalty_, *, greedy: bool, top_k_: int,
                       use_top_p: bool, use_penalty: bool):
    """[B] int32 next tokens from fp32 logits [B, V] (see the section comment)."""
    x = device_penalty(logits, seen, penalty_) if use_penalty else logits
    if greedy:
        return mops.argmax(x, -1).astype(ms.int32)
    x = x / temperature_
    if top_k_ > 0:
        vals, idx = mops.topk(x, top_k_)  # [B, k], sorted descending
    elif use_top_p:
        vals, idx = mops.sort(x, -1, True)
    else:
        vals, idx = x, None
    if use_top_p:
        probs = mops.softmax(vals, -1)
        before = mops.cumsum(probs, -1) - probs  # probability mass of the strictly more likely candidates
        vals = mops.where(before < top_p_, vals, mops.full_like(vals, _NEG))
    gumbel = -mops.log(-mops.log(uniforms))
    choice = mops.argmax(vals + gumbel, -1).astype(ms.int32)  # [B]
    if idx is None:
        return choice
    return mops.gather_elements(idx.astype(ms.int32), 1, choice.reshape(-1, 1)).reshape(-1)
