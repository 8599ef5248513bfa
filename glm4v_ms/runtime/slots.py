"""A fixed number of request slots over one shared KV cache, each slot at its own position: the decode side of
continuous batching (the server's engine loop in ``apps/serve`` decides who joins and leaves).

* The cache has ``slots`` rows of ``max_len`` positions. A request is prefilled alone (batch 1, the same
  ``GraphSession`` / ``EagerSession`` prefill as a single request, so its first token is the one it would get alone),
  then its prompt's K/V are copied into its slot row. From then on it feeds one token per shared decode step.
* One decode step runs the first ``tier`` rows, where ``tier`` is the smallest of 1, 2, 4, ... ``slots`` that covers
  the highest occupied slot (requests take the lowest free slot). Every row has its own cache position, rope delta
  and mask; free rows inside the tier compute a throw-away token at position 0 of their own row. In graph mode the
  step is compiled once per (tier, key-length bucket): requests coming and going never change the shapes, only the
  values (positions, tokens). Key-length buckets are powers of two from the runner's ``min_decode_bucket`` up to
  ``max_len``; the bucket of a step is that of its furthest row.
* Sampling per row. Eager mode: the logits come back to the host and each row is sampled with its own settings and
  generator (``sampling.next_tokens``, exactly as ``EagerSession``). Graph mode: the logits stay on the device; rows
  are grouped by the sampler's static choices (greedy, top-k size, top-p on/off) and each group is sampled by one
  small compiled graph over the whole tier (``sampling.device_next_tokens`` with the numeric knobs as per-row
  [tier, 1] tensors and the repetition penalty always on: a penalty of 1.0 leaves a logit bit-identical); tokens of
  rows outside the group are ignored. So a request's tokens do not depend on who else is in the batch, up to the
  rounding of a batched matmul (greedy results are compared with the request alone in tests/test_serve.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops as msops

from . import sampling
from ..model import ops
from ..model.generation_config import GenerationConfig
from ..model.kv_cache import KVCache, mask_fill
from .engine import GraphSession, graph_runner, next_pow2
from .generation import EagerSession, MODES

_SCATTER = msops.ScatterNdUpdate()


class _SlotDecode(nn.Cell):
    """One decode step over the first B rows of the slot cache, each row at its own position."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.kv_heads = model.config.text.num_key_value_heads
        self.fill = mask_fill(model.dtype)

    def construct(self, ids, pos, delta, seen, kv_len, track_seen, *caches):
        """ids [B, 1] int32, the fed tokens; pos [B] int32, the cache position each row writes; delta [B] int32
        rope deltas; seen [slots, V] fp32 (graph mode: the fed token is marked in place) or None. Returns fp32
        logits [B, V]."""
        m = self.model
        b = ids.shape[0]
        emb = m.language_model.embed_tokens(ids)  # [B, 1, hidden]
        p = (delta + pos).reshape(1, b, 1)
        cos, sin = m.rotary_tables(msops.concat([p, p, p], 0))  # decode: the same position on t, h and w
        allowed = msops.arange(kv_len).reshape(1, kv_len) <= pos.reshape(b, 1)
        mask = ((1.0 - allowed.astype(ms.float32)) * self.fill).astype(m.dtype).reshape(b, 1, 1, kv_len)
        shape = (b, self.kv_heads, 1, 1)
        index = msops.concat([msops.arange(b).astype(ms.int32).reshape(b, 1, 1, 1).broadcast_to(shape),
                              msops.arange(self.kv_heads).astype(ms.int32).reshape(1, -1, 1, 1).broadcast_to(shape),
                              pos.reshape(b, 1, 1, 1).broadcast_to(shape)], -1)
        h = m.language_model(emb, cos, sin, mask, caches, index, kv_len, False)
        logits = m.logits(h[:, 0]).astype(ms.float32)
        if track_seen:  # the fed token joins the sequence the repetition penalty looks at
            rows = msops.arange(b).astype(ms.int32).reshape(b, 1)
            logits = msops.depend(logits, _SCATTER(seen, msops.concat([rows, ids], -1),
                                                   msops.ones((b,), ms.float32)))
        return logits


def _sample_rows(logits, seen, uniforms, temperature, top_p, penalty, spec):
    """Device sampling of every row of ``logits`` [B, V] with one static ``spec`` (greedy, top_k, use_top_p) and
    per-row knobs [B, 1]."""
    greedy, top_k, use_top_p = spec
    return sampling.device_next_tokens(logits, seen[:logits.shape[0]], uniforms, temperature, top_p, penalty,
                                       greedy=greedy, top_k_=top_k, use_top_p=use_top_p, use_penalty=True)


@dataclass
class SlotRow:
    """Where one request lives in the shared batch and how its tokens are drawn."""
    slot: int
    pos: int                 # the cache position the next fed token is written to
    delta: int               # rope delta: decode position = cache position + delta
    gen: GenerationConfig
    session: Any             # the request's GraphSession (spec, knobs, generator) or EagerSession (seen, generator)

    @property
    def spec(self):
        greedy, top_k, use_top_p, _ = self.session.spec
        return (True, 0, False) if greedy else (False, top_k, use_top_p)


