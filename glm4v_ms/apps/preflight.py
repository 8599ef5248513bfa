"""What is checked before a model loads: where the model comes from (a folder, ``tiny-random``, a hub id) and
whether its folder is complete, and the media of a request (decoded, opened, page ranges and sizes checked, URLs
fetched once), so that a typo costs seconds, not a 9B load. Used by generate.py, batch jobs and the server."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..processing.media import MediaOptions

TINY_RANDOM = "tiny-random"
TINY_RANDOM_46V = "tiny-random-4.6v"  # the same with GLM-4.6V-Flash's files (token ids, tools template, configs)
TINY_RANDOM_45V = "tiny-random-4.5v"  # a tiny GLM-4.5V: the mixture-of-experts decoder (glm4v_moe), 4.5V's ids
_TINY = {TINY_RANDOM: "4.1v", TINY_RANDOM_46V: "4.6v", TINY_RANDOM_45V: "4.5v"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    pass


def tiny_model_dir(name: str = TINY_RANDOM) -> str:
    """Where tiny-random is cached; the name carries a hash of its builders, so a changed builder rebuilds it."""
    import hashlib

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha1()
    for path in (os.path.join("apps", "tiny.py"), os.path.join("processing", "tiny_tokenizer.py")):
        with open(os.path.join(pkg, path), "rb") as f:
            h.update(f.read())
    return os.path.join(os.path.expanduser("~"), ".cache", "glm4v_ms", f"{name}-{h.hexdigest()[:10]}")


def resolve_model(name: str) -> str:
    """A local folder as is; ``tiny-random`` built on first use; a hub id (``org/name``) downloaded with
    huggingface_hub (a clear error when offline)."""
    if name in _TINY:
        folder = tiny_model_dir(name)
        if not os.path.exists(os.path.join(folder, "model.safetensors")):
            from .tiny import make_tiny_model

            make_tiny_model(folder, overwrite=True, variant=_TINY[name])
        return folder
    if os.path.isdir(name):
        return name
    if _HUB_ID.match(name) and not os.path.exists(name):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
        except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
            raise ModelNotFoundError(
                f"model '{name}' is not a local folder and could not be downloaded from the Hugging Face hub "
                f"({type(e).__name__}: {str(e).splitlines()[0].split('. ')[0][:160]}); download it elsewhere and pass "
                "its folder"
            ) from None
    raise ModelNotFoundError(f"model folder not found: {name} (pass a GLM-V folder, a hub id like "
                             "zai-org/GLM-4.1V-9B-Thinking, or tiny-random / tiny-random-4.6v / tiny-random-4.5v)")


class ModelFolderError(ValueError):
    """A model folder's config, tokenizer, chat template or processor files are missing or broken."""


# Files a folder may carry; each one present must be valid JSON.
_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
               "video_preprocessor_config.json", "chat_template.json", "generation_config.json",
               "special_tokens_map.json")


def model_folder_problems(folder: str) -> List[str]:
    """What a folder lacks for ``generate.py``, one message per problem, each naming its file; [] when complete.

    Checked without loading weights or the tokenizer: config.json (present, valid JSON, a GLM-4.1V config), every
    JSON file present parses, the tokenizer (tokenizer.json, and tokenizer_config.json that names the tokenizer
    class), a chat template (tokenizer_config.json's ``chat_template``, chat_template.jinja or chat_template.json),
    preprocessor_config.json's fields when present (absent: transformers' defaults are used, as transformers does)."""
    from ..model.config import Glm4vConfig
    from ..processing.image_processing import ImageProcessorConfig

    problems: List[str] = []
    parsed: Dict[str, object] = {}
    for name in _JSON_FILES:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path, "r", encoding="utf-8") as f:
                parsed[name] = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problems.append(f"{path}: not readable as JSON ({str(e).splitlines()[0][:120]}); re-download the file")
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        problems.insert(0, f"{config_path}: missing (a GLM-4.1V model folder needs config.json)")
    elif "config.json" in parsed:
        try:
            Glm4vConfig.from_dict(parsed["config.json"])
        except (ValueError, TypeError, KeyError) as e:
            problems.insert(0, f"{config_path}: {str(e).splitlines()[0]}")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not os.path.exists(os.path.join(folder, name)):
            problems.append(f"{os.path.join(folder, name)}: missing (the tokenizer); copy the tokenizer files of "
                            "the original checkpoint into the folder")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        if name in parsed and not isinstance(parsed[name], dict):
            problems.append(f"{os.path.join(folder, name)}: expected a JSON object, got "
                            f"{type(parsed[name]).__name__}; re-download the file")
    tok_cfg = parsed.get("tokenizer_config.json")
    has_template = (isinstance(tok_cfg, dict) and tok_cfg.get("chat_template")) or \
        os.path.isfile(os.path.join(folder, "chat_template.jinja")) or \
        (isinstance(parsed.get("chat_template.json"), dict) and parsed["chat_template.json"].get("chat_template"))
    if not has_template and "tokenizer_config.json" in parsed:
        problems.append(f"{folder}: no chat template (none in tokenizer_config.json, no chat_template.jinja or "
                        "chat_template.json); copy it from the original checkpoint")
    pre = parsed.get("preprocessor_config.json")
    if isinstance(pre, dict):
        path = os.path.join(folder, "preprocessor_config.json")
        try:
            ImageProcessorConfig.from_dict(pre, path)
        except (ValueError, TypeError, KeyError) as e:
            msg = str(e).splitlines()[0]
            problems.append(msg if path in msg else f"{path}: {msg}")
    return problems


