"""Cost per module, measured: wall time (device synchronised; CUDA events on a GPU) and memory
(bytes the module's ops allocate, the largest single buffer, and on CUDA the device's peak), for the
reference and the target side by side, so "17x slower" and "allocates 8.6 GB in one buffer" come with
the modules responsible.

    cost = measure_cost(model, inputs)            # {"modules": {name: {...}}, "forward_s", ...}
    rows, lines = compare_costs(ref_cost, tgt_cost)

Two extra forwards, neither captured: one timed (hooks at every module enter / leave), one counting
allocations (a dispatch mode sees every op's outputs). The timed run's own overhead is stated: its
root time against the plain forward.
"""
from __future__ import annotations

import re
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_of(model: torch.nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


class _Timer:
    """Inclusive time per module call, summed per module name. On CUDA, events (recorded in stream
    order, read once at the end); elsewhere perf_counter."""

    def __init__(self, device):
        self.cuda = device is not None and device.type == "cuda"
        self.open: dict[int, list] = {}
        self.spans: list[tuple[str, object, object]] = []

    def enter(self, name):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        self.open.setdefault(name, []).append(start)

    def leave(self, name):
        start = self.open[name].pop()
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.spans.append((name, start, end))

    def seconds(self) -> dict[str, tuple[float, int]]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, list] = {}
        for name, start, end in self.spans:
            s = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            acc = out.setdefault(name, [0.0, 0])
            acc[0] += s
            acc[1] += 1
        return {k: (v[0], v[1]) for k, v in out.items()}


class _DevicePeaks:
    """Peak device memory per module (CUDA), in the untimed pass: the allocator's peak is read and
    reset at every enter / leave, which costs more than the events the timed pass records."""

    def __init__(self):
        self.stack: list[list] = []  # [name, peak so far]
        self.peaks: dict[str, int] = {}

    def enter(self, name):
        peak = torch.cuda.max_memory_allocated()
        for frame in self.stack:
            frame[1] = max(frame[1], peak)
        torch.cuda.reset_peak_memory_stats()
        self.stack.append([name, torch.cuda.memory_allocated()])

    def leave(self, name):
        frame = self.stack.pop()
        frame[1] = max(frame[1], torch.cuda.max_memory_allocated())
        if self.stack:
            self.stack[-1][1] = max(self.stack[-1][1], frame[1])
        self.peaks[name] = max(self.peaks.get(name, 0), frame[1])


