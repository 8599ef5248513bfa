"""The chat page (GET / on tools/serve.py) in a real headless browser: Debian's Chromium driven by Playwright for
Python (Playwright cannot download its own browsers here). The server runs tiny-random on 127.0.0.1.

Two tests replace the server's answer with a fixed SSE stream (Playwright's request routing) because a random model
cannot be made to write `<script>` or a box on demand: the stream has the exact shape the server sends (checked
against a real chunk in `test_fixture_stream_has_the_servers_shape`), so they test the page, not the model.
"""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from test_serve import Server  # noqa: E402  (same server harness: free port, bounded waits)

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("GLM4V_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError(f"Chromium not found at {CHROMIUM}: .ci/run installs Debian's chromium package")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)

# Flags for a closed network and root (as the environment notes advise): no sandbox, no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = os.environ.get("GLM4V_TEST_ARTIFACTS")
PROMPT = "What is in this picture? <think>"
# Predicates are always functions: Playwright turns a bare expression into an eval, which the page's CSP forbids.
MODEL_SHOWN = "() => document.getElementById('model-name').textContent === 'tiny-random'"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("web")
    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((60, 80, 3)) * 255).astype("uint8")).save(d / "pic.png")
    big = Image.new("RGB", (400, 300), (240, 240, 240))
    big.paste((200, 30, 30), (40, 60, 200, 180))  # a red square where the fixture's box will be
    big.save(d / "scene.png")
    (d / "bad.png").write_bytes(b"this is not a PNG at all")
    pages = [Image.new("RGB", (120, 160), c) for c in ((255, 255, 255), (30, 30, 200), (30, 160, 30))]
    pages[0].save(d / "doc.pdf", save_all=True, append_images=pages[1:])
    return d


@pytest.fixture(scope="module")
def server():
    s = Server("--max_batch", "4", "--max_queue", "8", "--max_body_mb", "1")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.base + "/")
    pg.wait_for_function(MODEL_SHOWN, timeout=15000)
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _attach(pg, path, kind="image"):
    """Choose a file in the picker and wait until the page has read it (FileReader is asynchronous)."""
    before = pg.locator(f"#attachments .chip[data-kind={kind}]").count()
    pg.set_input_files("#file", str(path))
    sync_api.expect(pg.locator(f"#attachments .chip[data-kind={kind}]")).to_have_count(before + 1)


def _settings(pg, max_tokens=None, temperature=None, thinking=True, budget=None):
    pg.click("#settings-toggle")
    if max_tokens is not None:
        pg.fill("#max-tokens", str(max_tokens))
    if temperature is not None:
        pg.fill("#temperature", str(temperature))
    pg.set_checked("#thinking", thinking)
    pg.fill("#thinking-budget", "" if budget is None else str(budget))
    pg.click("#settings-toggle")


def _last(pg):
    return pg.locator(".msg.assistant").last


def _wait_done(pg, timeout=120000):
    pg.wait_for_function("""() => { const m = [...document.querySelectorAll('.msg.assistant')].pop();
                                    return m && m.dataset.status !== 'streaming'; }""", timeout=timeout)
    return _last(pg).get_attribute("data-status")


