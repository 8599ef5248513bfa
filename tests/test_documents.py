"""Office documents (.ppt .pptx .doc .docx .odp .odt) as page images, through LibreOffice and the PDF path.

The documents are made here: a 3-slide presentation and a 3-page text document written as flat OpenDocument XML, each
page filled with its own colour (red, green, blue, in that order), then saved by LibreOffice itself as every office
format we accept. Bad inputs: corrupt (random bytes with an office name; a ZIP that looks like a .pptx inside but is
not), password-protected (an OpenDocument whose manifest declares encryption: the real container layout, but no real
cipher text, since making one needs a crypto library we do not ship; and the OLE2 wrapper Office puts encrypted
.pptx/.docx in), zero pages, timeout, crash, exit with an error, and LibreOffice missing. Fake ``soffice`` scripts on
PATH stand in where a real LibreOffice cannot be made to misbehave on purpose. After each test: no process still
running from the test's folders and no working folder left in the cache.

Tests that need a real LibreOffice skip when it is missing, except in CI (``CI`` set), where they fail instead.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from glm4v_ms.processing import office
from glm4v_ms.processing.media import (ConversionError, CorruptMediaError, EmptyMediaError, MediaOptions,
                                       MissingDependencyError, PasswordProtectedError, TooManyImagesError,
                                       load_document, load_images, load_pdf)

pdfium = pytest.importorskip("pypdfium2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOFFICE = shutil.which("soffice") or shutil.which("libreoffice")
COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255)]  # page k is mostly COLOURS[k]


@pytest.fixture(scope="module")
def soffice():
    if SOFFICE is None:
        if os.environ.get("CI"):
            pytest.fail("LibreOffice (soffice) is not installed, and CI must run the document tests: .ci/run installs "
                        "it with apt-get")
        pytest.skip("LibreOffice (soffice) is not installed; apt-get install libreoffice-impress-nogui "
                    "libreoffice-writer-nogui")
    return SOFFICE


def _processes_under(folder) -> list:
    """Command lines of running (not zombie) processes that mention ``folder``: soffice left behind by a test."""
    found, folder = [], os.fspath(folder)
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if folder in cmd:
            found.append(f"{pid}: {cmd[:200]}")
    return found


def _lo_temp_files() -> set:
    tmp = "/tmp"
    # LibreOffice's temporary folders (lu*.tmp) and its IPC socket (OSL_PIPE_<uid>_SingleOfficeIPC_<hash>)
    names = os.listdir(tmp) if os.path.isdir(tmp) else []
    return {n for n in names if (n.startswith("lu") and n.endswith(".tmp")) or n.startswith("OSL_PIPE_")}


@pytest.fixture
def clean(tmp_path, monkeypatch):
    """Options with a cache in tmp_path; afterwards asserts no stray process and no working folder is left."""
    monkeypatch.delenv("GLM4V_MS_SOFFICE", raising=False)
    monkeypatch.delenv("GLM4V_MS_DOC_CACHE", raising=False)
    cache = tmp_path / "cache"
    before = _lo_temp_files()
    yield MediaOptions(doc_cache_dir=str(cache))
    deadline = time.monotonic() + 5.0  # SIGKILLed processes need a moment to go
    while _processes_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _processes_under(tmp_path), f"processes left running: {_processes_under(tmp_path)}"
    left = [n for n in (os.listdir(cache) if cache.is_dir() else []) if not n.endswith(".pdf")]
    assert not left, f"working files left in the cache folder: {left}"
    assert not _lo_temp_files() - before, f"LibreOffice temp files left in /tmp: {_lo_temp_files() - before}"


# ------------------------------------------------------------------------------------------- documents made here
_NS = ('xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
       'xmlns:style="urn:oasis:names:tc:opendocument:xmlns:style:1.0" '
       'xmlns:draw="urn:oasis:names:tc:opendocument:xmlns:drawing:1.0" '
       'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" '
       'xmlns:fo="urn:oasis:names:tc:opendocument:xmlns:xsl-fo-compatible:1.0" '
       'xmlns:svg="urn:oasis:names:tc:opendocument:xmlns:svg-compatible:1.0"')


def _hex(rgb):
    return "#%02x%02x%02x" % rgb


def _fodp(n_slides=3) -> str:
    styles = "".join(f'<style:style style:name="c{k}" style:family="graphic"><style:graphic-properties '
                     f'draw:fill="solid" draw:fill-color="{_hex(COLOURS[k % 3])}" draw:stroke="none"/></style:style>'
                     for k in range(n_slides))
    pages = "".join(f'<draw:page draw:name="s{k + 1}"><draw:rect draw:style-name="c{k}" svg:x="1cm" svg:y="1cm" '
                    f'svg:width="24cm" svg:height="16cm"><text:p>Slide {k + 1}</text:p></draw:rect></draw:page>'
                    for k in range(n_slides))
    return (f'<?xml version="1.0" encoding="UTF-8"?><office:document {_NS} office:version="1.3" '
            f'office:mimetype="application/vnd.oasis.opendocument.presentation"><office:automatic-styles>{styles}'
            f'</office:automatic-styles><office:body><office:presentation>{pages}</office:presentation></office:body>'
            '</office:document>')


def _fodt(n_pages=3) -> str:
    styles = "".join(f'<style:style style:name="p{k}" style:family="paragraph"><style:paragraph-properties '
                     f'fo:background-color="{_hex(COLOURS[k % 3])}" fo:break-before="{"page" if k else "auto"}"/>'
                     f'<style:text-properties fo:font-size="150pt"/></style:style>' for k in range(n_pages))
    paras = "".join(f'<text:p text:style-name="p{k}">P{k + 1}<text:line-break/>P{k + 1}</text:p>'
                    for k in range(n_pages))
    return (f'<?xml version="1.0" encoding="UTF-8"?><office:document {_NS} office:version="1.3" '
            f'office:mimetype="application/vnd.oasis.opendocument.text"><office:automatic-styles>{styles}'
            f'</office:automatic-styles><office:body><office:text>{paras}</office:text></office:body>'
            '</office:document>')


@pytest.fixture(scope="module")
def docs(soffice, tmp_path_factory):
    """{"pptx": path, ...}: the same 3 pages saved by LibreOffice in every accepted format."""
    d = tmp_path_factory.mktemp("docs")
    (d / "deck.fodp").write_text(_fodp(), encoding="utf-8")
    (d / "text.fodt").write_text(_fodt(), encoding="utf-8")
    profile = (d / "profile").as_uri()
    out = {}
    for source, kinds in (("deck.fodp", ("pptx", "ppt", "odp")), ("text.fodt", ("docx", "doc", "odt"))):
        for kind in kinds:
            subprocess.run([soffice, f"-env:UserInstallation={profile}", "--headless", "--convert-to", kind,
                            "--outdir", str(d), str(d / source)], check=True, capture_output=True, timeout=300)
            out[kind] = str(d / (source.split(".")[0] + "." + kind))
            assert os.path.getsize(out[kind]) > 0, kind
    shutil.rmtree(d / "profile", ignore_errors=True)
    return out


def _dominant(page) -> int:
    """Index into COLOURS of the colour covering most of the page."""
    a = np.asarray(page.convert("RGB")).reshape(-1, 3).astype(int)
    counts = [int((np.abs(a - np.array(c)).sum(axis=1) < 60).sum()) for c in COLOURS]
    assert max(counts) > a.shape[0] // 10, f"no page colour dominates: {counts}"
    return int(np.argmax(counts))


# ------------------------------------------------------------------------------------------------------ good input
@pytest.mark.parametrize("kind", ["pptx", "ppt", "odp", "docx", "doc", "odt"])
def test_pages_count_order_and_pixels(docs, clean, kind):
    pages = load_document(docs[kind], dpi=30, options=clean)
    assert len(pages) == 3
    assert [_dominant(p) for p in pages] == [0, 1, 2], "pages out of order"
    cached = [os.path.join(clean.doc_cache_dir, n) for n in os.listdir(clean.doc_cache_dir)]
    assert len(cached) == 1 and cached[0].endswith(office.content_hash(docs[kind]) + ".pdf")
    direct = load_pdf(cached[0], dpi=30)  # the converted PDF rendered directly
    for ours, ref in zip(pages, direct):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    # page ranges and bytes input go the same way
    (second,) = load_document(open(docs[kind], "rb").read(), pages="2", dpi=30, options=clean)
    np.testing.assert_array_equal(np.asarray(second), np.asarray(direct[1]))


def test_converted_once_then_cached_without_libreoffice(docs, clean, tmp_path, monkeypatch):
    first = load_images(docs["pptx"], clean, dpi=20)
    pdf = os.path.join(clean.doc_cache_dir, office.content_hash(docs["pptx"]) + ".pdf")
    stamp = os.stat(pdf).st_mtime_ns
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # a second conversion would now fail
    again = load_images(docs["pptx"], clean, dpi=20)
    assert os.stat(pdf).st_mtime_ns == stamp
    assert [np.asarray(p).tobytes() for p in again] == [np.asarray(p).tobytes() for p in first]


def test_url_and_named_bytes(docs, clean, tmp_path):
    """A document over http (as the server and batch lines may give it) and bytes with their upload name."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.path.dirname(docs["docx"]))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{os.path.basename(docs['docx'])}?v=1"
        pages = load_document(url, pages="3", dpi=20, options=clean)
        assert [_dominant(p) for p in pages] == [2]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    with pytest.raises(CorruptMediaError, match=r"upload\.docx: is not a valid Word"):
        load_document(b"not a word file", name="upload.docx", options=clean)
    assert len(load_document(open(docs["doc"], "rb").read(), name="upload.doc", dpi=20, options=clean)) == 3