class _Allocations(TorchDispatchMode):
    """Bytes of new storage each op returns, charged to every module on the stack."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = names  # the module stack, shared with the hooks
        self.total: dict[str, int] = {}
        self.largest: dict[str, tuple[int, str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in inputs or t._base is not None:
                continue  # a view or an in-place result: no new memory
            nbytes = storage.nbytes()
            op = func.name() if hasattr(func, "name") else str(func)
            for name in self.names:
                self.total[name] = self.total.get(name, 0) + nbytes
                if nbytes > self.largest.get(name, (0, ""))[0]:
                    self.largest[name] = (nbytes, op)
        return out


def _hooks(model, enter, leave):
    """Pre and post hooks on every module calling enter(name) / leave(name); they return None (a
    forward hook's return value would replace the module's output)."""
    handles = []
    for name, module in model.named_modules():
        name = name or "__root__"
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: enter(n) and None))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: leave(n) and None))
    return handles


def measure_cost(model: torch.nn.Module, inputs, plain_s: float | None = None, tokens: int | None = None) -> dict:
    """Per module: ``time_s`` (inclusive, summed over calls), ``self_s`` (minus its children's),
    ``calls``, ``alloc_bytes``, ``largest_alloc`` (bytes, op), on CUDA ``peak_device_bytes``."""
    device = _device_of(model)
    args, kwargs = inputs.args, inputs.kwargs
    with torch.no_grad():
        model(*args, **kwargs)  # warm-up: one-time costs out of the figures
        _sync(device)
        timer = _Timer(device)
        handles = _hooks(model, timer.enter, timer.leave)
        try:
            start = time.perf_counter()
            model(*args, **kwargs)
            _sync(device)
            timed_s = time.perf_counter() - start
        finally:
            for h in handles:
                h.remove()
        stack: list[str] = []
        counter = _Allocations(stack)
        peaks = _DevicePeaks() if timer.cuda else None

        def enter(n):
            stack.append(n)
            if peaks:
                peaks.enter(n)

        def leave(n):
            stack.pop()
            if peaks:
                peaks.leave(n)

        handles = _hooks(model, enter, leave)
        try:
            with counter:
                model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
    seconds = timer.seconds()
    names = [n or "__root__" for n, _ in model.named_modules()]

    def called_parent(name: str) -> str | None:  # the nearest enclosing module that ran (ModuleLists don't)
        while name != "__root__":
            name = name.rsplit(".", 1)[0] if "." in name else "__root__"
            if name in seconds:
                return name
        return None

    child_s: dict[str, float] = {}
    for name in seconds:
        parent = called_parent(name) if name != "__root__" else None
        if parent is not None:
            child_s[parent] = child_s.get(parent, 0.0) + seconds[name][0]
    modules = {}
    for name in names:
        if name not in seconds:
            continue
        t, calls = seconds[name]
        row = {"time_s": t, "self_s": max(t - child_s.get(name, 0.0), 0.0), "calls": calls,
               "alloc_bytes": counter.total.get(name, 0),
               "largest_alloc": list(counter.largest.get(name, (0, "")))}
        if peaks and name in peaks.peaks:
            row["peak_device_bytes"] = peaks.peaks[name]
        modules[name] = row
    root = seconds.get("__root__", (timed_s, 1))[0]
    out = {"modules": modules, "timed_forward_s": root, "device": str(device)}
    if plain_s:
        out["plain_forward_s"] = plain_s
        out["timing_overhead_x"] = root / plain_s if plain_s > 0 else None
    if tokens:
        out["tokens"] = tokens
    return out


def _group(name: str) -> str:
    """model.layers.3.self_attn -> model.layers.*.self_attn: the same module in every layer."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (binary units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} TB"


def compare_costs(ref: dict, tgt: dict, top: int = 5) -> tuple[list[dict], list[str]]:
    """Rows per module group (reference vs target: self time, allocation, largest buffer), sorted by
    the target's extra self time, and the lines the console says."""
    groups: dict[str, dict] = {}
    for side, cost in (("ref", ref), ("tgt", tgt)):
        for name, row in cost["modules"].items():
            g = groups.setdefault(_group(name), {"module": _group(name), "ref_self_s": 0.0, "tgt_self_s": 0.0,
                                                 "ref_alloc": 0, "tgt_alloc": 0, "ref_largest": 0,
                                                 "tgt_largest": 0, "tgt_largest_op": "", "ref_calls": 0,
                                                 "tgt_calls": 0})
            g[f"{side}_self_s"] += row["self_s"]
            g[f"{side}_calls"] += row["calls"]
            g[f"{side}_alloc"] += row["alloc_bytes"]
            if row["largest_alloc"][0] > g[f"{side}_largest"]:
                g[f"{side}_largest"] = row["largest_alloc"][0]
                if side == "tgt":
                    g["tgt_largest_op"] = row["largest_alloc"][1]
    rows = sorted(groups.values(), key=lambda g: g["tgt_self_s"] - g["ref_self_s"], reverse=True)
    for g in rows:
        g["slowdown_x"] = g["tgt_self_s"] / g["ref_self_s"] if g["ref_self_s"] > 0 else None
    lines = []
    rt, tt = ref["timed_forward_s"], tgt["timed_forward_s"]
    extra = tt - rt
    # the timed runs carry the hooks' cost (on a launch-bound GPU forward, many times the plain one):
    # the target's extra time is claimed only where plain runs say it is slower at all
    slower = (tgt.get("plain_forward_s") or tt) > (ref.get("plain_forward_s") or rt)
    if extra > 0 and slower:
        responsible = [g for g in rows if g["tgt_self_s"] - g["ref_self_s"] > 0.05 * extra][:top]
        parts = [f"{g['module']} +{g['tgt_self_s'] - g['ref_self_s']:.3g} s"
                 + (f" ({g['slowdown_x']:.3g}x)" if g["slowdown_x"] else "") for g in responsible]
        if parts:
            lines.append(f"time (own code of each module, summed over layers): the target's extra "
                         f"{extra:.3g} s per forward is in " + ", ".join(parts))
    big = max(rows, key=lambda g: g["tgt_largest"] - g["ref_largest"], default=None)
    if big and big["tgt_largest"] > 2 * max(big["ref_largest"], 1) and big["tgt_largest"] >= 1 << 20:
        lines.append(f"memory: {big['module']} allocates {human_bytes(big['tgt_largest'])} in one buffer "
                     f"({big['tgt_largest_op']}) where the reference's largest is {human_bytes(big['ref_largest'])}")
    for side, cost in (("reference", ref), ("target", tgt)):
        if cost.get("timing_overhead_x"):
            lines.append(f"timing overhead ({side}): the timed forward took {cost['timing_overhead_x']:.2f}x the "
                         "plain one" + (" (launch-bound: per-module times include the gaps the timing hooks "
                                        "leave; read their ratios, not their sums)"
                                        if cost["timing_overhead_x"] > 2 else ""))
    return rows, lines


UNSTEADY = 1.5  # pairs of runs whose ratios differ by more than this, on both sides of 1: no verdict on speed


def cost_section(timing: dict, ref_meta: dict, tgt_meta: dict) -> tuple[dict | None, list[str]]:
    """The diff's cost: time per forward and tokens/s per side (plain runs, median of 3), and with
    --timing the per-module comparison. (None, []) when the run measured nothing."""
    lines = []
    out = {}
    ref_s, tgt_s = timing.get("side_by_side_reference_s"), timing.get("side_by_side_target_s")
    how = "timed alternately, median of 3"
    if not (ref_s and tgt_s):
        ref_s, tgt_s = timing.get("reference_plain_s"), timing.get("target_plain_s")
        how = "timed apart, median of 3"
    job = tgt_meta.get("job") or ref_meta.get("job") or {}
    tokens = (job.get("batch") or 0) * (job.get("seq_len") or 0)
    if ref_s and tgt_s:
        ratios = sorted(timing.get("side_by_side_ratios") or [])
        # the ratio of adjacent pairs (both runs under the same load) rather than of the two medians
        slowdown = ratios[len(ratios) // 2] if ratios else tgt_s / ref_s
        out.update(reference_forward_s=ref_s, target_forward_s=tgt_s, slowdown_x=slowdown)
        rate = lambda s: f", {tokens / s:,.0f} tokens/s" if tokens else ""  # noqa: E731
        if tokens:
            out.update(reference_tokens_per_s=tokens / ref_s, target_tokens_per_s=tokens / tgt_s)
        which = "the target is " + (f"{slowdown:.3g}x slower" if slowdown >= 1 else f"{1 / slowdown:.3g}x faster")
        if ratios and ratios[0] < 1 < ratios[-1] and ratios[-1] / ratios[0] > UNSTEADY:
            out["unsteady"] = [ratios[0], ratios[-1]]
            which = (f"no clear difference between them (pairs of runs said {ratios[0]:.3g}x to "
                     f"{ratios[-1]:.3g}x: the machine's load changed while they ran)")
        lines.append(f"time per forward{' and backward' if job.get('backward') else ''} (plain runs, {how}): "
                     f"reference {ref_s:.3g} s{rate(ref_s)}, target {tgt_s:.3g} s{rate(tgt_s)}: {which}")
    if ref_meta.get("cost") and tgt_meta.get("cost"):
        rows, more = compare_costs(ref_meta["cost"], tgt_meta["cost"])
        out["modules"] = rows
        out["reference"] = {k: v for k, v in ref_meta["cost"].items() if k != "modules"}
        out["target"] = {k: v for k, v in tgt_meta["cost"].items() if k != "modules"}
        lines += more
    return (out or None), lines