class SlotBatch:
    """``slots`` request slots of ``max_len`` positions over one KV cache; see the module docstring."""

    def __init__(self, model, slots: int, max_len: int, mode: str = "graph"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if slots <= 0:
            raise ValueError(f"the server needs at least one slot, got {slots}")
        self.model, self.mode, self.slots = model, mode, slots
        cfg = model.config.text
        self.vocab, self.kv_heads = cfg.vocab_size, cfg.num_key_value_heads
        self.cache = KVCache(cfg, slots, max_len, model.dtype)
        self.max_len = max_len
        self.tiers = sorted({min(next_pow2(n), slots) for n in range(1, slots + 1)})
        self._cell = _SlotDecode(model)
        self.shapes_seen: Dict[str, set] = {"decode": set(), "sample": set()}
        if mode == "graph":
            self.runner = graph_runner(model)
            self.min_bucket = self.runner.min_decode_bucket
            self._decode = ops.jit(self._cell.construct)
            self._sample = ms.jit(_sample_rows)
            self.seen = Parameter(mint.zeros((slots, self.vocab), dtype=ms.float32), name="slot_seen",
                                  requires_grad=False)
        else:
            self.runner = None
            self.min_bucket = 256
            self._decode = self._cell.construct
            self.seen = None

    # -------------------------------------------------------------------------------------------------- joining
    def tier(self, top_slot: int) -> int:
        """Rows a step runs when the highest occupied slot is ``top_slot``."""
        return next(t for t in self.tiers if t > top_slot)

    def kv_bucket(self, position: int) -> int:
        return min(self.max_len, max(self.min_bucket, next_pow2(position + 1)))

    def prefill(self, slot: int, inputs: Dict, gen: GenerationConfig) -> (int, SlotRow):
        """Run one request's prompt alone and move its K/V into ``slot``; returns (first token, its row)."""
        ids = np.asarray(inputs["input_ids"])
        s = int(ids.shape[-1])
        if s + 1 > self.max_len:
            raise ValueError(f"the prompt has {s} tokens; a server slot holds {self.max_len}")
        if self.mode == "graph":
            session = GraphSession(self.runner, gen, 1)
            scratch = self.runner.open_cache(1, s, 1)
            try:
                tok = session.prefill(inputs, scratch)
                self._copy_into(slot, scratch, s)
            finally:
                self.runner.close_cache(scratch)
            row_seen = np.zeros((1, self.vocab), np.float32)
            row_seen[0, ids.reshape(-1)] = 1.0
            _SCATTER(self.seen, Tensor(np.array([[slot]], np.int32)), Tensor(row_seen))
        else:
            session = EagerSession(self.model, gen, 1)
            scratch = KVCache(self.model.config.text, 1, s, self.model.dtype)
            tok = session.prefill(inputs, scratch)
            self._copy_into(slot, scratch, s)
        delta = int(np.asarray(scratch.rope_deltas).reshape(-1)[0])
        return int(tok[0]), SlotRow(slot=slot, pos=s, delta=delta, gen=gen, session=session)

    def _copy_into(self, slot: int, src: KVCache, n: int) -> None:
        idx = np.zeros((1, self.kv_heads, n, 3), np.int32)
        idx[..., 0] = slot
        idx[..., 1] = np.arange(self.kv_heads)[:, None]
        idx[..., 2] = np.arange(n)[None, :]
        index = Tensor(idx)
        for dst, part in zip(self.cache.tensors, src.tensors):
            _SCATTER(dst, index, part[:, :, :n])

    # ---------------------------------------------------------------------------------------------------- a step
    def step(self, rows: List[SlotRow], fed: List[int]) -> List[int]:
        """Feed ``fed[i]`` to ``rows[i]`` (all in one decode step) and return each row's next token."""
        top = max(r.slot for r in rows)
        n = self.tier(top)
        ids = np.zeros((n, 1), np.int32)
        pos = np.zeros((n,), np.int32)
        delta = np.zeros((n,), np.int32)
        for r, t in zip(rows, fed):
            if r.pos >= self.max_len:
                raise ValueError(f"slot {r.slot} is full ({self.max_len} positions)")
            ids[r.slot, 0], pos[r.slot], delta[r.slot] = t, r.pos, r.delta
        kv_len = self.kv_bucket(int(pos.max()))
        self.shapes_seen["decode"].add((n, kv_len))
        graph = self.mode == "graph"
        logits = self._decode(Tensor(ids), Tensor(pos), Tensor(delta), self.seen, kv_len, graph, *self.cache.tensors)
        for r in rows:
            r.pos += 1
        if graph:
            return self._sample_graph(rows, logits, n)
        host = logits.asnumpy()
        out = []
        for r, t in zip(rows, fed):  # exactly EagerSession.step's sampling, one row at a time
            s, g = r.session, r.gen
            s.seen = np.concatenate([s.seen, np.array([[t]], np.int64)], axis=1)
            tok = sampling.next_tokens(host[r.slot:r.slot + 1], s.seen, do_sample=g.do_sample,
                                       temperature_=g.temperature, top_k_=g.top_k, top_p_=g.top_p,
                                       repetition_penalty_=g.repetition_penalty, rng=s.rng)
            out.append(int(tok[0]))
        return out

    def _sample_graph(self, rows: List[SlotRow], logits, n: int) -> List[int]:
        groups: Dict[tuple, List[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.spec, []).append(i)
        out: List[Optional[int]] = [None] * len(rows)
        for spec, members in groups.items():
            greedy, top_k = spec[0], spec[1]
            width = 1 if greedy else (top_k or self.vocab)
            u = np.full((n, width), 0.5, np.float32)
            knobs = np.ones((3, n, 1), np.float32)  # temperature, top_p, penalty; 1.0 = no change
            for i in members:
                r = rows[i]
                if not greedy:
                    u[r.slot] = r.session.draw_uniforms()[0]
                    knobs[0, r.slot], knobs[1, r.slot] = r.gen.temperature, r.gen.top_p
                knobs[2, r.slot] = r.gen.repetition_penalty
            self.shapes_seen["sample"].add((n, spec))
            tok = self._sample(logits, self.seen, Tensor(u), Tensor(knobs[0]), Tensor(knobs[1]), Tensor(knobs[2]),
                               spec).asnumpy()
            for i in members:
                out[i] = int(tok[rows[i].slot])
        return out
