"""Stats of a GPU tensor in one kernel launch, written into a row of a preallocated device buffer.

On a GPU the per-record cost of module-level stats is CPU time, not bandwidth: an eager forward of a
0.6B model is bound by the CPU issuing kernels (on the lent H100, 37.5 of its 38.3 ms), so every
launch and every line of Python in a hook adds to the forward. One kernel per tensor reads it once
and accumulates min, max, sum, sum |x|, sum x^2 and NaN / Inf / zero counts into row ``row`` with
atomics. It runs on the tensor's own stream, in order, so a later in-place op cannot change what it
measures. The rows are copied to pinned host memory once per block of records, without a sync.

Two launchers, fastest first (measured on the lent H100's host, CPU time per tensor):
  * ``fused_stats.cu`` built with nvcc into a plain shared library, called through ctypes;
  * the same kernel in Triton, called through the compiled kernel's launcher (11.7 us; Triton's
    public ``kernel[grid](...)`` path costs 23.6 us, ``torch.aminmax`` alone 18 us).
Neither available (a CPU-only install): ``available()`` is False and the probes use gpu_stats.

    buf = FusedStatsBuffer(device, capacity=4096)
    row = buf.add(tensor)            # one launch; None when the buffer is full
    host, event = buf.finish()       # valid once event completes: host.numpy() is [rows, 9] STAT_NAMES
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from tensordiff.build_cache import build_cache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the batched torch path in gpu_stats is used
    triton = None

BLOCK = 1024


_CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_lib = [None, False]  # ctypes library, tried


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(home) if home.exists() else None


def _build(nvcc: str, src: Path, out: Path, arch: str, cudart: str) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           f"-cudart={cudart}", "-o", str(tmp), str(src), "-ldl"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        os.replace(tmp, out)  # atomic: a concurrent process sees the whole library or none
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _cuda_library():
    """Build (first use, ~5 s) or load the nvcc-compiled launcher; None when nvcc is missing or fails.

    Linked against the shared CUDA runtime when torch's CUDA major version matches nvcc's: the
    library then resolves to the libcudart torch already loaded and its launches share torch's warm
    runtime state. Otherwise (or when that fails) the runtime is linked in statically."""
    if _lib[1]:
        return _lib[0]
    _lib[1] = True
    if os.environ.get("TENSORDIFF_FUSED_STATS") == "triton" or not torch.cuda.is_available():
        return None
    src = Path(__file__).with_name("fused_stats.cu")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    root = build_cache()
    torch_major = (torch.version.cuda or "0").split(".")[0]
    wanted = os.environ.get("TENSORDIFF_CUDART")
    variants = [wanted] if wanted in ("shared", "static") else ["shared", "static"]
    for cudart in variants:
        out = root / f"fused_stats-{digest}-sm{arch}-{cudart}-cu{torch_major}.so"
        if not out.exists():
            nvcc = _nvcc()
            if nvcc is None:
                return None
            if cudart == "shared" and wanted != "shared":
                version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
                if f"release {torch_major}." not in version:
                    continue
            if not _build(nvcc, src, out, arch, cudart):
                continue
        try:
            lib = ctypes.CDLL(str(out))
        except OSError:
            continue
        fn = lib.td_stats_launch
        fn.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_longlong, ctypes.c_void_p,
                       ctypes.c_longlong, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        fn.variant = cudart
        pair = lib.td_pair_launch  # observers/live_compare.py: a target tensor against the reference's
        pair.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong,
                         ctypes.c_longlong, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p]
        pair.restype = ctypes.c_int
        fn.pair = pair
        _lib[0] = fn
        return fn
    return None


def pair_launcher():
    """td_pair_launch of the nvcc-built library, or None (no nvcc, no GPU)."""
    lib = _cuda_library()
    return getattr(lib, "pair", None)


def raw_stream(device_index: int) -> int:
    return _raw_stream(device_index)


CUDA_DTYPES = _CUDA_DTYPES


def available() -> bool:
    return triton is not None or _cuda_library() is not None


def launcher_name() -> str:
    lib = _cuda_library()
    return f"cuda ({lib.variant} cudart)" if lib is not None else "triton" if triton is not None else "none"


if triton is not None:
    @triton.jit(do_not_specialize=["n", "step", "slot"])
    def _stats_kernel(x_ptr, n, step, slot, minmax_ptr, sums_ptr, counts_ptr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        vmin = tl.full([BLOCK], float("inf"), tl.float32)
        vmax = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        sa = tl.zeros([BLOCK], tl.float32)
        sq = tl.zeros([BLOCK], tl.float32)
        nan = tl.zeros([BLOCK], tl.int32)
        inf = tl.zeros([BLOCK], tl.int32)
        zero = tl.zeros([BLOCK], tl.int32)
        for start in tl.range(0, n, step):
            offs = start + pid * BLOCK + tl.arange(0, BLOCK)
            inside = offs < n
            x = tl.load(x_ptr + offs, mask=inside, other=1.0).to(tl.float32)
            is_nan = x != x
            is_inf = tl.abs(x) == float("inf")
            finite = inside & (~is_nan) & (~is_inf)
            xf = tl.where(finite, x, 0.0)
            vmin = tl.minimum(vmin, tl.where(finite, x, float("inf")))
            vmax = tl.maximum(vmax, tl.where(finite, x, float("-inf")))
            s += xf
            sa += tl.abs(xf)
            sq += xf * xf
            nan += (inside & is_nan).to(tl.int32)
            inf += (inside & is_inf).to(tl.int32)
            zero += (inside & (x == 0.0)).to(tl.int32)
        tl.atomic_min(minmax_ptr + slot * 2, tl.min(vmin, axis=0))
        tl.atomic_max(minmax_ptr + slot * 2 + 1, tl.max(vmax, axis=0))
        tl.atomic_add(sums_ptr + slot * 3, tl.sum(s, axis=0).to(tl.float64))
        tl.atomic_add(sums_ptr + slot * 3 + 1, tl.sum(sa, axis=0).to(tl.float64))
        tl.atomic_add(sums_ptr + slot * 3 + 2, tl.sum(sq, axis=0).to(tl.float64))
        tl.atomic_add(counts_ptr + slot * 3, tl.sum(nan, axis=0).to(tl.int64))
        tl.atomic_add(counts_ptr + slot * 3 + 1, tl.sum(inf, axis=0).to(tl.int64))
        tl.atomic_add(counts_ptr + slot * 3 + 2, tl.sum(zero, axis=0).to(tl.int64))


_SM_COUNT: dict = {}
# (device, dtype, 16-byte aligned) -> compiled kernel. Triton's own launch path re-derives the
# specialisation of every argument in Python on each call (~20 us on the lent H100's host); calling
# the compiled kernel's launcher directly costs a few us. Any surprise in that private API switches
# back to the public path for good.
_COMPILED: dict = {}
_direct_ok = [True]


def _launch(t, n, grid, row, minmax, sums, counts):
    ptr = t.data_ptr()
    key = (t.device.index, t.dtype, ptr % 16 == 0)
    kernel = _COMPILED.get(key) if _direct_ok[0] else None
    if kernel is not None:
        try:
            stream = torch._C._cuda_getCurrentRawStream(key[0])
            kernel.run(grid, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None,
                       ptr, n, grid * BLOCK, row, minmax.data_ptr(), sums.data_ptr(), counts.data_ptr(), BLOCK)
            return
        except Exception:  # a Triton version whose launcher differs
            _direct_ok[0] = False
    kernel = _stats_kernel[(grid,)](t, n, grid * BLOCK, row, minmax, sums, counts, BLOCK=BLOCK, num_warps=4)
    if t.device.type == "cuda" and kernel is not None and hasattr(kernel, "run"):
        _COMPILED[key] = kernel


def _max_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 64
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count * 4
    return _SM_COUNT[key]


class FusedStatsBuffer:
    """Device-side accumulators for up to ``capacity`` tensors; one kernel launch per tensor."""

    def __init__(self, device, capacity: int = 4096):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.device_index = device.index if device.type == "cuda" else -1  # as Tensor.get_device()
        self.capacity = capacity
        self.rows = 0
        self._programs = _max_programs(self.device)
        # One allocation, laid out as fused_stats.cu expects: float min/max, double sums, int64 counts.
        raw = torch.zeros(capacity * 56, dtype=torch.uint8, device=self.device)
        self._set_views(raw)
        self.minmax[:, 0] = float("inf")
        self.minmax[:, 1] = float("-inf")
        self.numel: list[int] = []
        self._cuda = _cuda_library() if self.device.type == "cuda" else None
        self._base = raw.data_ptr()

    def _set_views(self, raw: torch.Tensor) -> None:
        """The layout of fused_stats.cu: float {min, max}, double {sum, sum |x|, sum x^2}, int64 counts."""
        cap = raw.numel() // 56
        self._raw = raw
        self.minmax = raw[:cap * 8].view(torch.float32).view(cap, 2)
        self.sums = raw[cap * 8:cap * 32].view(torch.float64).view(cap, 3)
        self.counts = raw[cap * 32:].view(torch.int64).view(cap, 3)

    def add(self, t: torch.Tensor, contiguous: bool | None = None) -> int | None:
        """Launch the stats of t into the next row; the row index, or None when full."""
        row = self.rows
        if row >= self.capacity:
            return None
        code = _CUDA_DTYPES.get(t.dtype)
        if code is None:
            t = t.detach().abs() if t.is_complex() else t.detach().to(torch.float32)
            code, contiguous = _CUDA_DTYPES[t.dtype], None
        if not (t.is_contiguous() if contiguous is None else contiguous):
            t = t.detach().contiguous()
        n = t.numel()
        if self._cuda is not None:
            # the tensor's device made current: a model split over GPUs runs with another one current
            other = torch.cuda.current_device() != self.device_index
            with torch.cuda.device(self.device_index) if other else contextlib.nullcontext():
                err = self._cuda(t.data_ptr(), n, code, row, self._base, self.capacity, _raw_stream(self.device_index))
            if err:
                raise RuntimeError(f"fused stats kernel launch failed (cudaError {err})")
        elif n:
            grid = min(triton.cdiv(n, BLOCK), self._programs)
            _launch(t, n, grid, row, self.minmax, self.sums, self.counts)
        self.numel.append(n)
        self.rows = row + 1
        return row

    def finish(self) -> tuple["HostStats", object]:
        """The rows so far on the host: see copy_to_host."""
        return copy_to_host(self._raw, self.numel)


def copy_to_host(raw: torch.Tensor, numel: list) -> tuple["HostStats", object]:
    """A stats buffer's raw accumulators (``numel``: the element count of each row's tensor) copied to
    pinned host memory, and the CUDA event after which they are valid: one copy and one event on the
    model's thread, never a wait. The moments are computed on the host by whoever reads them (the
    trace writer's thread). Also takes the buffers of fast_records.cpp."""
    cuda = raw.device.type == "cuda"
    host = torch.empty(raw.shape, dtype=torch.uint8, pin_memory=cuda)
    host.copy_(raw, non_blocking=cuda)
    event = torch.cuda.Event() if cuda else None
    if event is not None:
        event.record()
    return HostStats(host, numel), event


