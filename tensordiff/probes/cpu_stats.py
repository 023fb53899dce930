"""Stats and checksums of dense CPU tensors in one native pass (``cpu_stats.c``), through ctypes.

Built with the system C compiler on first use (under a second) into ``~/.cache/tensordiff``; ctypes
releases the GIL during the call, so the trace writer's thread and the model's run side by side.
Without a compiler, ``stats`` and ``checksum`` return None and the callers use numpy.

    cpu_stats.stats(t)      # float64 tensor [9] in schema.STAT_NAMES order, or None
    cpu_stats.checksum(t)   # int, or None
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from tensordiff.build_cache import build_cache

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_LIB: list = [None, False]  # library, tried


def _cpu_flags() -> str:
    """Part of the cache key: -march=native code built on one CPU must not run on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library():
    if _LIB[1]:
        return _LIB[0]
    _LIB[1] = True
    if os.environ.get("TENSORDIFF_CPU_STATS") == "numpy":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    src = Path(__file__).with_name("cpu_stats.c")
    key = hashlib.sha256(src.read_bytes() + _cpu_flags().encode() + cc.encode()).hexdigest()[:16]
    root = build_cache()
    out = root / f"cpu_stats-{key}.so"
    if not out.exists():
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
            os.close(fd)
            # what vectorises the loops, without -ffast-math (see cpu_stats.c)
            flags = ["-O3", "-shared", "-fPIC", "-fno-math-errno", "-ffinite-math-only", "-fassociative-math",
                     "-fno-signed-zeros", "-fno-trapping-math"]
            if platform.machine() in ("x86_64", "AMD64"):
                flags.append("-march=native")
            subprocess.run([cc, *flags, str(src), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, out)  # atomic: a concurrent process sees the whole library or none
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        lib = ctypes.CDLL(str(out))
    except OSError:
        return None
    lib.td_cpu_stats.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    lib.td_cpu_stats.restype = ctypes.c_int
    lib.td_checksum.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.td_checksum.restype = ctypes.c_uint64
    lib.td_pair_metrics.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.td_pair_metrics.restype = ctypes.c_int
    _LIB[0] = lib
    return lib


def available() -> bool:
    return _library() is not None


def dense(t: torch.Tensor) -> bool:
    """Its elements fill [data_ptr, data_ptr + nbytes) in some order (contiguous, or a permutation
    of it such as a transpose): stats do not depend on the order, a checksum sees the same bytes.
    The caller has checked that t is strided."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _native(t: torch.Tensor):
    """(library, t as dense bytes) where the native path applies: a strided CPU tensor, a view that
    leaves gaps (a slice) copied first; neither stats nor checksum depend on the elements' order."""
    if t.layout != torch.strided or not t.is_cpu or t.numel() == 0:
        return None
    lib = _library()
    if lib is None:
        return None
    return lib, (t if dense(t) else t.contiguous())


def stats_and_checksum(t: torch.Tensor) -> tuple[np.ndarray, int] | None:
    """(stats vector as float64 numpy, checksum) of a CPU float tensor in one native call, or None
    where this path does not apply. numpy, not a tensor: the trace writer wants numpy, and
    torch.from_numpy cost a tenth of a small tensor's record."""
    code = _DTYPE_CODE.get(t.dtype)
    ready = _native(t) if code is not None else None
    if ready is None:
        return None
    lib, t = ready
    out = np.empty(10, np.float64)  # numpy, not torch.empty: no trip through an active dispatch mode
    if lib.td_cpu_stats(t.data_ptr(), t.numel(), code, out.ctypes.data) != 0:
        return None
    return out[:9], int(out[9:].view(np.uint64)[0])


def pair_metrics(t: torch.Tensor, ref: torch.Tensor) -> np.ndarray | None:
    """[sum d^2, sum r^2, sum t^2, sum r*t, sum |d|, max |d|, non-finite mismatches] of a CPU target
    tensor (float32 / bfloat16 / float16) against a float32 reference of the same shape, in one
    native pass; None where this path does not apply (then metrics.compare does the work)."""
    code = _DTYPE_CODE.get(t.dtype)
    if code not in (0, 2, 3) or ref.dtype != torch.float32 or not (t.is_cpu and ref.is_cpu) \
            or t.layout != torch.strided or ref.layout != torch.strided or t.numel() == 0:
        return None
    lib = _library()
    if lib is None:
        return None
    # the same element order on both sides: contiguous copies where either is not
    t = t if t.is_contiguous() else t.contiguous()
    ref = ref if ref.is_contiguous() else ref.contiguous()
    out = np.empty(7, np.float64)
    if lib.td_pair_metrics(t.data_ptr(), code, ref.data_ptr(), t.numel(), out.ctypes.data) != 0:
        return None
    return out


def stats(t: torch.Tensor) -> torch.Tensor | None:
    """The stats vector of a CPU float tensor, None where this path does not apply."""
    both = stats_and_checksum(t)
    return None if both is None else torch.from_numpy(both[0])


def checksum(t: torch.Tensor) -> int | None:
    """A checksum of a CPU tensor's elements, independent of their order (a transpose, a copy and
    the tensor agree); None where this path does not apply."""
    ready = _native(t) if not t.is_complex() else None
    if ready is None:
        return None
    lib, t = ready
    size = t.element_size()
    if size not in (1, 2, 4, 8):
        return int(lib.td_checksum(t.data_ptr(), t.numel() * size, 1))
    return int(lib.td_checksum(t.data_ptr(), t.numel(), size))
