"""Observers that watch for NaN and Inf: a cheap screen for the whole run and an exact tracer for one
scope.

``NanScreen`` (coarse, the clean-run cost): one ``aminmax`` launch per new tensor at the calls of
outer modules (the root, and modules with a composite child: a decoder layer, not its attention's
projections; 1 in 7 calls of an LLM, and the tracer finds the op inside anyway) and, with
``backward``, at backward ops; results stay on the tensor's device and one host sync at the end says
which events saw non-finite values. ``aminmax`` propagates NaN and shows +-Inf, so it is exact
without a sum that could overflow, and it allocates nothing the size of the tensor.

``NanTracer`` (fine, only after the screen found something): inside the scope where values were
born, every op's inputs (before it runs) and outputs are counted exactly, the first op whose output
is non-finite while its inputs are finite is described in full, later bad ops are counted, and each
op is attributed to an expert where it runs inside a mixture-of-experts layer (``experts.py``).

    screen = NanScreen()
    with observe(model, [screen]):
        model(**inputs)
    first = screen.first_bad()        # a ScreenEvent, or None when the run was clean
"""
from __future__ import annotations

from dataclasses import dataclass, field

import weakref

import torch
from torch.utils._pytree import tree_flatten

from tensordiff.analysis.boundary import boundary_signature, first_bad_index
from tensordiff.observers.events import ModuleCall, Needs, Observer, OpCall
from tensordiff.observers.experts import ExpertTracker
from tensordiff.source_lines import user_source_line
from tensordiff.tensors import clone_tensors, flatten_tensors, version_of as _version


def _screenable(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel() > 0 \
        and t.device.type != "meta"


@dataclass(slots=True)
class ScreenEvent:
    kind: str                     # "enter" (inputs of a call), "leave" (its outputs), "op" (backward op)
    call: ModuleCall | None       # the module call (enter / leave) or the op's innermost call
    op: str = ""
    node: str = ""                # autograd node of a backward op
    index: int = -1
    slots: list = field(default_factory=list)   # (slot, group key, position in group)
    bad: list = field(default_factory=list)     # slots with NaN / Inf, after finish()

    @property
    def scope(self) -> str:
        return self.call.scope if self.call is not None else "__root__/forward#0"


class NanScreen(Observer):
    """Sync-free screen of module inputs and outputs (and, with ``backward``, of backward ops)."""

    def __init__(self, backward: bool = False, neg_inf_is_bad: bool = False):
        self.needs = Needs(backward=backward, modules="outer")
        self.neg_inf_is_bad = neg_inf_is_bad
        self._unwritten: set = set()  # storages of empty* outputs no op has written yet (backward ops)
        self.events: list[ScreenEvent] = []
        self._groups: dict = {}                 # (device, dtype) -> ([mins], [maxs])
        self._seen: dict = {}                   # id -> (weakref, version, group, pos): screened already
        self.tensors = 0

    def _screen(self, event: ScreenEvent, slot: str, t: torch.Tensor) -> None:
        seen = self._seen.get(id(t))
        if seen is not None and seen[0]() is t:  # screened already: unless written in place since
            version = _version(t)
            if seen[1] == version and version is not None:
                event.slots.append((slot, seen[2], seen[3]))
                return
        if not _screenable(t):
            return
        version = _version(t)
        key = (t.device, t.dtype)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = ([], [])
        lo, hi = torch.aminmax(t.detach())
        group[0].append(lo)
        group[1].append(hi)
        pos = len(group[0]) - 1
        self._seen[id(t)] = (weakref.ref(t), version, key, pos)
        event.slots.append((slot, key, pos))
        self.tensors += 1

    def _event(self, event: ScreenEvent, obj, prefix: str) -> None:
        for slot, t in flatten_tensors(obj, prefix):
            self._screen(event, slot, t)
        if event.slots:
            self.events.append(event)

    def on_module_enter(self, call, args, kwargs):
        event = ScreenEvent("enter", call)
        for slot, t in list(flatten_tensors(args, "input")) + list(flatten_tensors(kwargs, "input")):
            self._screen(event, slot, t)
        if event.slots:
            self.events.append(event)

    def on_module_leave(self, call, output):
        self._event(ScreenEvent("leave", call), output, "output")

    def on_op(self, op: OpCall, args, kwargs, out):
        if op.direction != "backward":
            return
        from tensordiff.guard import written_tensors

        outs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
        written = {id(t) for t in written_tensors(op.func, args, kwargs)}
        if op.name.split(".")[0] in UNINITIALIZED:  # its memory is garbage until something writes it
            self._unwritten.update(_storage(t) for t in outs)
            return
        for t in written_tensors(op.func, args, kwargs):
            self._unwritten.discard(_storage(t))
        if not _returns_alias(op.func):  # fresh outputs: the op wrote them (even where memory was reused)
            for t in outs:
                self._unwritten.discard(_storage(t))
        node = type(op.node).__name__ if op.node is not None else ""
        event = ScreenEvent("op", op.module, op.name, node, op.index)
        for slot, t in enumerate(a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)):
            if id(t) not in written and _storage(t) not in self._unwritten:  # a destination's old bytes: not data
                self._screen(event, f"in.{slot}", t)
        for slot, t in enumerate(outs):
            if _storage(t) not in self._unwritten:  # a view of memory nothing wrote yet
                self._screen(event, f"out.{slot}", t)
        if event.slots:
            self.events.append(event)

    def finish(self):
        finite = {}
        for key, (mins, maxs) in self._groups.items():  # one host sync per (device, dtype)
            lo, hi = torch.stack(mins), torch.stack(maxs)
            if self.neg_inf_is_bad:
                ok = torch.isfinite(lo) & torch.isfinite(hi)
            else:  # -inf alone (no NaN, no +inf) is how masks are written: not a finding
                ok = ~torch.isnan(lo) & ~torch.isnan(hi) & (hi != float("inf"))
            finite[key] = ok.tolist()
        for event in self.events:
            event.bad = [slot for slot, key, pos in event.slots if not finite[key][pos]]
        self._groups.clear()
        self._seen.clear()

    def first_bad(self, direction: str = "forward") -> ScreenEvent | None:
        want_op = direction == "backward"
        for event in self.events:
            if event.bad and (event.kind == "op") == want_op:
                return event
        return None

    def bad_after(self, first: ScreenEvent) -> list[ScreenEvent]:
        """Later events that still saw non-finite values (the spread)."""
        start = self.events.index(first)
        return [e for e in self.events[start + 1:] if e.bad and (e.kind == "op") == (first.kind == "op")]