def check_model_folder(folder: str) -> None:
    """Raise ``ModelFolderError`` with the first of ``model_folder_problems`` (see there)."""
    problems = model_folder_problems(folder)
    if problems:
        extra = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ModelFolderError(problems[0] + extra)


def load_processor(folder: str, media_options: Optional[MediaOptions] = None):
    """The folder's processor (tokenizer, chat template, preprocessing), after ``check_model_folder``; a tokenizer
    that still fails to load becomes one ``ModelFolderError`` line naming the folder's tokenizer files."""
    from ..processing.processor import Glm4vProcessor, PromptError

    check_model_folder(folder)
    try:
        return Glm4vProcessor.from_pretrained(folder, media_options=media_options)
    except (ModelFolderError, PromptError):
        raise
    except Exception as e:  # transformers / tokenizers raise many types for a broken tokenizer
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelFolderError(f"{os.path.join(folder, 'tokenizer.json')}: the tokenizer could not be loaded "
                               f"({type(e).__name__}: {msg}); re-download the tokenizer files") from None


@dataclass
class PreparedMedia:
    """A request's media after ``prepare_media``: images decoded (PIL), remote video / PDF bytes fetched once."""
    images: List = field(default_factory=list)
    video: object = None
    pdf: object = None
    pdf_pages: object = None
    pdf_dpi: Optional[float] = None


def prepare_media(images: Sequence = (), video=None, pdf=None, pdf_pages=None, pdf_dpi=None,
                  options: Optional[MediaOptions] = None) -> PreparedMedia:
    """Check (and load) every media input of a request before any model is loaded, so that a typo costs seconds.

    Images are decoded in full (so all their errors surface here, named by their path or URL); a PDF given as an
    image is refused (use ``pdf``: its pages are then chosen with ``pdf_pages`` and rendered at ``pdf_dpi``); a video
    is opened and its stream checked; a PDF is opened, its page count read and ``pdf_pages`` checked against it, and
    the size of every selected page at ``pdf_dpi`` checked against the pixel limit. URLs are fetched here, once."""
    from ..processing.media import (TooManyImagesError, UnreadableMediaError, as_pdf, check_dpi, check_pdf_pages,
                                    describe, is_pdf, load_image, page_ranges, probe_video, source_data)

    options = options or MediaOptions()
    out = PreparedMedia(pdf_pages=pdf_pages)
    for source in images:
        if isinstance(source, (str, os.PathLike, bytes, bytearray)):
            name = describe(source)
            data = source_data(source, options)
            if is_pdf(data):
                raise UnreadableMediaError(name, "is a PDF document, not an image",
                                           "pass it with --pdf (pdf=...): each page becomes an image")
            out.images.append(load_image(data, options, name=name))
        else:
            out.images.append(load_image(source, options))
    if video is not None:
        data = source_data(video, options) if isinstance(video, (str, os.PathLike)) else video
        if isinstance(data, (str, bytes)):
            probe_video(data, options, name=describe(video))
        out.video = video if isinstance(data, str) else data
    if pdf_dpi is not None:
        out.pdf_dpi = check_dpi(pdf_dpi, "--pdf_dpi (pdf_dpi)")
    if pdf is None:
        if pdf_pages is not None:
            raise ValueError("--pdf_pages (pdf_pages) needs a --pdf document")
        return out
    name = describe(pdf)
    if pdf_pages is not None:
        page_ranges(pdf_pages, name)  # the syntax, before the file is read
    raw = source_data(pdf, options)
    data = as_pdf(raw, name, options)  # an office document: converted by LibreOffice (cached) here, once
    if not is_pdf(data):
        raise UnreadableMediaError(name, "is neither a PDF nor an office document (.ppt .pptx .doc .docx .odp .odt)",
                                   "pass images with --image, documents with --pdf (--doc)")
    n_pages = check_pdf_pages(data, pdf_pages, out.pdf_dpi, options, name)
    if options.max_images is not None and n_pages + len(out.images) > options.max_images:
        raise TooManyImagesError(name, f"{n_pages} pages selected (and {len(out.images)} images), over the "
                                 f"cap of {options.max_images} images per prompt", "select pages with --pdf_pages "
                                 "or raise --max_images")
    out.pdf = pdf if isinstance(raw, str) else data  # a local file by its name; fetched bytes (or their PDF) as is
    return out
