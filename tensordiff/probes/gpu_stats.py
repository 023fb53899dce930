"""Stats for many GPU tensors at once: one concatenation and a handful of segment reductions per
batch instead of ~25 small kernels (and ~0.5 ms of launch overhead) per tensor.

    batcher = StatsBatcher()
    slot = batcher.add(tensor)      # cheap: remembers a flat view
    batcher.flush()                 # computes every pending tensor's stats, copies them to pinned
    slot.numpy()                    # host memory asynchronously; waits on the CUDA event, not the GIL

A tensor modified in place after ``add`` and before ``flush`` would be measured after the change:
capture sessions use fused_stats.LaunchingBatcher (one exact launch per tensor) wherever the fused
kernel is available, and this batcher only where it is not (no nvcc and no Triton).
"""
from __future__ import annotations

import threading

import numpy as np
import torch

MAX_TENSORS = 128
MAX_BYTES = 256 << 20
# Above this many elements a tensor gets its own plain reductions: they run at memory bandwidth,
# while one huge segment in segment_reduce is slow (measured on the H100: see benchmarks/RESULTS.md).
LARGE = 1 << 22


class StatsSlot:
    """The stats of one tensor, filled in by a later flush."""

    def __init__(self):
        self._ready = threading.Event()
        self._host = None
        self._row = 0
        self._event = None

    def fill(self, host: torch.Tensor, row: int, event) -> None:
        self._host, self._row, self._event = host, row, event
        self._ready.set()

    def numpy(self) -> np.ndarray:
        self._ready.wait()
        self._event.synchronize()  # releases the GIL
        return self._host[self._row].numpy()


def _segmented_stats(flats: list[torch.Tensor]) -> torch.Tensor:
    """[len(flats), 9] float64 stats (STAT_NAMES order) of same-dtype 1-D tensors on one device."""
    device = flats[0].device
    lengths_host = torch.tensor([f.numel() for f in flats], dtype=torch.int64, pin_memory=True)
    lengths = lengths_host.to(device, non_blocking=True)
    buf = torch.cat(flats)
    x = buf if buf.dtype in (torch.float32, torch.float64) else buf.float()
    finite = torch.isfinite(x)
    z = torch.where(finite, x, 0.0)

    def seg(values, reduce):
        return torch.segment_reduce(values, reduce, lengths=lengths, unsafe=True)

    n_finite = seg(finite.to(x.dtype), "sum")
    total = seg(z, "sum").double()
    sq = seg(z * z, "sum").double()
    sum_abs = seg(z.abs(), "sum").double()
    big = torch.finfo(x.dtype).max
    xmin = seg(torch.where(finite, x, big), "min").double()
    xmax = seg(torch.where(finite, x, -big), "max").double()
    nan = seg(torch.isnan(x).to(x.dtype), "sum").double()
    zero = seg((x == 0).to(x.dtype), "sum").double()
    count = n_finite.double().clamp(min=1)
    numel = lengths.double()
    inf = numel - n_finite.double() - nan
    mean = total / count
    std = (sq / count - mean * mean).clamp(min=0).sqrt()
    none_finite = n_finite == 0
    nan_fill = torch.full_like(mean, float("nan"))
    moments = [torch.where(none_finite, nan_fill, v) for v in (xmin, xmax, mean, sum_abs / count, std, sq.sqrt())]
    return torch.stack(moments + [nan, inf, zero], dim=1)


class StatsBatcher:
    def __init__(self, max_tensors: int = MAX_TENSORS, max_bytes: int = MAX_BYTES):
        self.max_tensors, self.max_bytes = max_tensors, max_bytes
        self._pending: list[tuple[torch.Tensor, StatsSlot]] = []
        self._bytes = 0

    def add(self, t: torch.Tensor) -> StatsSlot:
        t = t.detach()
        if t.is_complex():
            t = t.abs()
        if not t.is_floating_point():
            t = t.to(torch.float32)
        slot = StatsSlot()
        if t.numel() > LARGE:
            from tensordiff.probes.snapshot import _stats_to_host_async

            host, event = _stats_to_host_async(t)
            slot.fill(host.view(1, -1), 0, event)
            return slot
        self._pending.append((t.reshape(-1), slot))
        self._bytes += t.numel() * t.element_size()
        if len(self._pending) >= self.max_tensors or self._bytes >= self.max_bytes:
            self.flush()
        return slot

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._bytes = self._pending, [], 0
        groups: dict = {}
        for flat, slot in pending:
            groups.setdefault((flat.device, flat.dtype), []).append((flat, slot))
        for group in groups.values():
            nonempty = [(f, s) for f, s in group if f.numel() > 0]
            for f, s in group:
                if f.numel() == 0:
                    empty = torch.tensor([[float("nan")] * 6 + [0.0] * 3], dtype=torch.float64)
                    s.fill(empty, 0, _DoneEvent())
            if not nonempty:
                continue
            stats = _segmented_stats([f for f, _ in nonempty])
            host = torch.empty(stats.shape, dtype=torch.float64, pin_memory=True)
            host.copy_(stats, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            for row, (_, slot) in enumerate(nonempty):
                slot.fill(host, row, event)


class _DoneEvent:
    def synchronize(self) -> None:
        return None
