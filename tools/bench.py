"""Benchmark glm4v_ms (graph and eager modes) against transformers 4.57.6 on torch, on this machine, in one run.

    .venv/bin/python tools/bench.py                 # mid config, batch 1 and 4, a table
    .venv/bin/python tools/bench.py --config tiny --json

Same random config, same weights (one folder, written once to ~/.cache/glm4v_ms/bench-<config>-<hash>) and same
inputs for every side. Each implementation runs in its own process (clean peak memory) with the same number of CPU
threads (--threads: torch.set_num_threads and MindSpore's CPU kernel thread pool), and is measured the same way: one
warm-up run (it compiles in graph mode), then --repeats measured runs whose medians are reported. Prefill = from
the start of the first forward (ViT + decoder prefill) to the first new token; decode tokens/s = the other
new_tokens - 1 tokens over the time from the first to the last (greedy, EOS off). transformers runs at its default
attention (sdpa) and, as an extra row, with eager attention. Also reported: peak resident memory, the extra time
of the first run, and the decode roofline: bytes of weights read per token (decoder layers + final norm + lm_head,
plus the KV cache) divided into the best measured memory read bandwidth of the machine, with the fraction reached.
The machine's load average at the start and the end is printed: figures from a loaded machine are not comparable.

Configs: ``tiny`` (the test model's size), ``mid`` (~0.43B parameters: 8 decoder layers of width 1024, a 4-block
ViT of width 512, and the real vocabulary of 151552, whose lm_head is 60% of the bytes a decode step reads) and
``moe`` (GLM-4.5V's decoder at the mid width: 7 MoE layers of 32 routed experts, top 4, 1.1B parameters; the
roofline counts only the experts the batch's tokens choose).
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
    # GLM-4.5V's decoder scaled down (glm4v_moe): the mid model's width with an explicit head_dim, layer 0 dense,
    # then 7 MoE layers of 32 routed experts (top 4, 2 of 4 groups) + 1 shared expert: 1.1B parameters, ~0.3B active
    "moe": dict(vocab=151552, text=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                                        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                                        moe_intermediate_size=768, n_routed_experts=32, num_experts_per_tok=4,
                                        n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1,
                                        norm_topk_prob=True, routed_scaling_factor=1.0),
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
    moe = "n_routed_experts" in c["text"]
    if moe:  # GLM-4.5V's ids and sub-config names
        ids = dict(ids, image_token_id=151363, video_token_id=151364)
        text["model_type"], vision["model_type"] = "glm4v_moe_text", "glm4v_moe"
    return dict({"architectures": ["Glm4vMoeForConditionalGeneration" if moe else "Glm4vForConditionalGeneration"],
                 "model_type": "glm4v_moe" if moe else "glm4v", "tie_word_embeddings": False,
                 "torch_dtype": "bfloat16", "text_config": text, "vision_config": vision}, **ids)


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

def _median(xs):
    return float(np.median(np.asarray(xs, np.float64)))


def _summarise(runs: list, batch: int, new: int) -> dict:
    """The same figures from both sides' runs, each run = (total seconds, prefill seconds, decode seconds): run 0 is
    the warm-up; prefill ms and decode tokens/s (all rows) are medians over the measured runs."""
    (cold, _, _), measured = runs[0], runs[1:]
    return dict(prefill_ms=_median([p for _, p, _ in measured]) * 1e3,
                decode_tok_s=_median([(new - 1) * batch / d for _, _, d in measured]),
                first_run_extra_s=cold - _median([t for t, _, _ in measured]), runs=len(measured))


def worker_ours(folder: str, mode: str, batch: int, new: int, threads: int, repeats: int) -> dict:
    """Prefill = the session's prefill call (ViT, decoder prefill, first token on the host); decode = the time from
    there to the last token, for new - 1 steps (runtime.generation.StepStats)."""
    import mindspore as ms
    from glm4v_ms import load_model
    from glm4v_ms.model import ops
    from glm4v_ms.runtime.generation import StepStats, generate

    ops.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(threads)  # the CPU kernels' thread pool, like torch.set_num_threads
    t = time.perf_counter()
    model = load_model(folder)  # the class config.json names (dense or glm4v_moe)
    load_s = time.perf_counter() - t
    x = inputs(config_dict_of(folder), batch)
    runs = []
    for _ in range(1 + repeats):  # the first run compiles (graph mode) and warms up
        st = StepStats()
        t = time.perf_counter()
        generate(model, **x, max_new_tokens=new, eos_token_id=[], do_sample=False, mode=mode, stats=st)
        if st.new_tokens != new:
            raise RuntimeError(f"glm4v_ms produced {st.new_tokens} tokens, expected {new}")
        runs.append((time.perf_counter() - t, st.prefill_s, st.decode_s))
    return dict(_summarise(runs, batch, new), load_s=load_s, peak_mb=peak_mb(),
                threads=threads)


def worker_torch(folder: str, attn: str, batch: int, new: int, threads: int, repeats: int) -> dict:
    """transformers' generate timed like ours: prefill = from the start of the first forward (ViT, decoder prefill)
    to the first token chosen (a stopping criterion sees every new token); decode = from there to the last token,
    for new - 1 steps. ``attn``: "default" (what transformers picks by itself: sdpa) or an attn_implementation."""
    import torch
    import transformers
    from transformers import StoppingCriteria, StoppingCriteriaList

    torch.set_num_threads(threads)
    t = time.perf_counter()
    kw = {} if attn == "default" else dict(attn_implementation=attn)
    moe = config_dict_of(folder).get("model_type") == "glm4v_moe"
    cls = transformers.Glm4vMoeForConditionalGeneration if moe else transformers.Glm4vForConditionalGeneration
    model = cls.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    load_s = time.perf_counter() - t
    x = {k: torch.tensor(v) for k, v in inputs(config_dict_of(folder), batch).items()}
    marks: list = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            marks.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def first_forward(module, args, kwargs):
        if not marks:
            marks.append(time.perf_counter())

    hook = model.register_forward_pre_hook(first_forward, with_kwargs=True)
    runs = []
    for _ in range(1 + repeats):  # the first run warms up, as ours does
        marks.clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**x, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=0, stopping_criteria=StoppingCriteriaList([Clock()]))
        total = time.perf_counter() - t0
        if len(marks) != new + 1:
            raise RuntimeError(f"transformers produced {len(marks) - 1} tokens, expected {new}")
        runs.append((total, marks[1] - marks[0], marks[-1] - marks[1]))
    hook.remove()
    return dict(_summarise(runs, batch, new), load_s=load_s, peak_mb=peak_mb(), threads=torch.get_num_threads(),
                attn_implementation=model.config._attn_implementation)


def worker_bandwidth(threads: int) -> dict:
    """Best read bandwidth (GB/s) over a 1 GiB fp32 buffer: numpy sum (1 thread) and torch sum (``threads``)."""
    a = np.ones(1 << 28, np.float32)
    best = {}
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best["numpy"] = max(best.get("numpy", 0), a.nbytes / (time.perf_counter() - t) / 1e9)
    try:
        import torch

        torch.set_num_threads(threads)
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
    """fp32 bytes one decode step reads: every decoder layer, the final norm, lm_head, and the KV cache. MoE
    layers: the router, the shared experts and the routed experts the batch's tokens choose (at most
    batch x top-k distinct ones, all of them if fewer exist)."""
    t = cfg["text_config"]
    h, inner, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    d = t.get("head_dim") or h // t["num_attention_heads"]
    q, kv = t["num_attention_heads"] * d, t["num_key_value_heads"] * d
    attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h
    mlp = h * 2 * inner + inner * h
    if "n_routed_experts" not in t:
        params = layers * (attn + mlp + 4 * h) + h + t["vocab_size"] * h
    else:
        dense = t["first_k_dense_replace"]
        expert = 3 * h * t["moe_intermediate_size"]
        active = min(t["n_routed_experts"], batch * t["num_experts_per_tok"])
        moe = t["n_routed_experts"] * h + active * expert + t["n_shared_experts"] * expert
        params = layers * (attn + 2 * h) + dense * mlp + (layers - dense) * moe + h + t["vocab_size"] * h
    cache = 2 * layers * batch * context * kv
    return 4 * (params + cache)


# ---------------------------------------------------------------------------------------------------------------

class BenchError(Exception):
    """A bad flag or a missing dependency (exit 2), or a failed worker (exit 1): one ``error:`` line."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _spawn(kind: str, **params) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(params)]
    # the transformers worker needs torch whatever the caller's environment says (USE_TORCH=0 hides it)
    env = dict(os.environ, USE_TORCH="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()] or ["no output"]
        raise BenchError(f"the {kind} worker ({', '.join(f'{k}={v}' for k, v in params.items() if k != 'folder')}) "
                         f"failed: {tail[-1].strip()}", code=1)
    return json.loads(lines[-1])


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}"


