"""What the probes share while a model runs: record naming, the module scope stack, the sink.

Record keys are stable between backends so the diff engine can pair them:

    model.layers.0.mlp/forward#0/output.0            module record: module path, call, slot
    model.layers.0.input_layernorm/forward#0/op0003.mul.Tensor/out.0    op record in that module scope
    __backward__/backward#0/op0012.mm/in.1          op run by autograd (no module scope)

The root module is called ``__root__`` (``named_modules()`` gives it the empty name).
"""
from __future__ import annotations

import os
import re
import weakref
from collections import defaultdict

import numpy as np
import torch

from tensordiff.probes import cpu_stats, fused_stats
from tensordiff.probes.gpu_stats import StatsBatcher
from tensordiff.probes.snapshot import Snapshot, snapshot, tensor_layout
from tensordiff.schema import ROOT, module_record  # noqa: F401 (ROOT: re-exported)

BLOCK_RECORDS = 1024  # fast GPU stats: records per stats buffer and per writer block
def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None where it has none, e.g. inference tensors)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _fingerprint(t: torch.Tensor) -> float | int | None:
    """A checksum of a CPU tensor's values (None elsewhere: comparing it would need a device sync)."""
    if t.device.type != "cpu" or t.is_complex():
        return None
    d = t.detach()
    fast = cpu_stats.checksum(d)  # one native pass over the bytes; None for a strided view
    if fast is not None:
        return fast
    try:  # numpy's sum has a quarter of a torch op's overhead; this runs twice per op-level record
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is a fine fingerprint: NaN
            return float(d.numpy().sum(dtype=np.float64))
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16)
        return float(torch.sum(d, dtype=torch.float64))


