#!/usr/bin/env python
"""Convert a Hugging Face GLM-4.1V folder into a folder glm4v_ms loads directly (tensors already in its layout).

    python tools/convert.py SRC DST [--force] [--verify] [--shard_size 5GB] [--no_progress]

The decoder's q/k projection rows are permuted into the half rotary layout, dtypes are kept (bf16 stays bf16),
config.json gets the glm4v_ms layout marker, and the tokenizer / processor / generation files are copied (a SRC
without a tokenizer or chat template converts with a warning: generate.py needs them). DST is written into a hidden
temporary folder next to it and renamed into place at the end: an interrupted or failed run leaves nothing behind,
and a killed one (SIGKILL, out of memory) leaves a temporary folder that the next run to the same DST removes.
--force replaces only an earlier conversion (config.json with the glm4v_ms layout marker); any other existing DST,
the working or home directory, and DST equal to, inside or around SRC are refused. Load the result with Glm4vForConditionalGeneration.from_pretrained(DST) or
generate.py --model_name DST.
"""
import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", metavar="SRC", help="Hugging Face GLM-4.1V folder (config.json + safetensors)")
    ap.add_argument("dst", metavar="DST", help="the folder to create")
    ap.add_argument("--force", action="store_true",
                    help="replace DST if it is an earlier conversion (any other existing folder is never replaced)")
    ap.add_argument("--verify", action="store_true",
                    help="re-read every written tensor and compare it bit for bit before publishing DST")
    ap.add_argument("--shard_size", default="5GB",
                    help="maximum tensor bytes per output shard: 5GB, 500MB, 2000000 (bytes)... (default 5GB)")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
    args = ap.parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
    # A kill (SIGTERM) unwinds like Ctrl-C, so the temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from glm4v_ms.apps.convert import convert_checkpoint
    from glm4v_ms.progress import format_bytes
    from glm4v_ms.model.weights import CheckpointError

    try:
        s = convert_checkpoint(args.src, args.dst, force=args.force, verify=args.verify,
                               shard_size=args.shard_size, progress=not args.no_progress,
                               log=lambda line: print(line, file=sys.stderr))
    except KeyboardInterrupt:
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    except (CheckpointError, OSError, ValueError) as e:  # FileExistsError / FileNotFoundError are OSErrors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
    extra = f"; dropped {', '.join(s['dropped'])}" if s["dropped"] else ""
    print(f"converted {s['src']} -> {s['dst']}: {s['tensors']} tensors, {format_bytes(s['bytes'])} in "
          f"{s['shards']} shard(s), {len(s['copied'])} other file(s) copied, {s['seconds']:.1f} s"
          f"{', verified' if s['verified'] else ''}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
