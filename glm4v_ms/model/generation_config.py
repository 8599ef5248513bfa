"""Generation defaults of a checkpoint (generation_config.json) and the official GLM-V sampling recipe.

They live with the model because ``from_pretrained`` reads them with the weights (like HF's
``model.generation_config``); the runtime's decode loop consumes them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Optional

# The official GLM-V inference recipe (near-greedy, repetition penalty 1.1, 8192 new tokens).
OFFICIAL_SAMPLING = dict(do_sample=True, top_k=2, top_p=1e-5, temperature=1.0, repetition_penalty=1.1)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 8192
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: List[int] = field(default_factory=list)
    pad_token_id: Optional[int] = None
    seed: Optional[int] = None
    # Thinking control: after this many tokens inside <think> without </think>, force ``think_cutoff`` tokens.
    max_thinking_tokens: Optional[int] = None

    @classmethod
    def from_pretrained(cls, folder: str, text_config=None, **overrides) -> "GenerationConfig":
        """Defaults from the model folder's generation_config.json; absent knobs keep HF's defaults, except
        max_new_tokens (8192, the official recipe, instead of HF's max_length 20). EOS and pad ids missing from the
        file come from ``text_config`` (config.json)."""
        d: Dict = {}
        path = os.path.join(folder, "generation_config.json")
        if os.path.isfile(path):
            with open(path, "r", encoding="utf-8") as f:
                d = json.load(f)
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        if isinstance(cfg.eos_token_id, int):
            cfg.eos_token_id = [cfg.eos_token_id]
        if text_config is not None:
            if not cfg.eos_token_id:
                cfg.eos_token_id = list(text_config.eos_token_id or [])
            if cfg.pad_token_id is None:
                cfg.pad_token_id = text_config.pad_token_id
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self, vocab_size: int) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample:
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.max_thinking_tokens is not None and self.max_thinking_tokens < 0:
            raise ValueError(f"max_thinking_tokens must be >= 0, got {self.max_thinking_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        bad = [e for e in self.eos_token_id if not 0 <= e < vocab_size]
        if bad:
            raise ValueError(f"eos_token_id {bad} outside the vocabulary (size {vocab_size})")
