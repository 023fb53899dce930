"""Turn one live tensor into what a trace keeps: its layout, its stats and (optionally) its data.

Stats are computed where the tensor lives (no host sync per tensor). Data is read back from the
storage bytes and the view rebuilt on the host, so a device whose strided copy is broken cannot
corrupt the evidence. Everything is copied at capture time: a later in-place op must not rewrite it.

    snap = snapshot(hidden, save_data=True)
    snap.layout["stride"], snap.stats_numpy(), snap.data.materialize()
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np
import torch

from tensordiff.probes import cpu_stats
from tensordiff.schema import STAT_NAMES  # noqa: E402,F401 (the stats vector's layout)


_DTYPE_NAMES: dict = {}  # torch.float32 -> "float32" (str() of a dtype costs more than the rest of a layout)


def tensor_layout(t: torch.Tensor) -> dict:
    dtype = _DTYPE_NAMES.get(t.dtype)
    if dtype is None:
        dtype = _DTYPE_NAMES[t.dtype] = str(t.dtype).replace("torch.", "")
    if t.layout == torch.strided:
        return {"shape": list(t.shape), "dtype": dtype, "device": str(t.device), "stride": list(t.stride()),
                "storage_offset": t.storage_offset(), "contiguous": t.is_contiguous()}
    return {"shape": list(t.shape), "dtype": dtype, "device": str(t.device), "stride": [], "storage_offset": 0,
            "contiguous": True}


def _stats_on(x: torch.Tensor) -> torch.Tensor:
    """The STAT_NAMES vector in float64 on x's device; moments over the finite elements only."""
    if x.is_complex():
        x = x.abs()
    if x.dtype == torch.bool or not x.is_floating_point():
        x = x.to(torch.float64)
    x = x.reshape(-1)
    if x.numel() == 0:
        return torch.tensor([float("nan")] * 6 + [0.0] * 3, dtype=torch.float64)  # host: nothing to sync
    if x.device.type == "cpu":
        fast = cpu_stats.stats(x)
        if fast is not None:
            return fast
        fast = _finite_stats_cpu(x)
        if fast is not None:
            return fast
    finite = torch.isfinite(x)
    nan = torch.isnan(x).sum()
    n_finite = finite.sum()
    inf = x.numel() - n_finite - nan
    # Temporaries stay in x's dtype; reductions accumulate in float64 (CPU) / float32 (accelerators)
    # without materialising an upcast copy: on a GPU a float64 copy of a 600 MB logits tensor means
    # fresh GB-sized allocations, which synchronise.
    acc = torch.float64 if x.device.type == "cpu" else torch.float32
    xf = torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    count = n_finite.clamp(min=1).to(torch.float64)
    total = torch.sum(xf, dtype=acc).to(torch.float64)
    mean = total / count
    l2 = torch.linalg.vector_norm(xf, dtype=acc).to(torch.float64)
    l1 = torch.linalg.vector_norm(xf, ord=1, dtype=acc).to(torch.float64)
    var = (l2 * l2 / count - mean * mean).clamp(min=0.0)
    big = torch.full((), float("inf"), dtype=x.dtype, device=x.device)  # torch.full: no H2D copy
    xmin = torch.where(finite, x, big).min().to(torch.float64)
    xmax = torch.where(finite, x, -big).max().to(torch.float64)
    stats = torch.stack([
        xmin, xmax, mean, l1 / count, var.sqrt(), l2,
        nan.to(torch.float64), inf.to(torch.float64), (x == 0).sum().to(torch.float64),
    ])
    # No finite element: min/max/moments are undefined, say so instead of +-inf.
    return torch.where(n_finite > 0, stats, torch.cat([torch.full((6,), float("nan"), dtype=torch.float64,
                                                                  device=x.device), stats[6:]]))


