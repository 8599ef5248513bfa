"""Hugging Face GLM-4.1V folder -> a folder that ``from_pretrained`` loads directly, tensors already in our layout.

What changes: every tensor goes through ``Glm4vForConditionalGeneration.checkpoint_transform`` (today: the decoder's
q/k projection rows, weight and bias, are permuted per head into the half rotary layout; every other tensor is
copied bit for bit); dtypes are kept (bf16 stays bf16); a tied model's ``lm_head.weight`` is dropped; config.json
gets the marker ``{"glm4v_ms": {"layout": CONVERTED_LAYOUT, ...}}`` so that loading skips the transform and a second
conversion is refused. Every other file (tokenizer, chat template, processor and generation configs, README...) is
copied; hidden entries (``.git``, ``.cache``) and the source's safetensors files and index are not.

How:

* Everything is checked before anything is written: the paths, config.json (not converted already, not GPTQ), and
  the tensor names and shapes against the model built from the config (missing, unexpected or mis-shaped tensors
  raise ``CheckpointError`` naming them).
* The output shards are planned from the source headers (sizes are known), then each shard is streamed to disk:
  its header first, then one tensor at a time, each read with its own ``safe_open`` (closing the file also drops
  its memory-mapped pages). Peak extra memory is about twice the largest tensor, whatever the model's size.
* The folder is built in a hidden temporary folder next to DST, fsync'ed, and renamed into place at the very end;
  any failure (also Ctrl-C) removes it; one left by a killed run is removed by the next (staging.py). ``force``
  replaces only an earlier conversion (``is_conversion``): it is moved aside, the new folder renamed into place, and
  only then the old one deleted. Any other existing DST is refused whatever the flags.
* The shards' safetensors metadata says ``"format": "glm4v_ms"``. transformers refuses files whose format is not
  ``pt`` (or tf/flax/mlx), so a converted folder, whose q/k rows are permuted, cannot be loaded into the PyTorch
  model by mistake and silently give wrong results.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import ml_dtypes  # noqa: F401  (registers numpy bfloat16 so safetensors can read BF16 tensors)
import numpy as np
import mindspore as ms
from safetensors import safe_open

from .._version import __version__
from ..model.config import CONVERTED_LAYOUT, LAYOUT_KEY, Glm4vConfig
from ..model.glm4v import Glm4vForConditionalGeneration
from ..progress import Progress
from ..model.weights import INDEX_FILE, CheckpointError, check_names, checkpoint_files, read_shapes
from .staging import (OWNER_FILE, _fsync_path, _fsync_tree, _make_temp_dir, _new_name, _remove, _write_owner,
                      clean_stale)

DEFAULT_SHARD_SIZE = 5 * 10**9
CONFIG_FILE = "config.json"
# safetensors "__metadata__" of every written shard (see the module docstring for why the format is not "pt").
SHARD_METADATA = {"format": "glm4v_ms", "layout": CONVERTED_LAYOUT}

# Bytes per element of each safetensors dtype (the dtype strings are kept as the source spells them).
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

_SIZE_UNITS = {"": 1, "b": 1, "byte": 1, "bytes": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
               "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
               "tib": 2**40}


def shard_name(i: int, n: int) -> str:
    """Name of shard ``i`` (1-based) of ``n``, as transformers names them."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def parse_size(value: Union[int, str]) -> int:
    """5GB, 500MB, 1.5GB, 4GiB, 2000000 (bytes) -> bytes. kB/MB/GB/TB are powers of 1000, KiB/MiB/GiB of 1024."""
    if isinstance(value, bool):
        raise ValueError(f"shard size {value!r} is not a size")
    if isinstance(value, (int, np.integer)):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if unit not in _SIZE_UNITS:
            raise ValueError(f"shard size {value!r} is not a size; use e.g. 5GB, 500MB or 2000000 (bytes)")
        n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n <= 0:
        raise ValueError(f"shard size {value!r} must be positive")
    return n


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the source checkpoint, from its file header."""
    name: str
    path: str                  # source safetensors file
    dtype: str                 # safetensors dtype string, e.g. "BF16" (the output keeps it)
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _ITEMSIZE[self.dtype] * math.prod(self.shape)


def plan_shards(tensors: List[TensorInfo], limit: int) -> List[List[TensorInfo]]:
    """Split ``tensors`` (in order) into shards of at most ``limit`` bytes of tensor data; a tensor larger than the
    limit gets a shard of its own."""
    shards: List[List[TensorInfo]] = []
    size = 0
    for t in tensors:
        if not shards or (shards[-1] and size + t.nbytes > limit):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_shard(path: str, tensors: List[TensorInfo], load: Callable[[TensorInfo], np.ndarray],
                progress: Optional[Progress] = None, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write one safetensors file by streaming: the header first (every size is known from the plan), then each
    tensor's bytes as ``load(info)`` returns them, so only one tensor is held at a time. The file is fsync'ed.

    The format: 8-byte little-endian header length, the JSON header (name -> dtype, shape, [start, end) offsets into
    the data that follows; optional "__metadata__"), padded with spaces to a multiple of 8, then the data."""
    # Widest elements first (stable otherwise), as safetensors itself orders them: every tensor then starts at a
    # multiple of its element size, so readers can map it without copying.
    order = sorted(tensors, key=lambda t: -_ITEMSIZE[t.dtype])
    header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in order:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in order:
            arr = np.ascontiguousarray(load(t))
            if arr.nbytes != t.nbytes:  # the header promised t.nbytes: never write a file that lies about its data
                raise CheckpointError(f"tensor '{t.name}' has {arr.nbytes} bytes, the shard header says {t.nbytes}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))  # no copy
            del arr  # before the next load: never two tensors at once
            if progress is not None:
                progress.update(t.nbytes)
        f.flush()
        os.fsync(f.fileno())


def _read_tensor(path: str, name: str) -> np.ndarray:
    # A fresh safe_open per tensor: the file is memory-mapped while open, and the pages get_tensor touched count in
    # the process's memory until it is closed. Keeping a whole source shard open would hold the whole shard.
    try:
        with safe_open(path, framework="numpy") as f:
            return f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"cannot read tensor '{name}' from {path}: {e}") from None


