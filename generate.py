#!/usr/bin/env python
"""Run GLM-4.1V on images, a video, a document (PDF or slides / office file) or text, streaming the answer to stdout.

Examples:
  python generate.py --model_name tiny-random --image cat.png --prompt "Describe the image."
  python generate.py --model_name /models/GLM-4.1V-9B-Thinking --image a.jpg --image b.jpg --prompt "Compare."
  python generate.py --model_name /models/GLM-4.1V-9B-Thinking --video clip.mp4 --prompt "What happens?"
  python generate.py --model_name /models/GLM-4.1V-9B-Thinking --pdf paper.pdf --pdf_pages 1-3 --prompt "Summarise."
  python generate.py --model_name /models/GLM-4.1V-9B-Thinking --doc talk.pptx --prompt "Summarise the slides."
  echo -e "Hi\\nAnd then?" | python generate.py --model_name tiny-random --chat

--doc is --pdf under another name: .ppt .pptx .doc .docx .odp .odt are turned into a PDF by LibreOffice (installed
separately; converted once, cached by content in ~/.cache/glm4v_ms/docs), then rendered page by page like a PDF.

Thinking goes to stdout in grey (hidden with --hide_thinking); timings and progress go to stderr. Sampling defaults
are the official recipe's (top_k 2, top_p 1e-5, repetition_penalty 1.1); --greedy decodes deterministically.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    try:
        from glm4v_ms.apps.cli_args import add_generation_arguments, add_media_arguments, number_type
    except ImportError as e:
        print(f"error: {e} (run scripts/setup_env.sh to install the dependencies)", file=sys.stderr)
        sys.exit(2)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name", default="tiny-random",
                    help="a GLM-4.1V / GLM-4.6V-Flash / GLM-4.5V / GLM-4.6V folder, a hub id (downloaded when "
                         "online), or tiny-random / tiny-random-4.6v / tiny-random-4.5v (built-in, random)")
    ap.add_argument("--image", action="append", default=[], help="image path / URL (repeatable)")
    ap.add_argument("--video", help="video path / URL")
    ap.add_argument("--pdf", "--doc", dest="pdf", metavar="DOCUMENT",
                    help="PDF or office document (.ppt .pptx .doc .docx .odp .odt, via LibreOffice): each page "
                         "becomes an image")
    ap.add_argument("--pdf_pages", "--doc_pages", dest="pdf_pages", help="pages to use, e.g. 1-3,5 (default: all)")
    ap.add_argument("--pdf_dpi", "--doc_dpi", dest="pdf_dpi", type=number_type(float, 0, lo_open=True), default=None,
                    help="page render resolution, dots per inch (default 180)")
    ap.add_argument("--prompt", help="the user message (required unless --chat)")
    ap.add_argument("--system", help="system message")
    ap.add_argument("--tools", metavar="FILE",
                    help="JSON file with a list of OpenAI function tools ({\"type\": \"function\", \"function\": "
                         "{...}}) for the chat template (GLM-4.6V); the answer's tool calls are parsed into "
                         "tool_calls (printed with --json, else on stderr)")
    add_generation_arguments(ap)
    add_media_arguments(ap)
    ap.add_argument("--hide_thinking", action="store_true", help="do not print the thinking part")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (per turn) instead of streaming text")
    ap.add_argument("--chat", action="store_true", help="multi-turn: one user message per stdin line")
    ap.add_argument("--demo", action="store_true",
                    help="tiny-random only (scripts/demo.sh): its EOS is ignored and the reply opens with <think>, cut "
                         "after half of --max_new_tokens, so the random model streams every requested token through "
                         "the thinking / answer split")
    ap.add_argument("--draw_boxes", metavar="OUT.png", help="draw the answer's grounding boxes on the first image")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="CPU", choices=["CPU", "Ascend"])
    ap.add_argument("--mode", default="graph", choices=["graph", "eager"],
                    help="graph: prefill and decode compiled with mindspore.jit, sampling on device (fast; compiles "
                         "once per length bucket); eager: PyNative with host sampling (the reference path)")
    ap.add_argument("--quantized_weights", default="auto", choices=["auto", "dequantize", "int"],
                    help="GPTQ checkpoints only: dequantize to --dtype at load time, or keep the int4/int8 weights "
                         "(Ascend's weight-quant matmul; elsewhere dequantised per call: less memory, slower); auto: "
                         "int on Ascend, dequantize on CPU")
    args = ap.parse_args(argv)
    if not args.chat and args.prompt is None:
        ap.error("--prompt is required (or use --chat)")
    for flag in ("prompt", "system"):
        bad = _not_utf8(getattr(args, flag))
        if bad:
            ap.error(f"--{flag} is not valid UTF-8 text ({bad}); pass UTF-8 (check the terminal's or file's encoding)")
    return args


def demo_knobs(args):
    """--demo: the overrides that make tiny-random's random weights show the whole pipeline (never real models)."""
    return dict(eos_token_id=[], max_thinking_tokens=args.max_thinking_tokens or max(args.max_new_tokens // 2, 1))


def stats_line(pipe, result, first: bool) -> str:
    """Steady-state timings (compiles excluded) and, apart, the one-time work: loading (first turn) and compiles."""
    s = result.stats
    line = (f"[{s.prompt_tokens} prompt tokens, prefill {s.prefill_s * 1000:.0f} ms; {s.new_tokens} new tokens, "
            f"{s.decode_tok_s:.1f} tokens/s")
    once = [f"load {pipe.load_s:.1f} s"] if first else []
    if s.compiled:
        once.append(f"compiled {len(s.compiles)} graph{'s' if len(s.compiles) > 1 else ''} in {s.compile_s:.1f} s")
    return line + (f"; one-time: {', '.join(once)}, not in the timings]" if once else "]")


def _not_utf8(text):
    """Where ``text`` (from argv, undecodable bytes kept as surrogates) is not UTF-8, or None."""
    if text is None:
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        raw = text[e.start:e.end].encode("utf-8", "surrogateescape")
        return f"byte(s) {raw[:8].hex(' ')} at character {e.start}"


def check_output_path(path: str, flag: str) -> None:
    """An output file the run will write at the end must be writable now: its folder exists, it is not a folder,
    and PIL knows its extension."""
    from PIL import Image

    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if os.path.isdir(full):
        raise ValueError(f"{flag} {path}: is a folder; give a file name such as boxes.png")
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in the folder {parent} (permission denied)")
    ext = os.path.splitext(full)[1].lower()
    if ext and ext not in Image.registered_extensions():
        raise ValueError(f"{flag} {path}: unknown image extension {ext!r}; use .png or .jpg")


class Interrupts:
    """Ctrl-C while tokens are decoding stops at the next token, outside MindSpore's compiled step (MindSpore turns
    a SIGINT inside a graph run into SIGTERM, which would kill the process without a word): SIGINT and SIGTERM
    both set a flag that ``run_turn`` checks after each piece; a second signal, or one outside decoding, raises
    KeyboardInterrupt at once."""

    def __init__(self):
        self.decoding = False
        self.pending = False

    def install(self) -> None:
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.decoding and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt


INTERRUPTS = Interrupts()


EXIT_NO_INPUT = 3  # --chat with nothing to answer: not a usage error (2), not a failed request (1)


def chat_turns(prompt, stream):
    """--chat's user messages: ``prompt`` (if any), then each non-blank line of ``stream``, read only when the
    previous turn has been answered (a generator: the caller answers a line before the next one is read, so the
    chat works interactively and over a pipe that a program writes line by line)."""
    if prompt:
        yield prompt
    while True:
        line = stream.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\r\n")


def load_tools(path):
    """The --tools file: a JSON list of tools (or {"tools": [...]}); errors name the file and the problem."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--tools {path}: not valid JSON ({e})") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list) or not tools:
        raise ValueError(f"--tools {path}: expected a non-empty JSON list of tools (or {{\"tools\": [...]}})")
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"--tools {path}: tool {k} has no function name; write "
                             "{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}")
    return tools


def run_turn(pipe, args, messages, first_image, first: bool = True, tools=None):
    from glm4v_ms.apps.cli_args import generation_knobs
    from glm4v_ms.apps.pipeline import ChatResult

    result = ChatResult()
    size = first_image.size if first_image is not None else None
    knobs = generation_knobs(args)
    if args.demo:
        knobs.update(demo_knobs(args))
    grey, reset = ("\033[90m", "\033[0m") if sys.stdout.isatty() else ("", "")
    last = None
    INTERRUPTS.decoding = True  # Ctrl-C now stops at the next piece (see Interrupts)
    for piece in pipe.stream(messages, result, image_size=size, reply_prefix="<think>" if args.demo else "",
                             tools=tools,
                             **knobs):
        INTERRUPTS.check()
        if args.json or (piece.kind == "thinking" and args.hide_thinking):
            continue
        if piece.kind != last and last is not None:
            sys.stdout.write(reset + "\n")
        sys.stdout.write((grey if piece.kind == "thinking" else "") + piece.text)
        sys.stdout.flush()
        last = piece.kind
    INTERRUPTS.decoding = False
    INTERRUPTS.check()
    if args.json:
        print(json.dumps(dict(result.as_dict(), load_s=round(pipe.load_s, 3)), ensure_ascii=False))
    else:
        if last is not None:
            sys.stdout.write(reset + "\n")
        for call in result.tool_calls:
            fn = call.as_openai()["function"]
            print(f"[tool call {fn['name']}({fn['arguments']})]", file=sys.stderr)
    print(stats_line(pipe, result, first), file=sys.stderr)
    if args.draw_boxes and first_image is not None:
        from glm4v_ms.runtime.output import draw_boxes

        path = draw_boxes(first_image, result.boxes_pixels, args.draw_boxes)
        print(f"[{len(result.boxes_pixels)} box(es) drawn to {path}]", file=sys.stderr)
    return result


def preflight(args, options):
    """Everything about the request that can be checked without the model, before it is loaded (a typo costs
    seconds, not a 9B load): the output path, every media input (images decoded, PDF pages checked, video probed,
    URLs fetched once), the model folder's config / tokenizer / template / processor files, and that the KV cache
    for --max_new_tokens fits. Returns (model folder, prepared media)."""
    from glm4v_ms.model.kv_cache import check_cache_size
    from glm4v_ms.model.config import Glm4vConfig
    from glm4v_ms.apps.preflight import check_model_folder, prepare_media, resolve_model

    if args.draw_boxes:
        if not args.image:
            raise ValueError("--draw_boxes needs an --image to draw on")
        check_output_path(args.draw_boxes, "--draw_boxes")
    media = prepare_media(args.image, args.video, args.pdf, args.pdf_pages, args.pdf_dpi, options)
    folder = resolve_model(args.model_name)
    check_model_folder(folder)
    text = Glm4vConfig.from_pretrained(folder).text
    # The least the first request needs: one prompt token plus the new tokens, capped at the model's context.
    least = min(args.max_new_tokens + 1, text.max_position_embeddings)
    check_cache_size(text, 1, least, 2 if args.dtype == "bfloat16" else 4, host=args.device == "CPU")
    return folder, media


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no tokenizer length warnings: we check the context
    try:
        from glm4v_ms.processing.media import MediaError, MissingDependencyError
        from glm4v_ms.apps.cli_args import media_options
        from glm4v_ms.apps.pipeline import Glm4vPipeline
        from glm4v_ms.processing.processor import PromptError
        from glm4v_ms.model.weights import CheckpointError

        errors = (OSError, ValueError, MediaError, PromptError, CheckpointError, MissingDependencyError, KeyError)
    except ImportError as e:
        print(f"error: {e} (run scripts/setup_env.sh to install the dependencies)", file=sys.stderr)
        return 2
    try:
        options = media_options(args)
        if args.demo:
            from glm4v_ms.apps.preflight import TINY_RANDOM

            if args.model_name != TINY_RANDOM:
                raise ValueError(f"--demo is only for the built-in {TINY_RANDOM} model (it ignores EOS)")
            cut = demo_knobs(args)["max_thinking_tokens"]
            print(f"[demo: {TINY_RANDOM}'s weights are random, so its text is random. To show the whole pipeline, its "
                  f"EOS is ignored and the reply opens with <think>, cut after {cut} tokens by a forced "
                  f"</think><answer>: all {args.max_new_tokens} tokens stream. Real models never do this.]",
                  file=sys.stderr)
        folder, prepared = preflight(args, options)
        INTERRUPTS.install()
        if sys.stderr.isatty():  # progress for people; logs and error output stay one line per event
            print(f"[loading {args.model_name}]", file=sys.stderr)
        tools = load_tools(args.tools) if args.tools else None
        pipe = Glm4vPipeline.from_pretrained(folder, dtype=args.dtype, device=args.device, mode=args.mode,
                                             quantized_weights=args.quantized_weights, media_options=options,
                                             progress=True)
        first_image = prepared.images[0] if prepared.images else None
        media = dict(images=prepared.images, video=prepared.video, pdf=prepared.pdf, pdf_pages=prepared.pdf_pages,
                     pdf_dpi=prepared.pdf_dpi, system=args.system)
        if not args.chat:
            run_turn(pipe, args, pipe.messages(args.prompt, **media), first_image, tools=tools)
            return 0
        history = []
        turns = 0
        for text in chat_turns(args.prompt, sys.stdin):
            if turns == 0:
                messages = pipe.messages(text, **media)
            else:
                messages = pipe.messages(text, system=args.system, history=history)
            if not args.json:
                print(f"\n>>> {text}", file=sys.stderr)
            result = run_turn(pipe, args, messages, first_image, first=turns == 0, tools=tools)
            sys.stdout.flush()  # the answer is out before the next line is read
            turns += 1
            # Earlier turns keep only the answer (the official CLI's rule); media stay in the first user turn.
            history = [m for m in messages if m["role"] != "system"]
            history.append({"role": "assistant", "content": result.answer})
        if turns == 0:
            print("error: --chat got no input: stdin was empty (or only blank lines) and no --prompt was given; "
                  "give one user message per stdin line", file=sys.stderr)
            return EXIT_NO_INPUT
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except errors as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # transformers serves only the tokenizer: skip its import of torch (~5 s). Set for the CLI process only, so a
    # program that calls main() in-process (the tests) does not hide torch from the rest of its run.
    os.environ.setdefault("USE_TORCH", "0")
    sys.exit(main())
