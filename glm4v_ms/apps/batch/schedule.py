"""Scheduling: encode each request alone, group requests that may share a forward, cut left-padded batches.

Within a window of pending requests, each is encoded by the processor on its own (so a bad image fails only its
own line), grouped by media kind (images/text vs video: one forward cannot mix them) and generation settings,
sorted by prompt length and cut into batches; :func:`collate` left-pads a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .requests import Request, RequestError, media_kind
from .validate import fetch_remote_images


@dataclass
class Encoded:
    request: Request
    inputs: Dict                  # the processor's output for this request alone (batch of 1)
    prompt_len: int
    image_size: Optional[Tuple[int, int]]
    kind: str
    gen: object                   # GenerationConfig (max_new_tokens already fitted to the context)
    key: tuple                    # requests with equal keys may share a batch


def settings_key(gen, kind: str, index: int) -> tuple:
    """What must be equal for requests to share a batch. Greedy ignores the sampling knobs; a seeded sampled
    request runs alone, so that its draws (and its result) do not depend on its batch neighbours."""
    if gen.do_sample:
        solo = index if gen.seed is not None else None
        sampling = (gen.temperature, gen.top_k, gen.top_p, gen.seed, solo)
    else:
        sampling = ()
    return (kind, gen.max_new_tokens, bool(gen.do_sample), gen.repetition_penalty, gen.max_thinking_tokens,
            tuple(gen.eos_token_id or ()), gen.pad_token_id) + sampling


def encode_request(pipe, request: Request, job_settings: Dict) -> Encoded:
    """Load and preprocess one request alone (a bad image fails here, for this request only), fit its generation
    settings to the context as ``Glm4vPipeline.stream`` does, and compute its batching key."""
    from ...processing.media import load_images

    request = fetch_remote_images(request, pipe.processor.media_options)
    settings = dict(job_settings)
    settings.update(request.settings)
    gen = pipe.generation_config(**settings)
    gen.validate(pipe.model.config.text.vocab_size)
    inputs = pipe.inputs(request.messages, tools=request.tools)
    n_prompt = int(np.asarray(inputs["input_ids"]).shape[-1])
    ctx = pipe.model.config.text.max_position_embeddings
    if n_prompt >= ctx:
        raise RequestError(f"the prompt has {n_prompt} tokens but the model's context is {ctx}; use fewer or "
                           "smaller images, a shorter video or text")
    if n_prompt + gen.max_new_tokens > ctx:
        gen = replace(gen, max_new_tokens=ctx - n_prompt)
    size = None
    if request.first_image is not None:  # the pipeline's rule: boxes in pixels of the first image
        size = load_images(request.first_image, pipe.processor.media_options)[0].size
    kind = media_kind(request.messages)
    return Encoded(request, inputs, n_prompt, size, kind, gen, settings_key(gen, kind, request.index))


def make_batches(encoded: Sequence[Encoded], batch_size: int) -> List[List[Encoded]]:
    """Group by key (in order of first appearance), sort each group by prompt length, cut into batches."""
    groups: Dict[tuple, List[Encoded]] = {}
    for e in encoded:
        groups.setdefault(e.key, []).append(e)
    batches = []
    for members in groups.values():
        members = sorted(members, key=lambda e: (e.prompt_len, e.request.index))
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    return batches


_ARRAY_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def collate(inputs: Sequence[Dict]) -> Dict:
    """Per-request processor outputs -> one left-padded batch, equal to what the processor makes for the list of
    conversations, except for the ids under the padding: each row is padded with its own first token (the template's
    [gMASK]) rather than the pad token, so that the set of tokens a row has "seen" (the repetition penalty's input)
    is the same as when the request runs alone. The attention mask hides the padding either way."""
    rows = [np.asarray(x["input_ids"], dtype=np.int64).reshape(-1) for x in inputs]
    masks = [np.asarray(x["attention_mask"], dtype=np.int64).reshape(-1) for x in inputs]
    s = max(len(r) for r in rows)
    ids = np.zeros((len(rows), s), np.int64)
    mask = np.zeros((len(rows), s), np.int64)
    for k, (r, m) in enumerate(zip(rows, masks)):
        ids[k, :s - len(r)] = r[0]
        ids[k, s - len(r):] = r
        mask[k, s - len(r):] = m
    out = {"input_ids": ids, "attention_mask": mask}
    for key in _ARRAY_KEYS:
        parts = [np.asarray(x[key]) for x in inputs if x.get(key) is not None]
        out[key] = np.concatenate(parts, axis=0) if parts else None
    return out