def _read_dtypes(files: Dict[str, str], names: List[str]) -> Dict[str, str]:
    by_file: Dict[str, List[str]] = {}
    for k in names:
        by_file.setdefault(files[k], []).append(k)
    dtypes = {}
    for path, keys in by_file.items():
        with safe_open(path, framework="numpy") as f:
            for k in keys:
                dtypes[k] = f.get_slice(k).get_dtype()
    bad = [f"{k} ({d})" for k, d in dtypes.items() if d not in _ITEMSIZE]
    if bad:
        raise CheckpointError(f"tensor(s) with a dtype the converter does not know: {', '.join(sorted(bad))}")
    return dtypes


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.itemsize != b.dtype.itemsize or a.shape != b.shape:
        return False
    a = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    b = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    return bool(np.array_equal(a, b))


def verify_output(folder: str, shards: List[List[TensorInfo]], load: Callable[[TensorInfo], np.ndarray],
                  progress: Optional[Progress] = None) -> None:
    """Re-read every written tensor (one at a time) and compare it bit for bit (dtype, shape, bytes) with
    ``load(info)``, the transformed source tensor. Raises ``CheckpointError`` naming the first difference."""
    n = len(shards)
    planned = {t.name: shard_name(i + 1, n) for i, shard in enumerate(shards) for t in shard}
    written = {k: os.path.basename(p) for k, p in checkpoint_files(folder).items()}  # the index, as loading reads it
    if written != planned:
        wrong = sorted(k for k in set(planned) | set(written) if planned.get(k) != written.get(k))
        raise CheckpointError(f"verification failed: the written index maps {', '.join(wrong[:8])} wrongly")
    for i, shard in enumerate(shards):
        fname = shard_name(i + 1, n)
        path = os.path.join(folder, fname)
        with safe_open(path, framework="numpy") as f:
            keys = set(f.keys())
        extra = sorted(keys - {t.name for t in shard})
        if extra:
            raise CheckpointError(f"verification failed: {fname} holds unplanned tensor(s) {', '.join(extra[:8])}")
        for t in shard:
            try:
                with safe_open(path, framework="numpy") as f:
                    dtype = f.get_slice(t.name).get_dtype()
                    got = f.get_tensor(t.name)
            except Exception as e:
                raise CheckpointError(f"verification failed: cannot read tensor '{t.name}' back from {fname}: {e}")
            want = load(t)
            if dtype != t.dtype:
                problem = f"dtype {dtype}, expected {t.dtype}"
            elif got.shape != want.shape:
                problem = f"shape {list(got.shape)}, expected {list(want.shape)}"
            elif not _same_bits(got, want):
                problem = "the data differs from the converted source tensor"
            else:
                problem = None
            if problem:
                raise CheckpointError(f"verification failed: tensor '{t.name}' in {fname}: {problem}")
            del got, want  # before reading the next pair
            if progress is not None:
                progress.update(t.nbytes)


