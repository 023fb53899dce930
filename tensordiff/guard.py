"""Buffer guard: catch memory pollution before it becomes a NaN.

Three checks, on any device:
- **Live buffers that overlap.** Buffers are registered by byte range (a torch tensor's memory, or a
  raw pointer and size an extension hands a kernel) with an owner name and allocation site; two live
  buffers sharing bytes are reported when the second is registered.
- **Check before write / read.** A sealed buffer must hold what it held when sealed (its bytes are
  kept) until its own next write. At that write (an op that mutates the buffer itself), or at a probe
  point before an external kernel reads it (``check_all``), it is compared with the seal; a
  difference is reported with its evidence: elements changed, zeros, NaN, Inf, value range, first
  changed index.
- **Who wrote it.** While the guard is entered, every op that mutates a tensor whose bytes overlap a
  sealed buffer it is not itself (a view, another buffer handed the same memory) is checked after it
  runs: if the sealed buffer changed, that op is the writer, named with its source line.

    with Guard() as guard:                 # or: tensordiff.guard.watch(tensor, "name")
        guard.register("scratch", scratch_tensor, site="alloc.py:10")
        guard.seal(weights, "expert 17 weights")
        ...                                 # ops run; writers through aliases are recorded
        guard.check_all("before the kernel call")
    guard.findings                          # [Finding(kind="overlap" | "polluted" | "writer", ...)]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tensordiff.source_lines import user_source_line


@dataclass
class Finding:
    kind: str           # overlap | polluted | writer
    buffer: str         # the guarded buffer's name
    text: str           # one line, for people
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "buffer": self.buffer, "text": self.text, "evidence": self.evidence}


@dataclass
class _Live:
    name: str
    start: int
    end: int
    site: str
    device: str


@dataclass
class _Seal:
    name: str
    tensor: torch.Tensor   # the buffer itself (a view of its memory)
    kept: torch.Tensor     # its bytes when sealed
    start: int
    end: int
    group: str | None = None        # buffers of one kind, reported together ("layer 0 gate/up weights")
    unit: tuple | None = None       # (noun, index, count): which of them this is ("experts", 17, 64)


def _unit(seal: _Seal) -> dict:
    return {"group": seal.group, "unit": list(seal.unit)} if seal.group and seal.unit else {}


def summary_lines(findings: list[Finding]) -> list[str]:
    """One line per overlap, and per (kind, group, writer or probe point) with the units as ranges:
    "layer 0 gate/up weights of experts 17-24 of 64 polluted before ...: nan=7912, inf=79, range ..."."""
    from tensordiff.analysis.boundary import describe_indices

    lines, groups, device_events = [], {}, {}
    for f in findings:
        ev = f.evidence
        if f.kind == "allocator":  # the first event of each kind in full, then how many more and where
            device_events.setdefault((f.buffer, ev.get("kind_of_event")), []).append(f)
            continue
        if not ev.get("group"):
            lines.append(f.text)
            continue
        key = (f.kind, ev["group"], ev.get("where"), ev.get("op"), ev.get("source"), ev.get("writer"))
        groups.setdefault(key, []).append(ev)
    for (kind, group, where, op, source, writer), evs in groups.items():
        noun, _, count = evs[0]["unit"]
        units = describe_indices([e["unit"][1] for e in evs], count, noun)
        nums = {k: sum(e.get(k, 0) for e in evs) for k in ("nan", "inf", "zeros", "numel", "changed")}
        lows = [e["range"][0] for e in evs if "range" in e]
        highs = [e["range"][1] for e in evs if "range" in e]
        first = min((e["first_changed_index"] for e in evs if "first_changed_index" in e), default=None)
        what = (f"zeros={nums['zeros']}/{nums['numel']}, nan={nums['nan']}, inf={nums['inf']}"
                + (f", range [{min(lows):.3g}, {max(highs):.3g}]" if lows else "")
                + (f", {nums['changed']} element(s) changed since sealed (first at index {first})" if nums["changed"] else ""))
        if kind == "polluted":
            lines.append(f"{group} of {units} polluted {where}: {what}")
            if 1 < len(evs) <= 16:  # each unit's own evidence, as a kernel author's per-expert print would give it
                for e in sorted(evs, key=lambda e: e["unit"][1]):
                    lines.append(f"  {noun[:-1] if noun.endswith('s') else noun} {e['unit'][1]}: nan={e.get('nan', 0)}, "
                                 f"inf={e.get('inf', 0)}, zeros={e.get('zeros', 0)}/{e.get('numel', 0)}"
                                 + (f", first NaN at index {e['first_nan_index']}" if "first_nan_index" in e else "")
                                 + (f", first changed at index {e['first_changed_index']}"
                                    if "first_changed_index" in e else ""))
        else:
            lines.append(f"{group} of {units} overwritten by {op} at {source}"
                         + (f" through {writer!r}" if writer else " through a view") + f": {what}")
    for (buffer, _), found in device_events.items():
        more = ""
        if len(found) > 1:
            ops = list(dict.fromkeys(f.evidence.get("op") for f in found[1:]))
            more = f" (and {len(found) - 1} more such block(s), after {', '.join(ops[:5])}{', ...' if len(ops) > 5 else ''})"
        lines.append(f"{buffer}: {found[0].text}{more}")
    return lines


def byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte address a tensor's elements occupy (its strided span)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def evidence(now: torch.Tensor, kept: torch.Tensor | None = None) -> dict:
    """What a polluted buffer holds: elements changed (against its seal), zeros, NaN, Inf, the finite
    value range, the first changed index."""
    flat = now.detach().reshape(-1)
    out = {"numel": int(flat.numel())}
    if flat.is_floating_point():
        f = flat.float()
        finite = torch.isfinite(f)
        nan = torch.isnan(f)
        out.update(zeros=int((f == 0).sum()), nan=int(nan.sum()), inf=int(torch.isinf(f).sum()))
        if out["nan"]:
            out["first_nan_index"] = int(torch.nonzero(nan)[0])
        if bool(finite.any()):
            vals = f[finite]
            out["range"] = [float(vals.min()), float(vals.max())]
    else:
        out["zeros"] = int((flat == 0).sum())
    if kept is not None:
        a, b = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat, kept.reshape(-1).view(torch.uint8)
        changed = torch.nonzero((a.reshape(-1) != b.reshape(-1)).reshape(-1)).flatten()
        if changed.numel():
            item = flat.element_size()
            out["changed"] = int(torch.unique(changed // item).numel())
            out["first_changed_index"] = int(changed[0]) // item
        else:
            out["changed"] = 0
    return out


def describe(ev: dict) -> str:
    parts = [f"zeros={ev.get('zeros', 0)}/{ev['numel']}"]
    if "nan" in ev:
        parts += [f"nan={ev['nan']}", f"inf={ev['inf']}"]
    if "range" in ev:
        parts.append(f"range [{ev['range'][0]:.3g}, {ev['range'][1]:.3g}]")
    if ev.get("changed"):
        parts.append(f"{ev['changed']} element(s) changed since sealed, first at index {ev['first_changed_index']}")
    return ", ".join(parts)


_WRITE_ARGS: dict = {}  # op -> (position, name) of the arguments its schema marks as written


def written_tensors(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes into: arguments its schema marks as mutated (in-place and out=)."""
    slots = _WRITE_ARGS.get(func)
    if slots is None:
        schema = getattr(func, "_schema", None)
        slots = _WRITE_ARGS[func] = [] if schema is None else [
            (i, a.name) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    out = []
    for i, name in slots:
        value = args[i] if i < len(args) else kwargs.get(name)
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out += [v for v in value if isinstance(v, torch.Tensor)]
    return out


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and tuple(a.shape) == tuple(b.shape)
            and tuple(a.stride()) == tuple(b.stride()) and a.dtype == b.dtype)


