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

from tensordiff.probes import cpu_stats, fast_module_stats, fused_stats
from tensordiff.probes.gpu_stats import StatsBatcher
from tensordiff.probes.snapshot import Snapshot, snapshot, tensor_layout
from tensordiff.schema import ROOT, module_record  # noqa: F401 (ROOT: re-exported)
from tensordiff.tensors import version_of as _version

def _fingerprint(t: torch.Tensor) -> float | int | None:
    """A checksum of a CPU tensor's values (None elsewhere: comparing it would need a device sync)."""
    if not t.is_cpu or t.is_complex():  # (is_cpu: a tenth of device.type's cost)
        return None
    fast = cpu_stats.checksum(t)  # one native pass; no detach first (an op a dispatch mode would see)
    if fast is not None:
        return fast
    d = t.detach()
    try:  # numpy's sum has a quarter of a torch op's overhead; this runs twice per op-level record
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is a fine fingerprint: NaN
            return float(d.numpy().sum(dtype=np.float64))
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16)
        return float(torch.sum(d, dtype=torch.float64))


class CaptureSession:
    """Names records, keeps the module scope stack and sends snapshots to the trace writer."""

    def __init__(self, writer, save_data: bool = True, module_filter: str | None = None, replayer=None,
                 fast_gpu_stats: bool = False, keep=None, live=None, native_cpu: bool = False):
        self.writer = writer
        # observers/live_compare: the reference's capture keeps its module records (``keep``); an
        # in-process target's measures each of its records against them as it is made (``live``)
        self.keep = keep
        self.live = live
        self.save_beyond = False  # live: save the data of the records of calls beyond tolerance
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
        self._uninit: dict = {}  # id(tensor) -> (weakref, version at allocation): never-written memory
        self._ring = None  # the writer's staging ring for CPU copies (False: it has none)
        self._records = 0  # records of the general path (records: with the fast paths')
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
        # Module-level GPU stats without per-record objects (fast_module_stats: C++ or Python behind
        # one interface): CUDA tensors' stats go into one fused kernel launch each, their index rows
        # into blocks handed to the writer whole.
        self.fast = None
        # (a live target's deferred replay runs after the forward: its records may take this path too)
        if fast_gpu_stats and not save_data and (replayer is None or live is not None) and self.batcher is not None \
                and torch.cuda.is_available():
            self.fast = fast_module_stats.choose(writer, self.emit_general)
        # CPU records that keep only stats: made in C++ (fast_records.cpp CpuRecords) where it builds,
        # a tenth of the Python path's cost per record. Asked for by op-level captures (``native_cpu``),
        # where records are many: a module-level one does not wait for the extension's first build.
        # Not while a live comparison or a kept reference needs the tensors themselves.
        self.native = None
        if native_cpu and not save_data and keep is None and live is None \
                and os.environ.get("TENSORDIFF_CPU_RECORDS") != "python":
            from tensordiff.probes import fast_records

            self.native = fast_records.cpu_records()
        # module records straight from C++ into an asynchronous writer's batch (emit_module)
        self._native_modules = self.native is not None and not getattr(writer, "synchronous", True)
        if self._native_modules:
            self.native.attach(writer)
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
        if self.fast is not None:
            self.fast.flush()
        if self.batcher is not None:
            self.quietly(self.batcher.flush)
        hand_over = getattr(self.writer, "hand_over", None)
        if hand_over is not None:
            hand_over()

    def close(self) -> None:
        """The capture is over: drop what ties this session and its writer together, so both are
        freed when the caller lets go (the native records hold the writer from C++, where the garbage
        collector cannot see the cycle)."""
        if self.native is not None:
            self.native.close()
        if getattr(self.writer, "before_block", None) == self.flush_stats:
            self.writer.before_block = lambda: None

    @property
    def records(self) -> int:
        return self._records + (self.fast.records if self.fast is not None else 0) \
            + (self.native.count if self.native is not None else 0)

    def begin_forward(self) -> None:
        if not self._writer_runs_ops and hasattr(self.writer, "hold"):
            self.writer.hold()  # records wait: the writer's Python would slow the forward

    def end_of_forward(self) -> None:
        """The root module returned: hand over every pending stat, forget tensor identities. The
        writer stays quiet until the run ends (capture() or the writer's close say so): its Python
        would otherwise hold the GIL right when the caller syncs on the forward's results."""
        self.flush_stats()
        if self.fast is not None:
            self.fast.forget()

    # -- module records ------------------------------------------------------------------------
    def emit_module(self, module: str, direction: str, call: int, slot: str, source: str, t: torch.Tensor,
                    extra: dict | None = None) -> None:
        """One module record. CUDA tensors in fast mode cost a few microseconds here (see
        fast_module_stats); the writer thread builds the index row later."""
        if self.keep is not None or self.live is not None:
            key = f"{module}/{direction}#{call}/{slot}"
            if self.keep is not None:
                self.keep.keep(key, t)
            if self.live is not None and direction == "forward":
                self.live.add(key, t)  # (module level only: no op probe to hide its work from)
        if self.fast is not None:
            if t.is_cuda and extra is None:
                self.fast.emit(module, direction, call, slot, source, t)
                return
            self.fast.flush()  # keep execution order in the file
        if self._native_modules and extra is None and not self._uninit \
                and self.native.emit_module(module, direction, call, slot, source, t):
            return
        self.emit_general(module, direction, call, slot, source, t, extra)

    def emit_general(self, module: str, direction: str, call: int, slot: str, source: str, t: torch.Tensor,
                     extra: dict | None = None) -> None:
        rec = module_record(module, direction, call, slot, source)
        if extra:
            rec.update(extra)
        self.emit(rec, t)

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

    def mark_uninitialized(self, tensor: torch.Tensor) -> None:
        """A tensor fresh from an uninitialising allocation (aten::empty...): its records, and those
        of its views, say so until an op writes into it (its version counter moves)."""
        self._uninit[id(tensor)] = (weakref.ref(tensor), _version(tensor))

    def _is_uninitialized(self, tensor: torch.Tensor) -> bool:
        entry = self._uninit.get(id(tensor))
        if entry is None and tensor._base is not None:  # a view of one
            entry = self._uninit.get(id(tensor._base))
            if entry is not None and entry[0]() is not tensor._base:
                return False
        elif entry is not None and entry[0]() is not tensor:
            return False
        return entry is not None and entry[1] is not None and entry[1] == _version(tensor)

    def _staging_ring(self):
        if self._ring is None:
            self._ring = getattr(self.writer, "staging_ring", False)
        return self._ring or None

    def emit_op(self, base: dict, prefix: str, kind: str, tensors: list, save_data: bool | None = None,
                same_as: torch.Tensor | None = None, extra: dict | None = None, start: int = 0) -> None:
        """The records of one op's tensors from ``start`` on: ``base`` fields, key ``{prefix}/{kind}.{i}``,
        slot ``{kind}.{i}``, ``extra[i]`` fields (an observer's); ``same_as`` as in ``emit``, for the
        first tensor (index 0)."""
        save = self.save_data if save_data is None else save_data
        if self.native is not None and not save and not self._uninit and not extra:
            writer = self.writer
            while start < len(tensors):
                stop = self.native.emit_op(base, prefix, kind, tensors, start, same_as, writer.native_batch(), True)
                writer.native_added()
                if stop < 0:
                    return
                # a tensor the native path does not take (not a dense CPU float tensor): this one here
                self.emit({**base, "key": f"{prefix}/{kind}.{stop}", "slot": f"{kind}.{stop}"}, tensors[stop],
                          save_data=save_data, same_as=same_as if stop == 0 else None)
                start = stop + 1
            return
        for i in range(start, len(tensors)):
            rec = {**base, "key": f"{prefix}/{kind}.{i}", "slot": f"{kind}.{i}"}
            if extra and i in extra:
                rec.update(extra[i])
            self.emit(rec, tensors[i], save_data=save_data, same_as=same_as if i == 0 else None)

    def emit(self, record: dict, tensor: torch.Tensor, save_data: bool | None = None,
             same_as: torch.Tensor | None = None) -> None:
        """One record. ``same_as``: the input a view op's output was made from (recorded just before
        the op ran), so a view with the same elements becomes an alias instead of a new stats pass."""
        # (``record`` is the caller's fresh dict: completed in place, not copied)
        save = self.save_data if save_data is None else save_data
        if self._uninit and self._is_uninitialized(tensor):
            record["uninitialized"] = True
        if self.native is not None and not save:
            writer = self.writer
            if self.native.emit(record, tensor, same_as, writer.native_batch(), True):
                writer.native_added()  # (counted in native.count)
                return
            # (not a dense CPU float tensor: the Python path below takes it)
        original = self._already_captured(tensor, save)
        if original is None and same_as is not None and not save:
            seen = self._same_elements_as(tensor, same_as)
            if seen is not None:
                original = seen[1]
                in_order = tensor.is_contiguous() and same_as.is_contiguous()
                if not in_order:
                    record["stats_only"] = True  # the original's bytes are not in this order
                self._seen[id(tensor)] = (weakref.ref(tensor), original, _version(tensor), seen[3], seen[4] and in_order)
        if original is not None:
            # The same tensor, unchanged since it was captured (a module's output is the next one's
            # input; an op's output is the next op's input): record an alias, copy nothing.
            record["alias_of"] = original
            snap = Snapshot(tensor_layout(tensor), None, None)
        else:
            ring = self._staging_ring() if save and tensor.is_cpu else None
            snap = self.quietly(snapshot, tensor, save, self.batcher, ring)
            fingerprint = snap.checksum
            if fingerprint is None and tensor.is_cpu:
                fingerprint = self.quietly(_fingerprint, tensor)
            # (weakref, key, version, CPU checksum, data saved?): keyed by id, the weakref tells a
            # recycled id from the tensor itself
            self._seen[id(tensor)] = (weakref.ref(tensor), record["key"], _version(tensor), fingerprint,
                                      snap.data is not None and snap.save)
        if self._writer_runs_ops:
            self.quietly(self.writer.write, record, snap)  # its torch ops are ours, not the model's
        else:
            self.writer.write(record, snap)  # queued: the writer's thread does the work
        self._records += 1