def _finite_stats_cpu(x: torch.Tensor) -> torch.Tensor | None:
    """The common all-finite case in numpy: each reduction costs ~1 us of overhead where a torch op
    costs ~4, and an op-level capture computes stats for every input and output of every op."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.dtype not in (torch.float32, torch.float64):
        return None
    a = x.numpy()
    xmin, xmax = a.min(), a.max()  # NaN propagates
    if not (np.isfinite(xmin) and np.isfinite(xmax)):
        return None
    n = a.size
    a64 = a if a.dtype == np.float64 else a.astype(np.float64)
    total = float(a64.sum())
    l2 = math.sqrt(float(np.dot(a64, a64)))
    mean = total / n
    var = max(l2 * l2 / n - mean * mean, 0.0)
    return torch.tensor([float(xmin), float(xmax), mean, float(np.abs(a64).sum()) / n, math.sqrt(var), l2,
                         0.0, 0.0, float(n - np.count_nonzero(a))], dtype=torch.float64)


@dataclass
class PendingTensor:
    """Bytes on their way to the host; `materialize` rebuilds the logical (contiguous) array."""
    raw: torch.Tensor  # uint8 bytes on the host (maybe still being filled by an async copy)
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    event: object = None  # CUDA event to wait on before the bytes are valid
    logical: bool = False  # raw already holds the logical (row-major) array: nothing to rebuild
    release: int | None = None  # staging ring offset to give back once the bytes are in the file

    def raw_numpy(self) -> np.ndarray:
        return self.raw if isinstance(self.raw, np.ndarray) else self.raw.numpy()

    def materialize(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        if isinstance(self.raw, np.ndarray):  # staging ring bytes
            self.raw = torch.from_numpy(self.raw)
        if not self.shape or self.raw.numel() == 0:
            flat = self.raw.view(self.dtype) if self.raw.numel() else torch.empty(0, dtype=self.dtype)
            return flat.reshape(self.shape) if flat.numel() == int(np.prod(self.shape)) else flat
        flat = self.raw.view(self.dtype)
        return flat.as_strided(self.shape, self.stride, 0).contiguous()


def read_back(t: torch.Tensor) -> PendingTensor:
    """Copy t's data to the host. CPU tensors are cloned; device tensors travel as raw storage bytes
    (one contiguous 1-D copy, the most basic thing a device must do right) and are rebuilt here."""
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    shape, stride = tuple(t.shape), tuple(t.stride())
    if t.device.type == "cpu":
        dense = t.clone(memory_format=torch.contiguous_format)
        raw = dense.view(-1).view(torch.uint8) if dense.numel() else torch.empty(0, dtype=torch.uint8)
        return PendingTensor(raw, t.dtype, shape, tuple(dense.stride()))
    itemsize = t.element_size()
    if t.numel() == 0:
        return PendingTensor(torch.empty(0, dtype=torch.uint8), t.dtype, shape, stride)
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(shape, stride) if s > 0)
    start, nbytes = t.storage_offset() * itemsize, span * itemsize
    if t.device.type != "cuda":
        # A device under test may lack even `set_`: copy its whole storage as bytes (one contiguous
        # 1-D copy through the device's own _copy_from) and cut our window out on the host.
        host_storage = t.untyped_storage().cpu()
        whole = torch.empty(0, dtype=torch.uint8).set_(host_storage)
        return PendingTensor(whole[start:start + nbytes].clone(), t.dtype, shape, stride)
    dev_bytes = torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        t.untyped_storage(), start, (nbytes,), (1,))
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.copy_(dev_bytes, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return PendingTensor(host, t.dtype, shape, stride, event)


def device_stats(t: torch.Tensor) -> torch.Tensor:
    """Stats vector for t, computed on t's device; if the device lacks an op, on a host copy."""
    t = t.detach()
    try:
        return _stats_on(t)
    except (RuntimeError, NotImplementedError):
        return _stats_on(read_back(t).materialize())