# ----------------------------------------------------------------------------------------------------------------
# Files and folders
# ----------------------------------------------------------------------------------------------------------------

def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _is_source_weights(entry: str) -> bool:
    # All top-level weight files are left out, also any not in the index: they hold tensors in the original layout
    # (a loader must never pick them up) and could clash with our shard names. That includes PyTorch pickles
    # (pytorch_model*.bin and their index), which some folders carry next to the safetensors.
    return (entry.endswith(".safetensors") or entry == INDEX_FILE
            or (entry.startswith("pytorch_model") and (entry.endswith(".bin") or entry.endswith(".bin.index.json"))))


def _copy_other_files(src: str, dst: str) -> List[str]:
    """Copy every non-hidden entry of ``src`` except config.json and the weights; returns the copied names.
    Links are followed (a Hugging Face cache snapshot is a folder of links to blobs)."""
    copied = []
    for entry in sorted(os.listdir(src)):
        if entry.startswith(".") or entry == CONFIG_FILE or _is_source_weights(entry):
            continue
        s, d = os.path.join(src, entry), os.path.join(dst, entry)
        if os.path.isdir(s):
            shutil.copytree(s, d, ignore=lambda _dir, names: [n for n in names if n.startswith(".")])
        elif os.path.isfile(s):
            shutil.copyfile(s, d)
        else:
            raise FileNotFoundError(f"{s} is a broken link or not a regular file; complete the download or remove it")
        copied.append(entry)
    return copied


def _publish(tmp: str, dst: str, force: bool) -> None:
    """Rename the finished folder ``tmp`` to ``dst``. An existing ``dst`` (only with ``force``, and only an earlier
    conversion) is first moved aside and deleted once the new folder is in place: at every moment one of the two is
    complete on disk (a kill in between is repaired by the next run's clean_stale)."""
    parent = os.path.dirname(dst)
    os.remove(os.path.join(tmp, OWNER_FILE))
    if os.path.lexists(dst):
        _check_existing_dst(dst, force)  # it may have appeared or changed while we were converting
        aside = _new_name(parent, os.path.basename(dst) + ".old")
        _write_owner(dst)  # the aside copy is then recognisably ours (clean_stale)
        try:
            os.rename(dst, aside)
        except BaseException:
            os.remove(os.path.join(dst, OWNER_FILE))
            raise
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(aside, dst)
            os.remove(os.path.join(dst, OWNER_FILE))
            raise
        _fsync_path(parent)
        try:
            _remove(aside)
        except OSError as e:
            warnings.warn(f"the new {dst} is in place but the old folder moved aside to {aside} could not be "
                          f"deleted ({e}); delete it by hand")
    else:
        os.rename(tmp, dst)
        _fsync_path(parent)


