"""The trace file: one HDF5 file per run, written as the model runs, readable even if the run died.

Schema (``schema_version`` 2; version 1 files, one dataset per record under /data, still read);
the only module that imports h5py:

    /                      attrs: format="tensordiff-trace", schema_version=2, complete (bool),
                                  metadata (JSON: model, backend, versions, device, dtype, seed, ...)
    /index                 1-D variable-length UTF-8 strings, one JSON object per record, in execution
                           order: key, seq, kind, direction, module, call, scope, op, op_index, slot,
                           source, shape, dtype, device, stride, storage_offset, contiguous, has_data
    /stats                 float64 [n_records, 9]: min max mean mean_abs std l2 nan inf zero
                           (moments over finite elements; counts of NaN, Inf and exact zeros)
    /blob                  uint8 [n]: every saved tensor's bytes, back to back, in logical shape
                           (row-major); the index row's ``data_offset`` / ``data_nbytes`` say where.
                           One dataset written in batches: creating an HDF5 dataset per record cost
                           ~0.7 ms each, most of an op-level capture. A record whose index row has
                           ``alias_of`` shares the data and stats of that earlier record (the same
                           tensor, unchanged in between). Dtypes numpy lacks (bfloat16, float8) are
                           stored bit-exactly as same-width unsigned ints; the row's ``dtype`` names the
                           torch dtype. Rows without data_offset saved stats only.

The writer streams from a background thread through a byte-bounded queue (memory stays bounded
whatever the record count); the thread starts with the first work that cannot wait for the traced
run's end, so a stats-only capture's rows are written by ``close()`` itself. Each file starts as a
copy of an empty trace file made once per process, renamed over the path. Index rows are committed
and the file flushed in batches (every 256 records or 0.2 s; every record in synchronous mode, used
for targets that may crash): a writer killed with SIGKILL leaves every acknowledged record readable,
and ``complete`` stays False so the reader reports the trace partial.

    with TraceWriter("ref.h5", {"model": "qwen"}) as w:
        w.add({"module": "model.norm", "slot": "output.0"}, tensor)   # or w.write(record, snapshot)
    trace = open_trace("ref.h5"); trace.index; trace.tensor("model.norm/forward#0/output.0")
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
import torch

from tensordiff.errors import TensordiffError

from tensordiff.schema import FORMAT, INDEX_FIELDS, SCHEMA_VERSION, STAT_NAMES, module_record  # noqa: F401

# torch dtypes numpy cannot hold: stored as the same-width unsigned integer, bit for bit.
BLOB_CHUNK = 1 << 20  # bytes per /blob chunk

_BIT_STORED = {
    torch.bfloat16: np.uint16,
    torch.float8_e4m3fn: np.uint8,
    torch.float8_e5m2: np.uint8,
}


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise TensordiffError(f"unknown dtype {name!r} in trace")
    return dt


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype a torch dtype is stored as (bit-exact same-width ints where numpy lacks it)."""
    if dtype in _BIT_STORED:
        return np.dtype(_BIT_STORED[dtype])
    return torch.empty(0, dtype=dtype).numpy().dtype


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype in _BIT_STORED:
        return t.view(torch.uint16 if t.element_size() == 2 else torch.uint8).numpy()
    return t.numpy()


try:
    import orjson
except ImportError:  # a dependency; without it the standard encoder does the same work, slower
    orjson = None


def _has_nonfinite(value) -> bool:
    if isinstance(value, float):
        return value != value or value in (float("inf"), float("-inf"))
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_nonfinite(v) for v in value)
    return False


def row_text(row: dict) -> str:
    """One index row as JSON text. orjson encodes a row in a fifth of the standard encoder's time (it
    was 7 us of the ~15 us the writer spends per op-level record), but writes NaN and Infinity as
    null, and refuses what the standard encoder accepts (keys that are not strings, huge ints): such
    rows take the standard encoder, so every row reads back the same either way."""
    if orjson is not None:
        try:
            text = orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError:  # (orjson.JSONEncodeError is one)
            return json.dumps(row)
        if b"null" not in text or not _has_nonfinite(row):
            return text.decode()
    return json.dumps(row)


def _stats_matrix(rows: list) -> np.ndarray:
    """[len(rows), 9] float64 from stats rows that are 72 bytes (the native records') or float64
    arrays of 9 (``_append``'s): one join of their bytes, not an array conversion per row."""
    try:
        flat = b"".join(rows)
    except (BufferError, TypeError):  # a row that is not one contiguous buffer
        flat = b"".join(r if isinstance(r, bytes) else np.ascontiguousarray(r, np.float64).tobytes() for r in rows)
    if len(flat) != 72 * len(rows):
        raise ValueError(f"stats rows of {len(flat)} bytes for {len(rows)} records (expected 72 each)")
    return np.frombuffer(flat, np.float64).reshape(len(rows), 9)


# Stats-only batches that may queue while a traced run holds the writer before its thread works
# on them anyway (and is started for them)
_HELD_BATCHES = 256

