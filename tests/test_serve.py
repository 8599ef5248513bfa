"""tools/serve.py driven by the real openai SDK on tiny-random (127.0.0.1, free ports, bounded waits).

Server A (eager, 16 slots) answers the protocol, batching and bad-input tests; server B (1 slot, queue 1, API key,
small body cap) the back-pressure and auth tests. Graph mode's no-recompile rule is tested in-process on SlotBatch.
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "tiny-random"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, mode="eager"):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, GLOG_v="3", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--model_name", MODEL,
                                      "--port", str(self.port), "--mode", mode, *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.stderr = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        deadline = time.time() + 240
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + "".join(self.stderr))
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("server not ready in 240 s")

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=300, **kw)

    def metrics(self) -> dict:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def post(self, body: bytes, headers=None):
        """Raw POST to /v1/chat/completions -> (status, headers, json body)."""
        req = urllib.request.Request(self.base + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.headers, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers, json.loads(e.read())

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_media")
    rng = np.random.default_rng(0)
    im = Image.fromarray((rng.random((56, 84, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    path = d / "pic.png"
    im.save(path)
    (d / "bad.png").write_text("not an image")
    return dict(url="data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), path=str(path),
                dir=str(d), bad=str(d / "bad.png"))


@pytest.fixture(scope="module")
def server(media):
    s = Server("--max_batch", "16", "--max_queue", "64", "--allowed_local_media_path", media["dir"])
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def pipe():
    from glm4v_ms.apps.pipeline import Glm4vPipeline

    return Glm4vPipeline.from_pretrained(MODEL, mode="eager")


def _image_msg(url, text="Describe the picture <think>"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _stream(client, **kw):
    """(reasoning, content, finish_reason, usage, chunks) of a streamed request."""
    reasoning, content, finish, usage, n = [], [], None, None, 0
    for c in client.chat.completions.create(stream=True, **kw):
        n += 1
        assert c.object == "chat.completion.chunk" and c.model == MODEL and c.id.startswith("chatcmpl-")
        if c.usage is not None:
            assert c.choices == []
            usage = c.usage
            continue
        d = c.choices[0].delta
        extra = d.model_extra or {}
        if extra.get("reasoning_content"):
            assert extra["reasoning"] == extra["reasoning_content"]
            reasoning.append(extra["reasoning_content"])
        if d.content:
            content.append(d.content)
        if c.choices[0].finish_reason:
            finish = c.choices[0].finish_reason
    return "".join(reasoning), "".join(content), finish, usage, n


# ------------------------------------------------------------------------------------------------- protocol
def test_image_reasoning_content_usage_and_equal_to_pipeline(server, pipe, media):
    """A data-URL image; '<think>' at the end of the prompt opens the thinking part (the pipeline's rule), the
    budget cuts it: reasoning and content are both non-empty, equal to the pipeline's greedy result, and the
    stream equals the JSON answer."""
    client = server.client()
    kw = dict(model=MODEL, messages=_image_msg(media["url"]), max_tokens=14, temperature=0,
              extra_body={"thinking_budget": 5})
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    extra = msg.model_extra
    assert r.object == "chat.completion" and msg.role == "assistant"
    assert extra["reasoning_content"] and extra["reasoning"] == extra["reasoning_content"] and msg.content
    assert r.usage.completion_tokens == 14 and r.choices[0].finish_reason == "length"

    from glm4v_ms.apps.pipeline import ChatResult

    result = ChatResult()
    hf = [{"role": "user", "content": [{"type": "image", "image": media["url"]},
                                       {"type": "text", "text": "Describe the picture <think>"}]}]
    pieces = list(pipe.stream(hf, result, do_sample=False, max_new_tokens=14, max_thinking_tokens=5))
    assert "".join(p.text for p in pieces if p.kind == "thinking") == extra["reasoning_content"]
    assert "".join(p.text for p in pieces if p.kind == "answer") == msg.content
    assert r.usage.prompt_tokens == result.stats.prompt_tokens

    reasoning, content, finish, usage, _ = _stream(client, stream_options={"include_usage": True}, **kw)
    assert (reasoning, content, finish) == (extra["reasoning_content"], msg.content, "length")
    assert usage.completion_tokens == 14 and usage.prompt_tokens == r.usage.prompt_tokens

    raw = client.chat.completions.create(**{**kw, "extra_body": {"thinking_budget": 5, "skip_special_tokens": False}})
    text = raw.choices[0].message.content
    assert "</think><answer>" in text and "reasoning_content" not in (raw.choices[0].message.model_extra or {})
    assert text.startswith(extra["reasoning_content"])


def test_thinking_off_stop_strings_multiturn_file_url(server, media):
    client = server.client()
    base = dict(model=MODEL, max_tokens=10, temperature=0)
    off = client.chat.completions.create(messages=_image_msg(media["url"]), **base,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert not (off.choices[0].message.model_extra or {}).get("reasoning_content")  # starts after </think>
    full = client.chat.completions.create(messages=[{"role": "user", "content": "hello"}], **base).choices[0]
    cut = full.message.content[3:5]
    stopped = client.chat.completions.create(messages=[{"role": "user", "content": "hello"}], stop=[cut], **base)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full.message.content[:full.message.content.find(cut)]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "<think>long</think><answer>hi</answer>"},
               {"role": "user", "content": "and then?"}]
    stripped = [*history[:2], {"role": "assistant", "content": "hi"}, history[3]]
    a = client.chat.completions.create(messages=history, **base)
    b = client.chat.completions.create(messages=stripped, **base)
    assert a.choices[0].message.content == b.choices[0].message.content  # earlier turns keep only their answer
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    f = client.chat.completions.create(messages=_image_msg("file://" + media["path"]), **base)
    d = client.chat.completions.create(messages=_image_msg(media["url"]), **base)
    assert f.choices[0].message.content == d.choices[0].message.content and f.usage == d.usage
    assert f.choices[0].message.model_extra == d.choices[0].message.model_extra
    two = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": media["url"]}, {"type": "image_url", "image_url": {"url": media["url"]}},
        {"type": "text", "text": "Compare."}]}], **base)
    assert two.usage.prompt_tokens > d.usage.prompt_tokens
    av = pytest.importorskip("av")
    video = os.path.join(media["dir"], "clip.mp4")
    with av.open(video, "w") as c:
        st = c.add_stream("mpeg4", rate=4)
        st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
        for k in range(8):
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), k * 25, np.uint8), format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    v = client.chat.completions.create(messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "file://" + video}}, {"type": "text", "text": "What happens?"}]}],
        **base)
    text_only = client.chat.completions.create(messages=[{"role": "user", "content": "What happens?"}], **base)
    assert v.usage.prompt_tokens >= text_only.usage.prompt_tokens + 4  # video placeholders and frame tokens
    assert v.choices[0].finish_reason in ("stop", "length")
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


# ------------------------------------------------------------------------------------------ continuous batching
def _requests():
    """16 requests of different prompts, lengths and settings (greedy, sampled with seeds, penalties, stops)."""
    out = []
    for i in range(16):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": "word " * (i % 5) + f"request {i}"}],
                  max_tokens=4 + (i * 3) % 11)
        if i % 3 == 0:
            kw.update(temperature=0)
        elif i % 3 == 1:
            kw.update(temperature=0.8, top_p=0.9, seed=100 + i, extra_body={"top_k": 0, "repetition_penalty": 1.0})
        else:
            kw.update(seed=i)  # the checkpoint's recipe: top_k 2, top_p 1e-5, penalty 1.1
        out.append(kw)
    return out


def test_16_concurrent_streams_equal_one_at_a_time(server):
    client = server.client()
    reqs = _requests()
    alone = [_stream(client, **kw)[:3] for kw in reqs]
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda kw: _stream(client, **kw)[:3], reqs))
    assert together == alone
    assert len(together) == 16 and all(a[2] in ("stop", "length") for a in together)  # none lost or cut
    assert len({a[1] for a in alone}) > 8  # different requests, different answers (no mix-up hidden by equality)


def test_client_closing_a_stream_frees_its_slot(server):
    client = server.client()
    before = server.metrics()
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "tell me"}],
                                            max_tokens=2000, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        m = server.metrics()
        if m['glm4v_requests_total{outcome="cancelled"}'] > before['glm4v_requests_total{outcome="cancelled"}'] \
                and m["glm4v_requests_running"] == 0:
            break
        time.sleep(0.2)
    assert m["glm4v_requests_running"] == 0 and m["glm4v_requests_waiting"] == 0
    assert m['glm4v_requests_total{outcome="cancelled"}'] == before['glm4v_requests_total{outcome="cancelled"}'] + 1
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.usage.completion_tokens >= 1
    assert m["glm4v_time_to_first_token_seconds_count"] >= 1


# -------------------------------------------------------------------------------------------------- bad input
def _bad_cases(media):
    img = lambda url: {"model": MODEL, "messages": _image_msg(url)}  # noqa: E731
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    return [
        ("malformed json", b"{not json", 400, None),
        ("unknown model", {**ok, "model": "gpt-4"}, 404, "model"),
        ("no messages", {**ok, "messages": []}, 400, "messages"),
        ("messages not a list", {**ok, "messages": "hi"}, 400, "messages"),
        ("content wrong type", {**ok, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("bad role", {**ok, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ("audio part", {**ok, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         400, "messages[0].content[0].type"),
        ("n > 1", {**ok, "n": 2}, 400, "n"),
        ("temperature", {**ok, "temperature": 3}, 400, "temperature"),
        ("top_p", {**ok, "top_p": 0}, 400, "top_p"),
        ("top_k", {**ok, "top_k": -5}, 400, "top_k"),
        ("max_tokens", {**ok, "max_tokens": 0}, 400, "max_tokens"),
        ("penalty", {**ok, "repetition_penalty": -1}, 400, "repetition_penalty"),
        ("seed type", {**ok, "seed": "x"}, 400, "seed"),
        ("too long", {**ok, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, "messages"),
        ("unreachable url", img("http://127.0.0.1:9/none.png"), 400, "messages"),
        ("corrupt image", img("data:image/png;base64," + base64.b64encode(b"garbage" * 10).decode()), 400, "messages"),
        ("file outside", img("file:///etc/hostname"), 400, "messages[0].content[0]"),
        ("corrupt file", img("file://" + media["bad"]), 400, "messages"),
        ("plain path", img(media["path"]), 400, "messages[0].content[0]"),
    ]


def test_every_bad_input_gets_its_error_and_the_server_keeps_serving(server, media):
    for name, body, status, param in _bad_cases(media):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        code, _, out = server.post(data)
        assert code == status, (name, out)
        err = out["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
        assert err["param"] == param, (name, err)
    r = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2)
    assert r.choices[0].message.content is not None


# --------------------------------------------------------------------------- back-pressure, auth, size, signals
def test_queue_limit_auth_body_cap_and_sigterm(media):
    s = Server("--max_batch", "1", "--max_queue", "1", "--api_key", "sekret", "--max_body_mb", "0.01")
    try:
        ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert s.post(json.dumps(ok).encode())[0] == 401
        assert s.post(json.dumps(ok).encode(), {"Authorization": "Bearer wrong"})[0] == 401
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").chat.completions.create(**ok)
        code, _, err = s.post(json.dumps({**ok, "pad": "x" * 20000}).encode(), {"Authorization": "Bearer sekret"})
        assert code == 413 and err["error"]["code"] == "request_too_large"

        client = s.client("sekret")
        long = dict(model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=4000, temperature=0,
                    stream=True, extra_body={"ignore_eos": True})
        first = client.chat.completions.create(**long)   # holds the only slot
        next(iter(first))
        waiting = []
        t = threading.Thread(target=lambda: waiting.append(client.chat.completions.create(**{**long, "max_tokens": 2,
                                                                                               "stream": False})))
        t.start()
        deadline = time.time() + 20
        while s.metrics()["glm4v_requests_waiting"] < 1 and time.time() < deadline:
            time.sleep(0.1)
        code, headers, err = s.post(json.dumps(ok).encode(), {"Authorization": "Bearer sekret"})
        assert code == 503 and headers.get("Retry-After") == "1" and err["error"]["code"] == "server_busy"
        first.close()  # frees the slot: the waiting request runs, then service resumes
        t.join(120)
        assert waiting and waiting[0].usage.completion_tokens >= 1
        assert client.chat.completions.create(**ok).usage.completion_tokens >= 1

        # SIGTERM with a stream in flight: it ends with an error event, the process exits cleanly
        events = []
        inflight = client.chat.completions.create(**long)

        def read():
            try:
                for c in inflight:
                    events.append(c)
            except openai.APIError as e:
                events.append(e)

        reader = threading.Thread(target=read)
        reader.start()
        while not events and time.time() < deadline + 60:
            time.sleep(0.1)
        assert s.stop(signal.SIGTERM) == 0
        reader.join(30)
        assert not reader.is_alive() and isinstance(events[-1], openai.APIError)
        assert any("ready on" in line for line in s.stderr) and any("stopped" in line for line in s.stderr)
    finally:
        s.stop(signal.SIGKILL)


# ------------------------------------------------------------------------------------------------- graph mode
def test_graph_mode_rows_join_and_leave_without_new_shapes(pipe):
    """Graph mode SlotBatch: requests joining and leaving a running batch keep one decode shape per (tier, key
    bucket) and get the tokens they get alone (greedy and seeded sampling)."""
    from dataclasses import replace

    from glm4v_ms.apps.pipeline import Glm4vPipeline
    from glm4v_ms.runtime.generation import iter_tokens
    from glm4v_ms.runtime.slots import SlotBatch

    g = Glm4vPipeline(pipe.model, pipe.processor, pipe.gen, pipe.folder, mode="graph")
    ins = [{"input_ids": g.inputs(g.messages(p))["input_ids"]} for p in ("a", "bb cc dd", "a longer prompt here")]
    gens = [replace(g.gen, do_sample=False, max_new_tokens=9, eos_token_id=[]),
            replace(g.gen, seed=7, max_new_tokens=12, eos_token_id=[]),
            replace(g.gen, do_sample=True, top_k=0, top_p=0.9, temperature=0.7, seed=5, max_new_tokens=6,
                    eos_token_id=[])]
    alone = [[int(t[0]) for t in iter_tokens(g.model, i, gn, mode="graph")] for i, gn in zip(ins, gens)]
    sb = SlotBatch(g.model, 4, 512, "graph")

    def run():
        outs, rows = {}, {}
        joins = {0: 0, 2: 1, 5: 2}  # step -> request joining before it (slots 0, 1, 2: tiers 1, 2, 4)
        for step in range(20):
            if step in joins:
                k = joins[step]
                tok, rows[k] = sb.prefill(k, ins[k], gens[k])
                outs[k] = [tok]
            live = [k for k in rows if len(outs[k]) < gens[k].max_new_tokens]
            if not live:
                break
            for k, t in zip(live, sb.step([rows[k] for k in live], [outs[k][-1] for k in live])):
                outs[k].append(t)
        return [outs[k] for k in range(3)]

    assert run() == alone
    shapes = set(sb.shapes_seen["decode"])
    assert shapes == {(1, 256), (2, 256), (4, 256)}
    assert run() == alone and sb.shapes_seen["decode"] == shapes  # the same traffic again: no new shape