def is_conversion(path: str) -> bool:
    """True for a folder written by this converter: its config.json carries the glm4v_ms layout marker."""
    config = os.path.join(path, CONFIG_FILE)
    if os.path.islink(path) or not os.path.isdir(path) or not os.path.isfile(config):
        return False
    try:
        with open(config, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and isinstance(raw.get(LAYOUT_KEY), dict) and "layout" in raw[LAYOUT_KEY]


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_paths(src: str, dst: str, dst_arg: str = "x") -> None:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"SRC folder not found: {src} (expected a Hugging Face GLM-4.1V folder with "
                                "config.json and safetensors weights)")
    if not str(dst_arg).strip():
        raise ValueError("DST is empty; give the path of a new folder for the converted checkpoint")
    rs, rd = os.path.realpath(src), os.path.realpath(dst)
    if rd == rs:
        raise ValueError(f"DST {dst} is the same folder as SRC; write the converted folder to a new path")
    if _inside(rd, rs):
        raise ValueError(f"DST {dst} is inside SRC {src}; write the converted folder outside the source folder")
    if _inside(rs, rd):
        raise ValueError(f"SRC {src} is inside DST {dst}; replacing DST would delete the source: choose another DST")
    for special, what in ((os.getcwd(), "the working directory"), (os.path.expanduser("~"), "the home directory"),
                          (os.sep, "the root folder")):
        rsp = os.path.realpath(special)
        if rd == rsp or _inside(rsp, rd):
            where = "is" if rd == rsp else "contains"
            raise ValueError(f"DST {dst} {where} {what}; it is never replaced: give a new folder path such as "
                             f"{os.path.join(os.path.dirname(rs), os.path.basename(rs) + '-glm4v_ms')}")


def _check_existing_dst(dst: str, force: bool) -> None:
    if not os.path.lexists(dst):
        return
    if not is_conversion(dst):
        raise FileExistsError(f"DST {dst} already exists and is not a folder written by tools/convert.py (no "
                              f"'{LAYOUT_KEY}' layout marker in its config.json); it is never replaced, whatever "
                              "the flags: choose another path")
    if not force:
        raise FileExistsError(f"DST {dst} already exists; pass --force (force=True) to replace this earlier "
                              "conversion, or choose another path")


def _read_config(src: str) -> Tuple[dict, Glm4vConfig]:
    path = os.path.join(src, CONFIG_FILE)
    config = Glm4vConfig.from_json_file(path)  # clear errors: missing file, bad JSON, impossible fields
    with open(path, "r", encoding="utf-8") as f:
        raw = json.load(f)
    if config.converted:
        raise ValueError(f"SRC {src} is already a converted glm4v_ms folder; load it directly with from_pretrained "
                         f"(its config.json has the '{LAYOUT_KEY}' layout marker): there is nothing to convert")
    if config.is_moe:
        raise ValueError(f"SRC {src} holds a GLM-4.5V / GLM-4.6V mixture-of-experts model (model_type glm4v_moe), "
                         "which tools/convert.py does not convert: MoE folders load directly from the Hugging Face "
                         "layout (pass SRC itself to generate.py / from_pretrained)")
    if config.quantization is not None:
        method = config.quantization.get("quant_method")
        raise ValueError(f"SRC {src} is a quantised checkpoint (its config.json has quantization_config, quant_method "
                         f"{method!r}): GPTQ folders are loaded directly by from_pretrained, no conversion is needed")
    return raw, config


# ----------------------------------------------------------------------------------------------------------------

