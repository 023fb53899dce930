"""Tensors on disk that no PyTorch process made: checkpoints (safetensors, torch files) and engines'
dumps (.npy, .safetensors, .pt, raw binary with a manifest). Every read is checked against the file's
size and its own header, and a bad file is named with the entry at fault.

    infos = checkpoint_tensors("ckpt/")              # name -> TensorInfo(shape, dtype, file), headers only
    tensors, sources = read_dump("dump/")            # name -> torch.Tensor, name -> file

Torch files load with ``weights_only=True`` (no unpickling of code), .npy with ``allow_pickle=False``.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tensordiff.errors import TensordiffError

# safetensors' dtype names -> torch's
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# manifest dtype spellings -> torch dtypes
DTYPES = {name: getattr(torch, name) for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32",
                                                   "int16", "int8", "uint8", "bool")}
DTYPES.update({"f32": torch.float32, "fp32": torch.float32, "f16": torch.float16, "fp16": torch.float16,
               "bf16": torch.bfloat16, "f64": torch.float64, "i64": torch.int64, "i32": torch.int32,
               **{k.lower(): DTYPES[v] for k, v in SAFETENSORS_DTYPES.items() if v in DTYPES}})


@dataclass
class TensorInfo:
    shape: tuple
    dtype: str     # torch's name: float32, bfloat16, ...
    file: str

    @property
    def nbytes(self) -> int:
        size = torch.empty(0, dtype=getattr(torch, self.dtype)).element_size() if hasattr(torch, self.dtype) else 1
        n = 1
        for d in self.shape:
            n *= d
        return n * size


def safetensors_header(path: Path) -> dict:
    """name -> {"dtype", "shape", "data_offsets"}; checked: the header fits the file, every tensor's
    bytes lie inside it and match its shape and dtype."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise TensordiffError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise TensordiffError(f"{path}: truncated or not safetensors: header of {n} bytes in a {size}-byte file")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TensordiffError(f"{path}: safetensors header is not JSON ({exc})") from None
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower())
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise TensordiffError(f"{path}: tensor {name!r}: malformed header entry {entry!r}") from None
        if end > data:
            raise TensordiffError(f"{path}: tensor {name!r} ends at byte {end} of a {data}-byte data section: "
                                  "the file is truncated")
        expected = TensorInfo(shape, dtype, str(path)).nbytes
        if hasattr(torch, dtype) and end - start != expected:
            raise TensordiffError(f"{path}: tensor {name!r}: {end - start} bytes for shape {list(shape)} {dtype} "
                                  f"({expected} bytes)")
    return header


def _files(path: Path, suffixes: tuple) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise TensordiffError(f"{path}: no such file or directory")
    return sorted(p for p in path.iterdir() if p.suffix in suffixes)