def _counts(t: torch.Tensor) -> tuple[int, int, int]:
    """NaN, +Inf and -Inf counts (one sync)."""
    nan, pos, neg = torch.stack([torch.isnan(t).sum(), torch.isposinf(t).sum(), torch.isneginf(t).sum()]).tolist()
    return int(nan), int(pos), int(neg)


def tensor_range(t: torch.Tensor) -> dict:
    """shape, dtype, finite min / max and the non-finite count of one tensor (exact, one sync)."""
    d = t.detach()
    info = {"shape": list(d.shape), "dtype": str(d.dtype).replace("torch.", "")}
    if not (d.is_floating_point() or d.is_complex()) or d.numel() == 0:
        if d.numel() and not d.is_complex() and d.dtype != torch.bool:
            lo, hi = torch.aminmax(d)
            info.update(min=float(lo), max=float(hi))
        info["nonfinite"] = 0
        return info
    finite = torch.isfinite(d)
    n_bad = int(d.numel() - finite.sum())
    info["nonfinite"] = n_bad
    if n_bad < d.numel():
        values = d[finite] if n_bad else d
        lo, hi = torch.aminmax(values.float())
        info.update(min=float(lo), max=float(hi))
    return info


# Ops whose output memory is uninitialised: a NaN there is not born, it is whatever the allocator had.
UNINITIALIZED = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                 "aten::new_empty_strided"}