def convert_checkpoint(src: str, dst: str, force: bool = False, verify: bool = False,
                       shard_size: Union[int, str] = DEFAULT_SHARD_SIZE, progress: bool = True,
                       log: Optional[Callable[[str], None]] = None) -> Dict:
    """Convert the Hugging Face GLM-4.1V folder ``src`` into ``dst`` (see the module docstring).

    ``shard_size``: bytes of tensor data per output shard (int, or a string like "5GB", "500MB");
    ``verify``: re-read every written tensor and compare it bit for bit before publishing; ``progress``: a progress
    bar on stderr; ``log``: called with each notice (stale temporaries cleaned, warnings about SRC's tokenizer
    files). ``force`` replaces an existing DST only when it is itself an earlier conversion (``is_conversion``);
    any other existing DST, an empty DST, DST equal to / inside / containing SRC, the working directory or the
    home directory are always refused. Returns a summary: src, dst, tensors, bytes, shards, seconds, verified,
    dropped (source tensors left out: a tied model's lm_head.weight), copied (other files copied), cleaned (stale
    temporaries dealt with), warnings (what SRC lacks for generate.py: tokenizer, chat template, ...)."""
    t0 = time.monotonic()
    dst_arg = os.fspath(dst)
    src = os.path.abspath(os.fspath(src))
    dst = os.path.abspath(dst_arg)
    limit = parse_size(shard_size)
    _check_paths(src, dst, dst_arg)
    raw, config = _read_config(src)
    cleaned = clean_stale(dst, log)
    _check_existing_dst(dst, force)
    from .preflight import model_folder_problems

    # The weights convert without them, but generate.py needs the tokenizer, template and processor files: say so.
    notes = [f"warning: {p.replace(src, 'SRC ' + src, 1)}; DST loads as a model, but generate.py will refuse it"
             for p in model_folder_problems(src) if not p.startswith(os.path.join(src, CONFIG_FILE))]
    for note in notes:
        if log is not None:
            log(note)

    # The model built from the config gives the parameter names and shapes (its parameters are lazy: no memory).
    model = Glm4vForConditionalGeneration(config, ms.bfloat16)
    expected = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    ignore = ("lm_head.weight",) if config.tie_word_embeddings else ()
    files = checkpoint_files(src)
    shapes = read_shapes(files)
    check_names(expected, shapes, src, ignore)
    dropped = sorted(k for k in shapes if k not in expected)  # only ignored keys get past check_names
    dtypes = _read_dtypes(files, list(expected))
    tensors = [TensorInfo(name, files[name], dtypes[name], tuple(shapes[name])) for name in expected]
    shards = plan_shards(tensors, limit)
    total = sum(t.nbytes for t in tensors)

    def load(t: TensorInfo) -> np.ndarray:
        arr = model.checkpoint_transform(t.name, _read_tensor(t.path, t.name))
        if arr.shape != t.shape or arr.dtype.itemsize != _ITEMSIZE[t.dtype]:
            raise CheckpointError(f"tensor '{t.name}' in {t.path}: the header says {t.dtype} {list(t.shape)}, "
                                  f"read {arr.dtype} {list(arr.shape)}")
        return arr

    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = _make_temp_dir(parent, os.path.basename(dst) + ".converting")
    try:
        n = len(shards)
        bar = Progress(total, unit="B", desc="converting", enabled=progress)
        try:
            for i, shard in enumerate(shards):
                bar.update(0, shard=f"{i + 1}/{n}")
                write_shard(os.path.join(tmp, shard_name(i + 1, n)), shard, load, bar, SHARD_METADATA)
        finally:
            bar.close()
        weight_map = {t.name: shard_name(i + 1, n) for i, shard in enumerate(shards) for t in shard}
        _write_json(os.path.join(tmp, INDEX_FILE), {"metadata": {"total_size": total},
                                                    "weight_map": dict(sorted(weight_map.items()))})
        raw[LAYOUT_KEY] = {"layout": CONVERTED_LAYOUT, "glm4v_ms_version": __version__, "source_format": "hf"}
        _write_json(os.path.join(tmp, CONFIG_FILE), raw)
        copied = _copy_other_files(src, tmp)
        if verify:
            with Progress(total, unit="B", desc="verifying", enabled=progress) as vbar:
                verify_output(tmp, shards, load, vbar)
        _fsync_tree(tmp)
        _publish(tmp, dst, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already if _publish renamed it
        raise
    return {"src": src, "dst": dst, "tensors": len(tensors), "bytes": total, "shards": len(shards),
            "seconds": time.monotonic() - t0, "verified": bool(verify), "dropped": dropped, "copied": copied,
            "cleaned": cleaned, "warnings": notes}
