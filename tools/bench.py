"""Benchmark glm4v_ms (graph and eager modes) against transformers 4.57.6 on torch, on this machine, in one run.

    .venv/bin/python tools/bench.py                 # mid config, batch 1 and 4, a table
    .venv/bin/python tools/bench.py --config tiny --json

Same random config, same weights (one folder, written once to ~/.cache/glm4v_ms/bench-<config>-<hash>) and same
inputs for every side. Each implementation runs in its own process (clean peak memory), twice: the first run
compiles (graph mode) and warms up; the figures are from the second. Reported per side: prefill of a prompt with
one 448x448 image (256 image tokens + text), decode tokens/s (after that prompt, greedy, EOS off), peak resident
memory; and the decode roofline: bytes of weights read per token (decoder layers + final norm + lm_head, plus the KV
cache) divided into the best measured memory read bandwidth of the machine, with the fraction reached.

Configs: ``tiny`` (the test model's size) and ``mid`` (~0.43B parameters: 8 decoder layers of width 1024, a 4-block
ViT of width 512, and the real vocabulary of 151552, whose lm_head is 60% of the bytes a decode step reads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The real GLM-4.1V special token ids (config.json of zai-org/GLM-4.1V-9B-Thinking).
REAL_IDS = dict(image_token_id=151343, video_token_id=151344, image_start_token_id=151339,
                image_end_token_id=151340, video_start_token_id=151341, video_end_token_id=151342)

CONFIGS = {
    "tiny": dict(vocab=384, text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1),
                 vision=dict(depth=2, hidden_size=48, num_heads=4, intermediate_size=80)),
    "mid": dict(vocab=151552, text=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                                        num_attention_heads=8, num_key_value_heads=2),
                vision=dict(depth=4, hidden_size=512, num_heads=4, intermediate_size=3072)),
}
IMAGE_GRID = (1, 32, 32)  # a 448 x 448 image: 32 x 32 patches of 14 px, 256 tokens after the 2 x 2 merge


def config_dict(name: str) -> dict:
    c = CONFIGS[name]
    ids = REAL_IDS if c["vocab"] > 151343 else dict(image_token_id=300, video_token_id=301, image_start_token_id=302,
                                                     image_end_token_id=303, video_start_token_id=304,
                                                     video_end_token_id=305)
    text = dict(c["text"], vocab_size=c["vocab"], hidden_act="silu", max_position_embeddings=8192,
                rms_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.5, attention_bias=True,
                rope_scaling={"type": "default", "mrope_section": [8, 12, 12]}, tie_word_embeddings=False,
                model_type="glm4v_text", pad_token_id=0, eos_token_id=[1])
    if c["text"]["hidden_size"] // c["text"]["num_attention_heads"] < 64:
        text["rope_scaling"] = {"type": "default", "mrope_section": [2, 3, 3]}
    vision = dict(c["vision"], out_hidden_size=c["text"]["hidden_size"], hidden_act="silu", attention_bias=False,
                  in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, image_size=336,
                  rms_norm_eps=1e-5, model_type="glm4v")
    return dict({"architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v",
                 "tie_word_embeddings": False, "torch_dtype": "bfloat16", "text_config": text,
                 "vision_config": vision}, **ids)


def bench_folder(name: str) -> str:
    """The config's random checkpoint (bf16 safetensors, HF layout), written once and atomically."""
    import ml_dtypes
    from safetensors.numpy import save_file
    from glm4v_ms.apps.tiny import random_weights

    cfg = config_dict(name)
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    folder = os.path.join(os.path.expanduser("~/.cache/glm4v_ms"), f"bench-{name}-{key}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".bench-", dir=os.path.dirname(folder))
    w = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_weights(cfg, seed=0).items()}
    save_file(w, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(tmp, folder)
    return folder


def inputs(cfg: dict, batch: int) -> dict:
    """Each row: 12 text tokens, <|begin_of_image|>, 256 <|image|>, <|end_of_image|>, 8 text tokens."""
    rng = np.random.default_rng(0)
    text = lambda n: rng.integers(10, 250, size=n).tolist()  # noqa: E731
    row = text(12) + [cfg["image_start_token_id"]] + [cfg["image_token_id"]] * 256 + [cfg["image_end_token_id"]] \
        + text(8)
    v = cfg["vision_config"]
    patch_dim = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    n = int(np.prod(IMAGE_GRID))
    pix = rng.standard_normal((n, patch_dim)).astype(np.float32)
    return dict(input_ids=np.array([row] * batch), pixel_values=np.concatenate([pix] * batch),
                image_grid_thw=np.array([IMAGE_GRID] * batch))


def peak_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would carry the parent's peak over the exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------------------------
# workers (one process each)
# ---------------------------------------------------------------------------------------------------------------

def worker_ours(folder: str, mode: str, batch: int, new: int) -> dict:
    from glm4v_ms import Glm4vForConditionalGeneration
    from glm4v_ms.model import ops
    from glm4v_ms.runtime.generation import StepStats, generate

    ops.set_device("CPU")
    t = time.perf_counter()
    model = Glm4vForConditionalGeneration.from_pretrained(folder)
    load_s = time.perf_counter() - t
    x = inputs(config_dict_of(folder), batch)
    runs = []
    for _ in range(2):  # the first run compiles (graph mode) and warms up
        st = StepStats()
        t = time.perf_counter()
        generate(model, **x, max_new_tokens=new, eos_token_id=[], do_sample=False, mode=mode, stats=st)
        runs.append((time.perf_counter() - t, st))
    (cold_s, _), (warm_s, st) = runs
    return dict(load_s=load_s, prefill_ms=st.prefill_s * 1e3, decode_tok_s=st.decode_tok_s * batch,
                first_run_extra_s=cold_s - warm_s, peak_mb=peak_mb())


def worker_torch(folder: str, batch: int, new: int) -> dict:
    import torch
    from transformers import Glm4vForConditionalGeneration

    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    model = Glm4vForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    load_s = time.perf_counter() - t
    x = {k: torch.tensor(v) for k, v in inputs(config_dict_of(folder), batch).items()}

    def run(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
        return time.perf_counter() - t0

    run(1)  # warm-up
    prefill = min(run(1) for _ in range(2))
    total = run(new)
    return dict(load_s=load_s, prefill_ms=prefill * 1e3, decode_tok_s=(new - 1) * batch / (total - prefill),
                peak_mb=peak_mb())


def worker_bandwidth() -> dict:
    """Best read bandwidth (GB/s) over a 1 GiB fp32 buffer: numpy sum (1 thread) and torch sum (all threads)."""
    a = np.ones(1 << 28, np.float32)
    best = {}
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best["numpy"] = max(best.get("numpy", 0), a.nbytes / (time.perf_counter() - t) / 1e9)
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        ta = torch.from_numpy(a)
        for _ in range(5):
            t = time.perf_counter()
            ta.sum()
            best["torch"] = max(best.get("torch", 0), a.nbytes / (time.perf_counter() - t) / 1e9)
    except ImportError:
        pass
    return best


def config_dict_of(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def decode_bytes(cfg: dict, context: int, batch: int) -> int:
    """fp32 bytes one decode step reads: every decoder layer, the final norm, lm_head, and the KV cache."""
    t = cfg["text_config"]
    h, inner, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    d = h // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * d
    attn = h * (h + 2 * kv) + (h + 2 * kv) + h * h
    mlp = h * 2 * inner + inner * h
    params = layers * (attn + mlp + 4 * h) + h + t["vocab_size"] * h
    cache = 2 * layers * batch * context * kv
    return 4 * (params + cache)


# ---------------------------------------------------------------------------------------------------------------

def _spawn(args: list) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker"] + args
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir())
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark worker {' '.join(args)} failed: {tail}")
    return json.loads(lines[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,4", help="comma-separated batch sizes (the first is the headline)")
    ap.add_argument("--modes", default="graph,eager", help="glm4v_ms modes to run")
    ap.add_argument("--skip_torch", action="store_true", help="do not run transformers (e.g. torch not installed)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        kind, rest = args.worker[0], args.worker[1:]
        if kind == "ours":
            out = worker_ours(rest[0], rest[1], int(rest[2]), int(rest[3]))
        elif kind == "torch":
            out = worker_torch(rest[0], int(rest[1]), int(rest[2]))
        else:
            out = worker_bandwidth()
        print(json.dumps(out))
        return 0
    if args.new_tokens < 2:
        ap.error("--new_tokens must be >= 2")
    batches = [int(b) for b in args.batches.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    t0 = time.perf_counter()
    folder = bench_folder(args.config)
    cfg = config_dict_of(folder)
    log(f"machine: {machine()}\nconfig {args.config}: {folder}")
    bw = _spawn(["bandwidth"])
    bandwidth = max(bw.values())
    log("read bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
    results = {}
    for b in batches:
        for m in modes:
            log(f"glm4v_ms {m}, batch {b} ...")
            results[f"ours_{m}_b{b}"] = _spawn(["ours", folder, m, str(b), str(args.new_tokens)])
        if not args.skip_torch:
            log(f"transformers eager, batch {b} ...")
            results[f"torch_b{b}"] = _spawn(["torch", folder, str(b), str(args.new_tokens)])
    b0 = batches[0]
    context = inputs(cfg, 1)["input_ids"].shape[1] + args.new_tokens // 2
    bytes_tok = decode_bytes(cfg, context, b0)
    roof = bandwidth / (bytes_tok / 1e9)
    best_mode = max(modes, key=lambda m: results[f"ours_{m}_b{b0}"]["decode_tok_s"])
    ours = results[f"ours_{best_mode}_b{b0}"]
    best_prefill = min(results[f"ours_{m}_b{b0}"]["prefill_ms"] for m in modes)
    summary = dict(config=args.config, machine=machine(), new_tokens=args.new_tokens, batch=b0,
                   decode_tok_s=ours["decode_tok_s"] / b0, best_mode=best_mode,
                   prefill_ms=best_prefill, bandwidth_gb_s=bandwidth, bytes_per_token=bytes_tok,
                   roofline_tok_s=roof, roofline_fraction=ours["decode_tok_s"] / b0 / roof,
                   results=results, seconds=time.perf_counter() - t0)
    if not args.skip_torch:
        t = results[f"torch_b{b0}"]
        summary.update(torch_decode_tok_s=t["decode_tok_s"] / b0, torch_prefill_ms=t["prefill_ms"],
                       decode_vs_torch=ours["decode_tok_s"] / t["decode_tok_s"],
                       prefill_vs_torch=t["prefill_ms"] / best_prefill)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"\n{'side':<22}{'batch':>6}{'prefill ms':>12}{'decode tok/s':>14}{'peak MB':>10}{'1st-run extra s':>17}")
    for k, r in results.items():
        print(f"{k:<22}{k.rsplit('_b', 1)[1]:>6}{r['prefill_ms']:>12.0f}{r['decode_tok_s']:>14.2f}"
              f"{r['peak_mb']:>10.0f}{r.get('first_run_extra_s', 0):>17.1f}")
    print(f"\nroofline (batch {b0}): {bytes_tok / 1e6:.0f} MB read per token / {bandwidth:.1f} GB/s = "
          f"{roof:.1f} tok/s; glm4v_ms {best_mode} reaches {100 * summary['roofline_fraction']:.0f}%")
    if not args.skip_torch:
        print(f"vs transformers: decode {summary['decode_vs_torch']:.2f}x, prefill {summary['prefill_vs_torch']:.2f}x"
              f" (ratios > 1 mean glm4v_ms is faster)")
    print(f"total {summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
