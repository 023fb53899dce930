"""Loads fast_records.cpp: the per-record work of fast GPU module stats in C++ (see that file).

Built with torch's cpp_extension on first use (~40 s) into ``~/.cache/tensordiff``; no CUDA headers
needed, the stats kernel is reached through the nvcc-built launcher of fused_stats. When it cannot be
built (no compiler) the session does the same work in Python (``CaptureSession._emit_fast``).

    rec = recorder(capacity=1024)          # None when unavailable
    probed = ext.Probed(forward, "model.layers.0", True, rec, on_begin, on_end, emit_other, is_skipped)
    others = rec.record(args, "model.layers.0", "forward", 0, "input", "x.py:3 in f", False)  # hook path
    block = rec.detach()                   # block.records(): tuples for TraceWriter.write_block
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from pathlib import Path

import torch

from tensordiff.probes import fused_stats
from tensordiff.build_cache import build_cache

_EXT = [None, False]  # module, tried


def _load():
    if _EXT[1]:
        return _EXT[0]
    _EXT[1] = True
    if os.environ.get("TENSORDIFF_FAST_RECORDS") == "python":
        return None
    from torch.utils.cpp_extension import load

    src = Path(__file__).with_name("fast_records.cpp")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    root = build_cache()
    out = root / (f"fast_records-{digest}-torch{torch.__version__.replace('+', '_')}"
                  f"-py{sys.version_info[0]}{sys.version_info[1]}")
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.glob("*.so")):
        from tensordiff.progress import status

        status(f"compiling the fast records extension into {out} (first use only, ~40 s)")
    try:
        _EXT[0] = load(name="tensordiff_fast_records", sources=[str(src)], build_directory=str(out),
                       extra_cflags=["-O2", "-DNDEBUG"], verbose=False)
    except Exception as exc:  # no compiler, no headers: the Python path does the same work
        print(f"tensordiff: fast records extension unavailable ({str(exc).splitlines()[-1][:200]}); "
              "using the Python path", file=sys.stderr)
        _EXT[0] = None
    return _EXT[0]


def recorder(capacity: int, accept_cpu: bool = False):
    """A Recorder launching the nvcc-built stats kernel, or None (no extension or no launcher)."""
    launch = fused_stats._cuda_library()
    if launch is None and not accept_cpu:
        return None
    ext = _load()
    if ext is None:
        return None
    from tensordiff.tensors import flatten_tensors

    address = ctypes.cast(launch, ctypes.c_void_p).value if launch is not None else 0
    return ext.Recorder(address, capacity, flatten_tensors, accept_cpu)


def cpu_records():
    """A CpuRecords (fast_records.cpp) over the native stats pass of cpu_stats.c, or None where the
    extension or the stats library cannot be built (the session's Python path does the work)."""
    from tensordiff.probes import cpu_stats

    lib = cpu_stats._library()
    if lib is None:
        return None
    ext = _load()
    if ext is None:
        return None
    address = lambda fn: ctypes.cast(fn, ctypes.c_void_p).value  # noqa: E731
    return ext.CpuRecords(address(lib.td_cpu_stats), address(lib.td_checksum))


def op_handler(session, fallback, call_of: dict):
    """An OpHandler (fast_records.cpp): an op probe's dispatch handler that names ops and makes their
    records in C++ through the session's CpuRecords, or None where the extension is unavailable.
    ``fallback``: the probe's Python handler, for the cases the C++ one hands back."""
    ext = _load()
    if ext is None or session.native is None:
        return None
    from tensordiff.probes.dispatch_ops import allocates_uninitialized, func_info
    from tensordiff.probes.replay import output_tensors
    from tensordiff.source_lines import is_skipped_file

    def info(func) -> tuple:
        name, short, is_view, ignored = func_info(func)
        return name, short, is_view, ignored, allocates_uninitialized(name)

    return ext.OpHandler(session, session.writer, session.native, call_of, fallback, info, output_tensors,
                         session.emit_op, is_skipped_file)
