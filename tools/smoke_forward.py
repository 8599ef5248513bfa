#!/usr/bin/env python
"""One forward pass of a GLM-4.1V checkpoint on a synthetic image prompt: a smoke test of loading and the model.

    python tools/smoke_forward.py [--model_name DIR|tiny-random] [--grid 1 16 20] [--dtype float32]

Prints the shapes, the next-token top-5 and timings. With ``tiny-random`` a tiny random model is created first
(under ~/.cache/glm4v_ms), so this runs offline in seconds; its numbers are meaningless but exercise every stage.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name", default="tiny-random")
    ap.add_argument("--grid", type=int, nargs=3, default=[1, 16, 20], metavar=("T", "H", "W"),
                    help="image patch grid (h, w multiples of the merge size)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="CPU")
    args = ap.parse_args(argv)

    import numpy as np
    import glm4v_ms
    from glm4v_ms import Glm4vForConditionalGeneration

    glm4v_ms.set_device(args.device)
    folder = args.model_name
    if folder == "tiny-random":
        from glm4v_ms.tiny import make_tiny_model

        folder = os.path.join(os.path.expanduser("~"), ".cache", "glm4v_ms", "tiny-random")
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            make_tiny_model(folder, overwrite=True)
    try:
        t0 = time.perf_counter()
        model = Glm4vForConditionalGeneration.from_pretrained(folder, dtype=args.dtype)
        t_load = time.perf_counter() - t0
        c = model.config
        t, h, w = args.grid
        m = c.vision.spatial_merge_size
        rng = np.random.default_rng(0)
        text = rng.integers(0, min(c.image_start_token_id, c.text.vocab_size), size=6).tolist()
        ids = text[:3] + [c.image_start_token_id] + [c.image_token_id] * (t * h * w // (m * m)) + \
            [c.image_end_token_id] + text[3:]
        pv = rng.standard_normal((t * h * w, c.vision.patch_dim)).astype(np.float32)
        t0 = time.perf_counter()
        out = model(input_ids=np.array([ids]), pixel_values=pv, image_grid_thw=np.array([args.grid]))
        logits = out.logits.asnumpy()
        t_fwd = time.perf_counter() - t0
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    top = np.argsort(-logits[0, -1])[:5]
    print(f"model: {folder}")
    print(f"prompt: {len(ids)} tokens ({t * h * w // (m * m)} image tokens from grid {tuple(args.grid)})")
    print(f"logits: {logits.shape}, finite: {bool(np.isfinite(logits).all())}")
    print(f"next-token top-5 ids: {top.tolist()}")
    print(f"load {t_load * 1000:.0f} ms, forward {t_fwd * 1000:.0f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
