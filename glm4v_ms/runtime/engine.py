"""Graph mode: the decoder's prefill and decode step compiled with ``mindspore.jit`` at static shapes.

* decode: one graph per cache-length bucket (powers of two from ``min_decode_bucket``, capped at the cache size),
  compiled once and reused for every token. The step embeds the fed token, computes its rotary angles from the
  cache position, writes K/V into the static cache in place, attends over the bucket with a mask built in the graph,
  computes the logits of its one position and samples on device. Per step the host sends the fed token and its
  position (a few bytes) and reads back one int32 per row: that read is the only host sync.
* prefill: the prompt is right-padded to its length bucket (8 per octave, ``prefill_len``; one graph per bucket);
  logits only for the last prompt position; the first token is sampled on device. Before it, the ViT's block stack
  runs as a graph compiled per image grid (the patch embedding, position resampling and merger stay eager), and the
  scatter of its features into the token embeddings and the 3D positions (``get_rope_index``, host numpy) run
  eagerly.

The same cells and ops as the eager path are traced (``ops.py`` picks eager math on CPU, fused kernels on Ascend),
so graph mode changes where the work runs, not what is computed. Padded prompt positions write junk K/V into the
cache beyond the prompt; every decode step overwrites its own position before reading it, and the in-graph mask
hides the rest.

The cache tensors go in as trailing varargs: a tuple of tensors as one jit argument fails on the second call in
MindSpore 2.10 ("flatten tensor not supported"), flat arguments do not.

The runner holds compiled graphs (an execution artifact of one model), never request state: the cache, the
positions and the sampler state are per request (:class:`GraphSession`).

Compiles are one-time work and are accounted for apart from steady state. The first call of a graph with a new
signature (what MindSpore keys its graph cache on: tensor shapes and dtypes, Parameter identities, constant values)
compiles it: that call is timed on its own, reported to ``GraphRunner.compile_listener``, added to the request's
``compile_s``, and then made again, so the request's timings (generation.StepStats) measure the compiled graph at
steady state. Repeating a call is harmless because every graph call is idempotent: it writes the same cache
positions with the same values and samples from the same uniforms. (MindSpore's ``MS_DEV_PRECOMPILE_ONLY`` compiles
only the frontend graph; the backend still compiles at the first run, so it cannot separate the two.) The prefill
also runs the first decode step's graph once on stand-ins (a copy of the penalty state, position ``S`` that the real
first step overwrites before reading it), so a streamed answer does not stall after its first token.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops as msops

from ..model import ops
from ..model.kv_cache import KVCache, mask_fill, write_index
from ..model.parallel import request_seed
from .sampling import device_next_tokens

_SCATTER = msops.ScatterNdUpdate()


# The engine's graph calls hold this lock: a compile is timed alone, not against another thread's graph run.
_GRAPH_LOCK = threading.Lock()

# (what, None) when a compile starts; (what, seconds) when it is done. what: e.g. "decode graph for bucket 512".
CompileListener = Callable[[str, Optional[float]], None]


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def graph_signature(args) -> tuple:
    """What MindSpore keys a compiled graph on: each tensor's shape and dtype, each Parameter's identity (a compiled
    graph is bound to its Parameters), the value of every other (constant) argument."""
    out = []
    for a in args:
        if isinstance(a, Parameter):
            out.append(("parameter", id(a)))
        elif isinstance(a, Tensor):
            out.append((tuple(a.shape), str(a.dtype)))
        elif isinstance(a, (tuple, list)):
            out.append(graph_signature(a))
        else:
            out.append(a)
    return tuple(out)


class _Prefill(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model
        t = model.config.text
        self.kv_heads = t.num_key_value_heads
        self.fill = mask_fill(model.dtype)

    def construct(self, embeds, pos, key_mask, last, seen, uniforms, temperature, top_p, penalty, causal_only,
                  spec, return_logits, *caches):
        """embeds [B, Sb, hidden]; pos [3, B, Sb] int32; key_mask [B, Sb] int32 (0 = left padding or the right
        padding up to the bucket); last: int32 scalar, the last prompt position; seen [B, V] fp32."""
        m = self.model
        b, s, _ = embeds.shape
        cos, sin = m.rotary_tables(pos)
        ar = msops.arange(s)
        allowed = (ar.reshape(1, 1, 1, s) <= ar.reshape(1, 1, s, 1)) & (key_mask.reshape(b, 1, 1, s) > 0)
        mask = ((1.0 - allowed.astype(ms.float32)) * self.fill).astype(m.dtype)  # [B, 1, Sb, Sb] additive
        index = write_index(msops.zeros((), ms.int32), b, self.kv_heads, s)
        h = m.language_model(embeds, cos, sin, mask, caches, index, s, causal_only)
        logits = m.logits(msops.gather(h, last, 1)).astype(ms.float32)  # [B, V]: the last prompt position only
        greedy, top_k, use_top_p, use_penalty = spec
        tok = device_next_tokens(logits, seen, uniforms, temperature, top_p, penalty, greedy=greedy, top_k_=top_k,
                                 use_top_p=use_top_p, use_penalty=use_penalty)
        if return_logits:
            return tok, logits
        return tok


class _Decode(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.kv_heads = model.config.text.num_key_value_heads
        self.fill = mask_fill(model.dtype)

    def construct(self, ids, cur, delta, key_mask, seen, uniforms, temperature, top_p, penalty, kv_len, spec,
                  return_logits, *caches):
        """ids [B, 1] int32, the fed token; cur: int32 scalar, its cache position; delta [B] int32 rope deltas;
        key_mask [B, max_len] int32 (prompt padding 0, everything else 1); seen [B, V] fp32 (updated in place)."""
        m = self.model
        b = ids.shape[0]
        greedy, top_k, use_top_p, use_penalty = spec
        if use_penalty:  # the fed token joins the sequence the penalty looks at
            rows = msops.arange(b).astype(ms.int32).reshape(b, 1)
            seen = msops.depend(seen, _SCATTER(seen, msops.concat([rows, ids], -1),
                                               msops.ones((b,), ms.float32)))
        emb = m.language_model.embed_tokens(ids)  # [B, 1, hidden]
        p = (delta + cur).reshape(1, b, 1)
        cos, sin = m.rotary_tables(msops.concat([p, p, p], 0))  # decode: the same position on t, h and w
        allowed = (key_mask[:, :kv_len] > 0) & (msops.arange(kv_len).reshape(1, kv_len) <= cur)
        mask = ((1.0 - allowed.astype(ms.float32)) * self.fill).astype(m.dtype).reshape(b, 1, 1, kv_len)
        index = write_index(cur, b, self.kv_heads, 1)
        h = m.language_model(emb, cos, sin, mask, caches, index, kv_len, False)
        logits = m.logits(h[:, 0]).astype(ms.float32)  # [B, V]
        tok = device_next_tokens(logits, seen, uniforms, temperature, top_p, penalty, greedy=greedy, top_k_=top_k,
                                 use_top_p=use_top_p, use_penalty=use_penalty)
        if return_logits:
            return tok, logits
        return tok


class GraphRunner:
    """The compiled prefill / decode graphs of one model. Get it with :func:`graph_runner`."""

    def __init__(self, model, prefill_bucket: int = 16, min_decode_bucket: int = 256):
        if prefill_bucket <= 0 or min_decode_bucket <= 0:
            raise ValueError("bucket sizes must be positive")
        self.model = model
        self.prefill_bucket = prefill_bucket
        self.min_decode_bucket = next_pow2(min_decode_bucket)
        self._prefill_cell, self._decode_cell = _Prefill(model), _Decode(model)
        # compiling calls go through _jit, the request's own calls through the attributes (tests wrap those)
        self._jit = {"prefill": ops.jit(self._prefill_cell.construct), "decode": ops.jit(self._decode_cell.construct)}
        self.prefill_graph, self.decode_graph = self._jit["prefill"], self._jit["decode"]
        self.shapes_seen: Dict[str, set] = {"prefill": set(), "decode": set()}  # which static shapes ran
        self._free: Dict[tuple, list] = {}  # (batch, max_len) -> cache buffers not in use
        self._compiled: set = set()  # (graph kind, graph_signature) of every graph compiled so far
        self.compile_listener: Optional[CompileListener] = None  # told when a compile starts and ends

    def ensure_compiled(self, kind: str, what: str, fn, args) -> float:
        """Unless graph ``kind`` is compiled for ``args``' signature: call ``fn`` (its mindspore.jit function) on
        ``args`` once, which compiles it, and return the seconds of that call (else 0.0). The call runs the graph, so
        ``args`` must be safe to run (every graph call of a session is idempotent)."""
        key = (kind, graph_signature(args))
        if key in self._compiled:
            return 0.0
        if self.compile_listener is not None:
            self.compile_listener(what, None)
        t0 = time.perf_counter()
        with _GRAPH_LOCK:
            out = fn(*args)
            for t in out if isinstance(out, tuple) else (out,):  # wait for the device: read the (small) outputs
                t.asnumpy()
        seconds = time.perf_counter() - t0
        self._compiled.add(key)
        if self.compile_listener is not None:
            self.compile_listener(what, seconds)
        return seconds

    def prefill_len(self, prompt_len: int) -> int:
        """The prompt's bucket: a multiple of max(prefill_bucket, 2^(floor(log2 S) - 3)), i.e. 8 buckets per
        octave: at most 12.5% padded positions, and a logarithmic number of compiled prefill graphs."""
        step = max(self.prefill_bucket, 1 << max(int(prompt_len).bit_length() - 4, 0))
        return -(-prompt_len // step) * step

    def cache_len(self, prompt_len: int, max_new_tokens: int) -> int:
        """Positions to allocate: the prompt bucket (the prefill writes all of it) and every new token, rounded up
        to a power of two so that requests of similar size share cache buffers and graphs."""
        need = max(prompt_len + max(max_new_tokens, 1), self.prefill_len(prompt_len))
        n = next_pow2(max(need, self.min_decode_bucket))
        return n if n <= self.model.config.text.max_position_embeddings else need

    def open_cache(self, batch: int, prompt_len: int, max_new_tokens: int) -> KVCache:
        """A cache for one request, reusing the buffers of a finished request of the same shape (the compiled graphs
        are bound to those Parameter objects). Give it back with :meth:`close_cache`."""
        n = self.cache_len(prompt_len, max_new_tokens)
        free = self._free.get((batch, n))
        m = self.model
        return KVCache(m.config.text, batch, n, m.dtype, buffers=free.pop() if free else None)

    def close_cache(self, cache: KVCache) -> None:
        self._free.setdefault((cache.batch, cache.max_len), []).append(cache.buffers)

    def decode_bucket(self, position: int, max_len: int) -> int:
        """Keys attended by the step writing ``position``: the smallest power-of-two bucket holding it."""
        return min(max_len, max(self.min_decode_bucket, next_pow2(position + 1)))


def graph_runner(model, **kwargs) -> GraphRunner:
    """The model's GraphRunner, created on first use (compiled graphs are reused across requests)."""
    runner = model.__dict__.get("_graph_runner")
    if runner is None or kwargs:
        runner = GraphRunner(model, **kwargs)
        model.__dict__["_graph_runner"] = runner
    return runner


