"""Op-level probe: every aten op under a TorchDispatchMode, inside the innermost module scope, as an
event delivered to observers (the shape of ``tensordiff.observers.events``): ``OpReplay`` gives each
output its local error (and the layout experiment), ``OpRecorder`` writes the records. A new op-level
analysis is one more observer, not a branch in the dispatch mode.

Each op gets records for its tensor inputs (``in.N``, taken *before* the op runs, so an in-place op's
destination shows its old value) and outputs (``out.N``), with strides, storage offset and contiguity:
layout bugs (a copy that ignores strides) live there. View ops keep their layout and stats but not
their data: about 40% of ops are views, and their data is captured anyway where a real op reads them.

    with ModuleProbe(model, session), OpProbe(session):
        model(**inputs)
"""
from __future__ import annotations

import os
from types import MethodType

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tensordiff.observers.events import Needs, Observer
from tensordiff.probes.local_error import local_error
from tensordiff.probes.replay import LOW_PRECISION, dtypes_of, layout_experiment, output_tensors, replayable
from tensordiff.probes.session import CaptureSession
from tensordiff.schema import op_prefix
from tensordiff.source_lines import user_source_line

# Ops whose only job is metadata or that tensordiff itself never needs to compare.
_IGNORED = frozenset({"aten::detach"})


def allocates_uninitialized(name: str) -> bool:
    """aten::empty, empty_like, empty_strided, new_empty...: outputs hold whatever the allocator's
    memory held. Their values mean nothing until an op writes them: never compared."""
    return name.startswith(("aten::empty", "aten::new_empty"))


def op_short_name(func) -> str:
    name = func.name().split("::", 1)[-1]
    return name[:-8] if name.endswith(".default") else name


_FUNC_INFO: dict = {}  # func -> (name, short name, is a view, ignored): func.name() costs ~1 us a call


def func_info(func) -> tuple:
    info = _FUNC_INFO.get(func)
    if info is None:
        name = func.name()
        info = _FUNC_INFO[func] = (name, op_short_name(func), bool(getattr(func, "is_view", False)),
                                   name in _IGNORED)
    return info


def op_tensors(args, kwargs) -> list:
    """An op's tensor arguments in ``tree_flatten((args, kwargs))`` order. aten arguments nest one
    level at most (``Tensor[]``, ``Tensor?[]``), which makes this a fifth of pytree's cost."""
    out = []
    for group in (args, kwargs.values()) if kwargs else (args,):
        for a in group:
            if isinstance(a, torch.Tensor):
                out.append(a)
            elif isinstance(a, (list, tuple)):
                out.extend(b for b in a if isinstance(b, torch.Tensor))
    return out


class TraceOp:
    """One op of a traced run: its record fields (``base``), key prefix and, filled by observers on
    the way, per-output extra fields (``extra[i]``: local error, floor, layout experiment) and an
    observer's own state between start and end (``scratch``). A plain slotted class: a dataclass
    with two default factories cost 2 us per op."""
    __slots__ = ("func", "prefix", "base", "is_view", "direction", "extra", "scratch")

    def __init__(self, func, prefix: str, base: dict, is_view: bool, direction: str):
        self.func, self.prefix, self.base, self.is_view, self.direction = func, prefix, base, is_view, direction
        self.extra: dict = {}
        self.scratch: dict = {}


class OpReplay(Observer):
    """Runs each forward op again on the reference with the target's inputs: local error per output,
    the noise floor for a low-precision output over budget, and the layout experiment."""
    needs = Needs(ops=True, inputs_before=True)

    def __init__(self, session: CaptureSession):
        self.session = session
        self.replayer = session.replayer

    def on_op_start(self, op: TraceOp, args, kwargs) -> None:
        if op.direction != "forward" or not replayable(op.func):
            return
        op.scratch["ref_in"] = self.session.quietly(self.replayer.to_reference, (args, kwargs))
        op.scratch["dtypes"] = dtypes_of((args, kwargs))

    def on_op(self, op: TraceOp, args, kwargs, out) -> None:
        if "ref_in" not in op.scratch:
            return
        session, replayer = self.session, self.replayer
        ref_in = op.scratch["ref_in"]
        ref_out = output_tensors(session.quietly(replayer.run_op, op.func, ref_in))
        for i, item in enumerate(output_tensors(out)):
            if i >= len(ref_out):
                break
            local = session.quietly(local_error, item, ref_out[i])
            if local is None:
                continue
            extra = op.extra.setdefault(i, {})
            extra["local_rel_l2"], extra["local_max_abs"] = local
            budget = replayer.budget(f"{op.prefix}/out.{i}", item)
            if i == 0 and local[0] > budget:
                if item.dtype in LOW_PRECISION:
                    floor = session.quietly(replayer.op_floor, op.func, ref_in, op.scratch["dtypes"], ref_out[0])
                    if floor is not None:
                        extra["local_floor_rel_l2"] = floor
                verdict = session.quietly(layout_experiment, op.func, args, kwargs, ref_out[0], budget)
                if verdict:
                    extra["layout_experiment"] = verdict


