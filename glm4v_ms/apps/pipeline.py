"""Model + processor + generation settings: what ``generate.py`` and batch tools call.

    pipe = Glm4vPipeline.from_pretrained("path/or/hub-id" | "tiny-random", dtype="float32", device="CPU")
    messages = pipe.messages("Describe.", images=["cat.jpg"])
    for piece in pipe.stream(messages, result):      # text pieces tagged thinking / answer
        ...
    result.answer, result.thinking, result.boxes, result.stats
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from ..runtime.generation import GenerationConfig, Piece, StepStats, stream_generate
from ..runtime.output import Box, parse_boxes, rescale_boxes, split_thinking

TINY_RANDOM = "tiny-random"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    pass


class PromptTooLongError(ValueError):
    """The prompt (text and media tokens) does not fit the context."""


def tiny_model_dir() -> str:
    """Where tiny-random is cached; the name carries a hash of its builders, so a changed builder rebuilds it."""
    import hashlib

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha1()
    for name in (os.path.join("apps", "tiny.py"), os.path.join("processing", "tiny_tokenizer.py")):
        with open(os.path.join(pkg, name), "rb") as f:
            h.update(f.read())
    return os.path.join(os.path.expanduser("~"), ".cache", "glm4v_ms", f"{TINY_RANDOM}-{h.hexdigest()[:10]}")


def resolve_model(name: str) -> str:
    """A local folder as is; ``tiny-random`` built on first use; a hub id (``org/name``) downloaded with
    huggingface_hub (a clear error when offline)."""
    if name == TINY_RANDOM:
        folder = tiny_model_dir()
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            from .tiny import make_tiny_model

            make_tiny_model(folder, overwrite=True)
        return folder
    if os.path.isdir(name):
        return name
    if _HUB_ID.match(name) and not os.path.exists(name):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
        except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
            raise ModelNotFoundError(
                f"model '{name}' is not a local folder and could not be downloaded from the Hugging Face hub "
                f"({type(e).__name__}: {str(e).splitlines()[0].split('. ')[0][:160]}); download it elsewhere and pass "
                "its folder"
            ) from None
    raise ModelNotFoundError(f"model folder not found: {name} (pass a GLM-4.1V folder, a hub id like "
                             "zai-org/GLM-4.1V-9B-Thinking, or tiny-random)")


@dataclass
class ChatResult:
    thinking: str = ""
    answer: str = ""
    text: str = ""                   # the raw reply, markers removed
    tokens: List[int] = field(default_factory=list)
    boxes: List[Box] = field(default_factory=list)          # 0-1000 normalised
    boxes_pixels: List[Box] = field(default_factory=list)   # rescaled to the first image
    stats: StepStats = field(default_factory=StepStats)

    def as_dict(self) -> Dict:
        s = self.stats
        return {"thinking": self.thinking, "answer": self.answer,
                "boxes": [b.as_list() for b in self.boxes], "boxes_pixels": [b.as_list() for b in self.boxes_pixels],
                "prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
                "prefill_ms": round(s.prefill_s * 1000, 2), "decode_tok_s": round(s.decode_tok_s, 2),
                "thinking_cut_at": s.thinking_cut[0] if s.thinking_cut else -1}


def add_generation_arguments(parser, seed_help: str = "sampling seed (reproducible draws)") -> None:
    """The generation flags of the command-line tools (generate.py, tools/batch_infer.py), with the official
    recipe's defaults (generation.OFFICIAL_SAMPLING, 8192 new tokens)."""
    from ..runtime.generation import OFFICIAL_SAMPLING as rec

    parser.add_argument("--max_new_tokens", type=int, default=8192)
    parser.add_argument("--max_thinking_tokens", type=int, default=None,
                        help="force </think><answer> after this many thinking tokens (official 'academic' recipe: "
                             "8192)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample off)")
    parser.add_argument("--temperature", type=float, default=rec["temperature"])
    parser.add_argument("--top_k", type=int, default=rec["top_k"])
    parser.add_argument("--top_p", type=float, default=rec["top_p"])
    parser.add_argument("--repetition_penalty", type=float, default=rec["repetition_penalty"])
    parser.add_argument("--seed", type=int, default=None, help=seed_help)


