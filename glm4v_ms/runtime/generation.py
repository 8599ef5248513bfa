"""Prefill once, then one token per step over a static KV cache; greedy or sampled; thinking control.

The loop is a generator (``iter_tokens``) so that ``generate`` (collect) and ``stream_generate`` (decode text as it
comes) share one implementation. Thinking control forces tokens into the sequence through the same one-token steps,
so a cut-off ``</think><answer>`` continues from the cache without prefilling the prompt again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from . import sampling
from ..model.generation_config import GenerationConfig
from ..model.kv_cache import KVCache
from ..model.parallel import request_seed

@dataclass
class ThinkingTokens:
    """Token ids that delimit the thinking part (looked up in the tokenizer)."""
    think: int
    end_think: int
    cutoff: Sequence[int]  # forced when the budget is spent, e.g. ids of "</think><answer>"


@dataclass
class StepStats:
    """Timings of one request. Graph compiles are one-time work: their seconds are in ``compile_s`` (and what was
    compiled in ``compiles``), and ``prefill_s`` / ``decode_s`` exclude them, so they measure the steady state."""
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    thinking_cut: List[int] = field(default_factory=list)  # step at which each row's thinking was cut
    compile_s: float = 0.0
    compiles: List[str] = field(default_factory=list)  # e.g. ["prefill graph for bucket 128", ...]

    @property
    def compiled(self) -> bool:
        """True when this request compiled a graph (its first request of a new shape)."""
        return bool(self.compiles)

    @property
    def decode_tok_s(self) -> float:
        steps = max(self.new_tokens - 1, 0)  # the first token comes from the prefill
        return steps / self.decode_s if self.decode_s > 0 else 0.0


def _prompt_opens_thinking(row: np.ndarray, thinking: ThinkingTokens) -> bool:
    """True when the prompt row leaves a <think> open (templates that pre-fill it): generation starts inside."""
    opened = np.flatnonzero(row == thinking.think)
    closed = np.flatnonzero(row == thinking.end_think)
    return len(opened) > 0 and (len(closed) == 0 or closed[-1] < opened[-1])


class EagerSession:
    """One request run eagerly (PyNative): the model's forward over the cache, logits read back to the host and
    sampled there (sampling.next_tokens, transformers' order). The reference twin of engine.GraphSession."""

    def __init__(self, model, gen: GenerationConfig, batch: int):
        self.model, self.gen = model, gen
        # under tensor parallelism an unseeded sampled request gets a seed shared by the TP group (parallel.py)
        self.rng = np.random.default_rng(request_seed(model, gen.seed, gen.do_sample))
        self.seen: Optional[np.ndarray] = None
        self.last_logits: Optional[np.ndarray] = None
        self.compile_s, self.compiles = 0.0, []  # PyNative compiles nothing (engine.GraphSession does)

    def _sample(self, out) -> np.ndarray:
        self.last_logits = out.logits.asnumpy()[:, -1].astype(np.float32)
        g = self.gen
        return sampling.next_tokens(self.last_logits, self.seen, do_sample=g.do_sample, temperature_=g.temperature,
                                    top_k_=g.top_k, top_p_=g.top_p, repetition_penalty_=g.repetition_penalty,
                                    rng=self.rng)

    def prefill(self, inputs: Dict, cache: KVCache) -> np.ndarray:
        ids = np.asarray(inputs["input_ids"], dtype=np.int64)
        self.seen = ids if ids.ndim == 2 else ids[None]
        return self._sample(self.model(**inputs, cache=cache, logits_to_keep=1))

    def close(self, cache: KVCache) -> None:
        pass

    def step(self, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        self.seen = np.concatenate([self.seen, tokens[:, None]], axis=1)
        return self._sample(self.model(input_ids=tokens[:, None], cache=cache, logits_to_keep=1))


MODES = ("graph", "eager")


def open_session(model, gen: GenerationConfig, batch: int, prompt_len: int, mode: str = "graph"):
    """(session, cache) for one request. ``graph``: prefill and decode compiled with mindspore.jit, sampling on
    device (engine.py); ``eager``: PyNative forward, host sampling."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cfg = model.config.text
    if mode == "eager":
        return EagerSession(model, gen, batch), KVCache(cfg, batch, prompt_len + max(gen.max_new_tokens, 1), model.dtype)
    from .engine import GraphSession, graph_runner

    runner = graph_runner(model)
    return GraphSession(runner, gen, batch), runner.open_cache(batch, prompt_len, gen.max_new_tokens)


def iter_tokens(model, inputs: Dict, gen: GenerationConfig, thinking: Optional[ThinkingTokens] = None,
                stats: Optional[StepStats] = None, mode: str = "graph", session_out: Optional[list] = None,
                session_factory: Optional[Callable] = None) -> Iterator[np.ndarray]:
    """Yield the next token of every row ([B] int64), step by step. Finished rows yield ``pad_token_id``.
    ``session_out``, if given, receives the session (tests read its ``last_logits``). ``session_factory(gen,
    batch, prompt_len) -> (session, cache)`` replaces :func:`open_session` (the server's rows of a shared batch)."""
    cfg = model.config.text
    gen.validate(cfg.vocab_size)
    ids = np.asarray(inputs["input_ids"], dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    b, s = ids.shape
    pad = gen.pad_token_id if gen.pad_token_id is not None else (cfg.pad_token_id or 0)
    if session_factory is not None:
        session, cache = session_factory(gen, b, s)
    else:
        session, cache = open_session(model, gen, b, s, mode)
    if session_out is not None:
        session_out.append(session)
    stats = stats if stats is not None else StepStats()
    stats.prompt_tokens = s
    eos = np.asarray(gen.eos_token_id or [], dtype=np.int64)

    try:
        # Compile seconds (graph mode: first call of a new shape) are one-time work, kept apart from the timings.
        stats.compile_s, stats.compiles = 0.0, session.compiles
        t0 = time.perf_counter()
        tok = session.prefill(inputs, cache)
        stats.prefill_s = time.perf_counter() - t0 - session.compile_s
        stats.compile_s = prefill_compile = session.compile_s
        t0 = time.perf_counter()

        unfinished = np.ones(b, dtype=bool)
        # thinking state per row: tokens produced inside <think>, whether </think> was seen, forced queue
        inside = np.array([thinking is not None and _prompt_opens_thinking(ids[r], thinking) for r in range(b)])
        n_think = np.zeros(b, dtype=np.int64)
        forced: List[List[int]] = [[] for _ in range(b)]
        stats.thinking_cut = [-1] * b
        for step in range(gen.max_new_tokens):
            tok = tok.copy()
            for r in range(b):
                if forced[r]:
                    tok[r] = forced[r].pop(0)
            tok = np.where(unfinished, tok, pad)
            if thinking is not None and gen.max_thinking_tokens is not None:
                for r in range(b):
                    if not unfinished[r]:
                        continue
                    if tok[r] == thinking.think:
                        inside[r] = True
                    elif tok[r] == thinking.end_think:
                        inside[r] = False
                    elif inside[r]:
                        n_think[r] += 1
                        if n_think[r] >= gen.max_thinking_tokens and stats.thinking_cut[r] < 0:
                            forced[r] = list(thinking.cutoff)
                            inside[r] = False
                            stats.thinking_cut[r] = step + 1
            stats.new_tokens = step + 1
            # kept current: a consumer may stop early (EOS in a stream)
            stats.compile_s = session.compile_s
            stats.decode_s = time.perf_counter() - t0 - (session.compile_s - prefill_compile)
            yield tok
            if len(eos):
                unfinished &= ~np.isin(tok, eos)
            if not unfinished.any() or step + 1 == gen.max_new_tokens:
                break
            tok = session.step(tok, cache)
    finally:
        session.close(cache)  # a graph-mode cache goes back to the runner's pool


def _default_config(model) -> GenerationConfig:
    """The checkpoint's generation_config.json (HF's model.generation_config), else EOS/pad from config.json."""
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        return gen
    return GenerationConfig(eos_token_id=list(model.config.text.eos_token_id or []),
                            pad_token_id=model.config.text.pad_token_id)


def generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
             pixel_values_videos=None, video_grid_thw=None, *, generation_config: Optional[GenerationConfig] = None,
             thinking: Optional[ThinkingTokens] = None, stats: Optional[StepStats] = None, mode: str = "graph",
             **knobs) -> np.ndarray:
    """HF-style generate: returns [B, S + new] int64 (prompt followed by the new tokens; finished rows padded).

    ``mode``: "graph" (compiled prefill/decode, sampling on device) or "eager" (see open_session). ``knobs`` override the generation config: max_new_tokens, do_sample, temperature, top_k, top_p,
    repetition_penalty, eos_token_id (int or list), pad_token_id, seed, max_thinking_tokens."""
    gen = generation_config or _default_config(model)
    if isinstance(knobs.get("eos_token_id"), int):
        knobs["eos_token_id"] = [knobs["eos_token_id"]]
    unknown = set(knobs) - {f.name for f in fields(GenerationConfig)}
    if unknown:
        raise TypeError(f"generate() got unknown arguments: {sorted(unknown)}")
    gen = replace(gen, **knobs)
    inputs = dict(input_ids=np.asarray(input_ids), attention_mask=attention_mask, pixel_values=pixel_values,
                  image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                  video_grid_thw=video_grid_thw)
    ids = inputs["input_ids"] if inputs["input_ids"].ndim == 2 else inputs["input_ids"][None]
    new = [t for t in iter_tokens(model, inputs, gen, thinking, stats, mode)]
    if not new:
        return ids.astype(np.int64)
    return np.concatenate([ids.astype(np.int64), np.stack(new, axis=1)], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Streaming text
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Piece:
    text: str
    kind: str  # "thinking" or "answer"


def thinking_tokens(tokenizer) -> Optional[ThinkingTokens]:
    """<think>, </think> and the cut-off from the tokenizer; None if it lacks <think> / </think>. The cut-off is
    "</think><answer>" for GLM-4.1V; GLM-4.6V has no <answer> markup, so there it is "</think>" alone."""
    vocab = tokenizer.get_vocab()
    if "<think>" not in vocab or "</think>" not in vocab:
        return None
    t, e = int(vocab["<think>"]), int(vocab["</think>"])
    return ThinkingTokens(think=t, end_think=e, cutoff=[e, int(vocab["<answer>"])] if "<answer>" in vocab else [e])


class _IncrementalDecoder:
    """Decodes a growing token list piece by piece without splitting a UTF-8 character across pieces: text is only
    released when it no longer ends in the replacement character of an incomplete byte sequence."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.reset()

    def reset(self):
        self.ids: List[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=False)
        self.reset()
        return after[len(before):]


def stream_generate(model, tokenizer, inputs: Dict, generation_config: Optional[GenerationConfig] = None, *,
                    stats: Optional[StepStats] = None, tokens_out: Optional[List[int]] = None,
                    mode: str = "graph", session_factory: Optional[Callable] = None, **knobs) -> Iterator[Piece]:
    """Generate for one prompt and yield text pieces as they decode, tagged ``thinking`` or ``answer``.

    The <think>/</think>/<answer>/</answer> markers switch the tag and are not yielded; EOS tokens end the stream.
    ``max_thinking_tokens`` (a knob) cuts thinking with a forced "</think><answer>". The generated ids are appended
    to ``tokens_out`` if given. ``session_factory``: see :func:`iter_tokens`."""
    ids = np.asarray(inputs["input_ids"])
    if ids.ndim == 2 and ids.shape[0] != 1:
        raise ValueError(f"stream_generate takes one prompt; got a batch of {ids.shape[0]} (use generate())")
    gen = replace(generation_config or _default_config(model), **knobs)
    think = thinking_tokens(tokenizer)
    vocab = tokenizer.get_vocab()
    markers = {i for i in (vocab.get("<answer>"), vocab.get("</answer>")) if i is not None}
    eos = set(gen.eos_token_id or [])
    flat = ids.reshape(-1)
    kind = "thinking" if think is not None and _prompt_opens_thinking(flat, think) else "answer"
    row_tokens = (int(t[0]) for t in iter_tokens(model, inputs, gen, think, stats, mode,
                                                         session_factory=session_factory))
    yield from text_pieces(tokenizer, row_tokens, think, markers, eos, kind, tokens_out)


def text_pieces(tokenizer, tokens: Iterable[int], think: Optional[ThinkingTokens], markers: set, eos: set,
                kind: str, tokens_out: Optional[List[int]] = None) -> Iterator[Piece]:
    """One row's generated tokens -> text pieces tagged ``thinking`` / ``answer``, starting in part ``kind``:
    <think>/</think> switch the part, <answer>/</answer> (``markers``) are dropped, an EOS token ends the text.
    Each token is appended to ``tokens_out`` as it is consumed. Shared by stream_generate and batch jobs."""
    dec = _IncrementalDecoder(tokenizer)
    for tok in tokens:
        tok = int(tok)
        if tokens_out is not None:
            tokens_out.append(tok)
        is_marker = think is not None and tok in (think.think, think.end_think)
        if is_marker or tok in markers or tok in eos:
            rest = dec.flush()
            if rest:
                yield Piece(rest, kind)
            if think is not None and tok == think.think:
                kind = "thinking"
            elif think is not None and tok == think.end_think:
                kind = "answer"
            if tok in eos:
                return
            continue
        piece = dec.push(tok)
        if piece:
            yield Piece(piece, kind)
    rest = dec.flush()
    if rest:
        yield Piece(rest, kind)