class _GuardMode(TorchDispatchMode):
    def __init__(self, guard: "Guard"):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = written_tensors(func, args, kwargs)
        hits = self.guard._hits(written) if written else []
        for seal, writer in hits:
            if _same_view(writer, seal.tensor):  # its own write: it must hold its seal until now
                self.guard._verify(seal, f"before {func._schema.name} writes it")
        out = func(*args, **kwargs)
        for hook in self.guard.op_hooks:  # device allocators' own checks, attributed to this op
            hook(func)
        for seal, writer in hits:
            if _same_view(writer, seal.tensor):
                self.guard._reseal(seal)
            elif not torch.equal(seal.tensor.reshape(-1).view(torch.uint8) if seal.tensor.dtype != torch.uint8
                                 else seal.tensor.reshape(-1), seal.kept.reshape(-1).view(torch.uint8)):
                self.guard._writer(seal, func, writer)
        return out


class Guard:
    """Live buffers, seals and findings; entered, it watches every op (see the module docstring)."""

    def __init__(self):
        self.live: dict[str, _Live] = {}
        self.seals: dict[str, _Seal] = {}
        self.findings: list[Finding] = []
        self._mode = None
        self._reported: set = set()
        self.op_hooks: list = []  # callables(op) run after every watched op (e.g. echo_npu's red zones)

    # -- live buffers ----------------------------------------------------------------------------
    def register(self, name: str, buffer, nbytes: int | None = None, site: str | None = None,
                 device: str | None = None) -> None:
        """A live buffer: a tensor, or a raw address and size (what an extension's kernel is handed)."""
        if isinstance(buffer, torch.Tensor):
            start, end = byte_range(buffer)
            device = str(buffer.device)
        else:
            start, end = int(buffer), int(buffer) + int(nbytes or 0)
        live = _Live(name, start, end, site or user_source_line(), device or "cpu")
        for other in self.live.values():
            if other.device == live.device and live.start < other.end and other.start < live.end:
                lo, hi = max(live.start, other.start), min(live.end, other.end)
                self._add(Finding("overlap", name, f"live buffers {other.name!r} ({other.site}) and {name!r} "
                                  f"({live.site}) share {hi - lo} bytes "
                                  f"[{lo - other.start}, {hi - other.start}) of {other.name!r}",
                                  {"first": other.name, "second": name, "bytes": hi - lo,
                                   "first_range": [lo - other.start, hi - other.start],
                                   "second_range": [lo - live.start, hi - live.start]}))
        self.live[name] = live

    def release(self, name: str) -> None:
        self.live.pop(name, None)
        self.seals.pop(name, None)

    # -- seals -------------------------------------------------------------------------------------
    def seal(self, tensor: torch.Tensor, name: str, group: str | None = None, unit: tuple | None = None,
             expect: float | None = None) -> None:
        """``tensor`` must hold its present bytes until its own next write; with ``expect``, that value
        in every element instead (0: zeros after init, as a LoRA B buffer; a poison value after
        allocation). ``group`` / ``unit`` (e.g. "layer 0 gate/up weights", ("experts", 17, 64)):
        reported as ranges of that noun."""
        start, end = byte_range(tensor)
        kept = tensor.detach().clone() if expect is None else torch.full_like(tensor.detach(), expect)
        self.seals[name] = _Seal(name, tensor, kept, start, end, group, unit)

    def check_all(self, where: str) -> list[Finding]:
        """Probe point (e.g. before an external kernel reads the buffers): every seal verified."""
        before = len(self.findings)
        for seal in list(self.seals.values()):
            self._verify(seal, where)
        return self.findings[before:]

    def _verify(self, seal: _Seal, where: str) -> None:
        now = seal.tensor
        if torch.equal(now.reshape(-1).view(torch.uint8) if now.dtype != torch.uint8 else now.reshape(-1),
                       seal.kept.reshape(-1).view(torch.uint8) if seal.kept.dtype != torch.uint8
                       else seal.kept.reshape(-1)):
            return
        ev = {**evidence(now, seal.kept), **_unit(seal), "where": where}
        self._add(Finding("polluted", seal.name, f"{seal.name} polluted {where}: {describe(ev)}", ev))

    def _reseal(self, seal: _Seal) -> None:
        seal.kept.copy_(seal.tensor.detach())

    def _hits(self, written: list[torch.Tensor]) -> list[tuple[_Seal, torch.Tensor]]:
        hits = []
        for t in written:
            lo, hi = byte_range(t)
            for seal in self.seals.values():
                if lo < seal.end and seal.start < hi and seal.tensor.device == t.device:
                    hits.append((seal, t))
        return hits

    def _writer(self, seal: _Seal, func, writer: torch.Tensor) -> None:
        # the innermost live buffer the writer's memory belongs to (a block handed out twice lies
        # inside the other owner's range: the one that starts nearest the write is the writer's)
        owners = [l for l in self.live.values() if l.start <= writer.data_ptr() < l.end and l.name != seal.name]
        owner = max(owners, key=lambda l: l.start).name if owners else None
        through = f"through {owner!r}" if owner else "through a view of it"
        ev = {**evidence(seal.tensor, seal.kept), **_unit(seal), "op": func._schema.name,
              "source": user_source_line(), "writer": owner, "writer_shape": list(writer.shape)}
        # the seal is kept: a later check still sees the pollution; the same writer is reported once
        self._add(Finding("writer", seal.name, f"{seal.name} changed by {ev['op']} at {ev['source']} "
                          f"{through} (shape {list(writer.shape)}), not by a write of its own: {describe(ev)}", ev))

    def _add(self, finding: Finding) -> None:
        ev = finding.evidence
        key = (finding.kind, finding.buffer, ev.get("op"), ev.get("source"), ev.get("second"), ev.get("where"))
        if key in self._reported:
            return
        self._reported.add(key)
        self.findings.append(finding)

    # -- op watching -----------------------------------------------------------------------------
    def __enter__(self):
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth == 1:
            self._mode = _GuardMode(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self._mode.__exit__(*exc)
            self._mode = None

    def report(self, kind: str, buffer: str, text: str, evidence: dict | None = None) -> None:
        """A finding from a checker outside this module (a device allocator's red zones)."""
        self._add(Finding(kind, buffer, text, evidence or {}))

    def summary(self) -> list[dict]:
        return [f.to_dict() for f in self.findings]


_DEFAULT: Guard | None = None
_ACTIVE: Guard | None = None


def activate() -> Guard:
    """``--guard``: the guard that backends with buffers of their own (kt_moe's arenas) register
    into and seal with; None until a command turns it on."""
    global _ACTIVE
    if _ACTIVE is None:
        _ACTIVE = Guard()
    return _ACTIVE


def active() -> Guard | None:
    return _ACTIVE


def deactivate() -> None:
    global _ACTIVE
    _ACTIVE = None


def watch(tensor: torch.Tensor, name: str) -> Guard:
    """Seal ``tensor`` in the process-wide guard and start watching ops: a write into it through a view
    or another buffer sharing its memory is reported at the op that made it (``findings()``)."""
    global _DEFAULT
    if _ACTIVE is not None:  # under `tensordiff guard SCRIPT` / --guard: that guard watches
        _ACTIVE.register(name, tensor)
        _ACTIVE.seal(tensor, name)
        return _ACTIVE
    if _DEFAULT is None:
        _DEFAULT = Guard().__enter__()
    _DEFAULT.register(name, tensor)
    _DEFAULT.seal(tensor, name)
    return _DEFAULT


def findings() -> list[Finding]:
    return list(_DEFAULT.findings) if _DEFAULT is not None else []


def stop() -> list[Finding]:
    """Stop the process-wide guard; its findings."""
    global _DEFAULT
    found = findings()
    if _DEFAULT is not None:
        _DEFAULT.__exit__(None, None, None)
        _DEFAULT = None
    return found
