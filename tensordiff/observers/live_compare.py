"""The target compared with the reference while it runs, when both run in one process.

Replaying every target call on the fp32 reference costs several fp32 forwards, and saving every target
tensor writes gigabytes (a 0.6B bf16 model at 2048 tokens: 4.5 GB, the capture 65x its plain
forward). With the reference's own records still in memory, each target record is measured against its
counterpart as it is recorded (one kernel launch on a GPU, no sync), the measurements are read once
after the forward, and only the calls whose output is beyond tolerance are replayed and saved in full
(``observers/module_replay.DeferredReplay``). A clean run replays nothing and writes stats.

    kept = KeptReference(max_bytes)              # the reference's capture keeps its records here
    live = LiveCompare(kept, tolerance)          # the target's capture measures against them
    live.add(key, tensor)                        # per target record, in the forward
    metrics = live.results()                     # key -> the diff's metrics, after the forward

The metrics are the diff's: the whole-tensor sums, max |diff| and non-finite mismatches of one pass
(``fused_stats.cu``'s pair kernel on a GPU, ``cpu_stats.c``'s twin on the host; no per-element ratios),
and ``metrics.compare`` itself for integer tensors and dtypes those passes do not take. A trace
carries them in its index rows (``live_*``) with the reference's ``run_id``: the diff uses them only
against that same reference trace.
"""
from __future__ import annotations

import math
import uuid

import torch

from tensordiff.metrics import Tolerance, compare, tolerance_for
from tensordiff.probes import cpu_stats
from tensordiff.tensors import version_of as _version

LIVE_FIELDS = ("max_abs", "mean_abs", "rel_l2", "cosine", "max_rel", "frac_outside", "nonfinite_mismatch",
               "worst_flat")


def default_keep_bytes(device: torch.device) -> int:
    """What the reference may hold: 40% of the GPU's free memory, or a quarter of the host's available
    memory (records past it are compared from the trace files, their calls replayed as before)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.4)
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return int(info.get("MemAvailable", 8 << 30) * 0.25)
    except OSError:
        return 2 << 30


class KeptReference:
    """The reference's records by key, held (not copied) while they stay unchanged (version counter)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.run_id = uuid.uuid4().hex  # the reference trace's run_id: live metrics name it
        self.device: torch.device | None = None
        self._items: dict = {}
        self._storages: set = set()
        self.nbytes = 0
        self.dropped = 0  # records not kept: past the byte budget

    def keep(self, key: str, t: torch.Tensor) -> None:
        if t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._storages:
            if self.nbytes + storage.nbytes() > self.max_bytes:
                self.dropped += 1
                return
            self.nbytes += storage.nbytes()
            self._storages.add(ptr)
        self.device = t.device
        self._items[key] = (t.detach(), _version(t))

    def get(self, key: str) -> torch.Tensor | None:
        item = self._items.get(key)
        if item is None or item[1] is None or _version(item[0]) != item[1]:
            return None
        return item[0]

    def __len__(self) -> int:
        return len(self._items)

    def release(self) -> None:
        self._items.clear()
        self._storages.clear()
        self.nbytes = 0


class _PairBuffer:
    """Rows of fused_stats.cu's pair kernel on one GPU (52 bytes a row), read once."""

    def __init__(self, device: torch.device, capacity: int):
        self.device, self.capacity = device, capacity
        self.raw = torch.zeros(capacity * 52, dtype=torch.uint8, device=device)
        self.rows = 0
        self.numel: list[int] = []

    def read(self) -> list[dict]:
        a = self.raw.cpu().numpy()
        cap, k = self.capacity, self.rows
        sums = a[:cap * 40].view("f8").reshape(cap, 5)[:k]
        bad = a[cap * 40:cap * 48].view("u8")[:k]
        mx = a[cap * 48:cap * 52].view("f4")[:k]
        return [_finish(*sums[i].tolist(), int(bad[i]), float(mx[i]), self.numel[i]) for i in range(k)]


def _finish(sq_diff, sq_ref, sq_tgt, dot, sum_abs, bad, max_abs, n) -> dict:
    norm_ref, norm_diff = math.sqrt(sq_ref), math.sqrt(sq_diff)
    rel = norm_diff / norm_ref if norm_ref > 0 else (0.0 if norm_diff == 0 else math.inf)
    denom = math.sqrt(sq_ref * sq_tgt)
    return {"status": "ok", "numel": n, "max_abs": max_abs, "mean_abs": sum_abs / max(n - bad, 1), "rel_l2": rel,
            "cosine": dot / denom if denom > 0 else (1.0 if norm_diff == 0 else 0.0),
            "max_rel": float("nan"), "frac_outside": float("nan"), "nonfinite_mismatch": bad, "worst_flat": -1}


