"""Running one batch: left-padded forward through ``generation.iter_tokens``, then one result per row, with the
text, thinking, boxes and statistics computed exactly as ``Glm4vPipeline.stream`` does for one request."""

from __future__ import annotations

import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .schedule import Encoded, collate


def pieces_from_tokens(tokenizer, tokens: Sequence[int], think, markers: set, eos: set, kind: str):
    """(thinking, answer_text) of one row's generated tokens, exactly as ``generation.stream_generate`` yields them."""
    from ...runtime.generation import text_pieces

    parts = {"thinking": [], "answer": []}
    for piece in text_pieces(tokenizer, tokens, think, markers, eos, kind):
        parts[piece.kind].append(piece.text)
    return "".join(parts["thinking"]), "".join(parts["answer"])


def _run(pipe, batch: Sequence[Encoded], think, stats) -> Tuple[np.ndarray, List[float], float]:
    """Generate: tokens [B, steps], the wall time at which each step arrived, and the batch's seconds."""
    from ...runtime.generation import iter_tokens

    inputs = collate([e.inputs for e in batch])
    t_start = time.perf_counter()
    steps, times = [], []
    for step in iter_tokens(pipe.model, inputs, batch[0].gen, think, stats, mode=pipe.mode):
        steps.append(np.asarray(step).copy())
        # graph compiles so far are one-time work: kept out of the decode time
        times.append(time.perf_counter() - stats.compile_s)
    tokens = np.stack(steps, axis=1) if steps else np.zeros((len(batch), 0), np.int64)
    return tokens, times, time.perf_counter() - t_start


def _until_eos(row: List[int], eos: set) -> List[int]:
    for k, t in enumerate(row):
        if t in eos:
            return row[:k + 1]
    return row


def generate_batch(pipe, batch: Sequence[Encoded]) -> List[Dict]:
    """Run one batch (same key) and return one record per request, with ChatResult.as_dict()'s keys."""
    from ...runtime.generation import StepStats, thinking_tokens

    tok = pipe.processor.tokenizer
    think = thinking_tokens(tok)
    vocab = tok.get_vocab()
    markers = {i for i in (vocab.get("<answer>"), vocab.get("</answer>")) if i is not None}
    eos = set(batch[0].gen.eos_token_id or [])
    stats = StepStats()
    tokens, times, batch_s = _run(pipe, batch, think, stats)
    records = []
    for r, e in enumerate(batch):
        row = _until_eos(tokens[r].tolist(), eos)
        result = _row_result(tok, e, row, think, markers, eos, stats, r, times)
        rec = {"id": e.request.id, "index": e.request.index}
        rec.update(result.as_dict())
        rec.update(batch_size=len(batch), batch_s=round(batch_s, 3))
        records.append(rec)
    return records


def _row_result(tok, e: Encoded, row: List[int], think, markers: set, eos: set, stats, r: int, times):
    """The ChatResult of batch row ``r`` (its tokens up to EOS), as the pipeline builds it for one request."""
    from ...runtime.generation import StepStats, _prompt_opens_thinking
    from ...runtime.output import parse_boxes, rescale_boxes, split_thinking
    from ..pipeline import ChatResult

    n = len(row)
    ids = np.asarray(e.inputs["input_ids"]).reshape(-1)
    kind = "thinking" if think is not None and _prompt_opens_thinking(ids, think) else "answer"
    thinking, text = pieces_from_tokens(tok, row, think, markers, eos, kind)
    cut = stats.thinking_cut[r] if r < len(stats.thinking_cut) else -1
    st = StepStats(prompt_tokens=e.prompt_len, new_tokens=n, prefill_s=stats.prefill_s,
                   decode_s=(times[n - 1] - times[0]) if n else 0.0, thinking_cut=[cut] if cut >= 0 else [],
                   compile_s=stats.compile_s, compiles=stats.compiles)
    result = ChatResult(thinking=thinking.strip(), text=text, tokens=row, stats=st)
    _, result.answer = split_thinking(text)
    result.apply_tools(e.request.tools)
    result.boxes = parse_boxes(text)
    if e.image_size is not None:
        result.boxes_pixels = rescale_boxes(result.boxes, *e.image_size)
    return result