def checkpoint_tensors(path) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a checkpoint (a folder of .safetensors / .bin / .pt, or one file),
    read from headers where the format has them."""
    path = Path(path)
    files = _files(path, (".safetensors", ".bin", ".pt", ".pth"))
    if not files:
        raise TensordiffError(f"{path}: no .safetensors, .bin or .pt files")
    out: dict[str, TensorInfo] = {}
    for f in files:
        if f.suffix == ".safetensors":
            items = {k: TensorInfo(tuple(v["shape"]), SAFETENSORS_DTYPES.get(v["dtype"], v["dtype"].lower()), str(f))
                     for k, v in safetensors_header(f).items()}
        else:
            items = {k: TensorInfo(tuple(t.shape), str(t.dtype).replace("torch.", ""), str(f))
                     for k, t in _torch_file(f).items()}
        for name, info in items.items():
            if name in out:
                raise TensordiffError(f"{f}: tensor {name!r} is also in {out[name].file}")
            out[name] = info
    return out


def _torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # weights_only refuses pickled code: say so in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TensordiffError(f"{path}: cannot load as tensors with weights_only=True: {first}") from None
    if isinstance(obj, torch.Tensor):
        return {path.stem: obj}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    raise TensordiffError(f"{path}: holds a {type(obj).__name__}, not a tensor or a dict of tensors")


def _raw(path: Path, entry: dict, manifest: Path) -> torch.Tensor:
    """One raw binary tensor described by a manifest entry {name, file, dtype, shape[, strides, offset]}."""
    name = entry.get("name", "?")
    try:
        dtype = DTYPES[str(entry["dtype"]).lower()]
        shape = [int(d) for d in entry["shape"]]
    except (KeyError, ValueError, TypeError):
        raise TensordiffError(f"{manifest}: entry {name!r}: needs a known dtype and an integer shape "
                              f"(got dtype {entry.get('dtype')!r}, shape {entry.get('shape')!r})") from None
    strides = entry.get("strides")
    offset = int(entry.get("offset", 0))
    item = torch.empty(0, dtype=dtype).element_size()
    if strides is None:
        span = int(np.prod(shape)) if shape else 1
    else:  # elements from the first to one past the last the strides reach
        if len(strides) != len(shape):
            raise TensordiffError(f"{manifest}: entry {name!r}: {len(strides)} strides for {len(shape)} dims")
        span = 1 + sum((d - 1) * s for d, s in zip(shape, strides)) if all(shape) else 0
    size = path.stat().st_size if path.exists() else None
    if size is None:
        raise TensordiffError(f"{manifest}: entry {name!r}: file {path.name} not found")
    if offset + span * item > size:
        raise TensordiffError(f"{manifest}: entry {name!r}: shape {shape} {str(dtype).replace('torch.', '')} needs "
                              f"{offset + span * item} bytes, {path.name} has {size} (a manifest that lies "
                              "about its shape, or a truncated file)")
    raw = np.fromfile(path, dtype=np.uint8, count=span * item, offset=offset)
    flat = torch.from_numpy(raw.copy()).view(dtype)
    return flat.as_strided(shape, strides).clone() if strides is not None else flat.reshape(shape)


def read_dump(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> tensor, name -> file) for a folder of dumped tensors: .npy (the file's stem is the name),
    .safetensors and .pt (their keys), raw binary listed in ``manifest.json``
    (``{"tensors": [{"name", "file", "dtype", "shape", "strides"?, "offset"?}]}``)."""
    path = Path(path)
    if not path.is_dir():
        raise TensordiffError(f"{path}: not a directory of dumped tensors")
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}

    def put(name: str, t: torch.Tensor, f: Path):
        if name in tensors:
            raise TensordiffError(f"{f}: tensor {name!r} is also in {sources[name]}")
        tensors[name], sources[name] = t, str(f)

    for f in sorted(path.iterdir()):
        if f.suffix == ".npy":
            try:
                arr = np.load(f, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise TensordiffError(f"{f}: cannot read as .npy: {str(exc).splitlines()[0]}") from None
            put(f.stem, torch.from_numpy(np.ascontiguousarray(arr)), f)
        elif f.suffix == ".safetensors":
            safetensors_header(f)  # the checks, before safetensors itself reads it
            from safetensors.torch import load_file

            for k, t in load_file(str(f)).items():
                put(k, t, f)
        elif f.suffix in (".pt", ".pth"):
            for k, t in _torch_file(f).items():
                put(k, t.clone(), f)
    manifest = path / "manifest.json"
    if manifest.exists():
        try:
            entries = json.loads(manifest.read_text())["tensors"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TensordiffError(f"{manifest}: expected {{\"tensors\": [...]}} ({exc})") from None
        for entry in entries:
            if not isinstance(entry, dict) or "name" not in entry or "file" not in entry:
                raise TensordiffError(f"{manifest}: entry {entry!r}: needs a name and a file")
            put(entry["name"], _raw(path / entry["file"], entry, manifest), manifest)
    if not tensors:
        raise TensordiffError(f"{path}: no dumped tensors (.npy, .safetensors, .pt, or manifest.json)")
    return tensors, sources
