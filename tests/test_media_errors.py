"""Sources (paths, file://, http:// on a local server, data: URIs, PDFs) and every bad input's specific error.

Each error test checks the exception class and that the message names the input. No network: URLs point at an
http.server on 127.0.0.1 started in a thread.
"""

import base64
import http.server
import io
import struct
import sys
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from glm4v_ms.processing.media import (AspectRatioError, CorruptMediaError, EmptyMediaError, FetchError, ImageTooLargeError,
                            MediaNotFoundError, MediaOptions, MissingDependencyError, PageRangeError,
                            UnreadableMediaError, UnsupportedSourceError, load_image, load_images, load_pdf)
from glm4v_ms.processing.processor import Glm4vProcessor
from glm4v_ms.processing.tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("glm4v_tiny_media"))
    build_tiny_tokenizer(path)
    return Glm4vProcessor.from_pretrained(path)


def _png_bytes(height=60, width=80, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Serves a folder on 127.0.0.1; /slow answers after 2 s."""
    root = tmp_path_factory.mktemp("www")
    (root / "pic.png").write_bytes(_png_bytes())

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            if self.path == "/slow":
                time.sleep(2)
                self.path = "/pic.png"
            return super().do_GET()

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # the /slow client has given up by the time we answer: a broken pipe is expected

    httpd = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _pixels(processor, source):
    return processor(text="<|image|>", images=[source])["pixel_values"]


# ---------------------------------------------------------------------------------------------------- good sources
def test_every_source_kind_gives_the_same_pixels(processor, server, tmp_path):
    data = _png_bytes()
    path = tmp_path / "pic.png"
    path.write_bytes(data)
    reference = _pixels(processor, str(path))
    for source in (path, path.as_uri(), f"{server}/pic.png", "data:image/png;base64," + base64.b64encode(data).decode(),
                   Image.open(io.BytesIO(data)), np.asarray(Image.open(io.BytesIO(data)))):
        np.testing.assert_array_equal(_pixels(processor, source), reference)
    item = {"type": "image", "base64": base64.b64encode(data).decode()}
    out = processor.apply_chat_template([{"role": "user", "content": [item]}], tokenize=True, return_dict=True)
    np.testing.assert_array_equal(out["pixel_values"], reference)


# ------------------------------------------------------------------------------------------------------ bad files
def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.png")
    with pytest.raises(MediaNotFoundError, match="no such file") as err:
        load_image(path)
    assert path in str(err.value)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(EmptyMediaError, match="0 bytes") as err:
        load_image(str(path))
    assert str(path) in str(err.value)


def test_text_file_named_png(processor, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("these are my notes, not a picture\n")
    with pytest.raises(UnreadableMediaError, match="not an image format") as err:
        processor(text="<|image|>", images=[str(path)])
    assert str(path) in str(err.value)


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(CorruptMediaError, match="truncated") as err:
        load_image(str(path))
    assert str(path) in str(err.value)


def _png_header_only(width, height):
    """A PNG whose header claims width x height; PIL checks the size on open, before reading pixel data."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_decompression_bomb(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(20000, 10000))  # 200 M pixels: over twice PIL's limit -> PIL's own error
    with pytest.raises(ImageTooLargeError, match="decompression-bomb") as err:
        load_image(str(bomb))
    assert str(bomb) in str(err.value)
    big = tmp_path / "big.png"
    Image.new("L", (1500, 1000)).save(big)  # a real 1.5 M pixel image against a 1 M pixel limit
    with pytest.raises(ImageTooLargeError, match="1500x1000") as err:
        load_image(str(big), MediaOptions(max_image_pixels=1_000_000))
    assert str(big) in str(err.value)
    warned = tmp_path / "warned.png"  # 100 M pixels: PIL would only warn; our default limit makes it an error
    warned.write_bytes(_png_header_only(10000, 10000))
    with pytest.raises(ImageTooLargeError, match="exceeds the limit"):
        load_image(str(warned))
    # A higher user limit lifts PIL's guard for that open only: the header passes, the missing data does not.
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(CorruptMediaError):
        load_image(str(bomb), MediaOptions(max_image_pixels=300_000_000))
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_aspect_ratio_over_200(processor, tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (6000, 28)).save(path)
    with pytest.raises(AspectRatioError, match="exceeds 200") as err:
        processor(text="<|image|>", images=[str(path)])
    assert str(path) in str(err.value)


def test_bad_arrays():
    with pytest.raises(UnreadableMediaError, match="\\[0, 1\\]"):
        load_image(np.full((30, 30, 3), 2.0))
    with pytest.raises(UnreadableMediaError, match="transposed to HWC") as err:
        load_image(np.zeros((3, 40, 50), np.uint8))
    assert "shape (3, 40, 50)" in str(err.value)


# ------------------------------------------------------------------------------------------------------------ URLs
def test_unsupported_scheme():
    url = "ftp://example.com/cat.png"
    with pytest.raises(UnsupportedSourceError, match="scheme 'ftp:'") as err:
        load_image(url)
    assert url in str(err.value)


def test_unreachable_url():
    import socket
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cat.png"
    with pytest.raises(FetchError, match="could not fetch") as err:
        load_image(url, MediaOptions(timeout=2))
    assert url in str(err.value)


def test_http_errors_timeout_and_cap(server):
    with pytest.raises(FetchError, match="404") as err:
        load_image(f"{server}/missing.png")
    assert f"{server}/missing.png" in str(err.value)
    with pytest.raises(FetchError, match="timeout is 0.3 s") as err:
        load_image(f"{server}/slow", MediaOptions(timeout=0.3))
    assert f"{server}/slow" in str(err.value)
    with pytest.raises(FetchError, match="100-byte cap") as err:
        load_image(f"{server}/pic.png", MediaOptions(max_fetch_bytes=100))
    assert f"{server}/pic.png" in str(err.value)


# ------------------------------------------------------------------------------------------------------------- PDF
def _two_page_pdf():
    """Page 1: 200x100 pt, white with a blue square at (20, 20)-(80, 80) pt; page 2: 144x72 pt, all red."""
    pages = [(200, 100, b"0 0 1 rg 20 20 60 60 re f"), (144, 72, b"1 0 0 rg 0 0 144 72 re f")]
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R 5 0 R] /Count 2 >>"]
    for k, (w, h, content) in enumerate(pages):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents %d 0 R >>" % (w, h, 4 + 2 * k))
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_pdf_pages_and_dpi(tmp_path):
    pytest.importorskip("pypdfium2")  # fallback only: CI installs pypdfium2
    path = tmp_path / "doc.pdf"
    path.write_bytes(_two_page_pdf())
    pages = load_pdf(str(path))  # default 180 dpi: 200 pt = 200/72 in -> 500 px
    assert [p.size for p in pages] == [(500, 250), (360, 180)] and all(p.mode == "RGB" for p in pages)
    first = np.asarray(pages[0])
    # the square spans 20..80 pt = 50..200 px from the bottom-left; row 250 - 125 = 125 from the top is inside
    assert first[125, 125].tolist() == [0, 0, 255] and first[10, 10].tolist() == [255, 255, 255]
    assert [p.size for p in load_pdf(str(path), dpi=72)] == [(200, 100), (144, 72)]
    (second,) = load_pdf(str(path), pages="2", dpi=36)
    assert second.size == (72, 36) and np.asarray(second)[18, 36].tolist() == [255, 0, 0]
    with pytest.raises(PageRangeError, match="1..2") as err:
        load_pdf(str(path), pages=[3])
    assert str(path) in str(err.value)


