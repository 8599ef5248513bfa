"""The errors a media input can raise: one class per kind of problem, all ``MediaError`` (a ``ValueError``) except
``MissingDependencyError`` (an ``ImportError``: an optional package or program is not installed).

Every message starts with the input (path, URL, or a short description of an in-memory object) and ends with what to
do about it. ``media`` re-exports them all; ``office`` raises them without importing ``media``.
"""

from __future__ import annotations


class MediaError(ValueError):
    """A media input could not be used. ``source`` names the input; the message says what to do."""

    def __init__(self, source: str, problem: str, hint: str = ""):
        self.source = source
        super().__init__(f"{source}: {problem}" + (f". {hint}" if hint else ""))


class MediaNotFoundError(MediaError):
    """The path does not exist."""


class EmptyMediaError(MediaError):
    """The file or download has zero bytes."""


class UnreadableMediaError(MediaError):
    """The bytes are not a format we can decode (e.g. a text file named .png), or the array has a bad shape/dtype."""


class CorruptMediaError(MediaError):
    """The format is recognised but the data is damaged (e.g. a truncated JPEG)."""


class ImageTooLargeError(MediaError):
    """More pixels than the configured limit (PIL's decompression-bomb guard, made an error)."""


class AspectRatioError(MediaError):
    """Longer side over 200 times the shorter side: the vision tower cannot take it."""


class UnsupportedSourceError(MediaError):
    """A URL scheme or Python type we do not load from."""


class FetchError(MediaError):
    """A URL could not be downloaded: unreachable, HTTP error, timeout, or over the size cap."""


class PageRangeError(MediaError):
    """Requested PDF pages outside the document."""


class PasswordProtectedError(MediaError):
    """An office document that needs a password to open."""


class ConversionError(MediaError):
    """LibreOffice could not turn an office document into a PDF: it failed, crashed, or ran over its time limit."""


class TooManyImagesError(MediaError):
    """More images (document pages count one each) in one prompt than the configured cap."""


class MissingDependencyError(ImportError):
    """An optional package (PyAV, pypdfium2) or program (LibreOffice) is needed for this input."""