class CaptureSession:
    """Names records, keeps the module scope stack and sends snapshots to the trace writer."""

    def __init__(self, writer, save_data: bool = True, module_filter: str | None = None, replayer=None,
                 fast_gpu_stats: bool = False):
        self.writer = writer
        self.replayer = replayer               # probes/replay.Replayer: local errors, or None
        self.save_data = save_data
        self._filter = re.compile(module_filter) if module_filter else None
        self.calls = defaultdict(int)          # (module, direction) -> calls so far
        self.op_counts = defaultdict(int)      # scope -> ops so far
        self.scopes: list[tuple[str, str]] = []  # (module, scope) innermost last
        self.direction = "forward"
        self.drilling = False                  # True while a module call is re-run at op level
        self.error: dict | None = None         # where an exception left the model (innermost call, op)
        self.busy = False                      # True while we compute our own stats: not user ops
        self.records = 0
        self.last_record: dict | None = None
        self._seen: dict = {}  # id(tensor) -> (weakref, key, version, CPU checksum, data saved?)
        # GPU stats without a sync per tensor: one fused launch per tensor where the kernel is available
        # (exact under later in-place ops), else batched reductions; not with a synchronous writer,
        # which would wait on itself.
        self.batcher = None
        self._writer_runs_ops = getattr(writer, "synchronous", True)
        if not getattr(writer, "synchronous", False):
            exact = torch.cuda.is_available() and fused_stats.available()
            self.batcher = fused_stats.LaunchingBatcher() if exact else StatsBatcher()
        writer.before_block = self.flush_stats  # never let the writer wait on stats not yet computed
        # Module-level GPU stats without per-record objects: CUDA tensors' stats go into one fused kernel
        # launch each and their index rows into a block handed to the writer whole (see emit_module).
        self._fast = (fast_gpu_stats and not save_data and replayer is None and self.batcher is not None
                      and torch.cuda.is_available() and fused_stats.available())
        self._block: list = []            # record tuples waiting for their stats buffer's copy to host
        self._block_stats = None          # fused_stats.FusedStatsBuffer of the block
        self._fast_seen: dict = {}        # (ptr, numel, dtype) or id -> (weakref, version, record id)
        # The same work in C++ (probes/fast_records.cpp) when it builds: ~1 us per record instead of ~10.
        self._rec = None
        if self._fast:
            from tensordiff.probes import fast_records

            self._rec = fast_records.recorder(BLOCK_RECORDS)
        # Crash breadcrumbs: "about to run X" lines written straight to a file descriptor (no Python
        # buffering), so a process killed by the target still tells where it was.
        fd = os.environ.get("TENSORDIFF_PROGRESS_FD")
        self._progress_fd = int(fd) if fd else None

    def progress(self, text: str) -> None:
        if self._progress_fd is not None:
            os.write(self._progress_fd, (text + "\n").encode())

    def wants_module(self, name: str) -> bool:
        return self._filter is None or bool(self._filter.search(name))

    def next_call(self, module: str, direction: str) -> int:
        call = self.calls[(module, direction)]
        self.calls[(module, direction)] = call + 1
        return call

    def current_scope(self) -> tuple[str, str]:
        if self.scopes:
            return self.scopes[-1]
        if self.direction == "backward":
            return "__backward__", "__backward__/backward#0"
        return ROOT, f"{ROOT}/{self.direction}#0"

    def _already_captured(self, tensor: torch.Tensor, need_data: bool) -> str | None:
        seen = self._seen.get(id(tensor))
        if seen is None or seen[0]() is not tensor or seen[2] is None or seen[2] != _version(tensor) \
                or (need_data and not seen[4]):
            return None
        if seen[3] is None:
            return seen[1]  # not a CPU tensor: the version counter is all we can check without a sync
        # A kernel writing through a raw data_ptr() (kt-kernel, a custom extension) does not bump the
        # version counter: on the CPU, where a check is cheap and sync-free, confirm the data too.
        fingerprint = self.quietly(_fingerprint, tensor)
        if fingerprint != seen[3] and not (fingerprint != fingerprint and seen[3] != seen[3]):
            return None
        return seen[1]

    def flush_stats(self) -> None:
        if self._block or (self._rec is not None and self._rec.pending()):
            self._flush_block()
        if self.batcher is not None:
            self.quietly(self.batcher.flush)
        hand_over = getattr(self.writer, "hand_over", None)
        if hand_over is not None:
            hand_over()

    def begin_forward(self) -> None:
        if self._fast:
            self.writer.quiet.clear()  # stats blocks wait: the writer's Python would slow the forward

    def end_of_forward(self) -> None:
        """The root module returned: hand over every pending stat, forget tensor identities. The
        writer stays quiet until the run ends (capture() or the writer's close say so): its Python
        would otherwise hold the GIL right when the caller syncs on the forward's results."""
        self.flush_stats()
        self._fast_seen.clear()
        if self._rec is not None:
            self._rec.forget()

    # -- module records ------------------------------------------------------------------------
    def emit_module(self, module: str, direction: str, call: int, slot: str, source: str, t: torch.Tensor,
                    extra: dict | None = None) -> None:
        """One module record. CUDA tensors in fast mode cost a few microseconds here: a tuple, an alias
        lookup and one stats kernel launch; the writer thread builds the index row later."""
        if self._fast and t.is_cuda and extra is None:
            # inlined _emit_fast for an alias (half of all module records): no stats, no launch
            version = t._version
            contiguous = t.is_contiguous()
            ident = (t.data_ptr(), t.numel(), t.dtype) if contiguous else id(t)
            seen = self._fast_seen.get(ident)
            if seen is not None and seen[1] == version and seen[0]() is not None:
                self._block.append(((module, direction, call, slot), source, t.shape, t.stride(),
                                    t.storage_offset(), t.dtype, -1, seen[2], t.device))
                self.records += 1
            else:
                self._emit_fast(module, direction, call, slot, source, t, version, contiguous, ident)
            return
        if self._block or (self._rec is not None and self._rec.pending()):
            self._flush_block()  # keep execution order in the file
        rec = module_record(module, direction, call, slot, source)
        if extra:
            rec.update(extra)
        self.emit(rec, t)

    def _emit_fast(self, module, direction, call, slot, source, t, version, contiguous, ident) -> None:
        """A record whose tensor is new: one stats launch. ``ident`` is how a later record of the
        same data is recognised: stats do not depend on shape, so a contiguous view of captured memory
        (q_proj's output seen as q_norm's [.., heads, dim] input) is the same data while the version
        counter (shared by views) has not moved and the captured tensor still owns that memory."""
        rid = (module, direction, call, slot)
        buf = self._block_stats
        if buf is None or buf.device_index != t.get_device():
            if buf is not None:
                self._flush_block()
            buf = self._block_stats = fused_stats.FusedStatsBuffer(t.device, BLOCK_RECORDS)
        row = buf.add(t, contiguous)
        if row is None:  # the block is full
            self._flush_block()
            buf = self._block_stats = fused_stats.FusedStatsBuffer(t.device, BLOCK_RECORDS)
            row = buf.add(t, contiguous)
        self._fast_seen[ident] = (weakref.ref(t), version, rid)
        self._block.append((rid, source, t.shape, t.stride(), t.storage_offset(), t.dtype, row, None, t.device))
        self.records += 1

    def record_tensors(self, obj, module: str, direction: str, call: int, prefix: str, source: str,
                       bare_tensor_is_tuple: bool) -> None:
        """Module records of every tensor in obj through the C++ recorder (fast mode with _rec);
        tensors it does not take (not on CUDA) go through emit_module."""
        others = self._rec.record(obj, module, direction, call, prefix, source, bare_tensor_is_tuple)
        if others is not None:
            for slot, t in others:
                self.emit_module(module, direction, call, slot, source, t)

    def _flush_block(self) -> None:
        if self._rec is not None and self._rec.pending():
            block = self._rec.detach()  # its records become Python tuples in the writer's thread
            self.writer.write_block(block, [fused_stats.copy_to_host(raw, numel) for raw, numel in block.buffers()])
            self.records += len(block)
        if not self._block:
            return
        block, self._block = self._block, []
        buf, self._block_stats = self._block_stats, None
        self.writer.write_block(block, [buf.finish()] if buf is not None else [])

    def quietly(self, fn, *args):
        """Run our own tensor work (replays, copies) without the op probe recording it."""
        was, self.busy = self.busy, True
        try:
            return fn(*args)
        finally:
            self.busy = was

    def _same_elements_as(self, tensor: torch.Tensor, base: torch.Tensor) -> tuple | None:
        """The capture entry of ``base`` when ``tensor`` (a view op's output) holds exactly its
        elements: same memory, dtype and count, both without gaps (a reshape, a transpose). Its
        stats are then base's, and so is its checksum; its data too while the order is the same."""
        seen = self._seen.get(id(base))
        if seen is None or seen[0]() is not base or seen[2] is None or seen[2] != _version(base):
            return None
        if tensor.dtype != base.dtype or tensor.numel() != base.numel() or tensor.data_ptr() != base.data_ptr() \
                or tensor.layout != torch.strided or base.layout != torch.strided \
                or not cpu_stats.dense(tensor) or not cpu_stats.dense(base):
            return None
        return seen

    def emit(self, record: dict, tensor: torch.Tensor, save_data: bool | None = None,
             same_as: torch.Tensor | None = None) -> None:
        """One record. ``same_as``: the input a view op's output was made from (recorded just before
        the op ran), so a view with the same elements becomes an alias instead of a new stats pass."""
        save = self.save_data if save_data is None else save_data
        original = self._already_captured(tensor, save)
        if original is None and same_as is not None and not save:
            seen = self._same_elements_as(tensor, same_as)
            if seen is not None:
                in_order = tensor.is_contiguous() and same_as.is_contiguous()
                record = {**record, "alias_of": seen[1]}
                if not in_order:
                    record["stats_only"] = True  # the original's bytes are not in this view's order
                self._seen[id(tensor)] = (weakref.ref(tensor), seen[1], _version(tensor), seen[3], seen[4] and in_order)
                self.writer.write(record, Snapshot(tensor_layout(tensor), None, None))
                self.records += 1
                self.last_record = record
                return
        if original is not None:
            # The same tensor, unchanged since it was captured (a module's output is the next one's
            # input; an op's output is the next op's input): record an alias, copy nothing.
            record = {**record, "alias_of": original}
            snap = Snapshot(tensor_layout(tensor), None, None)
        else:
            snap = self.quietly(snapshot, tensor, save, self.batcher)
            fingerprint = snap.checksum
            if fingerprint is None and tensor.device.type == "cpu":
                fingerprint = self.quietly(_fingerprint, tensor)
            # (weakref, key, version, CPU checksum, data saved?): keyed by id, the weakref tells a
            # recycled id from the tensor itself
            self._seen[id(tensor)] = (weakref.ref(tensor), record["key"], _version(tensor), fingerprint,
                                      snap.data is not None and snap.save)
        if self._writer_runs_ops:
            self.quietly(self.writer.write, record, snap)  # its torch ops are ours, not the model's
        else:
            self.writer.write(record, snap)  # queued: the writer's thread does the work
        self.records += 1
        self.last_record = record
