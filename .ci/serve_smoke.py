"""CI: the server as a new user starts it, from the runtime-only environment (run by .ci/run with that venv's python).
Starts tools/serve.py on tiny-random on 127.0.0.1 (a free port), waits for /health, asks one chat completion, fetches
the chat page, then stops the server with SIGTERM. Bounded: 300 s to get ready, 120 s per request."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--model_name", "tiny-random",
                             "--host", "127.0.0.1", "--port", str(port), "--mode", "eager", "--max_batch", "2"],
                            env=dict(os.environ, GLOG_v="3"))
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                print(f"[ci] FAILED: tools/serve.py exited with {proc.returncode} before it was ready", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                print("[ci] FAILED: tools/serve.py not ready in 300 s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        body = {"model": "tiny-random", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello"}]}
        req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        if answer.get("usage", {}).get("completion_tokens", 0) < 1:
            print(f"[ci] FAILED: no tokens in the server's answer: {answer}", file=sys.stderr)
            return 1
        with urllib.request.urlopen(base + "/", timeout=30) as r:
            if b"<html" not in r.read():
                print("[ci] FAILED: GET / did not return the chat page", file=sys.stderr)
                return 1
        print(f"[ci] server ok: {answer['usage']['completion_tokens']} tokens answered, chat page served",
              file=sys.stderr)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
