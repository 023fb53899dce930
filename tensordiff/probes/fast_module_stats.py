"""Module-level GPU stats without per-record objects: the one interface the session and the module
probe use, whichever recorder runs behind it.

A CUDA tensor's record costs a tuple, an alias lookup and one fused stats kernel launch; its index
row is built later by the writer's thread, from a block of records handed over whole. Two
implementations, chosen once by ``choose``: the C++ recorder (``fast_records.cpp``, ~1 us per record,
and a whole-call module wrapper) and the same work in Python (~10 us), used where the extension
cannot be built. Nothing outside this file knows which one runs.

    fast = choose(writer, fallback)          # None: no fused stats launcher on this machine
    is_root = fast.enter()
    fast.record(args, "model.layers.0", "forward", 0, "input", source, bare_tensor_is_tuple=False)
    fast.leave(); fast.flush(); fast.forget()
"""
from __future__ import annotations

import weakref

import torch

from tensordiff.probes import fused_stats

BLOCK_RECORDS = 1024  # records per stats buffer and per writer block


class FastModuleStats:
    """What the session and the module probe call. ``fallback(module, direction, call, slot,
    source, tensor)`` takes the tensors this path does not (not on CUDA) through the general one."""

    records = 0  # records handed to the writer so far

    def enter(self) -> bool:
        """A module call starts; True when it is the outermost one (a forward begins)."""
        raise NotImplementedError

    def leave(self) -> None:
        raise NotImplementedError

    def record(self, obj, module: str, direction: str, call: int, prefix: str, source: str,
               bare_tensor_is_tuple: bool) -> None:
        """Records of every tensor in ``obj`` (a call's args, kwargs or output), slots ``prefix.N``."""
        raise NotImplementedError

    def emit(self, module: str, direction: str, call: int, slot: str, source: str, t: torch.Tensor) -> None:
        """One record of a CUDA tensor."""
        raise NotImplementedError

    def pending(self) -> bool:
        raise NotImplementedError

    def flush(self) -> None:
        """Hand every pending record to the writer."""
        raise NotImplementedError

    def forget(self) -> None:
        """The forward ended: forget tensor identities (memory may be reused)."""
        raise NotImplementedError

    def wrap(self, forward, name: str, wanted: bool, on_begin, on_end, emit_other, is_skipped):
        """A whole-call wrapper of ``forward`` in native code, or None (the probe wraps in Python)."""
        return None


class PythonModuleStats(FastModuleStats):
    def __init__(self, writer, fallback, capacity: int = BLOCK_RECORDS):
        self.writer, self.fallback, self.capacity = writer, fallback, capacity
        self.depth = 0
        self.records = 0
        self._block: list = []   # record tuples waiting for their stats buffer's copy to host
        self._stats = None       # fused_stats.FusedStatsBuffer of the block
        self._seen: dict = {}    # (ptr, numel, dtype) or id -> (weakref, version, record id)

    def enter(self) -> bool:
        self.depth += 1
        return self.depth == 1

    def leave(self) -> None:
        self.depth -= 1

    def record(self, obj, module, direction, call, prefix, source, bare_tensor_is_tuple) -> None:
        from tensordiff.tensors import flatten_tensors

        if isinstance(obj, torch.Tensor) and bare_tensor_is_tuple:
            obj = (obj,)
        for slot, t in flatten_tensors(obj, prefix):
            if t.is_cuda:
                self.emit(module, direction, call, slot, source, t)
            else:
                self.flush()  # keep execution order in the file
                self.fallback(module, direction, call, slot, source, t)

    def emit(self, module, direction, call, slot, source, t) -> None:
        version = t._version
        contiguous = t.is_contiguous()
        # Stats do not depend on shape: a contiguous view of captured memory (q_proj's output seen
        # as q_norm's [.., heads, dim] input) is the same data while the version counter (shared by
        # views) has not moved and the captured tensor still owns that memory.
        ident = (t.data_ptr(), t.numel(), t.dtype) if contiguous else id(t)
        seen = self._seen.get(ident)
        if seen is not None and seen[1] == version and seen[0]() is not None:  # an alias: no launch
            self._block.append(((module, direction, call, slot), source, t.shape, t.stride(),
                                t.storage_offset(), t.dtype, -1, seen[2], t.device))
            self.records += 1
            return
        rid = (module, direction, call, slot)
        buf = self._stats
        if buf is None or buf.device_index != t.get_device():
            if buf is not None:
                self.flush()
            buf = self._stats = fused_stats.FusedStatsBuffer(t.device, self.capacity)
        row = buf.add(t, contiguous)
        if row is None:  # the block is full
            self.flush()
            buf = self._stats = fused_stats.FusedStatsBuffer(t.device, self.capacity)
            row = buf.add(t, contiguous)
        self._seen[ident] = (weakref.ref(t), version, rid)
        self._block.append((rid, source, t.shape, t.stride(), t.storage_offset(), t.dtype, row, None, t.device))
        self.records += 1

    def pending(self) -> bool:
        return bool(self._block)

    def flush(self) -> None:
        if not self._block:
            return
        block, self._block = self._block, []
        buf, self._stats = self._stats, None
        self.writer.write_block(block, [buf.finish()] if buf is not None else [])

    def forget(self) -> None:
        self._seen.clear()


