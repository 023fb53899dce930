"""Host memory for the copies a full CPU capture takes, reused instead of allocated fresh.

A copy into fresh memory costs a page fault per 4 KB (2.3 ns per float32 element measured on the
dev VM) against 0.2-0.4 ns into pages already touched: in an op-level full capture the copies were
the model thread's largest cost. A ring of one buffer: the capture takes space at the head, the
trace writer gives it back in the same order once the bytes are in the file. One producer and one
consumer per ring; rings are lent to one writer at a time and kept for the next capture (warm).

    ring = staging.borrow()
    copy, end = ring.copy(t)       # None when the ring is full: the caller clones instead
    ...                            # the writer, once every byte up to `end` is in the file:
    ring.release(end); staging.give_back(ring)
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch

RING_BYTES = 64 << 20
_ALIGN = 64

_free: list = []
_lock = threading.Lock()


class Ring:
    def __init__(self, nbytes: int | None = None):
        self.size = nbytes or RING_BYTES
        # numpy, not torch: made and sliced without an op that a dispatch mode would record
        self.bytes = np.empty(self.size, np.uint8)
        self.base = self.bytes.ctypes.data
        self.head = 0  # virtual offsets, only ever growing: head written by the producer only,
        self.tail = 0  # tail by the consumer only (each an atomic int store under the GIL)

    def copy(self, t: torch.Tensor) -> tuple[np.ndarray, int] | None:
        """The bytes of a dense CPU tensor (contiguous, or a permutation such as a transpose:
        cpu_stats.dense) copied into the ring in memory order, and the offset to release them
        with; None when the ring has no room (the caller clones instead). One memmove, no torch op."""
        nbytes = t.numel() * t.element_size()
        if nbytes == 0 or nbytes > self.size // 4:
            return None
        start = self.head
        if start % self.size + nbytes > self.size:  # would cross the end: start over at the beginning
            start += self.size - start % self.size
        end = start + (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
        if end - self.tail > self.size:
            return None  # the writer has not caught up
        at = start % self.size
        ctypes.memmove(self.base + at, t.data_ptr(), nbytes)  # releases the GIL
        self.head = end
        return self.bytes[at:at + nbytes], end

    def release(self, upto: int) -> None:
        if upto > self.tail:
            self.tail = upto


def borrow() -> Ring:
    with _lock:
        ring = _free.pop() if _free else None
    if ring is None:
        ring = Ring()
    ring.head = ring.tail = 0
    return ring


def give_back(ring: Ring) -> None:
    with _lock:
        if len(_free) < 2:  # keep a warm one or two, not one per writer ever opened
            _free.append(ring)