def test_processor_document_items_and_cap(docs, clean, tmp_path):
    from glm4v_ms.processing.processor import Glm4vProcessor
    from glm4v_ms.processing.tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(str(tmp_path / "tok"))
    processor = Glm4vProcessor.from_pretrained(str(tmp_path / "tok"), media_options=clean)
    msgs = [{"role": "user", "content": [{"type": "document", "document": docs["odp"], "pages": "1,3", "dpi": 30},
                                         {"type": "image", "image": docs["docx"], "dpi": 30},
                                         {"type": "text", "text": "Summarise."}]}]
    out = processor.apply_chat_template(msgs, tokenize=True, return_dict=True)
    assert len(out["image_grid_thw"]) == 5  # 2 selected slides + 3 pages
    # what generate.py and batch job lines ("pdf": ..., "pdf_pages": ...) build, the batch line checked as a job does
    from glm4v_ms.apps.pipeline import Glm4vPipeline

    job = Glm4vPipeline.messages("Summarise.", pdf=docs["ppt"], pdf_pages="2-3", pdf_dpi=30)
    assert len(processor.apply_chat_template(job, tokenize=True, return_dict=True)["image_grid_thw"]) == 2
    from glm4v_ms.apps.batch.validate import validate_line

    line = json.dumps({"prompt": "Summarise.", "pdf": docs["ppt"], "pdf_pages": "2-3", "pdf_dpi": 30}).encode()
    _, request, problem = validate_line(line, 0, {})
    assert problem is None, problem
    assert len(processor.apply_chat_template(request.messages, tokenize=True,
                                             return_dict=True)["image_grid_thw"]) == 2
    processor.media_options = MediaOptions(doc_cache_dir=clean.doc_cache_dir, max_images=4)
    with pytest.raises(TooManyImagesError, match="5 images.*cap of 4") as err:
        processor.apply_chat_template(msgs, tokenize=True, return_dict=True)
    assert docs["odp"] in str(err.value)
    with pytest.raises(TooManyImagesError, match="3 pages selected, over the cap of 2") as err:
        load_document(docs["pptx"], options=MediaOptions(doc_cache_dir=clean.doc_cache_dir, max_images=2))
    assert docs["pptx"] in str(err.value)