class HostStats:
    """A FusedStatsBuffer's accumulators on the host; ``numpy()``: [rows, 9] float64 in STAT_NAMES
    order (moments over the finite elements; NaN where a tensor has none)."""

    def __init__(self, raw: torch.Tensor, numel: list):
        self.raw, self.numel = raw, numel
        self._array = None

    def numpy(self) -> np.ndarray:
        if self._array is None:  # once: every record of a block reads its row from it
            self._array = self._moments()
        return self._array

    def _moments(self) -> np.ndarray:
        k, a = len(self.numel), self.raw.numpy()
        cap = a.size // 56
        mm = a[:cap * 8].view(np.float32).reshape(cap, 2)[:k].astype(np.float64)
        sums = a[cap * 8:cap * 32].view(np.float64).reshape(cap, 3)[:k]
        counts = a[cap * 32:].view(np.int64).reshape(cap, 3)[:k].astype(np.float64)
        n_finite = np.asarray(self.numel, dtype=np.float64) - counts[:, 0] - counts[:, 1]
        count = np.maximum(n_finite, 1)
        mean = sums[:, 0] / count
        with np.errstate(invalid="ignore"):
            std = np.sqrt(np.maximum(sums[:, 2] / count - mean * mean, 0))
            moments = np.stack([mm[:, 0], mm[:, 1], mean, sums[:, 1] / count, std, np.sqrt(sums[:, 2])], axis=1)
        moments[n_finite <= 0] = np.nan
        return np.concatenate([moments, counts], axis=1)

    def __getitem__(self, index):  # host[row] (gpu_stats.StatsSlot), host[row, col]
        return torch.from_numpy(self.numpy())[index]


