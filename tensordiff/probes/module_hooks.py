"""Module-level probe: inputs and outputs of every module call, and gradients with backward.

    with ModuleProbe(model, session, backward=True):
        loss = loss_fn(model(**inputs)); loss.backward()

The wrappers (and, with backward, full backward hooks) are installed by the context manager and
always removed in ``__exit__``. The probe delivers each call to the replay observer
(``observers.module_replay.ModuleReplay``, when the session has a replayer) and writes the records with
what it answered; it knows nothing of how a local error is computed.
"""
from __future__ import annotations

import functools
import warnings

import torch

from tensordiff.errors import TensordiffError
from tensordiff.probes.session import ROOT, CaptureSession
from tensordiff.source_lines import is_skipped_file, user_source_line
from tensordiff.tensors import flatten_tensors


def _versions(obj) -> list:
    """Version counters of the tensors in obj: a call that wrote into its inputs cannot be re-run."""
    from torch.utils._pytree import tree_flatten

    out = []
    for x in tree_flatten(obj)[0]:
        if isinstance(x, torch.Tensor):
            try:
                out.append(x._version)
            except RuntimeError:  # inference tensors have no version counter
                out.append(None)
    return out


def _outputs(output):
    return (output,) if isinstance(output, torch.Tensor) else output


def _named_tensors(obj, prefix: str):
    """(slot, tensor) pairs; the flat tuple/dict of tensors a module gets is walked without a generator."""
    if type(obj) is tuple or type(obj) is dict:
        items = obj.items() if type(obj) is dict else enumerate(obj)
        out = []
        for k, v in items:
            if isinstance(v, torch.Tensor):
                out.append((f"{prefix}.{k}", v))
            elif v is not None and not isinstance(v, (int, float, bool, str)):
                out.extend(flatten_tensors(v, f"{prefix}.{k}", 1))
        return out
    return list(flatten_tensors(obj, prefix))


