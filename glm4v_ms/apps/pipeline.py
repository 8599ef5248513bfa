"""Model + processor + generation settings: what ``generate.py`` and batch tools call.

    pipe = Glm4vPipeline.from_pretrained("path/or/hub-id" | "tiny-random", dtype="float32", device="CPU")
    messages = pipe.messages("Describe.", images=["cat.jpg"])
    for piece in pipe.stream(messages, result):      # text pieces tagged thinking / answer
        ...
    result.answer, result.thinking, result.boxes, result.stats

What is checked before loading (model folder, media) is in ``preflight``; the shared command-line flags in
``cli_args``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..runtime.generation import GenerationConfig, Piece, StepStats, stream_generate
from ..processing.media import MediaOptions
from ..runtime.output import Box, parse_boxes, rescale_boxes, split_thinking
from ..runtime.tool_calls import ToolCall, parse_tool_calls
from .preflight import load_processor, resolve_model

class PromptTooLongError(ValueError):
    """The prompt (text and media tokens) does not fit the context."""


@dataclass
class ChatResult:
    thinking: str = ""
    answer: str = ""
    text: str = ""                   # the raw reply, markers removed
    tokens: List[int] = field(default_factory=list)
    boxes: List[Box] = field(default_factory=list)          # 0-1000 normalised
    boxes_pixels: List[Box] = field(default_factory=list)   # rescaled to the first image
    stats: StepStats = field(default_factory=StepStats)
    tool_calls: List[ToolCall] = field(default_factory=list)  # parsed from the answer when tools were given

    def apply_tools(self, tools: Optional[Sequence[Dict]]) -> None:
        """With ``tools``, move the answer's well-formed GLM tool calls into ``tool_calls`` (the answer keeps the
        rest of the text; malformed markup stays text). Without tools the answer is left as it is."""
        if tools:
            parsed = parse_tool_calls(self.answer, tools)
            self.answer, self.tool_calls = parsed.content, parsed.tool_calls

    def as_dict(self) -> Dict:
        """prefill_ms and decode_tok_s exclude graph compiles: those are in compile_s (compiled: whether this request
        compiled any graph)."""
        s = self.stats
        return {"thinking": self.thinking, "answer": self.answer,
                "tool_calls": [c.as_openai() for c in self.tool_calls],
                "boxes": [b.as_list() for b in self.boxes], "boxes_pixels": [b.as_list() for b in self.boxes_pixels],
                "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
                "prefill_ms": round(s.prefill_s * 1000, 2), "decode_tok_s": round(s.decode_tok_s, 2),
                "compile_s": round(s.compile_s, 3), "compiled": s.compiled,
                "thinking_cut_at": s.thinking_cut[0] if s.thinking_cut else -1}


class Glm4vPipeline:
    def __init__(self, model, processor, generation_config: GenerationConfig, folder: str, mode: str = "graph"):
        self.model, self.processor, self.gen, self.folder = model, processor, generation_config, folder
        self.mode = mode  # "graph" (compiled decode, sampling on device) or "eager" (PyNative, host sampling)
        self.load_s = 0.0  # seconds from_pretrained took (model folder, weights, processor)

    @classmethod
    def from_pretrained(cls, name: str, dtype: str = "float32", device: str = "CPU",
                        mode: str = "graph", quantized_weights: str = "auto",
                        tensor_parallel=None, media_options: Optional[MediaOptions] = None,
                        progress: bool = False) -> "Glm4vPipeline":
        """``tensor_parallel``: a parallel.TPContext (under msrun) to load this rank's part of the decoder (its heads
        and MLP width with tp; its routed experts with ep, MoE models);
        ``media_options``: URL limits, pixel cap and PDF dpi of the processor.
        ``progress``: report on stderr the weights being read (bytes, shard, rate, ETA) and, in graph mode, each
        graph compile (progress.Progress and progress.StepLog: redrawn on a terminal, one line per event in a log).
        Silent by default."""
        from ..model import ops
        from ..model.loading import load_model
        from ..progress import Progress, StepLog

        t0 = time.perf_counter()
        target = ops.set_device(device)
        if target == "CPU" and str(dtype).lower() in ("bfloat16", "bf16"):
            raise ValueError("bfloat16 compute needs an Ascend device (MindSpore has no bf16 matmul on CPU); "
                             "use --dtype float32 on CPU")
        folder = resolve_model(name)
        bars: List[Progress] = []

        def bar(total: int) -> Progress:
            bars.append(Progress(total, unit="B", desc="loading weights"))
            return bars[-1]

        # Tokenizer, template and processor configs first: a broken file costs seconds, not a whole model load.
        processor = load_processor(folder, media_options)
        try:
            # the class config.json names: GLM-4.1V / GLM-4.6V-Flash, or GLM-4.5V / GLM-4.6V (glm4v_moe)
            model = load_model(
                folder, dtype=dtype, quantized_weights=quantized_weights,
                tensor_parallel=tensor_parallel if tensor_parallel is not None and tensor_parallel.enabled else None,
                progress=bar if progress else None)
        finally:  # after a failure too: the bar's line is finished before the error is printed
            for b in bars:
                b.close()
        pipe = cls(model, processor, model.generation_config, folder, mode)
        if progress and mode == "graph":
            from ..runtime.engine import graph_runner

            graph_runner(model).compile_listener = StepLog("compiling")
        pipe.load_s = time.perf_counter() - t0
        return pipe

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def messages(prompt: str, images: Sequence = (), video=None, pdf=None, pdf_pages=None, pdf_dpi=None,
                 system: Optional[str] = None, history: Sequence[Dict] = ()) -> List[Dict]:
        """HF-format messages: optional system, earlier turns, then a user turn with media items before the text."""
        if images and video is not None:
            from ..processing.processor import MixedMediaError

            raise MixedMediaError("images and a video in one prompt are not supported by GLM-4.1V (they share the "
                                  "<|image|> placeholder); send them as separate prompts")
        content: List[Dict] = []
        if pdf is not None:
            item = {"type": "document", "document": pdf}
            if pdf_pages:
                item["pages"] = pdf_pages
            if pdf_dpi is not None:
                item["dpi"] = pdf_dpi
            content.append(item)
        content += [{"type": "image", "image": im} for im in images]
        if video is not None:
            content.append({"type": "video", "video": video})
        content.append({"type": "text", "text": prompt})
        msgs: List[Dict] = [{"role": "system", "content": system}] if system else []
        return msgs + list(history) + [{"role": "user", "content": content}]

    def inputs(self, messages, enable_thinking: bool = True, reply_prefix: str = "", *,
               tools: Optional[Sequence[Dict]] = None) -> Dict:
        """Model inputs of a conversation; ``tools`` (OpenAI function schemas) go to the chat template. ``reply_prefix`` (e.g. "<think>") is appended after the generation prompt,
        as the start of the reply. ``enable_thinking=False``: templates that know the switch get it; for the others
        (GLM-4.1V's) the reply starts with an empty ``<think></think>``, so the model starts in its answer."""
        proc = self.processor
        knows = "enable_thinking" in (proc.chat_template or "")
        kwargs = {"enable_thinking": False} if not enable_thinking and knows else {}
        if tools:
            kwargs["tools"] = list(tools)  # a template without tool support is refused by the processor
        inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="np", **kwargs)
        vocab = proc.tokenizer.get_vocab()
        if not enable_thinking and not knows and "<think>" in vocab and "</think>" in vocab:
            reply_prefix = "<think></think>" + reply_prefix
        if reply_prefix:
            inputs = dict(inputs)
            ids = np.asarray(inputs["input_ids"])
            extra = np.asarray(proc.tokenizer.encode(reply_prefix, add_special_tokens=False), ids.dtype)
            inputs["input_ids"] = np.concatenate([ids, np.broadcast_to(extra, (ids.shape[0], len(extra)))], 1)
            if inputs.get("attention_mask") is not None:
                mask = np.asarray(inputs["attention_mask"])
                inputs["attention_mask"] = np.concatenate([mask, np.ones((mask.shape[0], len(extra)), mask.dtype)], 1)
        return inputs

    def generation_config(self, **overrides) -> GenerationConfig:
        return replace(self.gen, **{k: v for k, v in overrides.items() if v is not None})

    def stream(self, messages, result: ChatResult, image_size=None, *, enable_thinking: bool = True,
               reply_prefix: str = "", max_context: Optional[int] = None, session_factory=None,
               tools: Optional[Sequence[Dict]] = None, **overrides) -> Iterator[Piece]:
        """Yield pieces as they decode; ``result`` is filled in as they come and completed at the end.
        ``reply_prefix``, ``enable_thinking``: see ``inputs``. ``max_context``: a smaller context than the model's
        (a server slot); ``session_factory``: see generation.iter_tokens (the server runs the request as a row of
        its shared batch). ``tools``: to the template, and the answer's tool calls parsed into
        ``result.tool_calls``."""
        inputs = dict(self.inputs(messages, enable_thinking, reply_prefix, tools=tools))
        gen = self.generation_config(**overrides)
        ctx = self.model.config.text.max_position_embeddings
        if max_context is not None:
            ctx = min(ctx, max_context)
        n_prompt = int(np.asarray(inputs["input_ids"]).shape[-1])
        if n_prompt >= ctx:
            raise PromptTooLongError(f"the prompt has {n_prompt} tokens but the context is {ctx}; use fewer or "
                             "smaller images, a shorter video or text")
        if n_prompt + gen.max_new_tokens > ctx:
            gen = replace(gen, max_new_tokens=ctx - n_prompt)
        model_inputs = {k: inputs.get(k) for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                  "pixel_values_videos", "video_grid_thw")}
        thinking, answer = [], []
        for piece in stream_generate(self.model, self.processor.tokenizer, model_inputs, gen,
                                     stats=result.stats, tokens_out=result.tokens, mode=self.mode,
                                     session_factory=session_factory):
            (thinking if piece.kind == "thinking" else answer).append(piece.text)
            yield piece
        result.thinking = "".join(thinking).strip()
        result.text = "".join(answer)
        _, result.answer = split_thinking(result.text)
        result.apply_tools(tools)
        result.boxes = parse_boxes(result.text)
        if image_size is not None:
            result.boxes_pixels = rescale_boxes(result.boxes, *image_size)

    def chat(self, messages, image_size=None, tools: Optional[Sequence[Dict]] = None, **overrides) -> ChatResult:
        result = ChatResult()
        for _ in self.stream(messages, result, image_size=image_size, tools=tools, **overrides):
            pass
        return result
