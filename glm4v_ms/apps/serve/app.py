"""The HTTP side (FastAPI on uvicorn): OpenAI chat completions (JSON and SSE), models, health, metrics; the
command line of ``tools/serve.py``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from .engine import Job, ServeEngine
from .metrics import Metrics
from .protocol import APIError, chunk, completion, delta_fields, parse_chat_request, usage_chunk

log = logging.getLogger("glm4v_ms.serve")

# The chat page (apps/web): static files shipped in the package, no build step, no CDN. It uses only the public API.
WEB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")
WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "app.css": "text/css; charset=utf-8"}
# Defence in depth for the page: no inline script, no foreign origin; media may be data:/blob: URLs of uploads.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: "
                                           "blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _error_response(e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(engine: ServeEngine, served_names: List[str], api_key: Optional[str] = None,
              allowed_local_media_path: Optional[str] = None, max_body_bytes: int = 64 << 20):
    app = FastAPI(title="glm4v_ms", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = engine.metrics
    started = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise APIError("missing API key: send 'Authorization: Bearer KEY'", status=401, code="invalid_api_key")
        if auth[7:].strip() != api_key:
            raise APIError("incorrect API key", status=401, code="invalid_api_key")

    async def read_json(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise APIError(f"request body of {size} bytes exceeds the {max_body_bytes}-byte limit", status=413,
                           code="request_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body_bytes:
                raise APIError(f"request body exceeds the {max_body_bytes}-byte limit", status=413,
                               code="request_too_large")
        try:
            return json.loads(bytes(data))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(f"the request body is not valid JSON ({e})", code="invalid_json") from None

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.get("/")
    async def page():
        return FileResponse(os.path.join(WEB_DIR, "index.html"), media_type=WEB_FILES["index.html"],
                            headers=PAGE_HEADERS)

    @app.get("/static/{name}")
    async def static_file(name: str):
        if name not in WEB_FILES or name == "index.html":
            raise APIError(f"no static file {name!r}", status=404, code="not_found")
        return FileResponse(os.path.join(WEB_DIR, name), media_type=WEB_FILES[name], headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        if engine.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": started, "owned_by": "glm4v_ms",
                                            "max_model_len": engine.max_context} for n in served_names]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        req = parse_chat_request(await read_json(request), served_names, allowed_local_media_path)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Job(req, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        try:
            engine.submit(job)
        except APIError:
            metrics.finished("rejected")
            raise
        state = {"done": False, "completion": 0}

        def finish(outcome: str, usage=None):
            state["done"] = True
            usage = usage or {}
            metrics.finished(outcome, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
            if outcome == "success" and job.t_first is not None:
                n = usage.get("completion_tokens", 0)
                tpot = (time.perf_counter() - job.t_first) / (n - 1) if n > 1 else None
                metrics.timing(ttft=job.t_first - job.t_arrival, tpot=tpot)

        async def next_item():
            """The worker's next event; a client that went away cancels the request."""
            while True:
                try:
                    return await asyncio.wait_for(queue.get(), 0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError()

        try:
            first = await next_item()  # "started" (first token computed) or an early error
        except asyncio.CancelledError:
            engine.cancel(job)
            finish("cancelled")
            raise
        if first[0] == "error":
            finish("error")
            return _error_response(first[1])
        if first[0] == "cancelled":
            finish("cancelled")
            return _error_response(APIError("request cancelled", status=499))

        if not req.stream:
            parts = {"thinking": [], "answer": []}
            calls = []
            try:
                while True:
                    item = await next_item()
                    if item[0] == "delta":
                        parts[item[1]].append(item[2])
                    elif item[0] == "tool_call":
                        calls.append(item[2])
                    elif item[0] == "done":
                        finish("success", item[2])
                        thinking = "".join(parts["thinking"]) if parts["thinking"] else None
                        answer = "".join(parts["answer"])
                        return completion(req, answer.strip() if calls else answer, thinking, item[1], item[2],
                                          tool_calls=calls)
                    elif item[0] == "error":
                        finish("error")
                        return _error_response(item[1])
                    else:
                        finish("cancelled")
                        return _error_response(APIError("request cancelled", status=499))
            except asyncio.CancelledError:
                engine.cancel(job)
                finish("cancelled")
                raise

        async def sse():
            def data(obj) -> str:
                return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"

            try:
                yield data(chunk(req, {"role": "assistant", "content": ""}))
                while True:
                    item = await queue.get()
                    if item[0] == "delta":
                        yield data(chunk(req, delta_fields(item[1], item[2])))
                    elif item[0] == "tool_call":  # one delta per call, once it has closed
                        yield data(chunk(req, {"tool_calls": [item[1]]}))
                    elif item[0] == "done":
                        finish("success", item[2])
                        yield data(chunk(req, {}, item[1]))
                        if req.include_usage:
                            yield data(usage_chunk(req, item[2]))
                        break
                    elif item[0] == "error":
                        finish("error")
                        yield data(item[1].body())
                        break
                    else:
                        finish("cancelled")
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not state["done"]:  # the client went away mid-stream (the task was cancelled)
                    engine.cancel(job)
                    finish("cancelled")

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ------------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="OpenAI-compatible GLM-4.1V server with continuous batching")
    ap.add_argument("--model_name", default="tiny-random",
                    help="a GLM-4.1V folder, a hub id (downloaded when online), or tiny-random (built-in, random)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", default="CPU", choices=["CPU", "Ascend"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mode", default="graph", choices=["graph", "eager"])
    ap.add_argument("--quantized_weights", default="auto", choices=["auto", "dequantize", "int"])
    ap.add_argument("--served_model_name", default=None, help="the model id clients send (default: the folder name)")
    ap.add_argument("--max_batch", type=int, default=16, help="decode slots (requests decoded together)")
    ap.add_argument("--max_queue", type=int, default=64, help="requests allowed to wait for a slot; more get 503")
    ap.add_argument("--max_model_len", type=int, default=8192,
                    help="positions per slot (prompt + answer); the KV cache holds max_batch x this")
    ap.add_argument("--max_body_mb", type=float, default=64.0, help="request body cap (413 above it)")
    ap.add_argument("--api_key", default=None, help="require 'Authorization: Bearer KEY' (401 otherwise)")
    ap.add_argument("--allowed_local_media_path", default=None,
                    help="allow file:// image / video URLs under this folder (refused otherwise)")
    ap.add_argument("--log_level", default="warning", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    for name in ("max_batch", "max_queue", "max_model_len"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            ap.error(f"--{name} must be positive")
    if args.allowed_local_media_path is not None and not os.path.isdir(args.allowed_local_media_path):
        ap.error(f"--allowed_local_media_path {args.allowed_local_media_path}: not a folder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s: %(message)s")
    try:
        import uvicorn

        from ..pipeline import Glm4vPipeline
    except ImportError as e:
        print(f"error: {e} (install the runtime requirements: pip install -r requirements.txt -c constraints.txt)",
              file=sys.stderr)
        return 2
    try:
        pipe = Glm4vPipeline.from_pretrained(args.model_name, dtype=args.dtype, device=args.device, mode=args.mode,
                                             quantized_weights=args.quantized_weights)
        ctx = min(args.max_model_len, pipe.model.config.text.max_position_embeddings)
        holder = {}
        metrics = Metrics(lambda: {**holder["engine"].counts(),
                                   **{f"shapes_{k}": len(v) for k, v in holder["engine"].slots.shapes_seen.items()}})
        engine = ServeEngine(pipe, args.max_batch, args.max_queue, ctx, metrics)
        holder["engine"] = engine
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model_name)) or args.model_name)
    app = build_app(engine, [name], api_key=args.api_key, allowed_local_media_path=args.allowed_local_media_path,
                    max_body_bytes=int(args.max_body_mb * (1 << 20)))
    engine.start()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGINT / SIGTERM: end every request with an error event, then stop
            engine.shutdown()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own version re-raises the signal after the graceful shutdown (exit status -15); a server
            # stopped on purpose exits 0 here, after printing its last line.
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"glm4v_ms serve: ready on http://{args.host}:{args.port}/v1 (model {name}, mode {args.mode}, "
                      f"{args.max_batch} slots x {ctx} positions); chat page: http://{args.host}:{args.port}/",
                      file=sys.stderr, flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=10, access_log=args.log_level in ("debug", "info"))
    Server(config).run()
    engine.shutdown()
    print("glm4v_ms serve: stopped", file=sys.stderr, flush=True)
    return 0