def _positive_int_list(flag: str, text: str) -> list:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 1,4") from None
    if not vals or min(vals) < 1:
        raise BenchError(f"{flag} {text!r}: expected comma-separated positive integers, e.g. 1,4")
    return vals


def _choices(flag: str, text: str, allowed: tuple) -> list:
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise BenchError(f"{flag} {text!r}: expected a comma-separated list of {', '.join(allowed)}")
    return list(dict.fromkeys(vals))


def _run_worker(kind: str, params: dict) -> dict:
    if kind == "ours":
        return worker_ours(params["folder"], params["mode"], params["batch"], params["new"], params["threads"],
                           params["repeats"])
    if kind == "torch":
        return worker_torch(params["folder"], params["attn"], params["batch"], params["new"], params["threads"],
                            params["repeats"])
    return worker_bandwidth(params["threads"])


TORCH_ATTN = ("sdpa", "eager")  # sdpa is transformers' default for this model: that row is loaded with no argument


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,4", help="comma-separated batch sizes (the first is the headline)")
    ap.add_argument("--modes", default="graph,eager", help="glm4v_ms modes to run: graph, eager or both")
    ap.add_argument("--torch_attn", default="sdpa,eager",
                    help="transformers attention implementations to run (the first is the comparison): sdpa "
                         "(transformers' default), eager or both")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads of both sides: torch.set_num_threads and MindSpore's CPU kernel thread pool "
                         "(default: all cores, %(default)s here)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="measured runs per side after one warm-up run; the figures are their medians (default 3)")
    ap.add_argument("--skip_torch", action="store_true", help="do not run transformers (e.g. torch not installed)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_run_worker(args.worker[0], json.loads(args.worker[1]))))
        return 0
    try:
        return _bench(ap, args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _bench(ap, args) -> int:
    if args.new_tokens < 2:
        ap.error("--new_tokens must be >= 2")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    batches = _positive_int_list("--batches", args.batches)
    modes = _choices("--modes", args.modes, ("graph", "eager"))
    attns = [] if args.skip_torch else _choices("--torch_attn", args.torch_attn, TORCH_ATTN)
    if attns:
        import importlib.util

        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise BenchError(f"{' and '.join(missing)} not installed: the comparison needs them (pip install -r "
                             "requirements-dev.txt), or pass --skip_torch to measure glm4v_ms alone")
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    t0 = time.perf_counter()
    load_before = load_average()
    folder = bench_folder(args.config)
    cfg = config_dict_of(folder)
    log(f"machine: {machine()}; load average {load_before}\nconfig {args.config}: {folder}\n"
        f"threads: {args.threads} (torch.set_num_threads, MindSpore CPU kernel threads); one warm-up run, then the "
        f"median of {args.repeats} measured run(s) per side")
    bw = _spawn("bandwidth", threads=args.threads)
    bandwidth = max(bw.values())
    log("read bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
    results = {}
    common = dict(folder=folder, new=args.new_tokens, threads=args.threads, repeats=args.repeats)
    for b in batches:
        for m in modes:
            log(f"glm4v_ms {m}, batch {b} ...")
            results[f"ours_{m}_b{b}"] = r = _spawn("ours", mode=m, batch=b, **common)
            log(f"  prefill {r['prefill_ms']:.0f} ms, decode {r['decode_tok_s']:.2f} tok/s, peak {r['peak_mb']:.0f} MB")
        for a in attns:
            log(f"transformers {a}, batch {b} ...")
            r = _spawn("torch", attn="default" if a == "sdpa" else a, batch=b, **common)
            if r["attn_implementation"] != a:  # transformers' default changed: the row would be mislabelled
                raise BenchError(f"transformers ran attention {r['attn_implementation']!r}, expected {a!r}", code=1)
            results[f"torch_{a}_b{b}"] = r
            log(f"  prefill {r['prefill_ms']:.0f} ms, decode {r['decode_tok_s']:.2f} tok/s, peak {r['peak_mb']:.0f} MB")
    b0 = batches[0]
    context = inputs(cfg, 1)["input_ids"].shape[1] + args.new_tokens // 2
    bytes_tok = decode_bytes(cfg, context, b0)
    roof = bandwidth / (bytes_tok / 1e9)
    best_mode = max(modes, key=lambda m: results[f"ours_{m}_b{b0}"]["decode_tok_s"])
    ours = results[f"ours_{best_mode}_b{b0}"]
    best_prefill = min(results[f"ours_{m}_b{b0}"]["prefill_ms"] for m in modes)
    summary = dict(config=args.config, machine=machine(), new_tokens=args.new_tokens, batch=b0,
                   threads=args.threads, repeats=args.repeats, decode_tok_s=ours["decode_tok_s"] / b0,
                   best_mode=best_mode, prefill_ms=best_prefill, bandwidth_gb_s=bandwidth, bytes_per_token=bytes_tok,
                   roofline_tok_s=roof, roofline_fraction=ours["decode_tok_s"] / b0 / roof,
                   results=results, load_average=[load_before, load_average()], seconds=time.perf_counter() - t0)
    if attns:
        t = results[f"torch_{attns[0]}_b{b0}"]
        summary.update(torch_attn=attns[0], torch_decode_tok_s=t["decode_tok_s"] / b0, torch_prefill_ms=t["prefill_ms"],
                       decode_vs_torch=ours["decode_tok_s"] / t["decode_tok_s"],
                       prefill_vs_torch=t["prefill_ms"] / best_prefill)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"\n{'side':<22}{'batch':>6}{'prefill ms':>12}{'decode tok/s':>14}{'peak MB':>10}{'1st-run extra s':>17}")
    for k, r in results.items():
        print(f"{k:<22}{k.rsplit('_b', 1)[1]:>6}{r['prefill_ms']:>12.0f}{r['decode_tok_s']:>14.2f}"
              f"{r['peak_mb']:>10.0f}{r['first_run_extra_s']:>17.1f}")
    print(f"\nroofline (batch {b0}): {bytes_tok / 1e6:.0f} MB read per token / {bandwidth:.1f} GB/s = "
          f"{roof:.1f} tok/s; glm4v_ms {best_mode} reaches {100 * summary['roofline_fraction']:.0f}%")
    for a in attns:  # every attention measured, so a comparison with the faster one is in the output too
        t = results[f"torch_{a}_b{b0}"]
        print(f"vs transformers ({a}{', its default' if a == 'sdpa' else ''}): decode "
              f"{ours['decode_tok_s'] / t['decode_tok_s']:.2f}x, prefill {t['prefill_ms'] / best_prefill:.2f}x "
              f"(ratios > 1 mean glm4v_ms is faster)")
    print(f"threads {args.threads} on both sides; load average {summary['load_average'][0]} at the start, "
          f"{summary['load_average'][1]} at the end; total {summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
