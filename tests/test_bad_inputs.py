"""Bad and hostile inputs to the command-line tools, run as a user would: one subprocess per case.

Every case asserts the exit code, that stderr has no traceback, that the error line names its subject (the flag,
path or URL at fault), and that nothing on disk was lost or changed (a digest of every file of the scratch tree
before and after). Cases about media and flags run against a model folder whose weights are broken: they must fail
on the input, before any weight is read (so a typo costs seconds, not a 9B load). URL cases use a server on
127.0.0.1 (a free port), bounded in time.
"""

import contextlib
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
from PIL import Image

from glm4v_ms.processing.media import FetchError, MediaOptions, load_image
from glm4v_ms.apps.tiny import make_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_LIMIT = 120  # seconds per subprocess: every case here ends in a few


# ------------------------------------------------------------------------------------------------------ fixtures
def _png(height=60, width=80) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _png_header_only(width, height) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb as PIL sees it on open)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _edit_json(path, fn):
    with open(path) as f:
        obj = json.load(f)
    fn(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


class _Handler(http.server.BaseHTTPRequestHandler):
    """/pic.png; /missing (404); /trickle: headers, then one body byte every 0.2 s; /trickle_headers: the status
    line, then one header byte every 0.2 s. Trickles stop after 30 s or when the client hangs up."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):
        try:
            if self.path == "/pic.png":
                data = _png()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/trickle":
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self._trickle(b"x" * 150)
            elif self.path == "/trickle_headers":
                self.wfile.write(b"HTTP/1.0 200 OK\r\n")
                self._trickle(b"X-Slow: " + b"a" * 150)
            else:
                self.send_error(404, "Not Found")
        except OSError:
            pass  # the client gave up: expected for the trickles

    def _trickle(self, data):
        end = time.monotonic() + 30
        for i in range(len(data)):
            if time.monotonic() > end:
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(0.2)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def w(tmp_path_factory, server):
    """The scratch tree every case runs against (paths by name)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    p: Dict[str, str] = {"root": str(root), "url": server}
    tiny = make_tiny_model(str(root / "tiny"))
    p["tiny"] = tiny
    (root / "a.png").write_bytes(_png())
    p["png"] = str(root / "a.png")
    pages = [Image.new("RGB", (200, 300), (k * 80, 0, 0)) for k in range(2)]
    pages[0].save(root / "doc.pdf", "PDF", resolution=72, save_all=True, append_images=pages[1:])
    p["pdf"] = str(root / "doc.pdf")
    os.mkfifo(root / "fifo.png")
    p["fifo"] = str(root / "fifo.png")
    (root / "bomb.png").write_bytes(_png_header_only(20000, 10000))
    p["bomb"] = str(root / "bomb.png")
    (root / "truncated.png").write_bytes(_png(300, 300)[:2000])
    p["truncated"] = str(root / "truncated.png")
    (root / "notes.mp4").write_text("this is text, not a video")
    p["notvideo"] = str(root / "notes.mp4")
    (root / "a_file").write_text("a file, not a folder")
    p["file"] = str(root / "a_file")

    def variant(name, edit: Callable[[str], None]) -> str:
        folder = str(root / name)
        shutil.copytree(tiny, folder)
        edit(folder)
        return folder

    def break_weights(folder):  # the 8-byte header length now points far past the end of the file
        with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
            f.write(struct.pack("<Q", 10**12))

    p["broken"] = variant("broken_weights", break_weights)  # media / flag cases: must fail before the weights
    p["no_tok"] = variant("no_tokenizer", lambda f: (break_weights(f), os.remove(os.path.join(f, "tokenizer.json"))))
    p["bad_tok"] = variant("bad_tokenizer", lambda f: (break_weights(f), open(os.path.join(f, "tokenizer.json"),
                                                                               "w").write('{"version": ')))
    p["odd_tok"] = variant("odd_tokenizer", lambda f: (break_weights(f), open(os.path.join(f, "tokenizer.json"),
                                                                               "w").write('{"model": 42}')))
    p["no_template"] = variant("no_template", lambda f: (break_weights(f), os.remove(os.path.join(
        f, "chat_template.jinja")), _edit_json(os.path.join(f, "tokenizer_config.json"),
                                               lambda d: d.pop("chat_template", None))))
    p["bad_pre"] = variant("bad_preprocessor", lambda f: (break_weights(f), open(os.path.join(
        f, "preprocessor_config.json"), "w").write("{not json")))
    p["bad_cfg"] = variant("bad_config", lambda f: (break_weights(f), open(os.path.join(f, "config.json"),
                                                                          "w").write("{")))
    p["huge_ctx"] = variant("huge_context", lambda f: (break_weights(f), _edit_json(
        os.path.join(f, "config.json"), lambda d: d["text_config"].__setitem__("max_position_embeddings", 10**12))))
    p["hf_no_tok"] = variant("hf_no_tokenizer", lambda f: [os.remove(os.path.join(f, n)) for n in
                                                            ("tokenizer.json", "tokenizer_config.json")])
    (root / "cwd").mkdir()  # every case runs here, inside the snapshot: a tool that wrote or deleted in its
    (root / "cwd" / "notes.txt").write_text("the user's working directory")  # working directory is caught
    p["cwd"] = str(root / "cwd")
    user = root / "user_folder"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    p["user"] = str(user)
    home = root / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine")
    p["home"] = str(home)
    return p


def snapshot(root) -> Dict[str, str]:
    """Every entry under ``root``: file -> sha256 of its bytes, folder -> "dir", others -> their kind."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for n in filenames:
            path = os.path.join(dirpath, n)
            rel = os.path.relpath(path, root)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[rel] = "special"
    return out


def run(tool: str, args: List, cwd: str, env: Optional[Dict] = None, timeout: float = TIME_LIMIT):
    env = dict(os.environ, GLOG_v="3", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    script = os.path.join(ROOT, tool)
    # bytes arguments reach the tool as undecodable argv (Python hands them over with surrogateescape)
    return subprocess.run([sys.executable, script, *args], cwd=cwd, env=env, capture_output=True,
                          timeout=timeout)


def error_lines(stderr: str) -> List[str]:
    return [l for l in stderr.splitlines() if "error:" in l or l.startswith("warning:")]


# ---------------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    name: str
    tool: str
    args: Callable[[Dict], List]      # paths by name -> argv
    code: int                         # expected exit code
    subject: Callable[[Dict], str]    # what the error line must name
    also: Tuple[str, ...] = ()        # further words the line must carry (what is wrong)
    cwd: Optional[Callable[[Dict], str]] = None
    env: Optional[Callable[[Dict], Dict]] = None
    creates: Optional[str] = None     # a path (relative to the scratch root) the case may create; removed after
    max_seconds: Optional[float] = None
    max_line: int = 400               # no 89 MB error lines


G, CONVERT, TINY = "generate.py", "tools/convert.py", "tools/make_tiny_model.py"


def gen(model: str, *rest):
    return lambda p: ["--model_name", p[model], "--max_new_tokens", "2", "--mode", "eager", *
                      [a(p) if callable(a) else a for a in rest]]


def at(name):
    return lambda p: p[name]


CASES = [
    # item 10: special files, PDFs as images, flag ranges (argparse: exit 2, the flag named)
    Case("fifo as image", G, gen("broken", "--image", at("fifo"), "--prompt", "x"), 1, at("fifo"),
         ("not a regular file", "FIFO")),
    Case("/dev/zero as image", G, gen("broken", "--image", "/dev/zero", "--prompt", "x"), 1, lambda p: "/dev/zero",
         ("not a regular file", "character device")),
    Case("pdf as image", G, gen("broken", "--image", at("pdf"), "--prompt", "x"), 1, at("pdf"), ("--pdf",)),
    Case("pdf_dpi negative", G, gen("broken", "--pdf", at("pdf"), "--pdf_dpi", "-50", "--prompt", "x"), 2,
         lambda p: "--pdf_dpi"),
    Case("pdf_dpi zero", G, gen("broken", "--pdf", at("pdf"), "--pdf_dpi", "0", "--prompt", "x"), 2,
         lambda p: "--pdf_dpi"),
    Case("seed negative", G, gen("broken", "--seed", "-1", "--prompt", "x"), 2, lambda p: "--seed"),
    Case("top_k negative", G, gen("broken", "--top_k", "-5", "--prompt", "x"), 2, lambda p: "--top_k"),
    Case("max_thinking_tokens negative", G, gen("broken", "--max_thinking_tokens", "-3", "--prompt", "x"), 2,
         lambda p: "--max_thinking_tokens"),
    Case("draw_boxes into a missing folder", G,
         gen("broken", "--image", at("png"), "--draw_boxes", lambda p: os.path.join(p["root"], "nope", "b.png"),
             "--prompt", "x"), 1, lambda p: os.path.join(p["root"], "nope"), ("does not exist",)),
    # item 8: page ranges checked against the page count, short errors
    Case("pdf_pages huge range", G, gen("broken", "--pdf", at("pdf"), "--pdf_pages", "1-99999999999999",
                                        "--prompt", "x"), 1, at("pdf"), ("outside", "1..2"), max_seconds=60),
    Case("pdf_pages many ranges", G, gen("broken", "--pdf", at("pdf"), "--pdf_pages",
                                         ",".join(["1-999999999"] * 5000), "--prompt", "x"), 1, at("pdf"),
         ("outside", "more"), max_seconds=60),
    Case("pdf_pages bad syntax, long", G, gen("broken", "--pdf", at("pdf"), "--pdf_pages", "1-2," + "x" * 60000,
                                              "--prompt", "x"), 1, at("pdf"), ("cannot parse", "chars")),
    # item 9: tracebacks
    Case("prompt not UTF-8", G, gen("broken", "--prompt", b"caf\xe9 \xff"), 2, lambda p: "--prompt", ("UTF-8",)),
    Case("absurd context", G, gen("huge_ctx", "--max_new_tokens", "100000000000", "--prompt", "x"), 1,
         lambda p: "KV cache", ("max_position_embeddings", "--max_new_tokens")),
    Case("make_tiny_model under a file", TINY, lambda p: [os.path.join(p["file"], "tiny")], 1, at("file"),
         ("is a file",)),
    # item 5: the folder's files, before the weights
    Case("tokenizer.json missing", G, gen("no_tok", "--prompt", "x"), 1,
         lambda p: os.path.join(p["no_tok"], "tokenizer.json"), ("missing",)),
    Case("tokenizer.json corrupt", G, gen("bad_tok", "--prompt", "x"), 1,
         lambda p: os.path.join(p["bad_tok"], "tokenizer.json"), ("JSON",)),
    Case("tokenizer.json not a tokenizer", G, gen("odd_tok", "--prompt", "x"), 1,
         lambda p: os.path.join(p["odd_tok"], "tokenizer.json"), ("could not be loaded",)),
    Case("chat template missing", G, gen("no_template", "--prompt", "x"), 1, at("no_template"),
         ("chat template",)),
    Case("preprocessor config corrupt", G, gen("bad_pre", "--prompt", "x"), 1,
         lambda p: os.path.join(p["bad_pre"], "preprocessor_config.json"), ("JSON",)),
    Case("config.json corrupt", G, gen("bad_cfg", "--prompt", "x"), 1,
         lambda p: os.path.join(p["bad_cfg"], "config.json"), ("JSON",)),
    Case("convert: SRC without tokenizer warns", CONVERT,
         lambda p: [p["hf_no_tok"], os.path.join(p["root"], "converted_no_tok"), "--no_progress"], 0,
         lambda p: "tokenizer.json", ("warning", "generate.py"), creates="converted_no_tok"),
    # item 3: URLs (local server), a total deadline whatever the server does
    Case("URL trickling its body", G, gen("broken", "--image", lambda p: p["url"] + "/trickle", "--fetch_deadline",
                                          "2", "--prompt", "x"), 1, lambda p: p["url"] + "/trickle",
         ("deadline",), max_seconds=40),
    Case("URL trickling its headers", G, gen("broken", "--image", lambda p: p["url"] + "/trickle_headers",
                                             "--fetch_deadline", "2", "--prompt", "x"), 1,
         lambda p: p["url"] + "/trickle_headers", ("deadline",), max_seconds=40),
    Case("URL 404", G, gen("broken", "--image", lambda p: p["url"] + "/missing.png", "--prompt", "x"), 1,
         lambda p: p["url"] + "/missing.png", ("404",)),
    Case("fetch_deadline zero", G, gen("broken", "--fetch_deadline", "0", "--prompt", "x"), 2,
         lambda p: "--fetch_deadline"),
    # item 2: convert --force and DST
    Case("convert DST empty", CONVERT, lambda p: [p["tiny"], "", "--force"], 1, lambda p: "DST", ("empty",)),
    Case("convert DST is the working directory", CONVERT, lambda p: [p["tiny"], ".", "--force"], 1,
         at("user"), ("working directory",), cwd=at("user")),
    Case("convert DST is the home directory", CONVERT, lambda p: [p["tiny"], p["home"], "--force"], 1,
         at("home"), ("home directory",), env=lambda p: {"HOME": p["home"]}),
    Case("convert --force onto a user folder", CONVERT, lambda p: [p["tiny"], p["user"], "--force"], 1,
         at("user"), ("not a folder written by tools/convert.py",)),
    Case("convert onto a user folder", CONVERT, lambda p: [p["tiny"], p["user"]], 1, at("user")),
    Case("convert DST above SRC", CONVERT, lambda p: [p["tiny"], p["root"], "--force"], 1, at("root"),
         ("inside DST",)),
    Case("convert DST inside SRC", CONVERT, lambda p: [p["tiny"], os.path.join(p["tiny"], "out"), "--force"], 1,
         lambda p: os.path.join(p["tiny"], "out"), ("inside SRC",)),
    Case("convert DST equal to SRC", CONVERT, lambda p: [p["tiny"], p["tiny"], "--force"], 1, at("tiny"),
         ("same folder",)),
    Case("make_tiny_model --force onto a user folder", TINY, lambda p: [p["user"], "--force"], 1, at("user"),
         ("not a model folder",)),
    # clean cases the probe found: they must stay clean
    Case("decompression bomb", G, gen("broken", "--image", at("bomb"), "--prompt", "x"), 1, at("bomb"),
         ("decompression",)),
    Case("truncated image", G, gen("broken", "--image", at("truncated"), "--prompt", "x"), 1, at("truncated"),
         ("truncated",)),
    Case("text file as video", G, gen("broken", "--video", at("notvideo"), "--prompt", "x"), 1, at("notvideo"),
         ("video",)),
    Case("missing image", G, gen("broken", "--image", lambda p: os.path.join(p["root"], "nope.jpg"),
                                 "--prompt", "x"), 1, lambda p: os.path.join(p["root"], "nope.jpg"),
         ("no such file",)),
    Case("bad URL scheme", G, gen("broken", "--image", "ftp://example.invalid/a.png", "--prompt", "x"), 1,
         lambda p: "ftp://example.invalid/a.png", ("scheme",)),
    Case("broken safetensors header", G, gen("broken", "--prompt", "x"), 1,
         lambda p: os.path.join(p["broken"], "model.safetensors")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(w, case):
    before = snapshot(w["root"])
    argv = case.args(w)
    t0 = time.monotonic()
    r = run(case.tool, argv, cwd=case.cwd(w) if case.cwd else w["cwd"], env=case.env(w) if case.env else None)
    seconds = time.monotonic() - t0
    stderr = r.stderr.decode("utf-8", "replace")
    try:
        assert r.returncode == case.code, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        lines = error_lines(stderr)
        assert lines, stderr[-3000:]
        line = lines[0] if case.code else next((l for l in lines if case.subject(w) in l), lines[0])
        if case.code:
            assert len(lines) == 1, stderr[-3000:]
        assert case.subject(w) in line, line[:case.max_line]
        for word in case.also:
            assert word in line, line[:case.max_line]
        assert len(line) <= case.max_line, line[:case.max_line]
        if case.max_seconds is not None:
            assert seconds < case.max_seconds, seconds
    finally:
        if case.creates:
            shutil.rmtree(os.path.join(w["root"], case.creates), ignore_errors=True)
    assert snapshot(w["root"]) == before, "the case changed files on disk"


# ------------------------------------------------------------------------------------------- cases with timing
def test_url_rate_floor(server):
    """A server that sends a byte every 0.2 s is given up once the grace is over (in-process: the grace is
    MediaOptions.rate_grace, not a flag)."""
    url = server + "/trickle"
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="too slow") as err:
        load_image(url, MediaOptions(min_fetch_rate=100, rate_grace=1.0, fetch_deadline=20))
    assert time.monotonic() - t0 < 10
    assert url in str(err.value) and "--min_fetch_rate" in str(err.value)
    assert load_image(server + "/pic.png", MediaOptions(min_fetch_rate=100, rate_grace=0.0)).size == (80, 60)


def test_sigint_while_decoding_exits_130(w):
    """Ctrl-C during decoding in graph mode (MindSpore turns a SIGINT inside a compiled step into SIGTERM) ends
    with "interrupted" and exit code 130."""
    env = dict(os.environ, GLOG_v="3", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, G), "--model_name", w["tiny"], "--prompt", "hi",
                          "--greedy", "--max_new_tokens", "4000"],
                         cwd=w["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = p.stdout.read(1)  # decoding has started
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=TIME_LIMIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = err.decode("utf-8", "replace")
    if first == b"" or "tokens/s]" in err:
        pytest.skip("the tiny model stopped before the signal arrived")
    assert p.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert not os.path.exists(os.path.join(w["root"], "rank_0")), "MindSpore wrote a failure dump"


def _stale_temp_of_a_killed_process(dst: str) -> str:
    """A temporary folder made by the converter's own code in a process that is then SIGKILLed."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from glm4v_ms.apps.staging import _make_temp_dir\n"
            "p = _make_temp_dir(os.path.dirname(sys.argv[2]), os.path.basename(sys.argv[2]) + '.converting')\n"
            "open(os.path.join(p, 'model-00001-of-00001.safetensors'), 'wb').write(b'x' * 4096)\n"
            "print(p, flush=True); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", code, ROOT, dst], capture_output=True, text=True, timeout=TIME_LIMIT,
                       env=dict(os.environ, GLOG_v="3"))
    assert r.returncode == -signal.SIGKILL, r.stderr
    return r.stdout.strip()