class OpRecorder(Observer):
    """Writes the op's input records before it runs and its output records after, with whatever
    the observers before it put in ``op.extra``."""
    needs = Needs(ops=True, inputs_before=True)

    def __init__(self, session: CaptureSession):
        self.session = session

    def on_op_start(self, op: TraceOp, args, kwargs) -> None:
        tensors = op_tensors(args, kwargs)
        if tensors:
            self.session.emit_op(op.base, op.prefix, "in", tensors, save_data=False if op.is_view else None)

    def on_op(self, op: TraceOp, args, kwargs, out) -> None:
        save = False if op.is_view else None
        if isinstance(out, torch.Tensor):  # most ops: one output
            if allocates_uninitialized(op.base["op"]):
                self.session.mark_uninitialized(out)
            base = args[0] if op.is_view and args and isinstance(args[0], torch.Tensor) else None
            self.session.emit_op(op.base, op.prefix, "out", [out], save_data=save, same_as=base, extra=op.extra)
            return
        self.session.emit_op(op.base, op.prefix, "out", output_tensors(out), save_data=save, extra=op.extra)


class OpProbe(TorchDispatchMode):
    """The op event source: names each op in the session's innermost module scope, leaves a crash
    breadcrumb, and delivers it to the observers (by default: replay when the session has a
    replayer, then the recorder)."""

    def __init__(self, session: CaptureSession, observers: list | None = None):
        super().__init__()
        self.session = session
        if observers is None:
            observers = ([OpReplay(session)] if session.replayer is not None else []) + [OpRecorder(session)]
        self.observers = observers
        self._early = [o for o in observers if o.needs.inputs_before]
        self._call_of: dict = {}  # scope -> its call number
        # The whole handler in C++ (fast_records.cpp OpHandler) where every record goes to the
        # session's CpuRecords: the recorder is the only observer, nothing keeps data, no crash
        # breadcrumbs, and the writer has a thread. It hands back to the Python handler below what
        # it does not cover. TENSORDIFF_OP_HANDLER=python keeps the Python handler.
        self.native = None
        if session.native is not None and len(observers) == 1 and type(observers[0]) is OpRecorder \
                and not session.save_data and session._progress_fd is None \
                and not getattr(session.writer, "synchronous", True) \
                and os.environ.get("TENSORDIFF_OP_HANDLER") != "python":
            from tensordiff.probes import fast_records

            python_handler = type(self).__torch_dispatch__.__get__(self, type(self))
            self.native = fast_records.op_handler(session, python_handler, self._call_of)
            if self.native is not None:  # (torch asks for a method bound to the mode)
                self.__torch_dispatch__ = MethodType(self.native, self)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        # the handler holds this probe (its fallback) and the session: a cycle otherwise left to
        # the garbage collector, with the capture's identity table and stats chunks in it
        self.__dict__.pop("__torch_dispatch__", None)
        self.native = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        session = self.session
        name, short, is_view, ignored = func_info(func)
        if session.busy or ignored:
            return func(*args, **kwargs)
        module, scope = session.current_scope()
        index = session.op_counts[scope]
        session.op_counts[scope] = index + 1
        call = self._call_of.get(scope)
        if call is None:
            call = self._call_of[scope] = int(scope.rsplit("#", 1)[1])
        base = {"kind": "op", "direction": session.direction, "module": module, "scope": scope,
                "call": call, "op": name, "op_index": index, "source": user_source_line()}
        if session.drilling:
            base["drill"] = True
        op = TraceOp(func, op_prefix(scope, index, short), base, is_view, session.direction)
        if session._progress_fd is not None:  # crash breadcrumbs (an isolated child)
            session.progress(f"{op.prefix}\t{base['source']}")
        for obs in self._early:
            obs.on_op_start(op, args, kwargs)
        out = func(*args, **kwargs)
        for obs in self.observers:
            obs.on_op(op, args, kwargs, out)
        return out


class LastOpTracker(TorchDispatchMode):
    """Remembers the op that started last and the user line that called it (naming a failing op)."""

    def __init__(self):
        super().__init__()
        self.op = None
        self.source = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.op, self.source = func.name(), user_source_line()
        return func(*args, **(kwargs or {}))