@dataclass
class Snapshot:
    layout: dict
    stats: torch.Tensor | np.ndarray | None  # float64 [len(STAT_NAMES)], maybe still on the device; None: from data
    data: PendingTensor | None = None
    save: bool = True  # False: data travels only so the writer thread can compute the stats
    stats_event: object = None  # CUDA event after which the (pinned host) stats are valid
    checksum: int | None = None  # of the live tensor's bytes, where the stats pass took one (CPU)

    def stats_numpy(self, materialized: torch.Tensor | None = None) -> np.ndarray:
        if isinstance(self.stats, np.ndarray):  # the native CPU stats pass
            return self.stats
        if hasattr(self.stats, "numpy") and not isinstance(self.stats, torch.Tensor):
            return self.stats.numpy()  # a gpu_stats.StatsSlot, filled by a batched flush
        if self.stats_event is not None:
            self.stats_event.synchronize()  # releases the GIL: the model thread keeps launching
        s = self.stats if self.stats is not None else _stats_on(materialized)
        return s.cpu().numpy() if s.device.type != "cpu" else s.numpy()


def _stats_to_host_async(t: torch.Tensor) -> tuple[torch.Tensor, object]:
    """Stats computed on the GPU, copied into pinned host memory without waiting. A blocking .cpu()
    in the writer thread would hold the GIL while the GPU catches up and stall the model's launches."""
    stats = device_stats(t)
    host = torch.empty(stats.shape, dtype=stats.dtype, pin_memory=True)
    host.copy_(stats, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


# Devices whose own kernels we trust for reductions; anything else (a PrivateUse1 device under test)
# gets its stats from the bytes we read back, so a broken device op cannot fake clean numbers.
TRUSTED_DEVICES = ("cpu", "cuda", "xpu", "mps")


def snapshot(t: torch.Tensor, save_data: bool = True, batcher=None, ring=None) -> Snapshot:
    """Layout, stats and data of t. CPU tensors: stats (and the checksum) from one native pass here,
    the copy into the writer's staging ``ring`` where it has room; without the native library the
    copy is taken here and the writer's thread computes the stats. Devices we do not trust: the
    copy, stats from it in the writer's thread. A trusted accelerator computes its stats itself,
    without a sync."""
    if t.is_cpu and t.layout == torch.strided:
        # One native pass gives the stats and the checksum the session keeps (see cpu_stats): over
        # the live tensor when only stats are kept (cheaper than a copy for the writer's thread to
        # reduce later), over the copy (still in cache) when the data is saved too.
        if not save_data:
            both = cpu_stats.stats_and_checksum(t)
            if both is not None:
                return Snapshot(tensor_layout(t), both[0], None, False, checksum=both[1])
        else:
            # into reused host memory (probes/staging) where it has room: no page faults
            both = cpu_stats.stats_and_checksum(t) if ring is not None and cpu_stats.dense(t) else None
            copied = ring.copy(t) if both is not None else None
            if copied is not None:
                data = PendingTensor(copied[0], t.dtype, tuple(t.shape), tuple(t.stride()),
                                     logical=t.is_contiguous(), release=copied[1])
                return Snapshot(tensor_layout(t), both[0], data, True, checksum=both[1])
            dense = t.detach().clone(memory_format=torch.contiguous_format)  # the ring is full (or t has gaps)
            if both is None:
                both = cpu_stats.stats_and_checksum(dense)
            if both is not None:
                raw = dense.view(-1).view(torch.uint8)
                data = PendingTensor(raw, t.dtype, tuple(t.shape), tuple(dense.stride()), logical=True)
                return Snapshot(tensor_layout(t), both[0], data, True, checksum=both[1])
    t = t.detach()
    if t.device.type == "cuda" and batcher is not None:
        return Snapshot(tensor_layout(t), batcher.add(t), read_back(t) if save_data else None, save_data)
    if t.device.type == "cuda":
        stats, event = _stats_to_host_async(t)
        return Snapshot(tensor_layout(t), stats, read_back(t) if save_data else None, save_data, event)
    if t.device.type in TRUSTED_DEVICES and t.device.type != "cpu":
        return Snapshot(tensor_layout(t), device_stats(t), read_back(t) if save_data else None, save_data)
    return Snapshot(tensor_layout(t), None, read_back(t), save_data)