class NanTracer(Observer):
    """Exact NaN / Inf accounting of every op inside ``scope`` (a module call scope, or every backward
    op with ``direction='backward'``); light bookkeeping elsewhere (routers, autograd nodes)."""

    def __init__(self, model: torch.nn.Module, scope: str | None, direction: str = "forward",
                 keep_inputs_of: set | None = None, neg_inf_is_bad: bool = False, keep_composites: bool = False):
        self.neg_inf_is_bad = neg_inf_is_bad
        self._constants: dict = {}           # id -> (weakref, op): non-finite tensors no input made
        self.needs = Needs(ops=True, backward=direction == "backward", inputs_before=True)
        self.scope = scope
        self.direction = direction
        self.keep_inputs_of = keep_inputs_of or set()
        # inputs of composite calls inside the scope too: an MoE block to bisect may sit below it
        self.keep_composites = keep_composites
        self._composite = {name or "__root__" for name, m in model.named_modules()
                           if next(iter(m.children()), None) is not None}
        self.kept_inputs: dict = {}          # scope -> (args, kwargs) cloned at the call's start
        self.birth: dict | None = None       # the first op whose output is non-finite
        self.spread_ops = 0                  # later ops in the scope whose outputs are non-finite
        self.ops_checked = 0
        self.experts = ExpertTracker(model)
        self._leaves = {}                    # data_ptr -> parameter / buffer name
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p is not None and p.device.type != "meta":
                self._leaves.setdefault(p.data_ptr(), name)
        self._before = None                  # the current op's input summaries (on_op_start)
        self._call_inputs: dict = {}         # scope -> inputs of calls in scope, while no birth is known
        self._modules = {name or "__root__": m for name, m in model.named_modules()}
        self._forward_tags: dict = {}        # autograd node -> what made it in the forward

    # -- where an op is ---------------------------------------------------------------------------
    def _in_scope(self, op: OpCall) -> bool:
        if op.direction != self.direction:
            return False
        return self.direction == "backward" or self.scope is None or self._inside(op.module)

    def _inside(self, call) -> bool:
        while call is not None:
            if call.scope == self.scope:
                return True
            call = call.parent
        return False

    def on_module_enter(self, call, args, kwargs):
        self.experts.enter(call)
        if call.scope in self.keep_inputs_of or (self.keep_composites and call.name in self._composite
                                                 and self._inside(call)):
            self.kept_inputs[call.scope] = clone_tensors((args, kwargs))
        if self.birth is None and self.direction == "forward" and self._inside(call):
            self._call_inputs[call.scope] = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]

    def on_module_leave(self, call, output):
        self.experts.leave(call)
        inputs = self._call_inputs.pop(call.scope, None)
        if inputs is not None and self.birth is None:
            self._opaque_birth(call, inputs, output)
        if self.direction == "backward":  # name autograd nodes no op event names (custom Functions)
            for _, t in flatten_tensors(output, "output"):
                self._tag_graph(t.grad_fn, {"module": call.name, "scope": call.scope})

    def _tag_graph(self, node, tag: dict, budget: int = 10000) -> None:
        stack = [node]
        while stack and budget > 0:
            node = stack.pop()
            budget -= 1
            if node is None or node in self._forward_tags:
                continue
            self._forward_tags[node] = {"node": node.name(), **tag}
            stack.extend(n for n, _ in node.next_functions)

    def _opaque_birth(self, call, inputs, output) -> None:
        """A call whose output is non-finite although no op inside it made a non-finite value: its
        values were written by code no op event sees (an extension kernel handed raw pointers).
        The call itself is where they were born."""
        for slot, (_, t) in enumerate(flatten_tensors(output, "out")):
            if not _screenable(t):
                continue
            nan, pos, neg = _counts(t)
            if not (nan or pos or (neg and self.neg_inf_is_bad)):
                continue
            finite = [not _screenable(x) or bool(torch.isfinite(x).all()) for x in inputs]
            ranges = [tensor_range(x) for x in inputs]
            op = OpCall(func=_CallAsOp(call.name), index=-1, direction="forward", module=call)
            found = self._describe(op, inputs, finite, ranges, slot, t, nan, pos + neg, None)
            module = self._modules.get(call.name)
            kernel = getattr(module, "tensordiff_kernel", None) or type(module).__name__
            found.update(op=f"{kernel} (a call no aten op explains)", origin="opaque_call" if all(finite)
                         else found["origin"])
            self.birth = found
            return

    # -- ops ------------------------------------------------------------------------------------
    def _in_external_kernel(self, op) -> bool:
        """Is the op inside a module that declares an extension kernel (``tensordiff_kernel``)?"""
        node = op.module
        while node is not None:
            if getattr(self._modules.get(node.name), "tensordiff_kernel", None):
                return True
            node = node.parent
        return False

    def _is_constant(self, t) -> bool:
        hit = self._constants.get(id(t))
        return hit is not None and hit[0]() is t

    def on_op_start(self, op, args, kwargs):
        self._before = None
        if not self._in_scope(op):
            return
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        finite = []
        for t in inputs:
            ok = True
            if _screenable(t) and not self._is_constant(t):
                ok = bool(torch.isfinite(t).all()) if self.neg_inf_is_bad else \
                    not bool((torch.isnan(t) | torch.isposinf(t)).any())
            finite.append(ok)
        self._before = (inputs, finite, [tensor_range(t) for t in inputs] if not all(finite) else None)

    def on_op(self, op, args, kwargs, out):
        self.experts.on_op(op, args, out)
        if op.direction == "forward" and self.direction == "backward":
            self._tag_forward_op(op, out)
        if self._before is None:
            return
        inputs, finite, ranges = self._before
        self._before = None
        self.ops_checked += 1
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if op.name.split(".")[0] in UNINITIALIZED:  # garbage by contract: whoever reads it unwritten is at fault
            for t in outs:
                self._constants[id(t)] = (weakref.ref(t), f"{op.name} (uninitialised memory)")
            return
        unwritten = {x.untyped_storage().data_ptr(): self._constants[id(x)][1] for x in inputs
                     if self._is_constant(x) and self._constants[id(x)][1].endswith("(uninitialised memory)")}
        if unwritten and all(t.untyped_storage().data_ptr() in unwritten for t in outs):
            for t in outs:  # a view of uninitialised memory is still uninitialised
                self._constants[id(t)] = (weakref.ref(t), unwritten[t.untyped_storage().data_ptr()])
            return
        if self.birth is None and op.direction == "forward" and self._in_external_kernel(op):
            # An extension kernel writes through raw pointers no op event sees: the aten ops around it
            # only move its buffers, and stale or fresh contents look alike to them. Its call as a whole
            # is judged at module leave (_opaque_birth: finite inputs, non-finite output).
            return
        if self.birth is None and not all(finite) and _returns_alias(op.func) and not any(
                self._leaves.get(x.data_ptr()) for x, ok in zip(inputs, finite) if not ok):
            # A view of memory that held NaN / Inf before this run wrote anything there (a reused
            # staging buffer): a view makes no values. Like uninitialised memory, it is a finding only
            # where something reads it before writing it.
            for t in outs:
                self._constants[id(t)] = (weakref.ref(t), f"{op.name} of memory that held NaN / Inf "
                                          "before this run wrote it (uninitialised memory)")
            return
        for slot, t in enumerate(outs):
            if not _screenable(t):
                continue
            nan, pos, neg = _counts(t)
            if not (nan or pos or (neg and self.neg_inf_is_bad)):
                continue
            if not inputs:  # a factory op's NaN / Inf constant: born where it meets data
                self._constants[id(t)] = (weakref.ref(t), op.name)
                break
            clean_inputs = all(finite)
            expert = self.experts.current(op)
            if expert is not None and clean_inputs:
                self.experts.born(expert, op.name, nan, pos + neg, _first(t))
            if self.birth is None:
                self.birth = self._describe(op, inputs, finite, ranges, slot, t, nan, pos + neg, expert)
            else:
                self.spread_ops += 1
            break

    def _describe(self, op, inputs, finite, ranges, slot, t, nan, inf, expert) -> dict:
        bad = ~torch.isfinite(t.detach())
        first = first_bad_index(bad)
        ins = []
        for i, x in enumerate(inputs):
            info = ranges[i] if ranges is not None else tensor_range(x)
            name = self._leaves.get(x.data_ptr()) if x.device.type != "meta" else None
            ins.append({"slot": f"in.{i}", **info, **({"tensor": name} if name else {})})
            if self._is_constant(x):  # a NaN / Inf the code wrote on purpose (a fill value)
                ins[-1]["constant"] = self._constants[id(x)][1]
        origin = "op"
        if not all(finite):
            leaves = [i for i, ok in enumerate(finite) if not ok and ins[i].get("tensor")]
            origin = "parameter" if leaves else "earlier"
        found = {"origin": origin, "direction": op.direction, "op": op.name, "op_index": op.index,
                 "scope": op.scope, "module": op.module.name if op.module is not None else "",
                 "source": user_source_line(), "slot": f"out.{slot}", "shape": list(t.shape),
                 "dtype": str(t.dtype).replace("torch.", ""), "numel": t.numel(), "nan": nan, "inf": inf,
                 "first_index": first[0] if first else None, "first_coords": first[1] if first else None,
                 "boundary": boundary_signature(bad), "inputs": ins,
                 "chain": op.module.chain() if op.module is not None else []}
        if expert is not None:
            found["expert"] = expert
        if op.node is not None:
            found["node"] = op.node.name()
            tag = self._forward_tags.get(op.node)
            if tag:
                found["forward"] = tag
        return found

    def _tag_forward_op(self, op, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.grad_fn is not None and t.grad_fn not in self._forward_tags:
                self._forward_tags[t.grad_fn] = {"node": t.grad_fn.name(), "op": op.name, "scope": op.scope,
                                                 "module": op.module.name if op.module else "",
                                                 "source": user_source_line()}


class _CallAsOp:
    """Stands for the op of a module call whose values no op made (``OpCall.name`` asks it)."""

    def __init__(self, name: str):
        self._name = name

    def name(self) -> str:
        return self._name


def _returns_alias(func) -> bool:
    """Does the op return a view of (or the same memory as) an input, by its schema?"""
    schema = getattr(func, "_schema", None)
    return schema is not None and any(r.alias_info is not None for r in schema.returns)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, nested)
        return -id(t)


def _first(t: torch.Tensor) -> int | None:
    found = first_bad_index(~torch.isfinite(t.detach()))
    return found[0] if found else None
