"""generate.py end to end in a subprocess on the tiny model: images, video, PDF, --json, --chat, --draw_boxes, and
bad inputs that must exit non-zero with one line on stderr and no traceback."""

import json
import os
import select
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from glm4v_ms.apps.tiny import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("cli") / "tiny"))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    imgs = []
    for i, (h, w) in enumerate([(120, 160), (64, 200), (90, 90)]):
        p = d / f"img{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(p)
        imgs.append(str(p))
    pdf = d / "doc.pdf"
    pages = [Image.fromarray((rng.random((300, 200, 3)) * 255).astype("uint8")) for _ in range(2)]
    pages[0].save(pdf, "PDF", resolution=72, save_all=True, append_images=pages[1:])
    av = pytest.importorskip("av")
    video = d / "clip.mp4"
    with av.open(str(video), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for k in range(10):
            arr = np.full((48, 64, 3), k * 20, np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    bad = d / "notes.png"
    bad.write_text("this is text, not an image")
    return dict(images=imgs, pdf=str(pdf), video=str(video), bad=str(bad), dir=d)


def run(*args, stdin=None):
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)


def _stderr_lines(r):
    """stderr without MindSpore warnings and the progress reports (loading weights, compiling ...)."""
    progress = ("[WARNING]", "loading weights: ", "compiling ")
    return [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(progress)]


def test_one_image_json(tiny, media):
    outs = {}
    for mode in ("graph", "eager"):
        r = run("--model_name", tiny, "--image", media["images"][0], "--prompt", "Describe.", "--json",
                "--max_new_tokens", "12", "--greedy", "--mode", mode)
        assert r.returncode == 0, r.stderr
        outs[mode] = out = json.loads(r.stdout.strip().splitlines()[-1])
    same = all(outs["graph"][k] == outs["eager"][k] for k in ("thinking", "answer", "new_tokens"))
    assert same, f"greedy output differs between --mode graph and eager: {outs}"
    for key in ("thinking", "answer", "boxes", "prompt_tokens", "new_tokens", "prefill_ms", "decode_tok_s"):
        assert key in out
    # 120x160 -> smart_resize 112x168 -> 8x12 patches -> 24 image tokens, plus template tokens
    assert out["prompt_tokens"] > 24 and 1 <= out["new_tokens"] <= 12


def test_several_images_stream(tiny, media):
    args = ["--model_name", tiny, "--prompt", "Compare them.", "--max_new_tokens", "10", "--seed", "1"]
    for p in media["images"]:
        args += ["--image", p]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert "prompt tokens" in r.stderr and "tokens/s" in r.stderr


def test_video(tiny, media):
    r = run("--model_name", tiny, "--video", media["video"], "--prompt", "What happens?", "--json",
            "--max_new_tokens", "6")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["prompt_tokens"] > 10


def test_pdf(tiny, media):
    r = run("--model_name", tiny, "--pdf", media["pdf"], "--pdf_dpi", "36", "--prompt", "Summarise.", "--json",
            "--max_new_tokens", "6")
    assert r.returncode == 0, r.stderr
    one = run("--model_name", tiny, "--pdf", media["pdf"], "--pdf_dpi", "36", "--pdf_pages", "1",
              "--prompt", "Summarise.", "--json", "--max_new_tokens", "6")
    assert one.returncode == 0, one.stderr
    both = json.loads(r.stdout.strip().splitlines()[-1])["prompt_tokens"]
    first = json.loads(one.stdout.strip().splitlines()[-1])["prompt_tokens"]
    assert both > first, "two pages must give more image tokens than one"


def test_chat_from_stdin(tiny, media):
    r = run("--model_name", tiny, "--chat", "--json", "--max_new_tokens", "5", "--greedy",
            "--image", media["images"][2], stdin="first question\nsecond question\n")
    assert r.returncode == 0, r.stderr
    turns = [json.loads(l) for l in r.stdout.strip().splitlines()]
    assert len(turns) == 2
    assert turns[1]["prompt_tokens"] > turns[0]["prompt_tokens"], "the second turn must carry the history"


def _read_line(proc, deadline):
    """One line of proc.stdout, or None if none came before ``deadline`` (time.monotonic()) or the process ended."""
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                return None
            continue
        ch = os.read(proc.stdout.fileno(), 1)
        if not ch:
            return None
        buf += ch
        if ch == b"\n":
            return buf.decode()
    return None


def test_chat_answers_each_line_as_it_arrives(tiny, media, tmp_path):
    """A pipe written line by line: the first answer comes out while stdin is still open and before the second
    question is sent; then the second answer carries the history. Bounded in time; the process is killed on failure."""
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "generate.py", "--model_name", tiny, "--chat", "--json",
                             "--max_new_tokens", "4", "--greedy", "--mode", "eager", "--image", media["images"][2]],
                            cwd=ROOT, env=dict(os.environ, GLOG_v="3"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=err)
    try:
        proc.stdin.write(b"first question\n")
        proc.stdin.flush()
        first = _read_line(proc, time.monotonic() + 300)
        err.seek(0)
        assert first is not None, f"no answer to the first line while stdin stays open; stderr: {err.read()[-2000:]}"
        assert proc.poll() is None  # still waiting for more input
        proc.stdin.write(b"second question\n")
        proc.stdin.close()
        second = _read_line(proc, time.monotonic() + 300)
        assert second is not None and proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    a, b = json.loads(first), json.loads(second)
    assert b["prompt_tokens"] > a["prompt_tokens"], "the second turn must carry the history"