class LaunchingBatcher:
    """gpu_stats.StatsBatcher's interface for the general capture path (op level, full capture), but
    exact: ``add`` launches the fused kernel at once on the tensor's stream, so an in-place op after
    the capture cannot change what is measured; ``flush`` only copies each buffer's rows to the host.

        slot = batcher.add(tensor)   # one launch
        batcher.flush()              # one copy + event per device buffer
        slot.numpy()                 # waits on the event (releases the GIL)
    """

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._open: dict = {}  # device -> (FusedStatsBuffer, [(row, StatsSlot)])

    def add(self, t: torch.Tensor):
        from tensordiff.probes.gpu_stats import StatsSlot

        t = t.detach()
        entry = self._open.get(t.device)
        row = entry[0].add(t) if entry is not None else None
        if row is None:  # no buffer yet on this device, or it is full
            if entry is not None:
                self._finish(t.device)
            entry = self._open[t.device] = (FusedStatsBuffer(t.device, self.capacity), [])
            row = entry[0].add(t)
        slot = StatsSlot()
        entry[1].append((row, slot))
        return slot

    def flush(self) -> None:
        for device in list(self._open):
            self._finish(device)

    def _finish(self, device) -> None:
        buf, slots = self._open.pop(device)
        host, event = buf.finish()
        for row, slot in slots:
            slot.fill(host, row, event)