class LiveCompare:
    """Each target record against the kept reference record of the same key, as it is recorded.
    ``tolerance(key, dtype name) -> Tolerance``: the diff's policy (the host path's per-element
    counts use it)."""

    CAPACITY = 4096
    HOLD_BYTES: int | None = None  # overrides the default share of memory held (tests)

    def __init__(self, kept: KeptReference, tolerance=None, hold_bytes: int | None = None):
        from tensordiff.probes import fused_stats

        self.kept = kept
        # What the target's records may keep alive until the forward ends (for the replay and the data
        # of calls beyond tolerance): past it, records are still measured but not held, and a call
        # beyond tolerance among them is reported instead of replayed (--no-live replays it).
        if hold_bytes is None:
            hold_bytes = self.HOLD_BYTES
        if hold_bytes is None:
            hold_bytes = default_keep_bytes(kept.device) // 2 if kept.device is not None else 1 << 30
        self.hold_bytes = hold_bytes
        self.held_bytes = 0
        self._held_storages: set = set()
        self.not_held = 0  # records measured but not held
        self._dtypes: dict = {}    # key -> the target's dtype name
        self._by_scope: dict = {}  # call scope -> its measured keys
        self.tolerance = tolerance or (lambda key, dtype: tolerance_for(dtype))
        self.tensors: dict = {}   # key -> (target tensor, version): for a later full save
        self._done: dict = {}     # key -> metrics (host) or (buffer, row) (GPU)
        self._by_tensor: dict = {}  # (id target, id reference) -> key measured first (aliases)
        self._buffers: dict = {}  # device -> open _PairBuffer
        self._all_buffers: list = []
        self._pair = fused_stats.pair_launcher() if torch.cuda.is_available() else None
        self._codes = fused_stats.CUDA_DTYPES
        self.not_kept = 0         # target records without a kept counterpart

    def add(self, key: str, t: torch.Tensor) -> None:
        ref = self.kept.get(key)
        if ref is None or ref.shape != t.shape or ref.device != t.device:
            self.not_kept += 1
            return
        # (the memory of held tensors is counted per call: observers/module_replay.DeferredReplay)
        if self.held_bytes < self.hold_bytes:
            self.tensors[key] = (t, _version(t))
        else:  # past the share: what settle() needs to tell which of these calls went beyond
            self.not_held += 1
            self._dtypes[key] = str(t.dtype).replace("torch.", "")
            self._by_scope.setdefault(key.rsplit("/", 1)[0], []).append(key)
        same = self._by_tensor.get((id(t), id(ref)))
        if same is not None and same[1] == _version(t):  # the same pair measured under another key
            self._done[key] = self._done[same[0]]
            return
        self._by_tensor[(id(t), id(ref))] = (key, _version(t))
        if t.device.type == "cuda" and self._pair is not None and t.dtype in self._codes and ref.dtype in self._codes:
            self._done[key] = self._launch(t, ref)
        elif not t.is_cpu:  # integer decisions (top-k indices) on a GPU: exact, at results()
            self._done[key] = ("later", key, ref)
        else:
            # floats: one native pass (cpu_stats.pair_metrics, the pair kernel's twin); integers and
            # other dtypes: the diff's own compare, exact (a router's top-k flips need its counts)
            sums = cpu_stats.pair_metrics(t.detach(), ref.detach()) if t.is_floating_point() else None
            if sums is not None:
                self._done[key] = _finish(*sums[:5].tolist(), int(sums[6]), float(sums[5]), t.numel())
            else:
                tol = self.tolerance(key, str(t.dtype).replace("torch.", ""))
                self._done[key] = compare(ref.detach(), t.detach(), tol)

    def keys_of(self, scope: str) -> list:
        return self._by_scope.get(scope, [])

    def beyond(self, key: str, m: dict | None, budget) -> bool:
        """Is a measured record beyond tolerance? (``budget(key, dtype name)``: the rel L2 budget)."""
        if m is None or m.get("status") != "ok":
            return False
        return m["nonfinite_mismatch"] > 0 or m["rel_l2"] > budget(key, self._dtypes.get(key, "float32"))

    def hold(self, t: torch.Tensor) -> bool:
        """May ``t`` be kept alive until the forward ends? Counts its storage once."""
        # By the view's own bytes, not its storage's (asking for the storage object cost a tenth of the
        # capture): two views of one storage count twice, a slice of a larger one counts only itself.
        ptr = t.data_ptr()
        if ptr in self._held_storages:
            return True
        nbytes = t.numel() * t.element_size()
        if self.held_bytes + nbytes > self.hold_bytes:
            self.held_bytes = self.hold_bytes  # full: later calls are not held either (call order)
            return False
        self._held_storages.add(ptr)
        self.held_bytes += nbytes
        return True

    @property
    def holding(self) -> bool:
        return self.held_bytes < self.hold_bytes

    def _launch(self, t: torch.Tensor, ref: torch.Tensor):
        from tensordiff.probes import fused_stats

        buf = self._buffers.get(t.device)
        if buf is None or buf.rows >= buf.capacity:
            buf = self._buffers[t.device] = _PairBuffer(t.device, self.CAPACITY)
            self._all_buffers.append(buf)
        tt = t.detach() if t.is_contiguous() else t.detach().contiguous()
        rr = ref if ref.is_contiguous() else ref.contiguous()
        row = buf.rows
        err = self._pair(tt.data_ptr(), self._codes[tt.dtype], rr.data_ptr(), self._codes[rr.dtype], tt.numel(),
                         row, buf.raw.data_ptr(), buf.capacity, fused_stats.raw_stream(t.device.index))
        if err:
            raise RuntimeError(f"pair kernel launch failed (cudaError {err})")
        buf.rows += 1
        buf.numel.append(tt.numel())
        return buf, row

    def results(self) -> dict:
        """key -> metrics (the diff's keys). One device-to-host read per buffer of GPU rows."""
        read = {id(buf): buf.read() for buf in self._all_buffers}
        out = {}
        for key, m in self._done.items():
            if isinstance(m, tuple) and m[0] == "later":
                t = self.tensor(key)
                if t is not None:
                    out[key] = compare(m[2], t.detach(), self.tolerance(key, str(t.dtype).replace("torch.", "")))
            elif isinstance(m, tuple):
                out[key] = read[id(m[0])][m[1]]
            else:
                out[key] = m
        return out

    def tensor(self, key: str) -> torch.Tensor | None:
        """The target's tensor of a record, while unchanged since it was recorded."""
        item = self.tensors.get(key)
        if item is None or item[1] is None or _version(item[0]) != item[1]:
            return None
        return item[0]

    def release(self) -> None:
        self.tensors.clear()
        self._by_tensor.clear()
        self._held_storages.clear()
        self.held_bytes = 0
        self._by_scope.clear()