@pytest.mark.parametrize("stdin", ["", "\n  \n"])
def test_chat_without_input_says_so(tiny, stdin):
    r = run("--model_name", tiny, "--chat", stdin=stdin)
    lines = _stderr_lines(r)
    assert r.returncode == 3 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: --chat got no input"), r.stderr


def test_draw_boxes(tiny, media):
    out = media["dir"] / "boxes.png"
    r = run("--model_name", tiny, "--image", media["images"][0], "--prompt", "Where?", "--max_new_tokens", "4",
            "--draw_boxes", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (160, 120) and "drawn to" in r.stderr


@pytest.mark.parametrize("kind", ["missing image", "corrupt image", "unknown model", "prompt too long",
                                  "bad pdf pages", "hub id offline", "bf16 on cpu",
                                  "no ascend here"])
def test_bad_inputs_one_line_no_traceback(tiny, media, kind):
    if kind == "no ascend here" and (os.environ.get("ASCEND_HOME_PATH") or os.environ.get("ASCEND_TOOLKIT_HOME")):
        pytest.skip("a CANN environment is present: Ascend may be available here")
    args = {
        "missing image": ["--model_name", tiny, "--image", str(media["dir"] / "nope.jpg"), "--prompt", "x"],
        "corrupt image": ["--model_name", tiny, "--image", media["bad"], "--prompt", "x"],
        "unknown model": ["--model_name", str(media["dir"] / "no-model"), "--prompt", "x"],
        "prompt too long": ["--model_name", tiny, "--prompt", "word " * 3000],
        "bad pdf pages": ["--model_name", tiny, "--pdf", media["pdf"], "--pdf_pages", "5-9", "--prompt", "x"],
        "hub id offline": ["--model_name", "zai-org/not-a-real-model", "--prompt", "x"],  # HF_HUB_OFFLINE=1 here
        "bf16 on cpu": ["--model_name", tiny, "--prompt", "x", "--dtype", "bfloat16"],
        "no ascend here": ["--model_name", tiny, "--prompt", "x", "--device", "Ascend"],  # CPU-only MindSpore
    }[kind]
    r = run(*args)
    lines = _stderr_lines(r)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    expect = {"missing image": "nope.jpg", "corrupt image": "notes.png", "unknown model": "no-model",
              "prompt too long": "context", "bad pdf pages": "doc.pdf",
              "hub id offline": "could not be downloaded from the Hugging Face hub",
              "bf16 on cpu": "bfloat16 compute needs an Ascend device",
              "no ascend here": "device Ascend is not available"}[kind]
    assert expect in lines[0], lines[0]