def generation_knobs(args) -> Dict:
    """The flags of add_generation_arguments -> GenerationConfig overrides."""
    return dict(max_new_tokens=args.max_new_tokens, max_thinking_tokens=args.max_thinking_tokens,
                do_sample=not args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


class Glm4vPipeline:
    def __init__(self, model, processor, generation_config: GenerationConfig, folder: str, mode: str = "graph"):
        self.model, self.processor, self.gen, self.folder = model, processor, generation_config, folder
        self.mode = mode  # "graph" (compiled decode, sampling on device) or "eager" (PyNative, host sampling)

    @classmethod
    def from_pretrained(cls, name: str, dtype: str = "float32", device: str = "CPU",
                        mode: str = "graph", quantized_weights: str = "auto",
                        tensor_parallel=None) -> "Glm4vPipeline":
        """``tensor_parallel``: a parallel.TPContext (under msrun) to load this rank's part of the decoder."""
        from ..model import ops
        from ..model.glm4v import Glm4vForConditionalGeneration
        from ..processing.processor import Glm4vProcessor

        target = ops.set_device(device)
        if target == "CPU" and str(dtype).lower() in ("bfloat16", "bf16"):
            raise ValueError("bfloat16 compute needs an Ascend device (MindSpore has no bf16 matmul on CPU); "
                             "use --dtype float32 on CPU")
        folder = resolve_model(name)
        model = Glm4vForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, quantized_weights=quantized_weights,
            tensor_parallel=tensor_parallel if tensor_parallel is not None and tensor_parallel.enabled else None)
        processor = Glm4vProcessor.from_pretrained(folder)
        return cls(model, processor, model.generation_config, folder, mode)

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
            if pdf_dpi:
                item["dpi"] = pdf_dpi
            content.append(item)
        content += [{"type": "image", "image": im} for im in images]
        if video is not None:
            content.append({"type": "video", "video": video})
        content.append({"type": "text", "text": prompt})
        msgs: List[Dict] = [{"role": "system", "content": system}] if system else []
        return msgs + list(history) + [{"role": "user", "content": content}]

    def inputs(self, messages, enable_thinking: bool = True) -> Dict:
        """Model inputs of a conversation. ``enable_thinking=False``: templates that know the switch get it; for the
        others (GLM-4.1V's) an empty ``<think></think>`` is appended to the generation prompt, so the model starts
        in its answer."""
        proc = self.processor
        knows = "enable_thinking" in (proc.chat_template or "")
        kwargs = {"enable_thinking": False} if not enable_thinking and knows else {}
        out = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="np", **kwargs)
        if not enable_thinking and not knows:
            vocab = proc.tokenizer.get_vocab()
            if "<think>" in vocab and "</think>" in vocab:
                out = dict(out)
                extra = np.array([[vocab["<think>"], vocab["</think>"]]], np.int64)
                ids = np.asarray(out["input_ids"])
                out["input_ids"] = np.concatenate([ids, extra.astype(ids.dtype)], axis=1)
                if out.get("attention_mask") is not None:
                    mask = np.asarray(out["attention_mask"])
                    out["attention_mask"] = np.concatenate([mask, np.ones((1, 2), mask.dtype)], axis=1)
        return out

    def generation_config(self, **overrides) -> GenerationConfig:
        return replace(self.gen, **{k: v for k, v in overrides.items() if v is not None})

    def stream(self, messages, result: ChatResult, image_size=None, *, enable_thinking: bool = True,
               max_context: Optional[int] = None, session_factory=None, **overrides) -> Iterator[Piece]:
        """Yield pieces as they decode; ``result`` is filled in as they come and completed at the end.
        ``max_context``: a smaller context than the model's (a server slot); ``session_factory``: see
        generation.iter_tokens (the server runs the request as a row of its shared batch)."""
        inputs = dict(self.inputs(messages, enable_thinking))
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
        result.boxes = parse_boxes(result.text)
        if image_size is not None:
            result.boxes_pixels = rescale_boxes(result.boxes, *image_size)

    def chat(self, messages, image_size=None, **overrides) -> ChatResult:
        result = ChatResult()
        for _ in self.stream(messages, result, image_size=image_size, **overrides):
            pass
        return result