def live_fields(m: dict) -> dict:
    """The index fields a record gets from its live metrics (JSON-safe: non-finite floats as None)."""
    out = {}
    for name in LIVE_FIELDS:
        v = m.get(name)
        if isinstance(v, float) and not math.isfinite(v):
            v = None if v != v else ("inf" if v > 0 else "-inf")
        out[f"live_{name}"] = v
    return out


def metrics_from_live(row: dict, stats_ref: dict, stats_tgt: dict) -> dict | None:
    """The diff's metrics of a target record from its live fields (None where it has none)."""
    rel = row.get("live_rel_l2")
    if rel is None or rel != rel:
        return None

    def num(name, default=float("nan")):
        v = row.get(f"live_{name}")
        if v == "inf":
            return math.inf
        if v == "-inf":
            return -math.inf
        return default if v is None or v != v else v

    return {"status": "ok", "numel": math.prod(row.get("shape") or []), "max_abs": num("max_abs"), "mean_abs": num("mean_abs"), "rel_l2": num("rel_l2"),
            "cosine": num("cosine"), "max_rel": num("max_rel"), "frac_outside": num("frac_outside"),
            "nan_ref": int(stats_ref["nan"]), "nan_tgt": int(stats_tgt["nan"]),
            "inf_ref": int(stats_ref["inf"]), "inf_tgt": int(stats_tgt["inf"]),
            "nonfinite_mismatch": int(num("nonfinite_mismatch", 0)), "worst_flat": int(num("worst_flat", -1)),
            "from_stats": False, "live": True}


__all__ = ["KeptReference", "LiveCompare", "Tolerance", "live_fields", "metrics_from_live", "default_keep_bytes"]