class GraphSession:
    """One request in graph mode: prefill, then one token per ``step``. Sampling runs on device; the host draws
    the uniforms from ``numpy.random.default_rng(seed)`` (reproducible with a seed)."""

    def __init__(self, runner: GraphRunner, gen, batch: int):
        self.runner, self.model = runner, runner.model
        vocab = self.model.config.text.vocab_size
        self.greedy = not gen.do_sample
        top_k = gen.top_k if gen.do_sample and 0 < gen.top_k < vocab else 0
        self.spec = (self.greedy, int(top_k), bool(gen.do_sample and gen.top_p < 1.0),
                     bool(gen.repetition_penalty != 1.0))
        self.knobs = (Tensor(float(gen.temperature), ms.float32), Tensor(float(gen.top_p), ms.float32),
                      Tensor(float(gen.repetition_penalty), ms.float32))
        self.n_uniform = 1 if self.greedy else (top_k or vocab)
        # under tensor parallelism an unseeded sampled request gets a seed shared by the TP group (parallel.py)
        self.rng = np.random.default_rng(request_seed(self.model, gen.seed, gen.do_sample))
        self._dummy = Tensor(np.full((batch, 1), 0.5, np.float32))
        self.batch, self.vocab = batch, vocab
        self.seen: Optional[Tensor] = None
        self.key_mask: Optional[Tensor] = None
        self.delta: Optional[Tensor] = None
        self.return_logits = False
        self.last_logits: Optional[np.ndarray] = None
        self.max_new_tokens = gen.max_new_tokens
        self.compile_s = 0.0  # seconds of graph compiles in this request (one-time work, not steady state)
        self.compiles: List[str] = []  # what was compiled, e.g. "decode graph for bucket 256"

    def _compile(self, kind: str, what: str, fn, args) -> None:
        seconds = self.runner.ensure_compiled(kind, what, fn, args)
        if seconds:
            self.compile_s += seconds
            self.compiles.append(what)

    def _run(self, kind: str, what: str, fn, run, args):
        """``run(*args)``; when that compiles graph ``fn`` first, the compiling call is made and timed apart."""
        self._compile(kind, what, fn, args)
        with _GRAPH_LOCK:
            return run(*args)

    def _vision(self, fn, what, *args):  # model.embed(graph=...) runs the ViT's block stack through this
        return self._run("vision", what, fn, fn, args)

    def _step_args(self, tokens, start: int, cache: KVCache, uniforms: Tensor, seen: Optional[Tensor] = None):
        kv_len = self.runner.decode_bucket(start, cache.max_len)
        ids = Tensor(np.asarray(tokens, np.int32).reshape(self.batch, 1))
        seen = self.seen if seen is None else seen
        return kv_len, (ids, Tensor(start, ms.int32), self.delta, self.key_mask, seen, uniforms, *self.knobs,
                        kv_len, self.spec, self.return_logits, *cache.tensors)

    def draw_uniforms(self) -> np.ndarray:
        """The next [B, n_uniform] uniforms of this request's generator (the server draws them per row)."""
        u = self.rng.random((self.batch, self.n_uniform), dtype=np.float32)
        return np.clip(u, np.float32(1e-12), np.float32(1 - 2 ** -24))  # log(-log(u)) stays finite

    def _uniforms(self) -> Tensor:
        if self.greedy:  # unused by the graph; one constant per request, not a new tensor per step
            return self._dummy
        return Tensor(self.draw_uniforms())

    def _read(self, out) -> np.ndarray:
        if self.return_logits:
            tok, logits = out
            self.last_logits = logits.asnumpy()
        else:
            tok = out
        return tok.asnumpy().astype(np.int64)

    def prefill(self, inputs: Dict, cache: KVCache) -> np.ndarray:
        """Run the prompt (and its images / video) and return the first new token of each row ([B] int64)."""
        m = self.model
        ids, mask = m.check_ids(inputs["input_ids"], inputs.get("attention_mask"))
        b, s = ids.shape
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
        if cache.length:
            raise ValueError("graph-mode prefill needs an empty cache (continue a cached request eagerly)")
        sb = self.runner.prefill_len(s)
        if sb > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions; the prefill bucket needs {sb} "
                             "(allocate it with GraphRunner.cache_len)")
        cache.begin(s, mask)
        embeds, _ = m.embed(ids, inputs.get("pixel_values"), inputs.get("image_grid_thw"),
                            inputs.get("pixel_values_videos"), inputs.get("video_grid_thw"), graph=self._vision)
        grid_i = None if inputs.get("pixel_values") is None else inputs.get("image_grid_thw")
        grid_v = None if inputs.get("pixel_values_videos") is None else inputs.get("video_grid_thw")
        pos, deltas = m.rope_index(ids, ops.to_numpy(grid_i), ops.to_numpy(grid_v), mask)
        cache.rope_deltas = deltas
        pad = sb - s
        if pad:
            embeds = mint.cat([embeds, mint.zeros((b, pad, embeds.shape[-1]), dtype=embeds.dtype)], 1)
        pos = np.concatenate([pos, np.zeros((3, b, pad), pos.dtype)], 2).astype(np.int32)
        km = np.zeros((b, sb), np.int32)
        km[:, :s] = 1 if mask is None else mask
        seen = np.zeros((b, self.vocab), np.float32)
        np.put_along_axis(seen, ids, 1.0, axis=1)
        self.seen = Tensor(seen)  # a plain tensor: updated in place in the graph, no recompile per request
        full = cache.key_mask.astype(np.int32).copy()
        full[:, s:] = 1  # every position after the prompt holds a real (generated) token
        self.key_mask = Tensor(full)
        self.delta = Tensor(deltas.reshape(-1).astype(np.int32))
        causal_only = mask is None or bool(mask.all())
        self.runner.shapes_seen["prefill"].add((b, sb))
        args = (embeds, Tensor(pos), Tensor(km), Tensor(s - 1, ms.int32), self.seen, self._uniforms(), *self.knobs,
                causal_only, self.spec, self.return_logits, *cache.tensors)
        out = self._run("prefill", f"prefill graph for bucket {sb}" + (f" (batch {b})" if b > 1 else ""),
                        self.runner._jit["prefill"], self.runner.prefill_graph, args)
        cache.commit(s)
        if self.max_new_tokens > 1:  # compile the first step's decode graph now, on stand-ins (see the module doc)
            stand_in = self._dummy if self.greedy else Tensor(np.full((b, self.n_uniform), 0.5, np.float32))
            kv_len, step = self._step_args(np.zeros(b, np.int32), s, cache, stand_in, seen=Tensor(seen.copy()))
            self._compile("decode", self._decode_what(kv_len), self.runner._jit["decode"], step)
        return self._read(out)

    def _decode_what(self, kv_len: int) -> str:
        return f"decode graph for bucket {kv_len}" + (f" (batch {self.batch})" if self.batch > 1 else "")

    def close(self, cache: KVCache) -> None:
        self.runner.close_cache(cache)

    def step(self, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        """Feed one token per row ([B]) and return the next ([B] int64)."""
        start = cache.begin(1, None)
        kv_len, args = self._step_args(tokens, start, cache, self._uniforms())
        self.runner.shapes_seen["decode"].add((self.batch, kv_len))
        out = self._run("decode", self._decode_what(kv_len), self.runner._jit["decode"], self.runner.decode_graph,
                        args)
        cache.commit(1)
        return self._read(out)