def test_killed_conversion_is_cleaned_by_the_next_run(w, tmp_path):
    dst = str(tmp_path / "out")
    stale = _stale_temp_of_a_killed_process(dst)
    assert os.path.isdir(stale) and os.path.basename(stale).startswith(".out.converting-")
    # not ours: same pattern, no owner file; and a live owner (this test process): both stay
    foreign = tmp_path / ".out.converting-1-abcdef"
    foreign.mkdir()
    (foreign / "data").write_text("not ours")
    live = tmp_path / ".out.converting-2-abcdef"
    live.mkdir()
    with open(live / ".glm4v_ms-owner.json", "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "start": None}, f)
    r = run(CONVERT, [w["tiny"], dst, "--no_progress"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    err = r.stderr.decode()
    assert f"removed {stale}" in err and "killed" in err, err
    assert not os.path.exists(stale) and foreign.is_dir() and live.is_dir()
    assert sorted(os.listdir(tmp_path)) == sorted(["out", foreign.name, live.name])


def _writing(folder) -> bool:
    """A conversion into ``folder``/out has started writing data into its temporary folder."""
    for n in os.listdir(folder):
        if n.startswith(".out.converting-"):
            with contextlib.suppress(OSError):
                if any(e.endswith(".safetensors") or e == "big.bin" for e in os.listdir(os.path.join(folder, n))):
                    return True
    return False


def test_sigkill_during_a_real_conversion(w, tmp_path):
    """SIGKILL while tools/convert.py writes (a large extra file in SRC keeps it busy long enough to be caught):
    a hidden temporary folder stays; the next run removes it and says so."""
    src = str(tmp_path / "src")
    shutil.copytree(w["tiny"], src)
    with open(os.path.join(src, "big.bin"), "wb") as f:
        f.write(os.urandom(1 << 20) * 96)
    dst = str(tmp_path / "out")
    env = dict(os.environ, GLOG_v="3")
    for attempt in range(3):
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, CONVERT), src, dst, "--no_progress"], env=env,
                             cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + TIME_LIMIT
        caught = False
        while p.poll() is None and time.monotonic() < end:
            if _writing(tmp_path):
                p.send_signal(signal.SIGKILL)
                caught = True
                break
            time.sleep(0.001)
        p.wait()
        if caught and not os.path.exists(dst):
            break
        shutil.rmtree(dst, ignore_errors=True)
    else:
        pytest.skip("the conversion finished before it could be killed (3 tries)")
    temps = [n for n in os.listdir(tmp_path) if n.startswith(".out.converting-")]
    assert len(temps) == 1
    r = run(CONVERT, [src, dst, "--no_progress"], cwd=str(tmp_path))
    err = r.stderr.decode()
    assert r.returncode == 0 and f"removed {os.path.join(str(tmp_path), temps[0])}" in err, err[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_interrupted_conversion_leaves_nothing(w, tmp_path):
    """SIGINT (Ctrl-C) and SIGTERM during a conversion: exit code, a message, no temporary folder, no DST."""
    src = str(tmp_path / "src")
    shutil.copytree(w["tiny"], src)
    with open(os.path.join(src, "big.bin"), "wb") as f:
        f.write(os.urandom(1 << 20) * 96)
    dst = str(tmp_path / "out")
    env = dict(os.environ, GLOG_v="3")
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        for attempt in range(3):
            p = subprocess.Popen([sys.executable, os.path.join(ROOT, CONVERT), src, dst, "--no_progress"], env=env,
                                 cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            end = time.monotonic() + TIME_LIMIT
            while p.poll() is None and time.monotonic() < end:
                if _writing(tmp_path):
                    p.send_signal(sig)
                    break
                time.sleep(0.001)
            out, err = p.communicate(timeout=TIME_LIMIT)
            if p.returncode != 0:
                break
            shutil.rmtree(dst)  # finished before the signal: try again
        else:
            pytest.skip("the conversion finished before it could be interrupted (3 tries)")
        err = err.decode()
        assert p.returncode == code and "Traceback" not in err, err[-2000:]
        if sig == signal.SIGINT:
            assert "interrupted" in err
        assert sorted(os.listdir(tmp_path)) == ["src"]


def test_kill_between_the_two_renames_of_force_is_repaired(tmp_path):
    """--force moves the old DST aside, then renames the new folder into place. Killed in between, DST is missing:
    the next run puts the old folder back (and removes the finished-but-unpublished temporary), saying so."""
    from glm4v_ms.apps.staging import OWNER_FILE, clean_stale

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=TIME_LIMIT)
    dead_pid = int(gone.stdout)  # a process that has exited
    owner = {"pid": dead_pid, "host": socket.gethostname(), "start": None}
    dst = tmp_path / "out"
    aside = tmp_path / f".out.old-{dead_pid}-0a1b2c"
    temp = tmp_path / f".out.converting-{dead_pid}-3d4e5f"
    for folder, marker in ((aside, "old conversion"), (temp, "new conversion")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"note": marker}))
        (folder / OWNER_FILE).write_text(json.dumps(owner))
    lines = []
    done = clean_stale(str(dst), lines.append)
    assert done == lines and len(lines) == 2, lines
    assert any(l.startswith(f"restored {dst}") for l in lines) and any(l.startswith(f"removed {temp}") for l in lines)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert json.loads((dst / "config.json").read_text()) == {"note": "old conversion"}
    assert not (dst / OWNER_FILE).exists()