# ------------------------------------------------------------------------------------------------------- bad input
def _fake_encrypted_odt(path):
    manifest = textwrap.dedent("""\
        <?xml version="1.0" encoding="UTF-8"?>
        <manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">
         <manifest:file-entry manifest:full-path="/" manifest:media-type="application/vnd.oasis.opendocument.text"/>
         <manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml" manifest:size="900">
          <manifest:encryption-data
             manifest:checksum-type="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0#sha256-1k"
             manifest:checksum="AAAA">
           <manifest:algorithm manifest:algorithm-name="http://www.w3.org/2001/04/xmlenc#aes256-cbc"
             manifest:initialisation-vector="AAAAAAAAAAAAAAAAAAAAAA=="/>
           <manifest:key-derivation manifest:key-derivation-name="PBKDF2" manifest:key-size="32"
             manifest:iteration-count="1024" manifest:salt="AAAAAAAAAAAAAAAAAAAAAA=="/>
          </manifest:encryption-data>
         </manifest:file-entry>
        </manifest:manifest>""")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mimetype", "application/vnd.oasis.opendocument.text")
        z.writestr("content.xml", os.urandom(900))
        z.writestr("META-INF/manifest.xml", manifest)
    return str(path)


def test_stale_working_folders_are_removed(tmp_path, clean, monkeypatch):
    """A conversion whose Python process was killed leaves its working folder; the next conversion removes it once
    it is a day old, and leaves younger ones (they may belong to a conversion still running)."""
    cache = tmp_path / "cache"
    old, young = cache / ".convert-old", cache / ".convert-young"
    for d in (old, young):
        (d / "profile").mkdir(parents=True)
    day_ago = time.time() - office.STALE_AFTER_S - 60
    os.utime(old, (day_ago, day_ago))
    monkeypatch.setenv("PATH", _fake_soffice(tmp_path / "bin", "exit 1") + os.pathsep + "/usr/bin:/bin")
    doc = tmp_path / "x.odt"
    doc.write_bytes(_odt_bytes(tmp_path))
    with pytest.raises(ConversionError, match="exit status 1"):
        load_document(str(doc), options=clean)
    assert not old.exists() and young.exists()
    shutil.rmtree(young)  # for `clean`'s check


