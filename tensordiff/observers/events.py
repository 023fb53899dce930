"""Module calls and aten ops as events delivered to observers: an analysis plugs in here without
touching the code that runs the model (the shape of torch's ``_debug_mode`` dispatch hooks).

    class Counter(Observer):
        needs = Needs(ops=True)
        def on_op(self, op, args, kwargs, out): ...

    with observe(model, [Counter()]):
        model(**inputs)

An observer declares what it needs, so the hot path does only that work: ``ops`` turns the dispatch
mode on at all (module events alone cost one Python frame per call); ``backward`` keeps it on while
autograd runs. Events carry names, not tensors' copies: an observer that keeps a tensor pays for it.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tensordiff.schema import ROOT


@dataclass(frozen=True)
class Needs:
    ops: bool = False            # aten op events (a dispatch mode over the whole run)
    backward: bool = False       # op events while autograd runs, too
    inputs_before: bool = False  # on_op_start before the op runs (an in-place op overwrites its input)
    # which module calls are events: "all"; or "outer": the root and modules with a composite child
    # (a decoder layer holds attention and MLP, which hold only leaves): 1 in 7 calls of an LLM
    modules: str = "all"


@dataclass
class ModuleCall:
    """One call of one module: ``name/forward#call`` is its scope, the key every analysis uses."""
    name: str
    call: int
    parent: "ModuleCall | None" = None

    @property
    def scope(self) -> str:
        return f"{self.name}/forward#{self.call}"

    def chain(self) -> list[str]:
        """Scopes from the root call down to this one."""
        out, node = [], self
        while node is not None:
            out.append(node.scope)
            node = node.parent
        return out[::-1]


@dataclass
class OpCall:
    """One aten op: its index in the run, the innermost module call around it, and for ops autograd
    runs, the autograd node (``MulBackward0``, a custom Function's ``...Backward``)."""
    func: object
    index: int
    direction: str
    module: ModuleCall | None
    node: object = None

    @property
    def name(self) -> str:
        return self.func.name()

    @property
    def scope(self) -> str:
        return self.module.scope if self.module is not None else f"{ROOT}/{self.direction}#0"


class Observer:
    """Base observer: every hook is optional. ``finish`` runs once after the model ran."""
    needs = Needs()

    def on_module_enter(self, call: ModuleCall, args: tuple, kwargs: dict) -> None:
        pass

    def on_module_leave(self, call: ModuleCall, output) -> None:
        pass

    def on_op_start(self, op: OpCall, args: tuple, kwargs: dict) -> None:
        pass

    def on_op(self, op: OpCall, args: tuple, kwargs: dict, out) -> None:
        pass

    def finish(self) -> None:
        pass


class EventSource:
    """Module wrappers and (when an observer needs them) a dispatch mode, delivering to observers."""

    def __init__(self, model: torch.nn.Module, observers: list[Observer]):
        self.model = model
        self.observers = list(observers)
        self.module_observers = [o for o in self.observers
                                 if type(o).on_module_enter is not Observer.on_module_enter
                                 or type(o).on_module_leave is not Observer.on_module_leave]
        self.op_observers = [o for o in self.observers if o.needs.ops or o.needs.backward]
        self.calls: dict[str, int] = {}
        self.open: ModuleCall | None = None   # the innermost open call
        self.direction = "forward"
        self.op_index = 0
        self.busy = False                     # an observer's own tensor work is not an event
        self._wrapped: list = []

    # -- modules -----------------------------------------------------------------------------
    def _wrap(self, name: str, forward):
        @functools.wraps(forward)
        def observed_forward(*args, **kwargs):
            if self.busy:
                return forward(*args, **kwargs)
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            event = ModuleCall(name, call, self.open)
            self.open = event
            try:
                self._deliver("on_module_enter", self.module_observers, event, args, kwargs)
                output = forward(*args, **kwargs)
                self.open = event.parent
                self._deliver("on_module_leave", self.module_observers, event, output)
                return output
            finally:
                self.open = event.parent

        return observed_forward

    def _deliver(self, hook: str, observers, *event) -> None:
        was, self.busy = self.busy, True
        try:
            for obs in observers:
                getattr(obs, hook)(*event)
        finally:
            self.busy = was

    def __enter__(self):
        policy = "all" if any(o.needs.modules == "all" for o in self.observers) else "outer"
        for name, mod in _modules_to_wrap(self.model, policy):
            own = mod.__dict__.get("forward")
            mod.forward = self._wrap(name, mod.forward)
            self._wrapped.append((mod, own))
        return self

    def __exit__(self, *exc):
        restore_forwards(self._wrapped)
        return False

    @contextlib.contextmanager
    def backward(self):
        """While autograd runs: op events carry direction 'backward' and their autograd node. The
        dispatch mode is entered here when only backward ops are wanted (the forward stays fast)."""
        self.direction = "backward"
        wanted = any(o.needs.backward for o in self.op_observers)
        mode = _OpEvents(self) if wanted and not any(o.needs.ops for o in self.op_observers) else None
        try:
            if mode is None:
                yield
            else:
                with mode:
                    yield
        finally:
            self.direction = "forward"


def restore_forwards(wrapped: list) -> None:
    """Undo instance-level ``forward`` wrappers: (module, the instance's own forward or None) pairs."""
    for mod, own in wrapped:
        if own is None:
            mod.__dict__.pop("forward", None)
        else:
            mod.forward = own
    wrapped.clear()


_SELECTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _modules_to_wrap(model: torch.nn.Module, policy: str) -> list:
    """(name, module) pairs to wrap, computed once per model and policy (a 0.6B model has 430
    modules: walking them costs about a millisecond per run)."""
    cache = _SELECTIONS.setdefault(model, {})
    if policy not in cache:
        mods = [(raw or ROOT, mod) for raw, mod in model.named_modules()]
        if policy == "outer":
            composite = {id(m) for _, m in mods if next(iter(m.children()), None) is not None}
            mods = [(n, m) for n, m in mods if n == ROOT or any(id(c) in composite for c in m.children())]
        cache[policy] = mods
    return cache[policy]


class _OpEvents(TorchDispatchMode):
    def __init__(self, source: EventSource):
        super().__init__()
        self.source = source

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = self.source
        if src.busy or func is torch.ops.aten.detach.default:
            return func(*args, **kwargs)
        backward = src.direction == "backward"
        observers = [o for o in src.op_observers if (o.needs.backward if backward else o.needs.ops)]
        if not observers:
            return func(*args, **kwargs)
        op = OpCall(func, src.op_index, src.direction, None if backward else src.open,
                    torch._C._current_autograd_node() if backward else None)
        src.op_index += 1
        early = [o for o in observers if o.needs.inputs_before]
        if early:
            src._deliver("on_op_start", early, op, args, kwargs)
        out = func(*args, **kwargs)
        src._deliver("on_op", observers, op, args, kwargs, out)
        return out


@contextlib.contextmanager
def observe(model: torch.nn.Module, observers: list[Observer]):
    """Deliver the module calls (and ops, where needed) of everything run inside to ``observers``;
    ``finish`` is called on each at the end. Yields the EventSource (its ``backward()`` context marks
    the autograd part)."""
    source = EventSource(model, observers)
    with contextlib.ExitStack() as stack:
        stack.enter_context(source)
        if any(o.needs.ops for o in source.op_observers):
            stack.enter_context(_OpEvents(source))
        yield source
    for obs in source.observers:
        obs.finish()