class ModuleProbe:
    """Wraps the ``forward`` of every module without hooks (an instance attribute, removed on exit):
    with any hook, ``Module.__call__`` takes its slow path, which alone cost 1.17x a plain forward of
    a 0.6B model on the lent H100 (~19 us per module call); a wrapper costs one frame. A module that
    already has forward hooks (a user's fault injection, a quantisation library) gets hooks registered
    after them instead, so the record shows what the call really returned to its caller."""

    def __init__(self, model: torch.nn.Module, session: CaptureSession, backward: bool = False,
                 drill_down: bool = False):
        self.model = model
        self.session = session
        self.backward = backward
        # Drill-down: the first call whose own code is wrong (its local error is beyond tolerance and
        # no descendant's is) is re-run at once at op level on the same inputs, so the op is named
        # without paying for op-level capture of the whole model.
        self.drill_down = drill_down and session.replayer is not None
        # Frames are also kept in a crash-safe child (progress breadcrumbs on): a call that raises is
        # re-run once with an op tracker so the crash report names the op, not just the module.
        self._keep_frames = self.drill_down or session._progress_fd is not None
        self._frames: list = []         # per open call: inputs and whether a descendant was beyond
        self.replay = None  # observers/module_replay.ModuleReplay when the session replays (set on enter)
        self.drilled: dict | None = None
        self.live_summary: dict | None = None  # deferred replay: what settle() measured, replayed, saved
        # the fast path may record a call's whole args / output at once, unless each tensor must also
        # be seen here (kept for a live comparison, or measured against the kept records)
        self._whole_objects = session.keep is None and session.live is None
        self._handles = []
        self._wrapped: list = []        # (module, its own instance-level forward or None)
        self._open_calls: list = []     # hook path: the state of each open call

    def _emit_other(self, name, call, slot, source, tensor):
        self.session.emit_module(name, "forward", call, slot, source, tensor)

    def __enter__(self):
        from torch.nn.modules import module as nn_module

        global_hooks = bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)
        if self.session.replayer is not None:
            from tensordiff.observers.module_replay import ModuleReplay

            kernels = {raw or ROOT for raw, mod in self.model.named_modules()
                       if getattr(mod, "tensordiff_kernel", None)}  # modules an external kernel computes
            if self.session.live is not None and not self.backward:
                from tensordiff.observers.module_replay import DeferredReplay

                # the reference's records are at hand: replay only what is beyond, after the forward
                self.replay = DeferredReplay(self.session, kernels, self.session.live)
            else:
                self.replay = ModuleReplay(self.session, kernels, self.backward)
        for raw_name, mod in self.model.named_modules():
            name = raw_name or ROOT
            wanted = self.session.wants_module(name)
            if global_hooks or mod._forward_hooks or mod._forward_pre_hooks:
                self._handles.append(mod.register_forward_pre_hook(self._pre_hook(name, wanted), with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._post_hook(name, wanted), with_kwargs=True,
                                                               always_call=True))
            else:
                own = mod.__dict__.get("forward")
                try:
                    mod.forward = self._wrap(name, wanted, mod.forward)
                except (AttributeError, RuntimeError, TypeError) as exc:  # e.g. a ScriptModule
                    raise TensordiffError(f"cannot probe module {name!r} ({type(mod).__name__}): {exc}") from None
                self._wrapped.append((mod, own))
            # The root returns a ModelOutput, on which full backward hooks never fire (torch warns).
            if self.backward and raw_name and wanted:
                self._handles.append(mod.register_full_backward_hook(self._backward_hook(name)))
        return self

    def __exit__(self, *exc):
        from tensordiff.observers.events import restore_forwards

        restore_forwards(self._wrapped)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _enter(self, name: str, wanted: bool, args, kwargs, forward=None) -> tuple:
        session = self.session
        call = session.next_call(name, "forward")
        if session.drilling:  # inside a drill-down re-run: scopes only, the op probe records
            scope = f"{name}/forward#{call}"
            session.scopes.append((name, scope))
            return call, False, scope
        if self.deferred:
            self.replay.on_enter(name, wanted, args, kwargs, forward)
        elif self.replay is not None:
            self.replay.on_enter(name, wanted, args, kwargs)
        if self._keep_frames and not self.deferred:
            # version counters only where a drill-down may re-run the call (they cost a tree walk)
            self._frames.append({"forward": forward, "args": args, "kwargs": kwargs, "below": False,
                                 "versions": _versions((args, kwargs)) if self.drill_down else None})
        # with a native wrapper some calls never touch session.scopes: the fast path keeps the depth
        fast = session.fast
        is_root = fast.enter() if fast is not None else not session.scopes
        scope = f"{name}/forward#{call}"
        session.scopes.append((name, scope))
        if is_root:
            session.begin_forward()
        if session._progress_fd is not None:
            session.progress(scope)
        if wanted:
            src = user_source_line(start=3)  # past _enter and the wrapper (or hook): torch's __call__
            if fast is not None and self._whole_objects:
                fast.record(args, name, "forward", call, "input", src, False)
                if kwargs:
                    fast.record(kwargs, name, "forward", call, "input", src, False)
                return call, is_root, scope
            if len(args) == 1 and isinstance(args[0], torch.Tensor):  # the common case, without lists
                session.emit_module(name, "forward", call, "input.0", src, args[0])
            else:
                for slot, t in _named_tensors(args, "input"):
                    session.emit_module(name, "forward", call, slot, src, t)
            if kwargs:
                for slot, t in _named_tensors(kwargs, "input"):
                    session.emit_module(name, "forward", call, slot, src, t)
        return call, is_root, scope

    def _leave(self, name: str, wanted: bool, state: tuple, output, failed: bool) -> None:
        session = self.session
        call, is_root, scope = state
        if session.scopes:
            session.scopes.pop()
        if session.drilling:
            return
        fast = session.fast
        if fast is not None:
            fast.leave()
        if session._progress_fd is not None:
            session.progress(f"{session.current_scope()[1]} (after {scope})")
        own_fault = False
        if failed and session.error is None:  # the innermost call the exception leaves
            frame = self.replay._open[-1] if self.deferred and self.replay._open else None
            if frame is not None:
                frame = {"forward": frame[3], "args": frame[0], "kwargs": frame[1]}
            elif self._frames and not self.deferred:
                frame = self._frames[-1]
            self._locate_error(name, scope, frame)
        if wanted and not failed and fast is not None and self._whole_objects and self.replay is None:
            fast.record(output, name, "forward", call, "output", "", True)
        elif wanted and not failed and isinstance(output, torch.Tensor) and self.replay is None:  # the common case
            session.emit_module(name, "forward", call, "output.0", "", output)
        elif self.replay is not None or (wanted and not failed):
            named = _named_tensors(_outputs(output), "output") if wanted and not failed else None
            extras, own_fault, _ = self.replay.on_leave(name, scope, wanted, output, failed, named) \
                if self.replay is not None else ({}, False, None)
            for slot, t in named or ():
                session.emit_module(name, "forward", call, slot, "", t, extras.get(slot))
        if self._keep_frames and not self.deferred:
            self._after_call(name, scope, own_fault)
        if is_root:
            if self.deferred:
                self._settle(drill=not failed)
            session.end_of_forward()  # no stats wait past a root forward; what came before an error lands

    @property
    def deferred(self) -> bool:
        return self.replay is not None and hasattr(self.replay, "settle")

    def _settle(self, drill: bool) -> None:
        """After a deferred-replay forward: the live measurements read once, the calls beyond
        tolerance replayed, every measured record amended (live metrics, local error, and the data of
        the replayed calls' records unless the capture keeps stats only), then the drill-down."""
        from tensordiff.observers.live_compare import live_fields
        from tensordiff.probes.snapshot import Snapshot, read_back, tensor_layout

        session, live = self.session, self.session.live
        amends: dict = {}

        def amend(key, fields, tensor):
            entry = amends.setdefault(key, [{}, None])
            entry[0].update(fields)
            if tensor is not None:
                entry[1] = tensor

        calls = self.replay.settle(amend)
        for key, m in self.replay.metrics.items():
            amend(key, live_fields(m), None)
        if session.save_beyond:
            prefixes = tuple(f"{c.scope}/" for c in calls if c.beyond)
            for key in live.tensors:
                if key.startswith(prefixes):
                    t = live.tensor(key)
                    if t is not None:
                        amend(key, {}, t)
        session.flush_stats()
        session.writer.amend_many([
            (key, fields, session.quietly(lambda t: Snapshot(tensor_layout(t), None, read_back(t), True), tensor)
             if tensor is not None else None) for key, (fields, tensor) in amends.items()])
        self.live_summary = {"records_measured": len(self.replay.metrics), "calls_replayed": self.replay.replayed,
                             "records_saved": sum(1 for _, t in amends.values() if t is not None),
                             "records_not_kept": live.not_kept, "records_not_held": live.not_held,
                             "beyond_not_replayed": self.replay.not_held_beyond[:20],
                             "beyond_not_replayed_count": len(self.replay.not_held_beyond)}
        if drill and self.drill_down and self.drilled is None:
            first = next((c for c in calls if c.own_fault and not c.below and c.forward is not None), None)
            if first is not None:
                from tensordiff.observers.module_replay import flat_versions

                if flat_versions(first.args, first.kwargs) != first.versions:
                    self.drilled = {"scope": first.scope, "ran": False, "why": "the call changed its inputs in place"}
                else:
                    frame = {"forward": first.forward, "args": first.args, "kwargs": first.kwargs,
                             "versions": _versions((first.args, first.kwargs))}
                    self.drilled = self._drill(first.name, first.scope, frame)
        self.replay.release()
        live.release()

    def _after_call(self, name: str, scope: str, beyond: bool) -> None:
        """Pop the call's frame; drill into the first call beyond whose descendants are all within."""
        frame = self._frames.pop() if self._frames else None
        if frame is None:
            return
        if self._frames:
            self._frames[-1]["below"] |= beyond or frame["below"]
        if (self.drill_down and beyond and not frame["below"] and self.drilled is None
                and frame["forward"] is not None):
            self.drilled = self._drill(name, scope, frame)

    def _rerun(self, name: str, scope: str, frame: dict, mode) -> str:
        """Run a finished call again on the same input objects under ``mode``, in the call's scope,
        module records off and call counters restored. Returns why it failed, or ''."""
        session = self.session
        saved_calls = session.calls.copy()
        session.drilling = True
        session.scopes.append((name, scope))
        try:
            with torch.no_grad(), mode:
                frame["forward"](*frame["args"], **frame["kwargs"])
            return ""
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:200]
        finally:
            session.scopes.pop()
            session.drilling = False
            session.calls = saved_calls

    def _locate_error(self, name: str, scope: str, frame: dict | None) -> None:
        from tensordiff.probes.dispatch_ops import LastOpTracker

        session = self.session
        session.error = {"module": name, "scope": scope, "op": None, "source": ""}
        if frame is not None and frame["forward"] is not None:  # it raised: re-running is harmless
            tracker = LastOpTracker()
            if self._rerun(name, scope, frame, tracker):  # it raised again: the last op is the one
                session.error.update(op=tracker.op, source=tracker.source)
        session.progress(f"error\t{scope}\t{session.error['op'] or ''}\t{session.error['source']}")

    def _drill(self, name: str, scope: str, frame: dict) -> dict:
        """Re-run one finished call on the target with the same input objects, under the op probe
        (op records with local errors, in this call's scope); module call counters are restored."""
        from tensordiff.probes.dispatch_ops import OpProbe

        session = self.session
        if _versions((frame["args"], frame["kwargs"])) != frame["versions"]:
            return {"scope": scope, "ran": False, "why": "the call changed its inputs in place"}
        before = session.records
        failed = self._rerun(name, scope, frame, OpProbe(session))
        return {"scope": scope, "ran": not failed, "records": session.records - before,
                "why": f"re-run failed: {failed}" if failed else ""}

    def _wrap(self, name: str, wanted: bool, forward):
        session = self.session
        if session.fast is not None and self._whole_objects:  # fast GPU stats: maybe the whole wrapper in native code
            probed = session.fast.wrap(forward, name, wanted, session.begin_forward, session.end_of_forward,
                                       self._emit_other, is_skipped_file)
            if probed is not None:
                return probed

        @functools.wraps(forward)
        def probed_forward(*args, **kwargs):
            state = self._enter(name, wanted, args, kwargs, forward)
            try:
                output = forward(*args, **kwargs)
            except BaseException:
                self._leave(name, wanted, state, None, failed=True)
                raise
            self._leave(name, wanted, state, output, failed=False)
            return output

        return probed_forward

    def _pre_hook(self, name: str, wanted: bool):
        def hook(module, args, kwargs):
            self._open_calls.append(self._enter(name, wanted, args, kwargs))

        return hook

    def _post_hook(self, name: str, wanted: bool):
        def hook(module, args, kwargs, output):
            if self._open_calls:  # always_call: also runs when forward raised (output is then None)
                self._leave(name, wanted, self._open_calls.pop(), output, failed=output is None)

        return hook

    def _backward_hook(self, name: str):
        session = self.session

        def hook(module, grad_input, grad_output):
            call = session.next_call(name, "backward")
            for slot, t in flatten_tensors(grad_output, "grad_output"):
                session.emit_module(name, "backward", call, slot, "", t)
            local = session.quietly(self.replay.on_backward, name, grad_input, grad_output) \
                if self.replay is not None else {}
            for slot, t in flatten_tensors(grad_input, "grad_input"):
                session.emit_module(name, "backward", call, slot, "", t, local.get(slot))
            return None

        return hook

    def emit_param_grads(self) -> None:
        """One record per parameter after the backward: ``OWNER/backward#0/param_grad.ATTR``, with the
        local error of the owner's backward where the reference's gradient was replayed."""
        session = self.session
        for pname, param in self.model.named_parameters():
            owner, _, attr = pname.rpartition(".")
            owner = owner or ROOT
            if param.grad is None or not session.wants_module(owner):
                continue
            extra = self.replay.param_grad_extra(pname, owner, attr, param.grad) if self.replay is not None else None
            session.emit_module(owner, "backward", 0, f"param_grad.{attr}", "", param.grad,
                                extra or {"param": pname})


def quiet_backward_hook_warnings():
    warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")
    warnings.filterwarnings("ignore", message=".*For backward hooks to be called.*")
