#!/usr/bin/env python
"""Benchmark tools/serve.py under concurrent streaming clients (continuous batching) on the bench's random configs.

    .venv/bin/python tools/bench_serve.py                      # mid config, 1, 4 and 16 clients, a table
    .venv/bin/python tools/bench_serve.py --config tiny --json

The server runs in its own process (graph mode, --max_batch = the largest client count) on the random checkpoint
of tools/bench.py (same config, same weights) with the tiny model's tokenizer and chat template added (text
prompts only: the tiny tokenizer's ids are valid in the real vocabulary; the random model's answer is not text).
Every client sends ``--requests`` streamed greedy requests one after another (ignore_eos, ``--new_tokens`` each,
prompts of different lengths). A warm-up pass at every client count compiles the graphs first. Reported per client
count: aggregate completion tokens/s (all tokens / wall time), time to first token p50 / p99 (request sent -> first
SSE chunk, which the server sends once the prefill has produced the first token), time per output token p50
((last chunk - first chunk) / (tokens - 1)). One client is the requests sent one at a time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))


def serve_folder(config: str) -> str:
    """tools/bench.py's random checkpoint of ``config`` plus the tiny model's tokenizer files (written once)."""
    from bench import bench_folder

    from glm4v_ms.apps.preflight import resolve_model

    weights = bench_folder(config)
    folder = weights.rstrip("/") + "-serve"
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    tiny = resolve_model("tiny-random")
    tmp = tempfile.mkdtemp(prefix=".bench-serve-", dir=os.path.dirname(folder))
    for name in os.listdir(tiny):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja",
                                                    "preprocessor_config.json"):
            shutil.copy(os.path.join(tiny, name), tmp)
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(weights, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, "generation_config.json"), "w") as f:
        json.dump({"do_sample": False, "eos_token_id": [1], "pad_token_id": 0, "max_new_tokens": 8192}, f)
    os.replace(tmp, folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(port: int, model: str, prompt: str, new_tokens: int) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                       "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    first = last = None
    usage = None
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        now = time.perf_counter()
        first = first if first is not None else now
        if line == b"data: [DONE]":
            break
        obj = json.loads(line[6:])
        if "error" in obj:
            raise RuntimeError(obj["error"]["message"])
        if obj.get("usage"):
            usage = obj["usage"]
        else:
            last = now
    conn.close()
    n = usage["completion_tokens"]
    return {"ttft": first - t0, "tpot": (last - first) / (n - 1) if n > 1 else 0.0, "tokens": n, "end": last}


def run_level(port: int, model: str, clients: int, requests: int, new_tokens: int, prompts) -> dict:
    def client(c):
        return [one_request(port, model, prompts[(c * requests + k) % len(prompts)], new_tokens)
                for k in range(requests)]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        results = [r for rs in ex.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttft = np.array([r["ttft"] for r in results])
    tpot = np.array([r["tpot"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tok_s": round(tokens / wall, 2), "ttft_p50_ms": round(float(np.percentile(ttft, 50)) * 1000, 1),
            "ttft_p99_ms": round(float(np.percentile(ttft, 99)) * 1000, 1),
            "tpot_p50_ms": round(float(np.percentile(tpot, 50)) * 1000, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mid", choices=["tiny", "mid"])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--mode", default="graph", choices=["graph", "eager"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    folder = serve_folder(args.config)
    port = free_port()
    env = dict(os.environ, GLOG_v="3")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--model_name", folder,
                             "--port", str(port), "--mode", args.mode, "--max_batch", str(max(levels)),
                             "--served_model_name", "bench", "--max_model_len", "1024"],
                            stderr=subprocess.PIPE, text=True, env=env)
    ready = threading.Event()

    def watch():
        for line in proc.stderr:
            if "ready on" in line:
                ready.set()
            elif not args.json:
                sys.stderr.write(line)

    threading.Thread(target=watch, daemon=True).start()
    try:
        if not ready.wait(1800):
            raise RuntimeError("server not ready")
        words = "the quick brown fox jumps over the lazy dog".split()
        prompts = [" ".join(words[k % 9] for k in range(6 + 5 * i)) for i in range(16)]
        t = time.perf_counter()
        for c in levels:  # warm-up: compiles every (tier, bucket) the measured runs use
            run_level(port, "bench", c, 1, args.new_tokens, prompts)
        warm = time.perf_counter() - t
        rows = [run_level(port, "bench", c, args.requests, args.new_tokens, prompts) for c in levels]
    finally:
        proc.terminate()
        proc.wait(60)
    base = rows[0]["tok_s"]
    out = {"config": args.config, "mode": args.mode, "new_tokens": args.new_tokens, "warmup_s": round(warm, 1),
           "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "levels": rows,
           "speedup_vs_first": {r["clients"]: round(r["tok_s"] / base, 2) for r in rows}}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"config {args.config}, {args.mode} mode, {args.new_tokens} new tokens per request, warm-up {warm:.0f} s, "
          f"load average {out['load_avg'][0]:.1f} on {out['cpus']} CPUs")
    print(f"{'clients':>7} {'requests':>8} {'tok/s':>8} {'x1':>5} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['tok_s']:>8.1f} {r['tok_s'] / base:>5.2f} "
              f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p99_ms']:>7.0f}ms {r['tpot_p50_ms']:>7.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
