#!/usr/bin/env python
"""Run GLM-4.1V over a JSONL data set, on one process or on every card with msrun; resumable after any crash.

    python tools/batch_infer.py --input prompts.jsonl --output results.jsonl [--model_name M] [generation flags]

INPUT: one JSON object per line (blank lines are skipped):
  {"id": "q1", "prompt": "What is this?", "image": "cat.jpg"}
  {"id": 7, "prompt": "Compare.", "image": ["a.jpg", "b.png"], "system": "Be brief.", "max_new_tokens": 256}
  {"prompt": "What happens?", "video": "clip.mp4"}                      (no id: the id is the 0-based line number)
  {"prompt": "Summarise.", "pdf": "paper.pdf", "pdf_pages": "1-3"}
  {"prompt": "Summarise the slides.", "pdf": "talk.pptx"}     (.ppt .pptx .doc .docx .odp .odt: through LibreOffice)
  {"id": "m", "messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                        {"type": "text", "text": "Describe."}]}]}
Fields: id (string or integer; unique: a repeated id is an error of the later line; 3 and "3" are different ids),
either messages (Hugging Face chat format; items of type text/image/video/document as Glm4vProcessor takes them) or
prompt with optional image (a path/URL or a list), video, pdf, pdf_pages, pdf_dpi, system; and optional generation
settings that override the command line's for that request: max_new_tokens, do_sample, temperature, top_k, top_p,
repetition_penalty, seed, max_thinking_tokens. null means "not given". Relative paths are relative to the working
directory. Invalid JSON, an unknown field (it is named), a missing or corrupt image, a PDF given as image (use
pdf; also by URL or data: URI), a lone UTF-16 surrogate in the text, a too-long prompt: that line gets an error result, the job goes on.
Every line is checked (fields, types, settings, local media files) before the model is loaded: a job of only bad
lines never loads it, and the log names each invalid request.

OUTPUT: one JSON object per input request, in input order: id, index (the 0-based input line), and the keys of
generate.py --json (thinking, answer, boxes [0-1000], boxes_pixels [pixels of the first image], prompt_tokens,
new_tokens, prefill_ms, decode_tok_s, thinking_cut_at) plus batch_size and batch_s (the batch's wall seconds);
prefill_ms is the batch's prefill; decode_tok_s the request's own new tokens per second of decoding. A failed
request has id, index and error. Every line also has request_digest (what it answers, see resuming) and
"format": "glm4v_ms.batch_infer/2", the mark of this tool's results: an existing --output that is not empty and
whose first and last lines lack it is refused (one error line) and left untouched.

Batching: each process reads its pending requests in windows of --sort_window, groups them by media kind (images
and text / video: one forward cannot hold both) and generation settings (greedy requests share batches whatever
their sampling knobs; a sampled request with a seed runs alone so that its result does not depend on its
neighbours), sorts them by prompt length and runs left-padded batches of up to --batch_size with
glm4v_ms.runtime.generation (graph mode by default). Greedy results do not depend on the batch.

ONE MACHINE, ALL CARDS (msrun, MindSpore's launcher; one process per card; each uses the card of its local rank):
  source .venv/bin/activate        # msrun starts `python` from PATH: it must be the environment's python
  msrun --worker_num=8 --local_worker_num=8 --master_addr=127.0.0.1 --master_port=8118 --join=True \\
        --log_dir=logs --tail_worker_log=0 tools/batch_infer.py --device Ascend --dtype bfloat16 \\
        --model_name /models/GLM-4.1V-9B-Thinking --input prompts.jsonl --output results.jsonl
SEVERAL MACHINES (here 2 x 8 cards; the same command on each, --node_rank 0 and 1; master_addr = machine 0's IP;
the input and the output's folder must be on a filesystem that every machine sees):
  msrun --worker_num=16 --local_worker_num=8 --node_rank=0 --master_addr=10.0.0.1 --master_port=8118 --join=True \\
        tools/batch_infer.py --device Ascend --dtype bfloat16 --model_name ... --input ... --output ...
Other launchers (one process per card started by a scheduler, e.g. an array job): pass --rank R --world_size N to
each (the card: $DEVICE_ID, default 0). Such processes do not talk to each other: the last one to finish merges.

TENSOR PARALLELISM (--tp N, under msrun): N consecutive ranks split the decoder (glm4v_ms/model/parallel.py) and work
on one shard together; only the first rank of each group writes. --worker_num must be a multiple of N; N must
divide the model's query heads, KV heads and MLP width (GLM-4.1V-9B: --tp 2). E.g. 8 cards as 4 groups of 2:
  msrun --worker_num=8 --local_worker_num=8 ... tools/batch_infer.py --tp 2 --device Ascend --dtype bfloat16 ...
EXPERT PARALLELISM (--ep N, under msrun; GLM-4.5V / GLM-4.6V, the mixture-of-experts models): N consecutive ranks
each hold 1/N of the routed experts (and read only theirs) and share one shard, as with --tp; alone (--tp 1) the
attention is replicated on every rank, with --tp N (the same N) it is split too. N must divide the routed experts
(128: --ep 8 --tp 8 on 8 cards, see the README); --ep on a dense model is an error.
  msrun --worker_num=8 --local_worker_num=8 ... tools/batch_infer.py --tp 8 --ep 8 --device Ascend --dtype bfloat16 ...

HOW IT WORKS: every process reads the input and every part file, so all agree on what is done; process r of N
then takes the pending requests whose line number % N == r and appends one line per finished request to
<output>.parts/rank-<r>.jsonl (flushed at once, fsync'ed every --fsync_interval seconds and at exit). Under msrun,
rank 0 shows the progress (requests done by all processes, read from the part files as they grow, over those to do
in this run; "before" = done by earlier runs), waits until every request has a result, then writes --output (a
temporary file renamed into place): every request exactly once, in input order. Under msrun the progress is in
rank 0's log (logs/worker_0.log; --tail_worker_log=0 copies it to the console).

FAILURES AND RESUMING: a killed or preempted process loses at most the batch it was generating. msrun stops the
whole job when one process dies (it then waits --cluster_time_out seconds, 600 by default, for its scheduler to
give up). Run the same command again, with any number of cards: requests that have a current result in any part
file (from any earlier world size) are skipped, a result line cut by the kill is removed and its request redone,
and the rest is shared out again. A request that failed (error result) counts as done; --retry_errors redoes
those. A job whose requests are all done only writes --output. The .parts folder is the job's state: keep it until
--output is written; delete it (and --output) to start over.

EDITING THE INPUT BETWEEN RUNS: a result is reused only for the identical request. Its request_digest covers the
line (prompt/messages, system, media references, per-line settings, id), each local media file (content when at
most 64 KiB, else real path + size + mtime; URLs by their string), the generation settings in effect (sampling
knobs only for sampled requests, with --mode) and the model (folder and its files' sizes and mtimes, --dtype,
--device, --quantized_weights). A request whose line, media, settings or model changed is recomputed, named in the
log and counted in the final line; results without a digest (an older version of this tool) are recomputed too.
Errors about the job itself (no input, unwritable or foreign output, unknown model, unusable generation flags)
print one "error:" line and exit 1.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    try:
        from glm4v_ms.apps.cli_args import add_generation_arguments
    except ImportError as e:
        print(f"error: {e} (run scripts/setup_env.sh to install the dependencies)", file=sys.stderr)
        sys.exit(2)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="JSONL file, one request per line")
    ap.add_argument("--output", required=True, help="JSONL results (written at the end; state in OUTPUT.parts/)")
    ap.add_argument("--model_name", default="tiny-random",
                    help="a GLM-4.1V folder, a hub id (downloaded when online), or tiny-random (built-in, random)")
    ap.add_argument("--batch_size", type=int, default=4, help="requests per forward (default 4)")
    ap.add_argument("--sort_window", type=int, default=None,
                    help="pending requests read at a time, grouped and sorted by prompt length into batches "
                         "(default 8 x batch_size); their preprocessed images are held in memory")
    ap.add_argument("--retry_errors", action="store_true", help="redo requests whose earlier result is an error")
    ap.add_argument("--fsync_interval", type=float, default=10.0,
                    help="seconds between fsyncs of the part file (lines are flushed at once; default 10)")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    ap.add_argument("--rank", type=int, default=None, help="this process's rank, for launchers other than msrun")
    ap.add_argument("--world_size", type=int, default=None, help="number of processes, with --rank")
    g = ap.add_argument_group("generation (defaults as generate.py; a request's own fields override them)")
    add_generation_arguments(g, seed_help="a sampled request with a seed runs in a batch of its own")
    m = ap.add_argument_group("model")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    m.add_argument("--device", default="CPU", choices=["CPU", "Ascend"])
    m.add_argument("--mode", default="graph", choices=["graph", "eager"],
                   help="graph: compiled prefill/decode (default); eager: PyNative, the reference path")
    m.add_argument("--tp", type=int, default=1,
                   help="tensor parallelism: split the decoder over this many consecutive msrun ranks (which then "
                        "share one data-parallel shard); must divide the query heads, KV heads and MLP width "
                        "(GLM-4.1V-9B: 2)")
    m.add_argument("--ep", type=int, default=1,
                   help="expert parallelism (GLM-4.5V / GLM-4.6V only): split the routed experts over this many "
                        "consecutive msrun ranks (which then share one data-parallel shard); must divide the routed "
                        "experts; with --tp above 1 both must be equal (GLM-4.5V on 8 cards: --tp 8 --ep 8)")
    m.add_argument("--quantized_weights", default="auto", choices=["auto", "dequantize", "int"],
                   help="GPTQ checkpoints only (see generate.py)")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch_size must be >= 1")
    for flag in ("tp", "ep"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1")
    if args.tp > 1 and args.ep > 1 and args.tp != args.ep:
        ap.error(f"--tp {args.tp} and --ep {args.ep}: with both above 1 they must be equal (attention and experts "
                 "are split over the same group of ranks)")
    if (args.rank is None) != (args.world_size is None):
        ap.error("--rank and --world_size go together")
    if args.sort_window is None:
        args.sort_window = 8 * args.batch_size
    return args


def launched_by_msrun() -> bool:
    """msrun sets MS_ROLE (MS_SCHED for its scheduler process, MS_WORKER for each worker) and MS_SCHED_HOST."""
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED") and "MS_SCHED_HOST" in os.environ


def _allreduce_barrier():
    """Every rank waits for the others. (comm_func.barrier has no CPU kernel in MindSpore 2.10; AllReduce does.)"""
    import numpy as np
    import mindspore as ms
    from mindspore import ops

    ops.AllReduce()(ms.Tensor(np.ones(1, np.float32))).asnumpy()


def distributed_layout(args, tp: int = 1, ep: int = 1):
    """Rank, world and the data-parallel layout of this process: from msrun (mindspore.communication.init()), from
    --rank/--world_size, or a single process. The device is selected here (card = local rank) before init. ``tp`` /
    ``ep``: tensor / expert parallelism over groups of max(tp, ep) consecutive ranks."""
    import glm4v_ms
    from glm4v_ms.apps.batch import JobError, make_layout

    if launched_by_msrun():
        if args.rank is not None:
            raise JobError("--rank/--world_size are for launchers other than msrun (msrun assigns ranks)")
        glm4v_ms.set_device(args.device, int(os.environ.get("DEVICE_ID", "0")))
        from mindspore.communication import get_group_size, get_local_rank, get_rank, init

        if max(tp, ep) > 1:  # joins the process group and sets up the groups of max(tp, ep) consecutive ranks
            from glm4v_ms.model.parallel import init_tensor_parallel

            init_tensor_parallel(tp, ep)
        else:
            init()
        return make_layout(get_rank(), get_group_size(), get_local_rank(), "msrun", tp=tp, ep=ep,
                           barrier=_allreduce_barrier)
    if max(tp, ep) > 1:
        flag, n = ("--tp", tp) if tp >= ep else ("--ep", ep)
        raise JobError(f"{flag} {n} runs one process per rank: launch with msrun --worker_num=<a multiple of {n}>")
    device_id = int(os.environ.get("DEVICE_ID", "0"))
    glm4v_ms.set_device(args.device, device_id)
    if args.rank is not None:
        return make_layout(args.rank, args.world_size, device_id, "flags", tp=tp)
    return make_layout(0, 1, device_id, "single", tp=tp)


class Terminated(BaseException):
    """SIGTERM arrived (preemption, scancel, kill)."""


def _terminate(*_):
    raise Terminated()


def delay_hook():
    """GLM4V_BATCH_TEST_DELAY (a test hook: seconds to pause before each write), or None when it is not a number
    of seconds >= 0."""
    try:
        delay = float(os.environ.get("GLM4V_BATCH_TEST_DELAY", "").strip() or 0)
    except ValueError:
        return None
    return delay if 0 <= delay < float("inf") else None


def job_options(args):
    """The job's options. The model folder is resolved (not loaded) by the job after checking the input and the
    output: its identity is part of each digest."""
    from glm4v_ms.apps.batch import JobOptions, model_identity
    from glm4v_ms.apps.cli_args import generation_knobs
    from glm4v_ms.apps.preflight import resolve_model

    runtime = dict(dtype=args.dtype, device=args.device, quantized_weights=args.quantized_weights)
    return JobOptions(input=args.input, output=args.output,
                      model_identity=lambda: model_identity(resolve_model(args.model_name), runtime),
                      batch_size=args.batch_size, sort_window=args.sort_window, retry_errors=args.retry_errors,
                      fsync_interval=args.fsync_interval, progress=not args.no_progress,
                      settings=generation_knobs(args), mode=args.mode,
                      test_delay=delay_hook())


def pipeline_loader(args):
    """What the job calls to load the model, only when this process has a valid request to run."""
    def load_pipeline():
        from glm4v_ms.apps.pipeline import Glm4vPipeline

        tensor_parallel = None
        if max(args.tp, args.ep) > 1:
            from glm4v_ms.model.parallel import init_tensor_parallel

            tensor_parallel = init_tensor_parallel(args.tp, args.ep)  # already set up: returns this process's context
        return Glm4vPipeline.from_pretrained(args.model_name, dtype=args.dtype, device=args.device,
                                             mode=args.mode, quantized_weights=args.quantized_weights,
                                             tensor_parallel=tensor_parallel)

    return load_pipeline


def run_job(args):
    """(summary, layout) of this process's part of the job."""
    from glm4v_ms.apps.batch import BatchJob

    if max(args.tp, args.ep) > 1:  # a config tp / ep cannot split is a clear error before any process group is joined
        from glm4v_ms.model.config import Glm4vConfig
        from glm4v_ms.model.loading import check_parallel
        from glm4v_ms.apps.preflight import resolve_model

        check_parallel(Glm4vConfig.from_pretrained(resolve_model(args.model_name)), args.tp, args.ep)
    options = job_options(args)
    layout = distributed_layout(args, tp=args.tp, ep=args.ep)
    return BatchJob(options, layout, pipeline_loader(args)).run(), layout


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if os.environ.get("MS_ROLE") == "MS_SCHED" and launched_by_msrun():
        # msrun runs this script once more as its scheduler: it only coordinates the workers' init().
        from mindspore.communication import init

        init()
        return 0
    # A kill (SIGTERM, e.g. preemption) unwinds like Ctrl-C: the part file is fsync'ed and closed.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from glm4v_ms.apps.batch import JobError
        from glm4v_ms.processing.media import MissingDependencyError
        from glm4v_ms.model.weights import CheckpointError
    except ImportError as e:
        print(f"error: {e} (run scripts/setup_env.sh to install the dependencies)", file=sys.stderr)
        return 2
    if delay_hook() is None:
        value = os.environ["GLM4V_BATCH_TEST_DELAY"]
        print(f"error: GLM4V_BATCH_TEST_DELAY={value!r} must be a number of seconds >= 0 (a test hook: unset it)",
              file=sys.stderr)
        return 2
    try:
        s, layout = run_job(args)
    except (KeyboardInterrupt, Terminated) as e:
        print(f"\n{'terminated' if isinstance(e, Terminated) else 'interrupted'}: finished requests are kept in the "
              ".parts folder; run again to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except (JobError, OSError, ValueError, CheckpointError, MissingDependencyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    if s.get("merged"):
        m = s["merged"]
        changed = f" ({s['changed']} recomputed because the request changed)" if s.get("changed") else ""
        print(f"wrote {args.output}: {m['requests']} result(s), {m['errors']} error(s); {s['done_before']} done "
              f"before this run, {s['pending']} in this run over {layout.dp_size} shard(s){changed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
