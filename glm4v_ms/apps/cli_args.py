"""Command-line flags shared by generate.py, tools/batch_infer.py and tools/serve.py: generation knobs with the
official recipe's defaults and their ranges (argparse refuses a value out of range, naming the flag), and the media
limits (URL timeouts, pixel cap, PDF dpi, documents)."""

from __future__ import annotations

import argparse
from typing import Dict

from ..processing.media import MediaOptions

def number_type(kind, lo=None, hi=None, lo_open=False, what=""):
    """An argparse type: ``kind`` (int / float) within [lo, hi] (``lo_open``: lo excluded), finite; the message says
    the allowed range (argparse prefixes it with the flag's name)."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {'an integer' if kind is int else 'a number'}")
        bad = (isinstance(value, float) and not math.isfinite(value)) or (lo is not None and (
            value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
        if bad:
            rng = what or (f"> {lo}" if lo_open else f">= {lo}") + (f" and <= {hi}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text[:40]}")
        return value

    parse.__name__ = "integer" if kind is int else "number"  # argparse names the type in its messages
    return parse


def add_generation_arguments(parser, seed_help: str = "sampling seed (reproducible draws)") -> None:
    """The generation flags of the command-line tools (generate.py, tools/batch_infer.py), with the official
    recipe's defaults (generation_config.OFFICIAL_SAMPLING, 8192 new tokens). Out-of-range values are refused by argparse
    (exit 2, the flag named), before anything is loaded."""
    from ..model.generation_config import OFFICIAL_SAMPLING as rec

    parser.add_argument("--max_new_tokens", type=number_type(int, 1), default=8192)
    parser.add_argument("--max_thinking_tokens", type=number_type(int, 0), default=None,
                        help="force </think><answer> after this many thinking tokens (official 'academic' recipe: "
                             "8192)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (do_sample off)")
    parser.add_argument("--temperature", type=number_type(float, 0, lo_open=True), default=rec["temperature"])
    parser.add_argument("--top_k", type=number_type(int, 0), default=rec["top_k"], help="0: no top-k filter")
    parser.add_argument("--top_p", type=number_type(float, 0, 1, lo_open=True, what="in (0, 1]"), default=rec["top_p"])
    parser.add_argument("--repetition_penalty", type=number_type(float, 0, lo_open=True),
                        default=rec["repetition_penalty"])
    parser.add_argument("--seed", type=number_type(int, 0, 2**64 - 1, what="in [0, 2**64)"), default=None,
                        help=seed_help)


def add_media_arguments(parser) -> None:
    """URL fetch limits (media.MediaOptions) as command-line flags."""
    d = MediaOptions()
    parser.add_argument("--fetch_timeout", type=number_type(float, 0, lo_open=True), default=d.timeout,
                        help=f"seconds to connect to a URL and for each read (default {d.timeout:g})")
    parser.add_argument("--fetch_deadline", type=number_type(float, 0, lo_open=True), default=d.fetch_deadline,
                        help=f"seconds for a whole URL download (default {d.fetch_deadline:g})")
    parser.add_argument("--min_fetch_rate", type=number_type(float, 0), default=d.min_fetch_rate,
                        help=f"bytes/s a URL download must average after {d.rate_grace:g} s (default "
                             f"{d.min_fetch_rate:g}; 0: no floor)")
    parser.add_argument("--max_images", type=number_type(int, 0), default=d.max_images,
                        help=f"cap on images per prompt, document pages counted one each (default {d.max_images}, "
                             "as GLM-V serves; 0: no cap)")
    parser.add_argument("--doc_timeout", type=number_type(float, 0, lo_open=True), default=d.convert_timeout,
                        help=f"seconds LibreOffice may take to convert an office document (default "
                             f"{d.convert_timeout:g})")


def media_options(args) -> MediaOptions:
    """The flags of add_media_arguments -> MediaOptions."""
    return MediaOptions(timeout=args.fetch_timeout, fetch_deadline=args.fetch_deadline,
                        min_fetch_rate=args.min_fetch_rate, max_images=args.max_images or None,
                        convert_timeout=args.doc_timeout)


def generation_knobs(args) -> Dict:
    """The flags of add_generation_arguments -> GenerationConfig overrides."""
    return dict(max_new_tokens=args.max_new_tokens, max_thinking_tokens=args.max_thinking_tokens,
                do_sample=not args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)