_SKELETONS: dict = {}  # compression -> the bytes of an empty trace file


def _skeleton(compression: str | None) -> bytes:
    """An empty trace file (root attributes and the three datasets, no records), made once per
    process in memory: each writer copies its bytes and opens the copy, which takes 0.9 ms against
    2 ms for h5py to create the attributes and datasets again."""
    import io

    import h5py

    if compression not in _SKELETONS:
        image = io.BytesIO()
        with h5py.File(image, "w") as f:  # default libver: no open-for-write flag to trip on after a crash
            f.attrs["format"] = FORMAT
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["complete"] = False
            f.attrs["metadata"] = "{}"
            f.create_dataset("index", shape=(0,), maxshape=(None,), chunks=(256,), dtype=h5py.string_dtype())
            f.create_dataset("stats", shape=(0, 9), maxshape=(None, 9), chunks=(256, 9), dtype="f8")
            f.create_dataset("blob", shape=(0,), maxshape=(None,), chunks=(BLOB_CHUNK,), dtype="u1",
                             compression=compression)
        _SKELETONS[compression] = image.getvalue()
    return _SKELETONS[compression]


def _write_attr(file, name: str, value) -> None:
    """Rewrite an existing scalar attribute in place (a str or a bool, as the skeleton made it):
    h5py's ``attrs[name] = value`` makes a new attribute and renames it over the old, ~0.3 ms."""
    import h5py

    data = np.array(value, dtype=h5py.string_dtype() if isinstance(value, str) else None)
    h5py.h5a.open(file.id, name.encode()).write(data)


def _append_rows(dataset, start: int, rows: np.ndarray) -> None:
    """rows into ``dataset`` from row ``start`` on, extending it: h5py's low-level calls (the
    slicing API's selection and type checks cost ~0.2 ms a commit)."""
    import h5py

    dataset.id.set_extent((start + len(rows),) + rows.shape[1:])
    space = dataset.id.get_space()
    space.select_hyperslab((start,) + (0,) * (rows.ndim - 1), rows.shape)
    dataset.id.write(h5py.h5s.create_simple(rows.shape), space, rows)


def _is_contiguous(shape, stride) -> bool:
    """torch's rule: row-major strides, ignoring dimensions of size 1; empty tensors are contiguous."""
    expected = 1
    for size, st in zip(reversed(tuple(shape)), reversed(tuple(stride))):
        if size == 0:
            return True
        if size != 1:
            if st != expected:
                return False
            expected *= size
    return True


