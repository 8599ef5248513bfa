"""Office documents (.ppt .pptx .doc .docx .odp .odt) -> PDF, by LibreOffice headless, cached by content hash.

The rest of the document path is the PDF one (``media.load_pdf``: pypdfium2, page ranges, dpi), as in GLM-V's own
demo. Flow of ``convert_to_pdf``:

1. The kind is sniffed from the content (``office_kind``), never trusted from the name: OOXML and OpenDocument are
   ZIP containers (``[Content_Types].xml`` + ``ppt/`` or ``word/``; a ``mimetype`` entry), .ppt / .doc are OLE2
   compound files (a ``PowerPoint Document`` / ``WordDocument`` stream). A name with an office extension whose
   content is none of these is refused before LibreOffice sees it: LibreOffice would import random bytes as a text
   document and render them. Encrypted documents (an OOXML package inside OLE2, an ODF manifest with
   ``encryption-data``) are refused as password-protected.
2. The PDF is looked up in the cache (``<cache>/<sha256 of the bytes>.pdf``; the folder is ``cache_dir``, else
   ``$GLM4V_MS_DOC_CACHE``, else ``$XDG_CACHE_HOME/glm4v_ms/docs``, else ``~/.cache/glm4v_ms/docs``). A hit needs no
   LibreOffice at all.
3. On a miss, ``soffice --headless --convert-to pdf`` runs in a new process group, in a private working folder inside
   the cache folder holding the input copy, the output, a fresh user profile (``-env:UserInstallation``, so it never
   meets a user's running LibreOffice) and ``TMPDIR``. At the time limit, or when the call is interrupted, the whole
   group is killed; the group is killed after a normal exit too, so no ``soffice.bin`` outlives the call. The folder
   is removed in every case, and so is the IPC socket a killed LibreOffice leaves in /tmp.
4. The PDF is checked (``check(path)``, e.g. zero pages) and then renamed into the cache: readers see a whole file or
   none, and a failed conversion caches nothing.

The executable: ``soffice`` argument, else ``$GLM4V_MS_SOFFICE``, else ``soffice`` / ``libreoffice`` on ``PATH``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import zipfile
from typing import Callable, Optional, Union

from .errors import ConversionError, CorruptMediaError, MissingDependencyError, PasswordProtectedError

OFFICE_EXTENSIONS = ("ppt", "pptx", "doc", "docx", "odp", "odt")
INSTALL_HINT = ("install it with `apt-get install --no-install-recommends libreoffice-impress-nogui "
                "libreoffice-writer-nogui` (Debian/Ubuntu), or set GLM4V_MS_SOFFICE to the soffice executable")

_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_MAGIC = b"PK\x03\x04"
_KIND_NAMES = {"ppt": "PowerPoint 97-2003", "pptx": "PowerPoint", "doc": "Word 97-2003", "docx": "Word",
               "odp": "OpenDocument presentation", "odt": "OpenDocument text"}


def _utf16(name: str) -> bytes:
    return name.encode("utf-16-le")  # OLE2 directory entries store stream names as UTF-16LE


def name_extension(name: str) -> str:
    """The lower-case extension of a path or URL (query and fragment ignored), without the dot."""
    path = urllib.parse.urlsplit(name).path if "://" in name else name
    return os.path.splitext(path)[1].lower().lstrip(".")


def office_kind(data: Union[str, bytes], name: str) -> Optional[str]:
    """The office format of a path or bytes ("pptx", "doc", ...), or None when it is not an office document.

    Raises ``PasswordProtectedError`` for an encrypted document, and ``CorruptMediaError`` when ``name`` has an office
    extension but the content is not that kind of container.
    """
    if isinstance(data, bytes):
        head = data[:8]
    else:
        with open(data, "rb") as f:
            head = f.read(8)
    kind = None
    if head.startswith(_ZIP_MAGIC):
        kind = _zip_kind(data if isinstance(data, str) else io.BytesIO(data), name)
    elif head == _OLE2_MAGIC:
        kind = _ole2_kind(data if isinstance(data, bytes) else pathlib.Path(data).read_bytes(), name)
    ext = name_extension(name)
    if kind is None and ext in OFFICE_EXTENSIONS:
        raise CorruptMediaError(name, f"is not a valid {_KIND_NAMES[ext]} (.{ext}) file: its content is not that "
                                "kind of document container", "re-save it from the office program, or export it "
                                "to PDF")
    return kind


def _zip_kind(fp, name: str) -> Optional[str]:
    try:
        with zipfile.ZipFile(fp) as z:
            names = set(z.namelist())
            if "mimetype" in names:  # OpenDocument
                mime = z.read("mimetype")[:100].decode("ascii", "replace").strip()
                kind = {"application/vnd.oasis.opendocument.presentation": "odp",
                        "application/vnd.oasis.opendocument.text": "odt"}.get(mime.replace("-template", ""))
                manifest = "META-INF/manifest.xml"
                if kind and manifest in names and b"encryption-data" in z.read(manifest)[:1 << 20]:
                    raise PasswordProtectedError(name, "is password-protected (encrypted OpenDocument)",
                                                 "save an unprotected copy, or export it to PDF")
                return kind
            if "[Content_Types].xml" in names:  # Office Open XML
                if "ppt/presentation.xml" in names:
                    return "pptx"
                if "word/document.xml" in names:
                    return "docx"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, KeyError):
        return None  # a damaged ZIP is "not recognised"; with an office name that becomes CorruptMediaError
    return None


def _ole2_kind(data: bytes, name: str) -> Optional[str]:
    if _utf16("EncryptedPackage") in data or _utf16("EncryptionInfo") in data:
        raise PasswordProtectedError(name, "is password-protected (encrypted Office document)",
                                     "save an unprotected copy, or export it to PDF")
    if _utf16("PowerPoint Document") in data:
        return "ppt"
    if _utf16("WordDocument") in data:
        return "doc"
    return None


def cache_folder(cache_dir: Optional[str] = None) -> str:
    """Where converted PDFs are kept (see the module docstring for the order of choices)."""
    if cache_dir:
        return os.fspath(cache_dir)
    if os.environ.get("GLM4V_MS_DOC_CACHE"):
        return os.environ["GLM4V_MS_DOC_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "glm4v_ms", "docs")


def find_soffice(soffice: Optional[str], name: str) -> str:
    """The LibreOffice executable, or ``MissingDependencyError`` saying how to install it."""
    wanted = soffice or os.environ.get("GLM4V_MS_SOFFICE")
    if wanted:
        found = shutil.which(wanted)
        if found is None:
            raise MissingDependencyError(f"{name}: the LibreOffice executable {wanted!r} (from "
                                         f"{'the soffice option' if soffice else 'GLM4V_MS_SOFFICE'}) is not found "
                                         f"or not executable; fix the setting, or {INSTALL_HINT}")
        return found
    found = shutil.which("soffice") or shutil.which("libreoffice")
    if found is None:
        raise MissingDependencyError(f"{name}: office documents are converted to pages by LibreOffice, which is not "
                                     f"installed (no soffice on PATH); {INSTALL_HINT}")
    return found


def content_hash(data: Union[str, bytes]) -> str:
    h = hashlib.sha256()
    if isinstance(data, bytes):
        h.update(data)
    else:
        with open(data, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def convert_to_pdf(data: Union[str, bytes], kind: str, name: str, *, soffice: Optional[str] = None,
                   timeout: float = 120.0, cache_dir: Optional[str] = None,
                   check: Optional[Callable[[str], None]] = None) -> str:
    """The path of the cached PDF of an office document (a path or its bytes), converting it on a cache miss.

    ``check(pdf_path)`` runs on a fresh conversion before it is cached and may raise (e.g. zero pages).
    """
    folder = cache_folder(cache_dir)
    target = os.path.join(folder, content_hash(data) + ".pdf")
    if os.path.isfile(target):
        return target
    exe = find_soffice(soffice, name)
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale(folder)
        work = tempfile.mkdtemp(prefix=".convert-", dir=folder)  # same file system as target: rename is atomic
    except OSError as e:
        raise ConversionError(name, f"cannot use the document cache folder {folder} ({e.strerror or e})",
                              "set GLM4V_MS_DOC_CACHE to a writable folder") from None
    try:
        source = os.path.join(work, f"document.{kind}")  # a plain name with the sniffed extension: the filter hint
        if isinstance(data, bytes):
            with open(source, "wb") as f:
                f.write(data)
        else:
            shutil.copyfile(data, source)  # LibreOffice's lock files then land in our folder, not beside the input
        out_dir, profile, tmp = (os.path.join(work, d) for d in ("out", "profile", "tmp"))
        os.mkdir(tmp)
        cmd = [exe, f"-env:UserInstallation={pathlib.Path(profile).as_uri()}", "--headless", "--invisible",
               "--nologo", "--norestore", "--nolockcheck", "--nodefault", "--convert-to", "pdf", "--outdir", out_dir,
               source]
        try:
            log = _run(cmd, timeout, dict(os.environ, TMPDIR=tmp, TMP=tmp, TEMP=tmp), work, name)
        finally:
            _remove_ipc_pipe(profile)
        produced = os.path.join(out_dir, "document.pdf")
        if not os.path.isfile(produced) or os.path.getsize(produced) == 0:
            detail = _last_line(log)
            if "could not be loaded" in detail:
                raise ConversionError(name, "LibreOffice could not open it: the file is damaged, password-protected "
                                      "or not a real document", "open it in an office program to check, or "
                                      "export it to PDF yourself")
            raise ConversionError(name, "LibreOffice produced no PDF" + (f" ({detail})" if detail else ""),
                                  "open it in an office program to check, or export it to PDF yourself")
        if check is not None:
            check(produced)
        os.replace(produced, target)
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


STALE_AFTER_S = 24 * 3600


def _remove_stale(folder: str) -> None:
    """Working folders of conversions whose Python process was killed (its ``finally`` never ran): a day old is
    far past any time limit, so no live conversion owns them."""
    now = time.time()
    for entry in os.scandir(folder):
        if entry.name.startswith(".convert-") and entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(OSError):
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S:
                    shutil.rmtree(entry.path, ignore_errors=True)


def _remove_ipc_pipe(profile: str) -> None:
    """Remove the socket a killed LibreOffice leaves in /tmp (it ignores TMPDIR for it, and removes it only on a
    normal exit): ``OSL_PIPE_<uid>_SingleOfficeIPC_<md5>``, the MD5 of the profile URL in UTF-16, each byte in hex
    without leading zero (LibreOffice 7.4's desktop/source/app/officeipcthread.cxx; checked on a live instance)."""
    if not hasattr(os, "getuid"):
        return
    digest = hashlib.md5(pathlib.Path(profile).as_uri().encode("utf-16-le"), usedforsecurity=False).digest()
    pipe = f"OSL_PIPE_{os.getuid()}_SingleOfficeIPC_" + "".join(format(b, "x") for b in digest)
    for folder in ("/tmp", "/var/tmp"):
        try:
            os.unlink(os.path.join(folder, pipe))
        except OSError:
            pass  # not there: LibreOffice exited normally, or never got that far


def _run(cmd, timeout: float, env, work: str, name: str) -> str:
    """Run ``cmd`` in its own process group; kill the group at the time limit, on interruption, and after exit."""
    log_path = os.path.join(work, "soffice.log")
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=work, start_new_session=True)
        except OSError as e:
            raise ConversionError(name, f"cannot start LibreOffice {cmd[0]} ({e.strerror or e})",
                                  INSTALL_HINT.replace("install it", "reinstall it", 1)) from None
        timed_out = False
        try:
            timed_out = not _wait_unreaped(proc, timeout)
        finally:
            _kill_group(proc.pid)  # children (oosplash -> soffice.bin) included; the leader is not reaped yet
            proc.wait()
    with open(log_path, "rb") as f:
        text = f.read()[-4000:].decode("utf-8", "replace")
    if timed_out:
        raise ConversionError(name, f"LibreOffice did not finish converting it within {timeout:g} s and was stopped",
                              "raise the time limit (MediaOptions.convert_timeout, generate.py --doc_timeout), or "
                              "export it to PDF yourself")
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else \
            str(-proc.returncode)
        raise ConversionError(name, f"LibreOffice crashed while converting it ({sig})",
                              "the document may be damaged; open it in an office program to check, or export it "
                              "to PDF yourself")
    if proc.returncode > 0:
        detail = _last_line(text)
        raise ConversionError(name, f"LibreOffice failed to convert it (exit status {proc.returncode}"
                              + (f": {detail})" if detail else ")"),
                              "open it in an office program to check, or export it to PDF yourself")
    return text


def _wait_unreaped(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for ``proc`` to exit without reaping it (so its process-group id cannot be reused before we kill the
    group); False at the time limit."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if hasattr(os, "waitid"):
            try:
                info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped by someone else (a SIGCHLD handler): it has exited
                return True
            if info is not None and info.si_pid:
                return True
        elif proc.poll() is not None:  # no waitid (not Linux/BSD): reaped already; the group kill is best-effort
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.1)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "javaldx" not in ln]
    return lines[-1][:200] if lines else ""