class CppModuleStats(FastModuleStats):
    def __init__(self, writer, fallback, rec, probed_cls):
        self.writer, self.fallback, self._rec, self._probed_cls = writer, fallback, rec, probed_cls
        self.records = 0

    def enter(self) -> bool:
        return self._rec.enter()

    def leave(self) -> None:
        self._rec.leave()

    def record(self, obj, module, direction, call, prefix, source, bare_tensor_is_tuple) -> None:
        others = self._rec.record(obj, module, direction, call, prefix, source, bare_tensor_is_tuple)
        for slot, t in others or ():
            self.flush()  # keep execution order in the file
            self.fallback(module, direction, call, slot, source, t)

    def emit(self, module, direction, call, slot, source, t) -> None:
        # the recorder names a dict's entries prefix.key: "grad_input.1", "param_grad.weight"
        prefix, _, name = slot.rpartition(".")
        self.record({name: t}, module, direction, call, prefix, source, False)

    def pending(self) -> bool:
        return self._rec.pending()

    def flush(self) -> None:
        if self._rec.pending():
            block = self._rec.detach()  # its records become Python tuples in the writer's thread
            self.writer.write_block(block, [fused_stats.copy_to_host(raw, numel) for raw, numel in block.buffers()])
            self.records += len(block)

    def forget(self) -> None:
        self._rec.forget()

    def wrap(self, forward, name, wanted, on_begin, on_end, emit_other, is_skipped):
        if self._probed_cls is None:
            return None
        probed = self._probed_cls(forward, name, wanted, self._rec, on_begin, on_end, emit_other, is_skipped)
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(forward, attr):
                setattr(probed, attr, getattr(forward, attr))
        probed.__wrapped__ = forward  # inspect.signature(module.forward) still sees the real one
        return probed


def choose(writer, fallback, recorder: str = "auto", capacity: int = BLOCK_RECORDS,
           accept_cpu: bool = False) -> FastModuleStats | None:
    """The fast path for this machine: ``recorder`` "auto" (C++ where it builds, else Python),
    "cpp" or "python". None where no stats kernel can be launched. ``accept_cpu`` (tests): the C++
    recorder also takes CPU tensors, without a kernel."""
    if recorder in ("auto", "cpp"):
        from tensordiff.probes import fast_records

        rec = fast_records.recorder(capacity, accept_cpu=accept_cpu)
        if rec is not None:
            return CppModuleStats(writer, fallback, rec, getattr(fast_records._load(), "Probed", None))
        if recorder == "cpp":
            return None
    if torch.cuda.is_available() and fused_stats.available():
        return PythonModuleStats(writer, fallback, capacity)
    return None
