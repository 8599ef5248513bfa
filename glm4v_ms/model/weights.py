"""Hugging Face safetensors checkpoints -> model parameters. Strict and tensor by tensor.

Module attribute paths equal the checkpoint keys, so loading is an identity map. Before any data is read, every
file header is checked against the model: a missing, unexpected or mis-shaped tensor raises ``CheckpointError``
naming it. Tensors are then read one at a time (peak extra memory: one tensor) and cast to the model dtype.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import ml_dtypes  # noqa: F401  (registers numpy bfloat16 so safetensors can read BF16 tensors)
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_NP_DTYPE = {ms.float32: np.float32, ms.float16: np.float16, ms.bfloat16: ml_dtypes.bfloat16}


class CheckpointError(ValueError):
    """The checkpoint does not match the model (names the offending tensors)."""


def checkpoint_files(folder: str) -> Dict[str, str]:
    """tensor name -> file path, from ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""
    index = os.path.join(folder, INDEX_FILE)
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(index):
        try:
            with open(index, "r", encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map' object): {e}")
        missing_files = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(folder, v))})
        if missing_files:
            raise CheckpointError(f"{index} lists shard(s) that are not in {folder}: {', '.join(missing_files)}; "
                                  "download the complete checkpoint")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    if os.path.isfile(single):
        return {k: single for k in _keys_of(single)}
    raise CheckpointError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}")


def _keys_of(path: str) -> List[str]:
    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for bad headers
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None


def _group_by_file(names: Dict[str, str]) -> Dict[str, List[str]]:
    out: Dict[str, List[str]] = {}
    for k, p in names.items():
        out.setdefault(p, []).append(k)
    return out


def read_shapes(files: Dict[str, str]) -> Dict[str, Tuple[int, ...]]:
    shapes = {}
    for path, keys in _group_by_file(files).items():
        try:
            with safe_open(path, framework="numpy") as f:
                present = set(f.keys())
                for k in keys:
                    if k not in present:
                        raise CheckpointError(f"tensor '{k}' is listed in the index but missing from {path}")
                    shapes[k] = tuple(f.get_slice(k).get_shape())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    return shapes


