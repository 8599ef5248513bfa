#!/usr/bin/env python
"""Create a tiny random GLM-V checkpoint folder (HF layout: GLM-4.1V, GLM-4.6V-Flash or GLM-4.5V) offline, in seconds.

    python tools/make_tiny_model.py DIR [--seed 0] [--force] [--variant 4.1v|4.6v|4.5v]

Its weights are random: the model runs the full pipeline but produces random text.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true",
                    help="replace the folder if it exists and is a model folder (has config.json) or empty")
    ap.add_argument("--variant", choices=("4.1v", "4.6v", "4.5v"), default="4.1v",
                    help="4.6v: GLM-4.6V-Flash's token ids, tool-calling template, context and processor files; "
                         "4.5v: a GLM-4.5V (mixture-of-experts decoder, glm4v_moe) with 4.5V's token ids")
    args = ap.parse_args(argv)
    from glm4v_ms.apps.tiny import make_tiny_model

    try:
        path = make_tiny_model(args.folder, seed=args.seed, overwrite=args.force, variant=args.variant)
    except (OSError, ValueError) as e:  # FileExistsError, NotADirectoryError, PermissionError are OSErrors
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: {msg}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