class TraceWriter:
    """Streams records into one HDF5 file. Use as a context manager; ``close()`` marks it complete."""

    def __init__(self, path, metadata: dict, compression: str | None = None,
                 max_pending_bytes: int = 512 << 20, synchronous: bool = False):
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # written beside and renamed over: a reader of an older file at this path keeps its copy
        fresh = self.path.with_name(f".{self.path.name}.{os.getpid()}.new")
        with open(fresh, "wb") as out:
            out.write(_skeleton(compression))
        os.replace(fresh, self.path)
        self._file = h5py.File(self.path, "r+")
        # the metadata as written, kept here: updates need not read the attribute back (~1 ms)
        self._metadata = json.loads(json.dumps(metadata, default=str))
        _write_attr(self._file, "metadata", json.dumps(self._metadata))
        self._index, self._stats, self._blob = (h5py.Dataset(h5py.h5d.open(self._file.id, name))
                                                for name in (b"index", b"stats", b"blob"))
        self._blob_tail = np.zeros(0, np.uint8)  # the bytes of the last, partial chunk in the file
        self._blob_end = 0                 # bytes allotted to records so far
        self._blob_written = 0             # bytes in the file
        self._blob_pending: list = []      # uint8 arrays between the two
        self._compression = compression
        self._file.flush()
        self.count = 0
        self._seq_of: dict[str, int] = {}  # key -> seq, to resolve aliases (the writer thread's)
        self._added: set[str] = set()      # keys given to add() (the caller's thread)
        self._stats_by_seq: dict[int, np.ndarray] = {}
        self._has_data_by_seq: dict[int, bool] = {}
        self._rows_pending: list = []  # (index JSON, stats) not yet committed to the file
        self._amended = False  # a committed row was rewritten since the last flush
        self._committed = 0
        self._metadata_at_close: dict = {}  # set_metadata(at_close=True)
        self._last_commit = time.monotonic()
        self._cond = threading.Condition()
        # bytes queued = produced - consumed; each counter has one writing thread, so the producer's
        # common case (under budget) takes no lock: a blocking acquire hands the GIL to the writer's
        # thread and waits for it back
        self._produced_bytes = 0
        self._consumed_bytes = 0
        self._max_pending = max_pending_bytes
        self._queue: queue.Queue = queue.Queue()
        self._ring = None       # probes/staging.Ring lent to this writer (CPU copies), once asked for
        self._staged_upto = 0   # ring offset up to which the bytes are in the blob's pending list
        self._scratch: list = []  # native records of a synchronous writer, before they are written
        self._batch: list = []  # (record, snap, nbytes; -1: a native record and its stats row) not yet handed to the writer's thread
        self._batch_bytes = 0
        self._batch_carries = False  # a record in the batch has data (maybe in the staging ring); native ones never
        self._batch_since = 0.0
        self._error: BaseException | None = None
        # synchronous: write in the caller's thread. For targets that may crash the process: nothing
        # acknowledged can be lost in a queue when the process dies.
        self.synchronous = synchronous
        self.before_block = lambda: None  # called before write() waits for the queue to drain
        # Set while no traced run is going on. Stats-only blocks wait for it (or for 64 blocks queued):
        # the writer's Python (JSON rows, h5py calls) holds the GIL, and a GPU forward bound by the CPU
        # issuing kernels would wait on it.
        self.quiet = threading.Event()
        self.quiet.set()
        # records per hand-over to the thread: each wakes it (a GIL hand-off on the model's thread),
        # so more while a traced run holds the writer quiet (``hold``), when it would only wait on them
        self.batch_limit = 64
        # Started by the first hand-over it has work for: a stats-only capture's rows wait for the
        # end of the traced run anyway, and close() writes them itself (no thread to start and wake).
        self._thread = threading.Thread(target=self._drain, name="tensordiff-writer", daemon=True)

    # -- producer side (the probes) ------------------------------------------------------------
    def write(self, record: dict, snap) -> None:
        """Queue one record (index fields) with its Snapshot. Blocks while too many bytes are queued."""
        if self._error is not None:
            raise self._error
        if self.synchronous:
            self._write_now(record, snap)
            return
        # bytes this record holds in memory until written (also stats-only host copies); copies in the
        # staging ring hold none beyond the ring's own
        data = snap.data
        nbytes = 0 if data is None or data.release is not None else data.raw.numel()
        # Records travel to the writer's thread in batches: a hand-over (lock, condition, queue) costs
        # about as much as the rest of an op-level record. Only asynchronous writers batch; they lose
        # their queue with the process anyway.
        if not self._batch:
            self._batch_since = time.monotonic()
        self._batch.append((record, snap, nbytes))
        self._batch_bytes += nbytes
        self._batch_carries |= snap.data is not None
        if len(self._batch) >= self.batch_limit or self._batch_bytes >= 8 << 20 \
                or time.monotonic() - self._batch_since > 0.1:
            self.hand_over()

    def native_batch(self) -> list:
        """The list the native CPU records (probes/fast_records.cpp CpuRecords) append to: (record with
        its layout and alias, its stats row as 72 bytes (an alias: its original's), -1) each, or ((the
        row's JSON text without its closing brace, key), stats as before, -2). An alias there refers
        to another native record, which never has data. Call ``native_added`` after appending."""
        if self._error is not None:
            raise self._error
        if self.synchronous:
            return self._scratch
        if not self._batch:
            self._batch_since = time.monotonic()
        return self._batch

    def native_added(self) -> None:
        if self.synchronous:  # written now: nothing acknowledged may wait in a list
            items, self._scratch = self._scratch, []
            for record, stats, n in items:
                self._write_native(record, stats) if n == -1 else self._write_native_text(record, stats)
        elif len(self._batch) >= self.batch_limit or time.monotonic() - self._batch_since > 0.1:
            self.hand_over()

    @property
    def _pending_bytes(self) -> int:
        return self._produced_bytes - self._consumed_bytes

    def hand_over(self, start: bool = True) -> None:
        """Queue the batched records now (also at the end of a forward: the writer may work). Blocks
        while too many bytes are queued. A batch of stats only, while a traced run holds the writer
        (or ``start=False``), does not start its thread: it would wait for the run's end anyway."""
        if not self._batch:
            return
        batch, nbytes, carries_data = self._batch, self._batch_bytes, self._batch_carries
        self._batch, self._batch_bytes, self._batch_carries = [], 0, False
        if nbytes and self._pending_bytes > 0 and self._pending_bytes + nbytes > self._max_pending:
            self.before_block()  # e.g. compute batched stats the queued records wait for
            with self._cond:
                while self._pending_bytes > 0 and self._pending_bytes + nbytes > self._max_pending:
                    self._cond.wait()
        self._produced_bytes += nbytes
        self._queue.put((("batch", batch, carries_data), None, nbytes))
        if start and (carries_data or nbytes or self.quiet.is_set() or self._queue.qsize() >= _HELD_BATCHES):
            self._start()

    def _start(self) -> None:
        if self._thread.ident is None:  # (never started: a thread starts once)
            self._thread.start()

    def add(self, record: dict, tensor: torch.Tensor, save: bool = True) -> None:
        """The plain record-adding API (importers of foreign dumps, tests): ``record`` holds index
        fields (``schema.py``; at least ``module`` and ``slot``, or a ``key``), the tensor's layout
        and stats are computed here, its data saved unless ``save=False``."""
        from tensordiff.probes.snapshot import snapshot

        if "key" not in record and not {"module", "slot"} <= set(record):
            raise TensordiffError(f"{self.path}: a record needs a key, or a module and a slot: {record}")
        base = module_record(record.get("module", ""), record.get("direction", "forward"),
                             int(record.get("call", 0)), record.get("slot", ""), record.get("source", ""))
        rec = {**base, **record}
        if rec["key"] in self._added:
            raise TensordiffError(f"{self.path}: record {rec['key']!r} is already in the trace")
        self._added.add(rec["key"])
        self.write(rec, snapshot(tensor.detach().cpu(), save_data=save))

    def write_block(self, records, parts: list) -> None:
        """Queue a block of module records from the fast GPU stats path (probes/session.emit_module):
        tuples (record id, source, shape, stride, storage_offset, dtype, stats row, alias id, device)
        (or a fast_records Block that makes them), and their stats: parts [(host, CUDA event or None),
        ...] in row order, ``host.numpy()`` [rows, 9] valid once its event is done."""
        if self._error is not None:
            raise self._error
        if self.synchronous:
            self._write_block(records, parts)
        else:
            self.hand_over()
            self._queue.put((("block", records), parts, 0))
            self._start()

    def amend(self, key: str, fields: dict, snap=None) -> None:
        """Facts learnt about a record after it was written (a live comparison's metrics, a replay's
        local error), and optionally its data (``snap``: a Snapshot with data; for a record that was
        written as stats only). Applied in order after the record itself."""
        self.amend_many([(key, fields, snap)])

    def amend_many(self, items: list) -> None:
        """``amend`` for many records at once: (key, fields, snap or None) each. Committed rows are
        read and rewritten in one slice (one h5py call per row cost 0.4 ms)."""
        if self._error is not None:
            raise self._error
        if self.synchronous:
            self._amend_batch(items)
            return
        self.hand_over()
        nbytes = sum(snap.data.raw.numel() for _, _, snap in items if snap is not None and snap.data is not None)
        if nbytes:
            with self._cond:
                while self._pending_bytes > 0 and self._pending_bytes + nbytes > self._max_pending:
                    self._cond.wait()
        self._produced_bytes += nbytes
        self._queue.put((("amend", items), None, nbytes))
        self._start()

    @property
    def staging_ring(self):
        """Reused host memory for the producer's CPU copies (probes/staging); given back at close."""
        if self._ring is None:
            from tensordiff.probes import staging

            self._ring = staging.borrow()
        return self._ring

    @property
    def acknowledged(self) -> int:
        """Records committed to the file: these survive a SIGKILL of this process. (Asked from the
        producer's thread: what it batched is handed over, so the count moves.)"""
        self.hand_over()
        if not self._queue.empty():  # (a synchronous writer never queues)
            self._start()
        return self._committed

    def set_metadata(self, at_close: bool = False, **items) -> None:
        """Add entries to the trace's metadata. ``at_close``: written by close() with the file's
        last attributes, without a flush of its own (a traced run's summary, right before close)."""
        if at_close:
            self._metadata_at_close.update(items)
            return
        if self.synchronous:
            self._update_metadata(items)
        else:
            self.hand_over()
            self._queue.put(("meta", items, 0))
            self._start()

    def _update_metadata(self, items: dict, flush: bool = True) -> None:
        self._metadata.update(json.loads(json.dumps(items, default=str)))
        _write_attr(self._file, "metadata", json.dumps(self._metadata))
        if flush:
            self._file.flush()

    # -- consumer side (background thread) -----------------------------------------------------
    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:  # idle: commit what is pending, so it is acknowledged
                try:
                    self._commit()
                except BaseException as exc:
                    self._error = exc
                continue
            if item is None:  # close() is waiting to close the file, which flushes it
                self._commit(flush=False)
                return
            try:
                if item[0] == "meta":
                    self._update_metadata(item[1])
                elif isinstance(item[0], tuple) and item[0][0] == "batch":
                    # This thread's Python (JSON rows) holds the GIL the model's thread needs around
                    # every op: while a traced run goes on, stats-only batches wait (unless many
                    # queue up). Batches with bytes go on: their writes release the GIL, and the
                    # model would wait on the byte budget otherwise.
                    while not self.quiet.is_set() and not item[0][2] and self._queue.qsize() < _HELD_BATCHES \
                            and self._pending_bytes == 0:
                        self.quiet.wait(0.05)
                    self._write_batch(item[0][1])
                elif isinstance(item[0], tuple) and item[0][0] == "amend":
                    self._amend_batch(item[0][1])
                elif isinstance(item[0], tuple) and item[0][0] == "block":
                    # (records with data behind it could fill the byte budget the model waits on: go on)
                    while not self.quiet.is_set() and self._queue.qsize() < 64 and self._pending_bytes == 0:
                        self.quiet.wait(0.05)
                    self._write_block(item[0][1], item[1])
                else:
                    self._write_now(item[0], item[1])
                # Index rows are committed in batches (each h5py call holds the GIL the model's thread
                # needs): every 256 records or 0.2 s, whichever comes first, and at close; every 4096
                # while more batches wait (the queue after a traced run: each commit flushes the file)
                if len(self._rows_pending) >= (4096 if self._queue.qsize() else 256) \
                        or time.monotonic() - self._last_commit > 0.2 \
                        or self._blob_end - self._blob_written > 64 << 20 \
                        or (self._ring is not None and self._staged_upto - self._ring.tail > self._ring.size // 2):
                    self._commit()
            except BaseException as exc:  # surfaced to the producer on its next write / close
                self._error = exc
            finally:
                with self._cond:
                    self._consumed_bytes += item[2]
                    self._cond.notify_all()

    def _write_now(self, record: dict, snap) -> None:
        seq = self.count
        alias = record.get("alias_of")
        if alias is not None:  # same data as an earlier record: share its data and stats
            original = self._seq_of[alias]
            has_data = self._has_data_by_seq[original] and not record.pop("stats_only", False)
            row = {**record, **snap.layout, "seq": seq, "has_data": has_data}
            self._append(seq, row, self._stats_by_seq[original])
            return
        data = snap.data
        if data is not None and data.logical and snap.stats is not None:
            # bytes already in order and stats already taken (the CPU path): no torch op here, whose
            # GIL hand-offs would stall the model's thread
            host, raw = None, data.raw_numpy()
        else:
            host = data.materialize() if data is not None else None
            raw = np.ascontiguousarray(_to_numpy(host)).reshape(-1).view(np.uint8) if host is not None else None
        has_data = raw is not None and snap.save
        row = {**record, **snap.layout, "seq": seq, "has_data": has_data}
        if data is not None and data.release is not None:
            self._staged_upto = data.release  # records come in order: the latest is the furthest
        if has_data:
            row["data_offset"], row["data_nbytes"] = self._blob_end, int(raw.nbytes)
            self._blob_pending.append(raw)
            self._blob_end += raw.nbytes
        self._append(seq, row, snap.stats_numpy(host))

    def _write_native(self, record: dict, stats) -> None:
        seq = self.count
        alias = record.get("alias_of")
        record["seq"] = seq  # (the Python path's field order: seq, then has_data)
        if alias is not None:  # as _write_now (stats_only stays in the row where no bytes are shared)
            # (an original made as text is in no table here: native originals never have data)
            original = self._seq_of[alias]
            record["has_data"] = self._has_data_by_seq.get(original, False) and not record.pop("stats_only", False)
        else:
            record["has_data"] = False
        self._append(seq, record, np.frombuffer(stats, np.float64))

    def _amend_batch(self, items: list) -> None:
        seqs = [self._seq_of.get(key) for key, _, _ in items]
        old = [q for q in seqs if q is not None and q < self._committed]
        lo = min(old) if old else 0
        texts = list(self._index.asstr()[lo:max(old) + 1]) if old else []
        rows: dict = {}

        hi = lo + len(texts)

        def row_of(seq: int) -> dict:
            if seq not in rows:
                if seq >= self._committed:
                    text = self._rows_pending[seq - self._committed][0]
                else:  # an alias's original may lie before the slice read
                    text = texts[seq - lo] if lo <= seq < hi else self._index.asstr()[seq]
                rows[seq] = json.loads(text)
            return rows[seq]

        def give_data(seq: int, snap) -> bool:
            row = row_of(seq)
            if not row.get("has_data"):
                alias = row.get("alias_of")
                if alias is not None and alias in self._seq_of:  # the bytes belong to the original row
                    row["has_data"] = give_data(self._seq_of[alias], snap)
                else:
                    host = snap.data.materialize()
                    raw = np.ascontiguousarray(_to_numpy(host)).reshape(-1).view(np.uint8)
                    row["data_offset"], row["data_nbytes"] = self._blob_end, int(raw.nbytes)
                    self._blob_pending.append(raw)
                    self._blob_end += raw.nbytes
                    row["has_data"] = True
                self._has_data_by_seq[seq] = row["has_data"]
            return row["has_data"]

        for seq, (_, fields, snap) in zip(seqs, items):
            if seq is None:
                continue  # never written (a record the writer refused): nothing to amend
            row_of(seq).update(fields)
            if snap is not None and snap.data is not None:
                give_data(seq, snap)
        outside = {}
        for seq, row in rows.items():
            text = row_text(row)
            if seq >= self._committed:
                self._rows_pending[seq - self._committed] = (text, self._rows_pending[seq - self._committed][1])
            elif lo <= seq < hi:
                texts[seq - lo] = text
            else:
                outside[seq] = text
        if texts or outside:
            self._write_pending_blob()  # committed rows point at new bytes only once those are in the file
            if texts:
                self._index[lo:hi] = texts
            for seq, text in outside.items():
                self._index[seq] = text
            self._amended = True
        if self.synchronous:
            self._commit()

    def _write_block(self, records, parts: list) -> None:
        if not isinstance(records, list):  # a fast_records Block: its tuples are built here, off the model's path
            records = records.records()
        for _, event in parts:
            if event is not None:
                event.synchronize()  # releases the GIL
        stats = np.concatenate([host.numpy() for host, _ in parts]) if parts else None
        for rid, source, shape, stride, offset, dtype, row, alias, device in records:
            rec = module_record(*rid, source)
            rec.update(shape=list(shape), dtype=str(dtype).replace("torch.", ""), device=str(device),
                       stride=list(stride), storage_offset=int(offset), contiguous=_is_contiguous(shape, stride),
                       seq=self.count)
            if alias is not None:
                rec["alias_of"] = module_record(*alias)["key"]
                original = self._seq_of[rec["alias_of"]]
                rec["has_data"] = self._has_data_by_seq[original]
                self._append(self.count, rec, self._stats_by_seq[original])
            else:
                rec["has_data"] = False
                self._append(self.count, rec, stats[row])
        if len(self._rows_pending) >= 256:
            self._commit()

    def _write_batch(self, batch: list) -> None:
        """Records handed over together, in order: (record, snapshot, bytes) from ``write``, native
        ones marked -1 (a dict) or -2 (JSON text, numbered here in a loop of their own: ~1000 a
        forward at op level)."""
        i, n = 0, len(batch)
        while i < n:
            record, snap, mark = batch[i]
            if mark != -2:
                self._write_native(record, snap) if mark == -1 else self._write_now(record, snap)
                i += 1
                continue
            seq, seq_of, pending = self.count, self._seq_of, self._rows_pending
            while i < n and batch[i][2] == -2:
                (text, key), stats, _ = batch[i]
                pending.append((f'{text},"seq":{seq},"has_data":false}}', stats))
                seq_of[key] = seq
                seq += 1
                i += 1
            self.count = seq

    def _write_native_text(self, row: tuple, stats) -> None:
        """One native row made as JSON text (the fields of the dict it would have had, in its order):
        only seq and has_data are added here."""
        self._write_batch([(row, stats, -2)])
        if self.synchronous:
            self._commit()

    def _append(self, seq: int, row: dict, stats) -> None:
        self._rows_pending.append((row_text(row), np.asarray(stats, dtype=np.float64)))
        self._stats_by_seq[seq] = self._rows_pending[-1][1]
        self._has_data_by_seq[seq] = row["has_data"]
        self._seq_of[row["key"]] = seq
        self.count = seq + 1
        if self.synchronous:
            self._commit()

    def _commit(self, flush: bool = True) -> None:
        """Write pending index rows and flush: a record is acknowledged (readable after a SIGKILL)
        once its row is committed. Synchronous writers commit every record. ``flush=False``: the
        last commit before the file is closed, which flushes it (a flush costs ~0.7 ms)."""
        if not self._rows_pending:
            if self._amended:
                self._file.flush()
                self._amended = False
            return
        self._write_pending_blob()  # data first: a committed row always finds its bytes
        if self._ring is not None and self._staged_upto:
            self._ring.release(self._staged_upto)  # those bytes are in the file (or were never needed)
        start, n = self._committed, len(self._rows_pending)
        texts = np.empty(n, object)
        texts[:] = [r for r, _ in self._rows_pending]
        _append_rows(self._index, start, texts)
        _append_rows(self._stats, start, _stats_matrix([s for _, s in self._rows_pending]))
        self._rows_pending.clear()
        if flush:
            self._file.flush()
        self._committed = start + n  # acknowledged only once flushed: a SIGKILL may come right after
        self._last_commit = time.monotonic()

    def _write_pending_blob(self) -> None:
        if self._blob_pending:
            self._blob.resize((self._blob_end,))
            if self._compression is None:
                self._write_whole_chunks()
            else:
                data = np.concatenate(self._blob_pending) if len(self._blob_pending) > 1 else self._blob_pending[0]
                self._blob[self._blob_written:self._blob_end] = data
            self._blob_written = self._blob_end
            self._blob_pending.clear()

    def _write_whole_chunks(self) -> None:
        """Pending bytes go to the file as whole raw chunks (``write_direct_chunk``: no hyperslab
        selection, chunk cache or type conversion; h5py's sliced write took 7 s of a 0.6B trace
        pair's 12.5 GB on the lent H200). Whole chunks are written from the pending arrays as they
        are; only a chunk that spans two arrays is assembled. The last, partial chunk is written
        padded and kept: the next commit writes it again with its continuation."""
        size = BLOB_CHUNK
        at = self._blob_written // size * size  # file position of the chunk being filled
        carry = self._blob_tail
        for data in self._blob_pending:
            pos = 0
            if len(carry):
                pos = min(size - len(carry), len(data))
                carry = np.concatenate([carry, data[:pos]])
                if len(carry) == size:
                    self._blob.id.write_direct_chunk((at,), carry)
                    at += size
                    carry = np.zeros(0, np.uint8)
            while len(data) - pos >= size:
                self._blob.id.write_direct_chunk((at,), data[pos:pos + size])
                at += size
                pos += size
            if pos < len(data):
                carry = data[pos:].copy()
        self._blob_tail = carry
        if len(carry):
            self._blob.id.write_direct_chunk((at,), np.concatenate([carry, np.zeros(size - len(carry), np.uint8)]))

    def hold(self) -> None:
        """A traced run starts: stats-only records wait until ``resume`` (see ``quiet``)."""
        self.quiet.clear()
        self.batch_limit = 1024

    def resume(self) -> None:
        self.batch_limit = 64
        self.quiet.set()
        if not self._queue.empty():
            self._start()

    def close(self, complete: bool = True) -> None:
        self.batch_limit = 64
        self.quiet.set()
        if not self.synchronous:
            self.hand_over(start=False)
            self._queue.put(None)
            if self._thread.ident is not None:
                self._thread.join()
            else:  # never needed: what is queued is written here
                self._drain()
        if self._file.id.valid:
            if self._error is None:
                self._commit(flush=False)
                if self._metadata_at_close:
                    self._update_metadata(self._metadata_at_close, flush=False)
            if complete and self._error is None:
                _write_attr(self._file, "complete", True)
            self._file.close()
        if self._ring is not None:
            from tensordiff.probes import staging

            staging.give_back(self._ring)
            self._ring = None
        if self._error is not None:
            raise self._error

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(complete=exc_type is None)


class TraceReader:
    """Lazy reader: the index is a DataFrame, tensors are read one record at a time."""

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise TensordiffError(f"trace file not found: {self.path}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise TensordiffError(f"cannot open trace {self.path}: not a readable HDF5 file ({exc})") from None
        attrs = self._file.attrs
        if attrs.get("format") != FORMAT:
            raise TensordiffError(f"{self.path} is not a tensordiff trace (no format={FORMAT!r} attribute)")
        version = int(attrs.get("schema_version", -1))
        if version > SCHEMA_VERSION:
            raise TensordiffError(f"{self.path} has schema_version {version}; this tensordiff reads up to "
                                  f"{SCHEMA_VERSION}")
        self.complete = bool(attrs.get("complete", False))
        try:
            self.meta = json.loads(attrs.get("metadata", "{}"))
        except json.JSONDecodeError:
            raise TensordiffError(f"{self.path}: metadata attribute is not valid JSON") from None
        self._index_df = None
        self._rows = None
        self._chunk_offsets = None  # /blob chunk -> file offset (None: not looked at, False: read via h5py)
        self._fd = None

    @property
    def index(self):
        """One row per record, in execution order, with layout and stats columns."""
        if self._index_df is None:
            import pandas as pd

            rows = [json.loads(s) for s in self._file["index"].asstr()[...]]
            stats = self._file["stats"][...]
            n = min(len(rows), len(stats))  # a crash may leave one a row ahead of the other
            df = pd.DataFrame(rows[:n])
            for name in INDEX_FIELDS:  # an empty trace still has every documented column
                if name not in df.columns:
                    df[name] = pd.Series(dtype=object)
            for i, name in enumerate(STAT_NAMES):
                df[name] = stats[:n, i]
            self._index_df = df.set_index("key", drop=False)
        return self._index_df

    def __len__(self) -> int:
        return len(self.index)

    def keys(self) -> list[str]:
        return list(self.index["key"])

    @property
    def rows(self) -> dict:
        """key -> index row as a dict, built once (a DataFrame .loc per lookup costs ~100 us)."""
        if self._rows is None:
            self._rows = self.index.to_dict("index")
        return self._rows

    def row(self, key: str) -> dict:
        try:
            return self.rows[key]
        except KeyError:
            raise TensordiffError(f"{self.path}: no record {key!r}") from None

    def has_data(self, key: str) -> bool:
        return bool(self.row(key)["has_data"])

    def tensor(self, key: str) -> torch.Tensor:
        """The record's tensor on the CPU, in its original dtype and logical shape."""
        row = self.row(key)
        alias = row.get("alias_of")
        if isinstance(alias, str):  # same data as an earlier record (same tensor, unchanged)
            if not row["has_data"]:  # e.g. a transpose of it: the same stats, not the same order
                raise TensordiffError(f"{self.path}: record {key!r} was saved as stats only")
            return self.tensor(alias).reshape(row["shape"])
        offset = row.get("data_offset")
        if isinstance(offset, (int, float)) and offset == offset:  # schema 2: bytes in /blob
            dtype = _torch_dtype(row["dtype"])
            raw = self._blob_bytes(int(offset), int(row["data_nbytes"]))
            arr = raw.view(_numpy_dtype(dtype))
        else:  # schema 1: a dataset per record
            name = f"{int(row['seq']):07d}"
            if "data" not in self._file or name not in self._file["data"]:
                raise TensordiffError(f"{self.path}: record {key!r} was saved as stats only")
            ds = self._file["data"][name]
            arr = ds[()]
            dtype = _torch_dtype(ds.attrs["dtype"])
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if dtype in _BIT_STORED:
            t = t.view(dtype)
        return t.reshape(row["shape"])

    def _blob_bytes(self, offset: int, nbytes: int) -> np.ndarray:
        """Bytes of /blob, copied straight from the file's pages when its chunks are raw (no filter):
        h5py's sliced read went at 1.5 GB/s through the chunk machinery on the lent H200."""
        chunks = self._raw_chunks()
        if chunks is None:
            return self._file["blob"][offset:offset + nbytes]
        out = np.empty(nbytes, np.uint8)
        view = memoryview(out)
        pos = offset
        while pos < offset + nbytes:  # runs of chunks that lie back to back in the file: one read each
            index, within = divmod(pos, BLOB_CHUNK)
            take = min(BLOB_CHUNK - within, offset + nbytes - pos)
            while pos + take < offset + nbytes and chunks[index + 1] == chunks[index] + BLOB_CHUNK:
                index += 1
                take = min(take + BLOB_CHUNK, offset + nbytes - pos)
            at = chunks[(pos // BLOB_CHUNK)] + within
            # pread, not mmap: mapped file pages count as this process's resident memory (19 GB
            # "peak RSS" while diffing a 12.5 GB trace pair)
            if os.preadv(self._fd, [view[pos - offset:pos - offset + take]], at) != take:
                raise TensordiffError(f"{self.path}: record bytes at {at} cut short (truncated file?)")
            pos += take
        return out

    def _raw_chunks(self):
        """File offset of each /blob chunk, or None where the chunks are not plain bytes in the file
        (compressed, missing, or another chunk size): then h5py reads."""
        if self._chunk_offsets is False:
            return None
        if self._chunk_offsets is None:
            self._chunk_offsets = False
            blob = self._file["blob"]
            if blob.compression is not None or blob.chunks != (BLOB_CHUNK,) or blob.shape[0] == 0:
                return None
            offsets = [-1] * (-(-blob.shape[0] // BLOB_CHUNK))
            raw = [True]

            def visit(info):  # one walk of the chunk index (get_chunk_info(i) per chunk is quadratic)
                raw[0] = raw[0] and not info.filter_mask and info.size == BLOB_CHUNK
                if info.chunk_offset[0] // BLOB_CHUNK < len(offsets):
                    offsets[info.chunk_offset[0] // BLOB_CHUNK] = info.byte_offset

            try:
                if hasattr(blob.id, "chunk_iter"):
                    blob.id.chunk_iter(visit)
                else:
                    for i in range(blob.id.get_num_chunks()):
                        visit(blob.id.get_chunk_info(i))
                if not raw[0] or min(offsets) < 0:
                    return None
                # the file h5py has open, not the path's: a newer trace may have been renamed over it
                fd = os.dup(self._file.id.get_vfd_handle())
                if os.fstat(fd).st_size < max(offsets) + BLOB_CHUNK:
                    os.close(fd)
                    return None
                self._fd = fd
            except (OSError, ValueError, RuntimeError, TypeError):
                return None
            self._chunk_offsets = offsets
        return self._chunk_offsets

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def annotate(path, **items) -> None:
    """Add entries to a finished trace's metadata (an analysis run after the capture, e.g. the
    per-expert probe)."""
    import h5py

    with h5py.File(path, "a") as fh:
        meta = json.loads(fh.attrs.get("metadata", "{}"))
        meta.update(items)
        fh.attrs["metadata"] = json.dumps(meta, default=str)


def add_data(path, tensors: dict) -> int:
    """Give records of a finished trace their data afterwards: ``tensors`` key -> tensor (the live
    comparison's kept reference records that the target's comparison needed). A record that aliases
    another gives the original its bytes. Returns how many records got data."""
    import h5py

    if not tensors:
        return 0
    with h5py.File(path, "r+") as f:
        index = f["index"]
        texts = list(index.asstr()[...])
        seq_of = {json.loads(t)["key"]: i for i, t in enumerate(texts)}
        rows: dict = {}
        blob = f["blob"]
        end = int(blob.shape[0])
        given = 0

        def row_of(seq):
            if seq not in rows:
                rows[seq] = json.loads(texts[seq])
            return rows[seq]

        def give(seq, t) -> bool:
            nonlocal end
            row = row_of(seq)
            if row.get("has_data"):
                return True
            alias = row.get("alias_of")
            if alias is not None and alias in seq_of:
                row["has_data"] = give(seq_of[alias], t) and not row.get("stats_only", False)
                return row["has_data"]
            host = t.detach().to("cpu").contiguous()
            if list(host.shape) != list(row["shape"]) or str(host.dtype).replace("torch.", "") != row["dtype"]:
                return False
            raw = np.ascontiguousarray(_to_numpy(host)).reshape(-1).view(np.uint8)
            blob.resize((end + raw.nbytes,))
            blob[end:end + raw.nbytes] = raw
            row.update(data_offset=end, data_nbytes=int(raw.nbytes), has_data=True)
            end += raw.nbytes
            return True

        for key, t in tensors.items():
            seq = seq_of.get(key)
            if seq is not None and t is not None:
                given += give(seq, t)
        for seq, row in rows.items():
            index[seq] = row_text(row)
    return given


def open_trace(path) -> TraceReader:
    return TraceReader(path)