def _api(server, messages, **kw):
    body = dict(model="tiny-random", messages=messages, **kw)
    req = urllib.request.Request(server.base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _data_url(path, mime):
    return f"data:{mime};base64," + base64.b64encode(open(path, "rb").read()).decode()


def _as_shown(text):
    """The page shows closed box spans as [box N] (the rectangles go over the image); the rest verbatim."""
    n = iter(range(1, 10**6))
    return re.sub(r"<\|begin_of_box\|>.*?<\|end_of_box\|>", lambda m: f"[box {next(n)}]", text, flags=re.S)


def _record_streaming(pg):
    """Record, while the answer streams, how many distinct lengths the thinking and answer areas had."""
    pg.evaluate("""() => {
        window.__seen = {thinking: new Set(), answer: new Set()};
        new MutationObserver(() => {
            const m = [...document.querySelectorAll('.msg.assistant')].pop();
            if (!m || m.dataset.status !== 'streaming') return;
            window.__seen.thinking.add(m.querySelector('details.thinking .body').textContent.length);
            window.__seen.answer.add(m.querySelector('.answer').textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")


def test_image_prompt_streams_thinking_and_answer_equal_to_the_api(page, server, files):
    # '<think>' ending the prompt opens the thinking part for the random model (the pipeline's rule); the budget
    # then forces '</think><answer>' so that both areas fill
    _settings(page, max_tokens=40, temperature=0, budget=12)
    _attach(page, files / "pic.png")
    page.fill("#prompt", PROMPT)
    _record_streaming(page)
    page.press("#prompt", "Enter")
    assert _wait_done(page) == "done"
    seen = page.evaluate("() => ({t: [...window.__seen.thinking], a: [...window.__seen.answer]})")
    msg = _last(page)
    thinking = msg.locator("details.thinking .body").text_content()
    answer = msg.locator(".answer").text_content()
    # both areas filled while streaming (several intermediate lengths observed), and the thinking stays collapsed
    assert len([n for n in seen["t"] if n > 0]) >= 2, seen
    assert msg.locator("details.thinking").get_attribute("open") is None
    full = _api(server, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url(files / "pic.png", "image/png")}},
        {"type": "text", "text": PROMPT}]}], max_tokens=40, temperature=0, thinking_budget=12,
        chat_template_kwargs={"enable_thinking": True})
    want, usage = full["choices"][0]["message"], full["usage"]
    assert "```" not in want["content"]  # no code block: the answer area shows the text with box spans numbered
    assert thinking == want["reasoning_content"]
    assert answer == _as_shown(want["content"])
    assert want["content"] and len([n for n in seen["a"] if n > 0]) >= 2, seen
    assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} new tokens" in msg.locator(
        ".meta").text_content()


def _sse(pieces, finish="stop"):
    """An SSE body shaped like the server's: role chunk, deltas, finish chunk, usage chunk, [DONE]."""
    base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "tiny-random"}
    chunks = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    for kind, text in pieces:
        delta = {"reasoning_content": text, "reasoning": text} if kind == "thinking" else {"content": text}
        chunks.append(dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None}]))
    chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish}]))
    chunks.append(dict(base, choices=[], usage={"prompt_tokens": 7, "completion_tokens": len(pieces),
                                                "total_tokens": 7 + len(pieces)}))
    return "".join("data: " + json.dumps(c) + "\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_fixture_stream_has_the_servers_shape(server):
    """The forced streams below must look like the real server's, or the page tests would test nothing."""
    req = urllib.request.Request(server.base + "/v1/chat/completions", method="POST", headers={
        "Content-Type": "application/json"}, data=json.dumps({
            "model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        real = [ln[6:] for ln in r.read().decode().split("\n\n") if ln.startswith("data: ")]
    fake = [ln[6:] for ln in _sse([("thinking", "a"), ("answer", "b")]).split("\n\n") if ln.startswith("data: ")]
    assert real[-1] == fake[-1] == "[DONE]"
    r0, f0 = json.loads(real[0]), json.loads(fake[0])
    assert set(r0) == set(f0) and r0["choices"][0]["delta"] == f0["choices"][0]["delta"]
    deltas = [json.loads(x)["choices"][0]["delta"] for x in real[1:-3]]
    for d in deltas:
        assert set(d) in ({"content"}, {"reasoning_content", "reasoning"}), d
    assert json.loads(real[-2])["choices"] == [] and set(json.loads(real[-2])["usage"]) == set(
        json.loads(fake[-2])["usage"])


def _force_answer(pg, pieces):
    pg.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=_sse(pieces)))


def test_model_html_is_shown_as_text(page):
    hostile = ('<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
               '<b>bold?</b>\n```html\n<script>window.__pwned = 3</script>\n```\ndone')
    _force_answer(page, [("thinking", "<i>thinking</i><script>window.__pwned = 4</script>"),
                         ("answer", hostile[:20]), ("answer", hostile[20:])])
    page.fill("#prompt", "say something dangerous")
    page.click("#send")
    assert _wait_done(page) == "done"
    msg = _last(page)
    assert page.evaluate("() => window.__pwned") is None
    answer = msg.locator(".answer")
    assert answer.locator("script, img, b, i").count() == 0
    assert "<script>window.__pwned = 1</script>" in answer.text_content()
    assert "<b>bold?</b>" in answer.text_content()
    code = answer.locator("pre > code")
    assert code.count() == 1 and code.text_content() == "<script>window.__pwned = 3</script>"
    assert code.get_attribute("data-lang") == "html"
    think = msg.locator("details.thinking .body")
    assert think.locator("i, script").count() == 0 and "<i>thinking</i>" in think.text_content()


def test_boxes_drawn_at_the_rescaled_position(page, files, tmp_path):
    _force_answer(page, [("answer", "The red square <|begin_of_box|>[100,200,500,"),
                         ("answer", "600]<|end_of_box|> is on the left.")])
    _attach(page, files / "scene.png")
    page.fill("#prompt", "Where is the red square?")
    page.click("#send")
    assert _wait_done(page) == "done"
    msg = _last(page)
    img = msg.locator(".figure img")
    img.wait_for()
    page.wait_for_function("() => { const i = document.querySelector('.msg.assistant .figure img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    ib = img.bounding_box()
    box = msg.locator(".figure .box")
    assert box.count() == 1
    bb = box.bounding_box()
    # 0-1000 coordinates -> fractions of the displayed image (border included: allow 3 px)
    for got, want in ((bb["x"], ib["x"] + 0.1 * ib["width"]), (bb["y"], ib["y"] + 0.2 * ib["height"]),
                      (bb["width"], 0.4 * ib["width"]), (bb["height"], 0.4 * ib["height"])):
        assert abs(got - want) <= 3, (bb, ib)
    assert box.locator(".label").text_content() == "1 The red square"
    assert "[box 1]" in msg.locator(".answer").text_content()
    out = os.path.join(ARTIFACTS or str(tmp_path), "web-boxes.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    page.screenshot(path=out, full_page=True)
    assert os.path.getsize(out) > 1000


def _running(server) -> float:
    return server.metrics().get("glm4v_requests_running", -1)


def test_stop_cancels_within_a_second_and_frees_the_slot(page, server):
    _settings(page, max_tokens=3000, temperature=0)
    page.fill("#prompt", "Write a very long story. <think>")
    page.click("#send")
    page.wait_for_function("() => document.querySelector('.msg.assistant:last-child details.thinking .body')"
                           ".textContent.length > 0", timeout=60000)
    assert _running(server) == 1
    t0 = time.time()
    page.click("#stop")
    assert _wait_done(page, timeout=1000) == "stopped"
    while _running(server) != 0 and time.time() < t0 + 1.0:  # the server notices within one decode step
        time.sleep(0.05)
    assert _running(server) == 0, server.metrics()
    print(f"stop -> slot freed in {time.time() - t0:.2f} s")
    assert "stopped" in _last(page).locator(".meta").text_content()
    # the chat goes on
    _settings(page, max_tokens=8)
    page.fill("#prompt", "And now a short one.")
    page.click("#send")
    assert _wait_done(page) == "done"


def test_bad_upload_shows_the_servers_error_and_the_chat_keeps_working(page, files):
    _attach(page, files / "bad.png")
    page.fill("#prompt", "What is this?")
    page.click("#send")
    assert _wait_done(page) == "error"
    err = page.locator("#error")
    assert err.is_visible()
    assert "image" in err.text_content().lower(), err.text_content()
    # oversize: the server's body cap is 1 MB here
    big = files / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(big)
    assert os.path.getsize(big) > 1 << 20
    _attach(page, big)
    page.fill("#prompt", "And this?")
    page.click("#send")
    assert _wait_done(page) == "error"
    assert "exceeds" in err.text_content() and "limit" in err.text_content()
    _settings(page, max_tokens=6)
    page.fill("#prompt", "Hello again")
    page.click("#send")
    assert _wait_done(page) == "done"
    assert not err.is_visible()
    # the failed turns were not sent again: the conversation holds only the turn that worked
    assert page.locator(".msg.user.failed").count() == 2


def test_pdf_upload_sends_the_chosen_pages(page, server, files):
    _settings(page, max_tokens=6, temperature=0)
    _attach(page, files / "doc.pdf", "pdf")
    assert page.locator("#pdf-pages-row").is_visible()
    page.fill("#pdf-pages", "2-3")
    page.fill("#prompt", "What colours are the pages?")
    page.click("#send")
    assert _wait_done(page) == "done"
    meta = _last(page).locator(".meta").text_content()
    prompt_tokens = int(re.search(r"(\d+) prompt", meta).group(1))
    pdf = _data_url(files / "doc.pdf", "application/pdf")

    def usage(pages):
        file = {"file_data": pdf, "filename": "doc.pdf", **({"pages": pages} if pages else {})}
        return _api(server, [{"role": "user", "content": [{"type": "file", "file": file},
                                                          {"type": "text", "text": "What colours are the pages?"}]}],
                    max_tokens=6, temperature=0)["usage"]["prompt_tokens"]

    assert prompt_tokens == usage("2-3")
    assert usage(None) > prompt_tokens > usage("1")
    assert "(pages 2-3)" in page.locator(".msg.user").last.text_content()


def test_keyboard_and_phone_width(browser, server):
    ctx = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    pg = ctx.new_page()
    try:
        pg.goto(server.base + "/")
        pg.wait_for_function(MODEL_SHOWN)
        pg.click("#prompt")
        pg.keyboard.type("line one")
        pg.keyboard.press("Shift+Enter")
        pg.keyboard.type("line two")
        assert pg.input_value("#prompt") == "line one\nline two"
        assert pg.locator(".msg").count() == 0
        for sel in ("#send", "#stop", "#prompt", ".attach", "#settings-toggle"):
            b = pg.locator(sel).bounding_box()
            assert b and b["x"] >= 0 and b["x"] + b["width"] <= 375 + 0.5, (sel, b)
        assert pg.evaluate("() => document.documentElement.scrollWidth") <= 375
        _settings(pg, max_tokens=4)
        pg.click("#prompt")
        pg.keyboard.press("Enter")
        assert _wait_done(pg) == "done"
        assert "line one\nline two" in pg.locator(".msg.user").last.text_content()
    finally:
        ctx.close()


def _post(server, body):
    req = urllib.request.Request(server.base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("file, status, words", [
    ({"file_id": "file-abc"}, 400, ["file_id", "inline"]),
    ({"filename": "x.pdf"}, 400, ["exactly one of", "file_data"]),
    ("not an object", 400, ["'file' part needs"]),
    ({"file_data": "PDF", "pages": ["1"]}, 400, ["pages", "range"]),
    ({"file_data": "PDF", "pages": "7-9"}, 400, ["page", "7"]),
    ({"file_data": "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4 broken").decode()}, 400, ["pdf"]),
])
def test_file_part_errors(server, files, file, status, words):
    """The page's PDF upload is OpenAI's 'file' content part; what the server refuses and how it says so."""
    if isinstance(file, dict) and file.get("file_data") == "PDF":
        file = dict(file, file_data=_data_url(files / "doc.pdf", "application/pdf"))
    got, body = _post(server, {"model": "tiny-random", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "file", "file": file}, {"type": "text", "text": "hi"}]}]})
    assert got == status, body
    msg = body["error"]["message"]
    assert all(w.lower() in msg.lower() for w in words), msg
    assert _post(server, {"model": "tiny-random", "max_tokens": 2, "messages": [
        {"role": "user", "content": "still serving?"}]})[0] == 200