def test_corrupt_and_password_protected_are_refused_before_libreoffice(tmp_path, clean):
    garbage = tmp_path / "talk.pptx"
    garbage.write_bytes(os.urandom(3000))  # LibreOffice would render these bytes as a text document
    with pytest.raises(CorruptMediaError, match=r"not a valid PowerPoint \(\.pptx\)") as err:
        load_document(str(garbage), options=clean)
    assert str(garbage) in str(err.value)
    encrypted = _fake_encrypted_odt(tmp_path / "secret.odt")
    with pytest.raises(PasswordProtectedError, match="password-protected") as err:
        load_images(encrypted, clean)
    assert encrypted in str(err.value)
    # Office wraps an encrypted .pptx / .docx in an OLE2 file with an EncryptedPackage stream.
    ole = tmp_path / "locked.docx"
    ole.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504) + "EncryptedPackage".encode("utf-16-le"))
    with pytest.raises(PasswordProtectedError, match=str(ole)):
        load_document(str(ole), options=clean)
    assert not os.path.exists(clean.doc_cache_dir) or not os.listdir(clean.doc_cache_dir)


def test_corrupt_inside_and_encrypted_reach_libreoffice(soffice, tmp_path, clean):
    inner = tmp_path / "broken.pptx"  # passes the container sniff, but the XML inside is garbage
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("[Content_Types].xml", "<garbage")
        z.writestr("ppt/presentation.xml", "not xml at all")
    with pytest.raises(ConversionError, match="LibreOffice could not open it") as err:
        load_document(str(inner), options=clean)
    assert str(inner) in str(err.value)
    # LibreOffice's own answer to an encrypted document, bypassing our sniff
    encrypted = _fake_encrypted_odt(tmp_path / "secret.odt")
    with pytest.raises(ConversionError, match="damaged, password-protected"):
        office.convert_to_pdf(encrypted, "odt", encrypted, cache_dir=clean.doc_cache_dir)
    assert not os.listdir(clean.doc_cache_dir)


def test_timeout_kills_libreoffice(soffice, docs, clean):
    options = MediaOptions(doc_cache_dir=clean.doc_cache_dir, convert_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(ConversionError, match=r"within 0\.5 s and was stopped") as err:
        load_document(docs["odt"], options=options)
    assert time.monotonic() - t0 < 10
    assert docs["odt"] in str(err.value)


def _fake_soffice(folder, body: str) -> str:
    """An executable named soffice in ``folder`` running ``body`` (sh); returns the folder for PATH."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "soffice")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return str(folder)


def _outdir_of_args():
    # soffice ... --outdir OUT SOURCE: the fake writes OUT/document.pdf like the real one
    return 'while [ "$1" != "--outdir" ]; do shift; done; OUT="$2"; mkdir -p "$OUT"'


def _zero_page_pdf() -> bytes:
    """A well-formed PDF whose page tree is empty (pypdfium2 cannot save one: it writes no page tree at all)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _odt_bytes(tmp_path) -> bytes:
    path = tmp_path / "plain.odt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mimetype", "application/vnd.oasis.opendocument.text")
        z.writestr("content.xml", "<x/>")
    return path.read_bytes()