def iter_tensors(files: Dict[str, str], names: List[str]) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, array) one tensor at a time, file by file. Each tensor is read with its own ``safe_open``: closing the
    file unmaps its pages, so a 5 GB shard's pages are never all counted in the process's memory at once."""
    wanted = set(names)
    for path, keys in _group_by_file(files).items():
        for k in keys:
            if k in wanted:
                with safe_open(path, framework="numpy") as f:
                    yield k, f.get_tensor(k)


def tensor_nbytes(files: Dict[str, str]) -> Dict[str, int]:
    """tensor name -> bytes it takes in its file, from the safetensors headers (8-byte length, then JSON with each
    tensor's data_offsets); the files were already opened by read_shapes, so their headers are valid."""
    out: Dict[str, int] = {}
    for path, keys in _group_by_file(files).items():
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for k in keys:
            start, end = header[k]["data_offsets"]
            out[k] = end - start
    return out


def _fmt(names: List[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_names(expected: Dict[str, Tuple[int, ...]], shapes: Dict[str, Tuple[int, ...]], folder: str,
                ignore: Tuple[str, ...] = ()) -> None:
    """Raise ``CheckpointError`` naming every missing, unexpected or mis-shaped tensor.

    ``expected``: parameter name -> shape of the model; ``shapes``: tensor name -> shape in the checkpoint."""
    unexpected = [k for k in shapes if k not in expected and k not in ignore]
    missing = [k for k in expected if k not in shapes]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors (not part of this model/config): {_fmt(unexpected)}")
    bad_shape = [f"{k} (checkpoint {list(shapes[k])}, model {list(expected[k])})"
                 for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    if bad_shape:
        problems.append(f"shape mismatch: {_fmt(bad_shape)}")
    if problems:
        raise CheckpointError(f"checkpoint in {folder} does not match config.json: " + "; ".join(problems))


def _cast(name: str, arr: np.ndarray, target) -> np.ndarray:
    if arr.dtype != target:
        if arr.dtype.kind not in "fV" and arr.dtype != ml_dtypes.bfloat16:
            raise CheckpointError(f"tensor '{name}' has dtype {arr.dtype}; expected a floating-point tensor")
        arr = arr.astype(np.float32).astype(target) if arr.dtype == ml_dtypes.bfloat16 else arr.astype(target)
    return arr


def load_weights(model: nn.Cell, folder: str, ignore: Tuple[str, ...] = (),
                 transform: Optional[Callable[[str, np.ndarray], np.ndarray]] = None,
                 quantized: Optional[Dict[str, tuple]] = None, zero_offset: int = 1, split=None,
                 progress: Optional[Callable[[int], Any]] = None) -> None:
    """Set every parameter of ``model`` from the checkpoint in ``folder`` (strict).

    ``ignore``: checkpoint keys that may be present and are not used (e.g. ``lm_head.weight`` of a tied model);
    ``transform(name, array)``: the model's layout change for a tensor (shape-preserving along dims >= 1; it
    permutes dim 0), applied after reading.
    ``quantized``: GPTQ modules, name -> (quant.GPTQSpec, keep_int, out_features, in_features). Their ``qweight/qzeros/scales/g_idx`` are read
    together, one module at a time, and either dequantised into the module's float ``weight`` or (keep_int, the
    module is a quant.QuantLinear) turned into its integer weight, scale, offset and act-order permutation.
    ``zero_offset``: added to stored GPTQ zeros (1 for the v1 format).
    ``split`` (tensor parallelism, parallel.TPSplit): the model holds one rank's part of some tensors; names and
    shapes are checked against the full model (``split.full_shape``) and each full tensor, after ``transform``, is
    cut to the rank's part (``split.take``).
    ``progress(total_bytes)``, if given, returns an object with ``update(n_bytes, shard="i/n")`` and ``close()``
    (e.g. progress.Progress): it is told the bytes of each tensor read, and closed at the end."""
    from . import quant

    quantized = quantized or {}
    params = dict(model.parameters_and_names())
    files = checkpoint_files(folder)
    shapes = read_shapes(files)
    # The name check sees each quantised module as its float weight [N, K]; its own tensors are checked against the
    # quantisation spec (quant.check_module) and int-kept modules' integer parameters are filled below.
    virtual = {k: v for k, v in shapes.items() if not any(k == f"{m}.{q}" for m in quantized for q in quant.QUANT_KEYS)}
    expected = {k: tuple(p.shape) for k, p in params.items()}
    if split is not None:
        if any(keep_int for _, keep_int, _, _ in quantized.values()):
            raise CheckpointError("GPTQ integer weights cannot be split for tensor parallelism; load with "
                                  "quantized_weights='dequantize'")
        expected = {k: tuple(split.full_shape(k, s)) for k, s in expected.items()}
    for m, (spec, keep_int, n, k) in quantized.items():
        quant.check_module(m, spec, shapes, n, k)
        if keep_int:  # QuantLinear's integer weight, scale, offset (and act_perm) are derived, not read
            for name in [x for x in expected if x.startswith(m + ".") and x != f"{m}.bias"]:
                expected.pop(name)
        else:
            virtual[f"{m}.weight"] = (n, k)
    check_names(expected, virtual, folder, ignore)

    def put(name: str, arr: np.ndarray, dtype=None) -> None:
        p = params[name]
        target = _NP_DTYPE.get(p.dtype) if dtype is None else dtype
        if target is None:
            raise CheckpointError(f"unsupported parameter dtype {p.dtype} for {name}")
        arr = _cast(name, arr, target)
        if transform is not None:
            arr = transform(name, arr)
        if split is not None:
            arr = split.take(name, arr)
        p.set_data(Tensor(np.ascontiguousarray(arr)))

    plain = [k for k in expected if k in shapes]
    quant_keys = [f"{m}.{key}" for m in quantized for key in quant.QUANT_KEYS if f"{m}.{key}" in files]
    bar = None
    if progress is not None:
        nbytes = tensor_nbytes({k: files[k] for k in plain + quant_keys})
        shard = {path: i + 1 for i, path in enumerate(_group_by_file(files))}
        bar = progress(sum(nbytes.values()))

    def advance(name: str) -> None:
        if bar is not None:
            bar.update(nbytes[name], shard=f"{shard[files[name]]}/{len(shard)}")

    for name, arr in iter_tensors(files, plain):
        put(name, arr)
        advance(name)
    for m, (spec, keep_int, _, _) in quantized.items():
        raw = {}
        for key in quant.QUANT_KEYS:
            if f"{m}.{key}" in files:
                with safe_open(files[f"{m}.{key}"], framework="numpy") as f:
                    raw[key] = f.get_tensor(f"{m}.{key}")
                advance(f"{m}.{key}")
        qt = quant.read_module(m, spec, raw, zero_offset)
        if not keep_int:
            put(f"{m}.weight", qt.dequantize())
            continue
        target = _NP_DTYPE[params[f"{m}.scale"].dtype]
        arrays = quant.int_parameters(qt, spec, m, np.float32)
        if "act_perm" in arrays:
            params[f"{m}.act_perm"].set_data(Tensor(arrays.pop("act_perm")))
        for key in ("weight", "scale", "offset"):  # [N, ...]: the transform permutes output rows, then back to [., N]
            arr = arrays[key] if transform is None else transform(f"{m}.{key}", arrays[key])
            arrays[key] = np.ascontiguousarray(arr.T)
        params[f"{m}.scale"].set_data(Tensor(arrays["scale"].astype(target)))
        params[f"{m}.offset"].set_data(Tensor(arrays["offset"].astype(target)))
        w = arrays["weight"]
        if spec.bits == 4:
            params[f"{m}.weight"].set_data(Tensor(quant.pack_int4_pairs(w), dtype=params[f"{m}.weight"].dtype))
        else:
            params[f"{m}.weight"].set_data(Tensor(w))
    if bar is not None:
        bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Mapped loading: checkpoint tensors (or slices of them) -> regions of parameters
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """Checkpoint tensor ``source`` (its ``src`` slice, read with safe_open(...).get_slice: only those bytes are
    read), after the model's transform and an optional transpose, goes to ``dst`` of parameter ``param``
    (() = the whole parameter)."""
    source: str
    param: str
    src: tuple = ()
    dst: tuple = ()
    transpose: bool = False


def _slice_shape(shape: Tuple[int, ...], index: tuple) -> Tuple[int, ...]:
    out = list(shape)
    for i, s in enumerate(index):
        out[i] = len(range(*s.indices(shape[i])))
    return tuple(out)


def load_pieces(model: nn.Cell, folder: str, pieces: List[Piece], expected: Dict[str, Tuple[int, ...]],
                ignore: Tuple[str, ...] = (), transform: Optional[Callable[[str, np.ndarray], np.ndarray]] = None,
                progress: Optional[Callable[[int], Any]] = None) -> None:
    """Fill every parameter of ``model`` from ``pieces`` of the checkpoint in ``folder`` (strict).

    ``expected``: every checkpoint tensor the model's config implies, name -> full shape, including tensors this
    process does not read (another expert-parallel rank's experts): names and shapes of the whole checkpoint are
    checked before anything is read, and errors name the checkpoint's tensors. Every parameter must be covered by its
    pieces. Parameters are assembled one at a time (a buffer of the parameter's size, freed when it is set), and a
    piece reads only its slice, so a rank's peak memory is its own parameters plus one parameter.
    ``transform(source_name, array)``: the model's layout change (applied to the slice read; it must act on whole
    rows blocks, as the per-head q/k permutation does on head-aligned slices)."""
    params = dict(model.parameters_and_names())
    files = checkpoint_files(folder)
    shapes = read_shapes(files)
    check_names(expected, shapes, folder, ignore)
    by_param: Dict[str, List[Piece]] = {}
    for p in pieces:
        by_param.setdefault(p.param, []).append(p)
    uncovered = sorted(set(params) - set(by_param))
    if uncovered:
        raise CheckpointError(f"no checkpoint tensor is mapped to parameter(s) {_fmt(uncovered)} (internal error)")
    bar = None
    if progress is not None:
        sizes = tensor_nbytes({p.source: files[p.source] for p in pieces})

        def piece_bytes(p: Piece) -> int:
            full = shapes[p.source]
            return sizes[p.source] * int(np.prod(_slice_shape(full, p.src))) // max(int(np.prod(full)), 1)

        shard = {path: i + 1 for i, path in enumerate(_group_by_file(files))}
        bar = progress(sum(piece_bytes(p) for p in pieces))
    for name, plist in by_param.items():
        param = params[name]
        target = _NP_DTYPE.get(param.dtype)
        if target is None:
            raise CheckpointError(f"unsupported parameter dtype {param.dtype} for {name}")
        whole = len(plist) == 1 and plist[0].dst == ()
        buf = None if whole else np.empty(tuple(param.shape), dtype=target)
        for p in plist:
            with safe_open(files[p.source], framework="numpy") as f:
                arr = f.get_slice(p.source)[p.src] if p.src else f.get_tensor(p.source)
            arr = _cast(p.source, arr, target)
            if transform is not None:
                arr = transform(p.source, arr)
            if p.transpose:
                arr = arr.T
            if whole:
                if tuple(arr.shape) != tuple(param.shape):
                    raise CheckpointError(f"tensor '{p.source}' gives shape {list(arr.shape)} for parameter {name} "
                                          f"{list(param.shape)} (internal error)")
                param.set_data(Tensor(np.ascontiguousarray(arr)))
            else:
                buf[p.dst] = arr
            if bar is not None:
                bar.update(piece_bytes(p), shard=f"{shard[files[p.source]]}/{len(shard)}")
        if buf is not None:
            param.set_data(Tensor(buf))
            del buf
    if bar is not None:
        bar.close()