def test_page_files_are_served_with_a_strict_policy(server):
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/app.css", "text/css")):
        with urllib.request.urlopen(server.base + path, timeout=10) as r:
            assert r.headers["Content-Type"].startswith(kind)
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    for bad in ("/static/index.html", "/static/..%2Fprotocol.py", "/static/nope.js"):
        try:
            urllib.request.urlopen(server.base + bad, timeout=10)
            raise AssertionError(f"{bad} was served")
        except urllib.error.HTTPError as e:
            assert e.code == 404


def test_slides_upload_is_rendered_on_the_server(page, server, tmp_path):
    """A .pptx goes up like a PDF: the server recognises it from its bytes and LibreOffice renders its slides."""
    from test_documents import SOFFICE, _fodp

    if SOFFICE is None:
        if os.environ.get("CI"):
            raise AssertionError("LibreOffice is not installed: .ci/run installs it")
        pytest.skip("LibreOffice (soffice) is not installed")
    (tmp_path / "deck.fodp").write_text(_fodp(2), encoding="utf-8")
    subprocess.run([SOFFICE, f"-env:UserInstallation={(tmp_path / 'profile').as_uri()}", "--headless",
                    "--convert-to", "pptx", "--outdir", str(tmp_path), str(tmp_path / "deck.fodp")],
                   check=True, capture_output=True, timeout=300)
    deck = tmp_path / "deck.pptx"
    _settings(page, max_tokens=4, temperature=0)
    _attach(page, deck, "pdf")
    assert "document: deck.pptx" in page.locator("#attachments").text_content()
    page.fill("#prompt", "Summarise the slides.")
    page.click("#send")
    assert _wait_done(page, timeout=300000) == "done"
    prompt_tokens = int(re.search(r"(\d+) prompt", _last(page).locator(".meta").text_content()).group(1))
    mime = "application/vnd.openxmlformats-officedocument.presentationml.presentation"
    want = _api(server, [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": _data_url(deck, mime), "filename": "deck.pptx"}},
        {"type": "text", "text": "Summarise the slides."}]}], max_tokens=4, temperature=0)["usage"]["prompt_tokens"]
    assert prompt_tokens == want
    one_slide = _api(server, [{"role": "user", "content": [
        {"type": "file", "file": {"file_data": _data_url(deck, mime), "pages": "1"}},
        {"type": "text", "text": "Summarise the slides."}]}], max_tokens=4, temperature=0)["usage"]["prompt_tokens"]
    assert one_slide < prompt_tokens  # both slides were sent