def test_pdf_in_prompts(processor, tmp_path):
    pytest.importorskip("pypdfium2")
    path = tmp_path / "doc.pdf"
    path.write_bytes(_two_page_pdf())
    doc = [{"role": "user", "content": [{"type": "document", "document": str(path), "dpi": 72},
                                        {"type": "text", "text": "Summarise the document."}]}]
    assert processor.apply_chat_template(doc).count("<|image|>") == 2  # pages counted without tokenising
    out = processor.apply_chat_template(doc, tokenize=True, return_dict=True)
    # At 72 dpi, page 1 is 100x200 px (HxW): round -> 112x196, 2*112*196 >= 12544 -> grid 8x14;
    # page 2 is 72x144 px: round(2.57)*28 = 84, round(5.14)*28 = 140 -> grid 6x10.
    assert out["image_grid_thw"].tolist() == [[1, 8, 14], [1, 6, 10]]
    as_image = [{"role": "user", "content": [{"type": "image", "image": str(path), "dpi": 72}]}]
    out2 = processor.apply_chat_template(as_image, tokenize=True, return_dict=True)
    np.testing.assert_array_equal(out2["pixel_values"], out["pixel_values"])
    assert len(load_images(str(path), dpi=72)) == 2


def test_bad_pdf_and_missing_pypdfium2(tmp_path, monkeypatch):
    pytest.importorskip("pypdfium2")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    with pytest.raises(CorruptMediaError, match="cannot open as a PDF") as err:
        load_pdf(str(broken))
    assert str(broken) in str(err.value)
    good = tmp_path / "good.pdf"
    good.write_bytes(_two_page_pdf())
    monkeypatch.setitem(sys.modules, "pypdfium2", None)
    with pytest.raises(MissingDependencyError, match="pip install pypdfium2==") as err:
        load_images(str(good))
    assert str(good) in str(err.value)


def test_processor_errors_name_the_input(processor, tmp_path):
    path = str(tmp_path / "gone.png")
    conversation = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": "?"}]}]
    with pytest.raises(MediaNotFoundError) as err:
        processor.apply_chat_template(conversation, tokenize=True)
    assert path in str(err.value) and isinstance(err.value, ValueError)
    with pytest.raises(UnsupportedSourceError, match="s3:"):
        processor(text="<|video|>", videos=["s3://bucket/clip.mp4"])
    from glm4v_ms.processing.processor import PromptError
    with pytest.raises(PromptError, match="'audio' is not supported"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}])
    with pytest.raises(PromptError, match="clip.mp4: 'fps' is the frame rate of a frame list"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": "clip.mp4",
                                                                     "fps": 4}]}], tokenize=True)