@pytest.mark.parametrize("case", ["crash", "exit", "zero_pages", "hang_with_child", "no_output"])
def test_fake_libreoffice_failures(case, tmp_path, clean, monkeypatch):
    bodies = {
        "crash": "kill -SEGV $$",
        "exit": 'echo "Error: no export filter found" >&2; exit 3',
        "zero_pages": _outdir_of_args() + f'; cp "{tmp_path / "zero.pdf"}" "$OUT/document.pdf"',
        "hang_with_child": f'"{sys.executable}" -c "import time; time.sleep(600)" "{tmp_path}/child" & '
                           f'"{sys.executable}" -c "import time; time.sleep(600)" "{tmp_path}/parent"',
        "no_output": "echo 'Error: source file could not be loaded'",
    }
    (tmp_path / "zero.pdf").write_bytes(_zero_page_pdf())
    monkeypatch.setenv("PATH", _fake_soffice(tmp_path / "bin", bodies[case]) + os.pathsep + "/usr/bin:/bin")
    doc = tmp_path / f"{case}.odt"
    doc.write_bytes(_odt_bytes(tmp_path))
    options = MediaOptions(doc_cache_dir=clean.doc_cache_dir, convert_timeout=1.0)
    expected = {"crash": (ConversionError, r"crashed while converting it \(SIGSEGV\)"),
                "exit": (ConversionError, r"exit status 3: Error: no export filter found"),
                "zero_pages": (EmptyMediaError, "converts to zero pages"),
                "hang_with_child": (ConversionError, r"within 1 s and was stopped"),
                "no_output": (ConversionError, "could not open it")}[case]
    with pytest.raises(expected[0], match=expected[1]) as err:
        load_document(str(doc), options=options)
    assert str(err.value).startswith(str(doc)) and "\n" not in str(err.value)
    assert not [n for n in os.listdir(clean.doc_cache_dir) if n.endswith(".pdf")], "a failed conversion was cached"
    # `clean` checks afterwards that no process naming tmp_path (the script, its child) survives


def test_missing_libreoffice_one_line_and_rest_keeps_working(tmp_path, clean, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    doc = tmp_path / "notes.odt"
    doc.write_bytes(_odt_bytes(tmp_path))
    with pytest.raises(MissingDependencyError, match="apt-get install --no-install-recommends "
                       "libreoffice-impress-nogui libreoffice-writer-nogui") as err:
        load_document(str(doc), options=clean)
    assert str(err.value).startswith(str(doc)) and "\n" not in str(err.value)
    with pytest.raises(MissingDependencyError, match="GLM4V_MS_SOFFICE"):
        load_document(str(doc), options=MediaOptions(doc_cache_dir=clean.doc_cache_dir, soffice="/nowhere/soffice"))
    # PDFs and images do not need LibreOffice
    pdf = tmp_path / "one.pdf"
    blank = pdfium.PdfDocument.new()
    blank.new_page(144, 72)
    blank.save(str(pdf))
    assert [p.size for p in load_images(str(pdf), clean, dpi=72)] == [(144, 72)]
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(_zero_page_pdf())
    with pytest.raises(CorruptMediaError, match="cannot open as a PDF"):  # leaves PDFium's last error set
        load_pdf(b"%PDF-1.4\nnot a pdf\n")
    with pytest.raises(EmptyMediaError, match="PDF has zero pages") as err:
        load_pdf(str(empty))
    assert str(empty) in str(err.value)


# --------------------------------------------------------------------------------------------------------- the CLI
def _cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLM4V_MS_")}  # no cache / soffice override
    env.update(GLOG_v="3", **(env_extra or {}))
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_slides_end_to_end(docs, tmp_path):
    from glm4v_ms.apps.tiny import make_tiny_model

    tiny = make_tiny_model(str(tmp_path / "tiny"))
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = _cli("--model_name", tiny, "--doc", docs["pptx"], "--doc_pages", "1-2", "--doc_dpi", "30", "--prompt",
             "Summarise the slides.", "--json", "--max_new_tokens", "3", "--greedy", "--mode", "eager", env_extra=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["new_tokens"] >= 1 and out["prompt_tokens"] > 10
    assert len(os.listdir(tmp_path / "xdg" / "glm4v_ms" / "docs")) == 1  # converted into the user cache
    r = _cli("--model_name", tiny, "--pdf", docs["pptx"], "--max_images", "2", "--prompt", "Hi", "--mode", "eager",
             env_extra=env)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("[WARNING]")]
    assert r.returncode == 1 and len(lines) == 1 and "cap of 2" in lines[0] and docs["pptx"] in lines[0], r.stderr
    fresh = tmp_path / "copy.odp"
    shutil.copyfile(docs["odp"], fresh)
    with open(fresh, "ab") as f:
        f.write(b"\0")  # new bytes: a cache miss, so LibreOffice is needed
    r = _cli("--model_name", tiny, "--doc", str(fresh), "--prompt", "Hi", "--mode", "eager",
             env_extra={**env, "PATH": str(tmp_path / "empty-bin") + os.pathsep + os.path.dirname(sys.executable)})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("[WARNING]")]
    assert r.returncode == 1 and len(lines) == 1 and "apt-get install" in lines[0], r.stderr
