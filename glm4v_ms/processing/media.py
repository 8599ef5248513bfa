"""Loading images, document pages (PDF, office) and videos from the sources a user can give, with clear errors.

Sources: file paths, ``file://`` and ``http(s)://`` URLs, ``data:`` URIs (base64 or percent-encoded), PIL images and
numpy arrays (HWC or HW; uint8, uint16, or float in [0, 1]). Remote fetches have a timeout and a size cap
(``MediaOptions``). Every error is a ``MediaError`` subclass whose message starts with the input (path, URL, or a short
description of an in-memory object) and ends with what to do about it.

PyAV (videos) and pypdfium2 (PDFs) are optional; a missing one raises ``MissingDependencyError`` with the pip command.
So is LibreOffice, which turns office documents into PDFs (``office``). The errors live in ``errors``, re-exported here.

Why this module is long: it is the one place where user-supplied sources are opened, so every guard (regular files
only, URL deadline / rate floor / size cap, pixel limit, page ranges) shares one ``MediaOptions``; the sections
(sources and fetching, images, PDF, video) are independent and short, and splitting them would make each import the
others' options and source helpers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
import os
import re
import http.client
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import (AspectRatioError, ConversionError, CorruptMediaError, EmptyMediaError,  # noqa: F401 (re-exported)
                     FetchError, ImageTooLargeError, MediaError, MediaNotFoundError, MissingDependencyError,
                     PageRangeError, PasswordProtectedError, TooManyImagesError, UnreadableMediaError,
                     UnsupportedSourceError)
from .office import convert_to_pdf, office_kind

AV_PIN = "av==18.1.0"
PYPDFIUM2_PIN = "pypdfium2==5.15.2"


@dataclass
class MediaOptions:
    """How sources are fetched and guarded.

    timeout: seconds for connecting to a URL and for each read from it (a server silent that long is given up).
    fetch_deadline: seconds for a whole URL download, headers included (a server that trickles a byte every few
        seconds never trips ``timeout``; this bounds it).
    min_fetch_rate: bytes per second a download must average once ``rate_grace`` seconds have passed; 0 turns the
        floor off.
    rate_grace: seconds before ``min_fetch_rate`` applies (connection set-up and slow starts are not penalised).
    max_fetch_bytes: a download larger than this is refused (checked on Content-Length and while reading).
    max_image_pixels: images (and rendered PDF pages) with more pixels raise ``ImageTooLargeError``; defaults to
        PIL's decompression-bomb threshold, so PIL's own warning becomes an error.
    pdf_dpi: resolution of rendered PDF pages (GLM-4.1V's document demos use about 180).
    max_images: images per prompt, document pages counted one each (GLM-V serves with 32); more raise
        ``TooManyImagesError`` (a document is refused before its pages are rendered). None: no cap.
    convert_timeout, soffice, doc_cache_dir: LibreOffice's time limit per office document, its executable and the
        cache folder of converted PDFs; None: the defaults ``office`` describes.
    """

    timeout: float = 10.0
    fetch_deadline: float = 300.0
    min_fetch_rate: float = 1024.0
    rate_grace: float = 10.0
    max_fetch_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    pdf_dpi: float = 180.0
    max_images: Optional[int] = 32
    convert_timeout: float = 120.0
    soffice: Optional[str] = None
    doc_cache_dir: Optional[str] = None

    def __post_init__(self):
        if self.max_images is not None and (isinstance(self.max_images, bool) or not isinstance(self.max_images, int)
                                            or self.max_images < 1):
            raise ValueError(f"MediaOptions.max_images must be a positive integer or None, got {self.max_images!r}")
        for name in ("timeout", "fetch_deadline", "pdf_dpi", "convert_timeout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"MediaOptions.{name} must be a positive number of "
                                 f"{'dots per inch' if name == 'pdf_dpi' else 'seconds'}, got {value!r}")
        for name in ("min_fetch_rate", "rate_grace"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"MediaOptions.{name} must be a number >= 0, got {value!r}")


# ---------------------------------------------------------------------------------------------------- source naming
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def describe(source) -> str:
    """A short name for error messages: the path or URL itself, or the type and shape of an in-memory object."""
    if isinstance(source, (str, os.PathLike)):
        s = os.fspath(source)
        return f"{s[:40]}... ({len(s)} chars)" if s.startswith("data:") and len(s) > 60 else s
    if isinstance(source, Image.Image):
        return f"PIL image {source.width}x{source.height} mode {source.mode}"
    if isinstance(source, np.ndarray):
        return f"numpy array shape {source.shape} dtype {source.dtype}"
    if isinstance(source, (bytes, bytearray)):
        return f"{len(source)} bytes"
    return f"object of type {type(source).__name__}"


def local_path(source: Union[str, os.PathLike]) -> Optional[str]:
    """The filesystem path for a plain path or ``file://`` URL; None for other URLs and data URIs."""
    s = os.fspath(source)
    m = _SCHEME.match(s)
    if m is None or (len(m.group(1)) == 1 and os.name == "nt"):  # "C:\..." is a Windows path, not a scheme
        return s
    scheme = m.group(1).lower()
    if scheme != "file":
        # "notes:v2.png" is a legal file name on POSIX; only treat it as a URL when no such file exists.
        return s if scheme not in ("http", "https", "data") and os.path.exists(s) else None
    parsed = urllib.parse.urlparse(s)
    if parsed.netloc not in ("", "localhost"):
        raise UnsupportedSourceError(s, f"file URL on host {parsed.netloc!r}", "only local file:// URLs are read")
    return urllib.request.url2pathname(parsed.path)


def read_bytes(source: Union[str, os.PathLike], options: MediaOptions) -> bytes:
    """All bytes of a path, ``file://`` / ``http(s)://`` URL, or ``data:`` URI."""
    s = os.fspath(source)
    path = local_path(s)
    if path is not None:
        check_file(path, s)
        with open(path, "rb") as f:
            return f.read()
    scheme = _SCHEME.match(s).group(1).lower()
    if scheme == "data":
        return _decode_data_uri(s)
    if scheme in ("http", "https"):
        return _fetch(s, options)
    raise UnsupportedSourceError(s, f"unsupported URL scheme '{scheme}:'",
                                 "use a local path, file://, http://, https:// or a data: URI")


def check_file(path: str, name: str) -> None:
    """Clear errors for a missing path, a directory, or a zero-byte file."""
    if not os.path.exists(path):
        raise MediaNotFoundError(name, "no such file", "check the path (relative paths are taken from "
                                 f"{os.getcwd()})")
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise UnreadableMediaError(name, "is a directory, not a file", "pass the path of an image, video or PDF")
    if not stat.S_ISREG(mode):  # never opened: a FIFO would block, /dev/zero or /dev/urandom never end
        raise UnreadableMediaError(name, f"is not a regular file (it is a {_file_kind(mode)})",
                                   "save the data to a file and pass its path")
    if os.path.getsize(path) == 0:
        raise EmptyMediaError(name, "file is empty (0 bytes)", "re-create or re-download the file")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def _decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not sep:
        raise UnreadableMediaError(describe(uri), "data: URI without a ',' before the payload",
                                   "use data:<mime>;base64,<data>")
    try:
        if header.lower().endswith(";base64"):
            data = base64.b64decode(payload.strip(), validate=False)
        else:
            data = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as e:
        raise UnreadableMediaError(describe(uri), f"invalid base64 payload ({e})", "re-encode the file") from None
    if not data:
        raise EmptyMediaError(describe(uri), "data: URI has an empty payload")
    return data


class _Watchdog:
    """Shuts the fetch's socket down when the deadline passes, wherever the fetch is blocked (connecting, reading
    headers, reading the body): the socket timeout alone bounds each read, not their sum."""

    def __init__(self, seconds: float):
        self.fired = False
        self._sockets: List[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def watch(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.fired:
                self._shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()


def _opener(watchdog: _Watchdog):
    """A urllib opener whose HTTP(S) connections register their socket with ``watchdog`` (proxies and redirects as
    in urllib's default opener)."""

    def watched(base):
        class Connection(base):
            def connect(self):
                super().connect()
                watchdog.watch(self.sock)
        return Connection

    http_conn, https_conn = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_conn, req)

    class SecureHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_conn, req, context=self._context)

    return urllib.request.build_opener(Handler, SecureHandler)


def _fetch(url: str, options: MediaOptions) -> bytes:
    """Download ``url`` within ``options.fetch_deadline`` seconds in total, at least ``options.min_fetch_rate``
    bytes/s on average after ``options.rate_grace`` seconds, at most ``options.max_fetch_bytes`` bytes."""
    cap, deadline = options.max_fetch_bytes, options.fetch_deadline
    request = urllib.request.Request(url, headers={"User-Agent": "glm4v_ms"})
    chunks: List[bytes] = []
    received = 0
    start = time.monotonic()
    too_slow = None
    with _Watchdog(deadline) as watchdog:
        try:
            with _opener(watchdog).open(request, timeout=min(options.timeout, deadline)) as response:
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > cap:
                    raise FetchError(url, f"download of {int(length)} bytes exceeds the {cap}-byte cap",
                                     "raise MediaOptions.max_fetch_bytes or fetch the file yourself")
                while received <= cap:  # one byte over the cap tells "too big" from "exactly the cap"
                    chunk = response.read1(min(1 << 16, cap + 1 - received))  # returns what one read got
                    if not chunk:
                        break
                    chunks.append(chunk)
                    received += len(chunk)
                    elapsed = time.monotonic() - start
                    if elapsed > options.rate_grace and received < options.min_fetch_rate * elapsed:
                        too_slow = elapsed
                        break
        except FetchError:
            raise
        except urllib.error.HTTPError as e:
            raise FetchError(url, f"HTTP error {e.code} {e.reason}", "check the URL") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if watchdog.fired:
                raise FetchError(url, f"download not finished within the {deadline:g} s deadline ({received} bytes "
                                 "received)", "raise --fetch_deadline (MediaOptions.fetch_deadline) or fetch the "
                                 "file yourself") from None
            reason = getattr(e, "reason", None) or e
            raise FetchError(url, f"could not fetch ({reason})",
                             f"check the URL and network; the timeout is {options.timeout} s") from None
    if too_slow is not None:
        raise FetchError(url, f"download too slow: {received} bytes in {too_slow:.1f} s, under the floor of "
                         f"{options.min_fetch_rate:g} bytes/s", "lower --min_fetch_rate "
                         "(MediaOptions.min_fetch_rate; 0 turns it off) or fetch the file yourself")
    if watchdog.fired:  # the deadline passed just as the last read returned: the data may be cut short
        raise FetchError(url, f"download not finished within the {deadline:g} s deadline ({received} bytes "
                         "received)", "raise --fetch_deadline (MediaOptions.fetch_deadline) or fetch the file "
                         "yourself")
    data = b"".join(chunks)
    if len(data) > cap:
        raise FetchError(url, f"download exceeds the {cap}-byte cap",
                         "raise MediaOptions.max_fetch_bytes or fetch the file yourself")
    if not data:
        raise EmptyMediaError(url, "the server returned 0 bytes")
    return data


# ----------------------------------------------------------------------------------------------------------- images
_PIL_LIMIT_LOCK = threading.Lock()


def source_data(source, options: MediaOptions) -> Union[str, bytes]:
    """A local path (left unread, so PIL / PyAV stream from disk) or the bytes of a URL, data: URI or bytes."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise EmptyMediaError(describe(source), "no bytes given")
        return bytes(source)
    path = local_path(source)
    if path is not None:
        check_file(path, describe(source))
        return path
    return read_bytes(source, options)


def is_pdf(data: Union[str, bytes]) -> bool:
    """Sniff the ``%PDF-`` magic of a path or bytes (file names are not trusted)."""
    if isinstance(data, bytes):
        return data[:5] == b"%PDF-"
    with open(data, "rb") as f:
        return f.read(5) == b"%PDF-"


def load_images(source, options: Optional[MediaOptions] = None, pages=None, dpi=None) -> List[Image.Image]:
    """One image, or every selected page when ``source`` is a PDF or an office document (sniffed by content)."""
    options = options or MediaOptions()
    if isinstance(source, (str, os.PathLike, bytes, bytearray)):
        data, name = source_data(source, options), describe(source)
        if is_pdf(data) or office_kind(data, name):
            return load_pdf(as_pdf(data, name, options), pages, dpi, options, name)
        return [load_image(data, options, name=name)]
    return [load_image(source, options)]


def load_image(source, options: Optional[MediaOptions] = None, name: Optional[str] = None) -> Image.Image:
    """Open ``source`` as a fully decoded PIL image with its EXIF orientation applied (mode unchanged).

    EXIF: transformers' ``load_image`` transposes files it opens but not PIL images passed in; we transpose both,
    so a photo taken sideways is always seen upright.
    """
    options = options or MediaOptions()
    name = name or describe(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        return array_to_image(source, name)
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        data = source_data(source, options)
        image = _open_image(data if isinstance(data, str) else io.BytesIO(data), name, options)
    else:
        raise UnsupportedSourceError(name, "is not an image source",
                                     "pass a path, URL, data: URI, PIL.Image or numpy array")
    _check_pixels(image.width, image.height, name, options)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptMediaError(name, f"image data is truncated or damaged ({e})",
                                "re-download or re-export the file") from None
    return ImageOps.exif_transpose(image)


def _open_image(fp, name: str, options: MediaOptions) -> Image.Image:
    raise_pil_limit = options.max_image_pixels > (Image.MAX_IMAGE_PIXELS or 0) and Image.MAX_IMAGE_PIXELS
    with _PIL_LIMIT_LOCK if raise_pil_limit else contextlib.nullcontext(), warnings.catch_warnings():
        # PIL warns above MAX_IMAGE_PIXELS and raises above twice that; our own check below decides instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        if raise_pil_limit:  # a user limit above PIL's: lift PIL's guard for this open only (under the lock)
            Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(fp)
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(name, f"refused by PIL's decompression-bomb guard ({e})",
                                     "raise MediaOptions.max_image_pixels if the image is trusted") from None
        except UnidentifiedImageError:
            raise UnreadableMediaError(name, "is not an image format PIL can read",
                                       "check that the file really is a PNG/JPEG/WebP/... image") from None
        finally:
            if raise_pil_limit:  # only the lifting path touches the global, so no other thread can race it
                Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(width: int, height: int, name: str, options: MediaOptions) -> None:
    if width * height > options.max_image_pixels:
        raise ImageTooLargeError(name, f"{width}x{height} = {width * height} pixels exceeds the limit of "
                                 f"{options.max_image_pixels} (possible decompression bomb)",
                                 "raise MediaOptions.max_image_pixels if the image is trusted")
    if width == 0 or height == 0:
        raise UnreadableMediaError(name, f"image has zero size {width}x{height}")


def array_to_image(array: np.ndarray, name: str) -> Image.Image:
    """An HWC / HW numpy image as PIL. uint8 as is; uint16 as 16-bit gray/colour; float must lie in [0, 1]."""
    a = np.asarray(array)
    if a.size == 0:
        raise UnreadableMediaError(name, "array is empty")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]  # [H, W, 1] -> [H, W]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        hint = "channels-first arrays must be transposed to HWC" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else \
            "pass [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]"
        raise UnreadableMediaError(name, "array is not an image in HWC layout", hint)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or a.min() < 0.0 or a.max() > 1.0:
            raise UnreadableMediaError(name, f"float image values must lie in [0, 1], got [{np.nanmin(a)}, "
                                       f"{np.nanmax(a)}]", "divide 0-255 data by 255 or pass uint8")
        a = np.round(a.astype(np.float64) * 255.0).astype(np.uint8)  # round, not truncate: u/255*255 -> u
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)  # 16-bit -> top 8 bits, like a 16-bit PNG shown on an 8-bit screen
    elif a.dtype != np.uint8:
        raise UnreadableMediaError(name, f"unsupported dtype {a.dtype}", "pass uint8, uint16 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(a))


# -------------------------------------------------------------------------------------------------------------- PDF
def excerpt(value, limit: int = 40) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for error messages that quote user input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def page_ranges(pages, name: str):
    """1-based page selection (int, iterable of ints, or "1-3,5") -> list of (first, last) ranges, parsed without
    expanding them (a range like 1-99999999999 costs nothing). Raises ``PageRangeError`` for bad syntax."""
    def bad(detail: str = ""):
        return PageRangeError(name, f"cannot parse page range {excerpt(pages)}{detail}", "use e.g. '1-3,5' (1-based)")

    if isinstance(pages, bool):
        raise bad()
    if isinstance(pages, int):
        return [(pages, pages)]
    if isinstance(pages, str):
        ranges = []
        for part in pages.replace(" ", "").split(","):
            lo, dash, hi = part.partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()) or not lo.isascii() or not hi.isascii():
                raise bad()
            if len(lo) > 18 or len(hi) > 18:  # no PDF has that many pages; also keeps int() cheap
                raise PageRangeError(name, f"page number in {excerpt(part)} is far beyond any document",
                                     "page numbers start at 1")
            first, last = int(lo), int(hi or lo)
            if last < first:
                raise PageRangeError(name, f"page range {excerpt(part)} runs backwards", "write e.g. '3-5', not '5-3'")
            ranges.append((first, last))
        return ranges
    try:
        return [(int(p), int(p)) for p in pages]
    except (TypeError, ValueError):
        raise bad(" (expected page numbers)") from None


def parse_pages(pages, num_pages: int, name: str) -> List[int]:
    """1-based page numbers (int, iterable, or "1-3,5") -> 0-based indices; None means every page. Every range is
    checked against ``num_pages`` before any list is built, so only valid selections are expanded."""
    if pages is None:
        return list(range(num_pages))
    ranges = page_ranges(pages, name)
    outside = [(a, b) for a, b in ranges if a < 1 or b > num_pages]
    if outside or not ranges:
        shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in outside[:3])
        more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        raise PageRangeError(name, f"pages {shown + more if outside else excerpt(pages)} are outside the document's "
                             f"1..{num_pages}", "page numbers start at 1")
    return [p - 1 for a, b in ranges for p in range(a, b + 1)]


def check_dpi(dpi, name: str = "pdf dpi") -> float:
    """A PDF render resolution must be a finite positive number (0 is an error, not "the default")."""
    try:
        value = float(dpi)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of dots per inch (e.g. 180), got {excerpt(dpi)}")
    return value


def load_document(source, pages=None, dpi: Optional[float] = None, options: Optional[MediaOptions] = None,
                  name: Optional[str] = None) -> List[Image.Image]:
    """Pages of a PDF or office document (.ppt .pptx .doc .docx .odp .odt: converted by LibreOffice and cached, see
    ``office``) from a path, file:// / http(s):// URL, data: URI or bytes, as RGB images at ``dpi`` (default
    ``options.pdf_dpi`` = 180); ``pages`` are 1-based ("1-3,5")."""
    options = options or MediaOptions()
    name = name or describe(source)
    return load_pdf(as_pdf(source_data(source, options), name, options), pages, dpi, options, name)


def as_pdf(data: Union[str, bytes], name: str, options: MediaOptions) -> Union[str, bytes]:
    """``data`` (a path or bytes, from ``source_data``) itself, or for an office document the path of its PDF."""
    kind = None if is_pdf(data) else office_kind(data, name)
    if kind is None:
        return data
    _pdfium(name)  # before a conversion that could not be read afterwards
    return convert_to_pdf(data, kind, name, soffice=options.soffice, timeout=options.convert_timeout,
                          cache_dir=options.doc_cache_dir,
                          check=lambda path: _check_converted(path, name))


def _check_converted(path: str, name: str) -> None:
    with PDFIUM_LOCK:
        _open_pdf(path, name, converted=True).close()


# PDFium is not thread-safe, even across documents (pypdfium2's documentation: serialise every call). The server
# prepares requests in worker threads, so every use of it (open, count, render, close) holds this lock.
PDFIUM_LOCK = threading.RLock()


def _pdfium(name: str):
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise MissingDependencyError(f"{name}: reading PDF documents needs pypdfium2; install it with "
                                     f"`pip install {PYPDFIUM2_PIN}`") from None
    return pdfium


def _open_pdf(data: Union[str, bytes], name: str, converted: bool = False):
    """An open pypdfium2 document with at least one page (the caller closes it)."""
    pdfium = _pdfium(name)
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        if not _empty_page_tree(data):
            what = "LibreOffice's PDF of it cannot be opened" if converted else "cannot open as a PDF"
            raise CorruptMediaError(name, f"{what} ({e})", "check that the file is a valid PDF or office "
                                    "document") from None
        document = None
    if document is None or len(document) == 0:
        if document is not None:
            document.close()
        raise EmptyMediaError(name, f"{'converts to' if converted else 'PDF has'} zero pages",
                              "check that the document has content")
    return document


_EMPTY_PAGES = re.compile(rb"/Type\s*/Pages\b(?:(?!>>).){0,200}?/Count\s+0\b|/Count\s+0\b(?:(?!>>).){0,200}?"
                          rb"/Type\s*/Pages\b", re.S)


def _empty_page_tree(data: Union[str, bytes]) -> bool:
    """PDFium refuses a PDF whose page tree is empty without an error code of its own (its last-error value is then
    stale: 0 in a fresh process, an earlier failure's code later; pypdfium2 5.15.2), so that case is recognised from
    the bytes: a ``/Pages`` dictionary with ``/Count 0`` (written uncompressed, as LibreOffice and pypdfium2 do)."""
    if isinstance(data, str):
        with open(data, "rb") as f:
            data = f.read()
    return _EMPTY_PAGES.search(data) is not None


def load_pdf(source, pages=None, dpi: Optional[float] = None, options: Optional[MediaOptions] = None,
             name: Optional[str] = None) -> List[Image.Image]:
    """Render PDF pages to RGB images at ``dpi`` (default ``options.pdf_dpi`` = 180); ``pages`` are 1-based."""
    options = options or MediaOptions()
    name = name or describe(source)
    dpi = options.pdf_dpi if dpi is None else check_dpi(dpi)
    data = source_data(source, options)  # a download happens outside the lock
    with PDFIUM_LOCK:
        return _render_pages(_open_pdf(data, name), pages, dpi, options, name)


def _render_pages(document, pages, dpi: float, options: MediaOptions, name: str) -> List[Image.Image]:
    """The selected pages of an open document as RGB images (closes it); the caller holds PDFIUM_LOCK."""
    try:
        images = []
        scale = dpi / 72.0  # PDF user space is 72 units per inch
        indices = parse_pages(pages, len(document), name)
        if options.max_images is not None and len(indices) > options.max_images:
            raise TooManyImagesError(name, f"{len(indices)} pages selected, over the cap of {options.max_images} "
                                     "images per prompt", "select pages (e.g. pages \"1-8\", generate.py --pdf_pages) "
                                     "or raise MediaOptions.max_images (generate.py --max_images)")
        for index in indices:
            page = document[index]
            width_pt, height_pt = page.get_size()
            _check_pixels(round(width_pt * scale), round(height_pt * scale), f"{name} page {index + 1}", options)
            images.append(page.render(scale=scale).to_pil().convert("RGB"))
        return images
    finally:
        document.close()


def check_pdf_pages(source, pages=None, dpi: Optional[float] = None, options: Optional[MediaOptions] = None,
                    name: Optional[str] = None) -> int:
    """Check, without rendering, what ``load_pdf`` would refuse: the page ranges against the page count and each
    selected page's pixels at ``dpi``. Returns how many pages are selected (for the per-prompt image cap)."""
    options = options or MediaOptions()
    name = name or describe(source)
    dpi = options.pdf_dpi if dpi is None else check_dpi(dpi)
    data = source_data(source, options)
    with PDFIUM_LOCK:
        document = _open_pdf(data, name)
        try:
            indices = parse_pages(pages, len(document), name)
            scale = dpi / 72.0  # PDF user space is 72 units per inch
            for index in sorted(set(indices)):
                width_pt, height_pt = document[index].get_size()
                _check_pixels(round(width_pt * scale), round(height_pt * scale), f"{name} page {index + 1}", options)
            return len(indices)
        finally:
            document.close()


def probe_video(source, options: Optional[MediaOptions] = None, name: Optional[str] = None) -> None:
    """Open a video (path or bytes) and check it has a video stream with a frame rate, decoding nothing: the
    same errors as ``decode_video`` for files that are not videos."""
    with _open_video(source, options or MediaOptions(), name or describe(source)):
        pass


@contextlib.contextmanager
def _open_video(source, options: MediaOptions, name: str):
    """(container, its first video stream, frame rate), open for the ``with`` block; errors name the file."""
    try:
        import av
    except ImportError:
        raise MissingDependencyError(f"{name}: decoding video needs PyAV; install it with "
                                     f"`pip install {AV_PIN}`") from None
    data = source_data(source, options)
    try:
        container = av.open(data if isinstance(data, str) else io.BytesIO(data))
    except (av.error.FFmpegError, OSError) as e:
        raise UnreadableMediaError(name, f"cannot open as a video ({e})",
                                   "check that the file is a video format FFmpeg can read") from None
    with container:
        if not container.streams.video:
            raise UnreadableMediaError(name, "has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise CorruptMediaError(name, "video stream has no frame rate", "re-encode the file (e.g. with ffmpeg)")
        yield container, stream, rate


# ------------------------------------------------------------------------------------------------------------ video
@dataclass
class DecodedVideo:
    """Frames decoded from a file: ``frames[k]`` is source frame ``frame_indices[k]`` as [H, W, 3] uint8 RGB."""

    frames: List[np.ndarray]
    frame_indices: List[int]
    fps: float
    total_num_frames: int
    source: str


def decode_video(source, select: Callable[[int, float], Sequence[int]],
                 options: Optional[MediaOptions] = None) -> DecodedVideo:
    """Decode only the frames ``select(total_frames, fps)`` asks for, with PyAV.

    Like transformers' PyAV reader: total frames from the stream header, fps = average_rate, duration = total / fps.
    When the container does not record a frame count, every frame is decoded once to count them.
    """
    options = options or MediaOptions()
    name = describe(source)
    with _open_video(source, options, name) as (container, stream, rate):
        import av  # imported by _open_video already (it raises the clear error when PyAV is missing)

        fps = float(rate)
        total = int(stream.frames or 0)
        try:
            if total <= 0:  # no frame count in the header: decode everything, then select
                every = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
                total = len(every)
                if total == 0:
                    raise CorruptMediaError(name, "video stream has no decodable frames")
                wanted = [min(int(i), total - 1) for i in select(total, fps)]
                return DecodedVideo([every[i] for i in wanted], wanted, fps, total, name)
            wanted = [int(i) for i in select(total, fps)]
            wanted_set, last_wanted = set(wanted), max(wanted)
            got = {}
            for i, frame in enumerate(container.decode(stream)):
                if i > last_wanted:
                    break
                if i in wanted_set:
                    got[i] = frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise CorruptMediaError(name, f"video data is damaged ({e})", "re-encode the file") from None
    if not got:
        raise CorruptMediaError(name, "no frames could be decoded")
    # Headers can overstate the frame count; a missing index takes the last frame that did decode.
    decoded = sorted(got)
    frames = [got[i] if i in got else got[decoded[-1]] for i in wanted]
    return DecodedVideo(frames, wanted, fps, total, name)
