"""Module-level probe: inputs and outputs of every module call, and gradients with backward.

    with ModuleProbe(model, session, backward=True):
        loss = loss_fn(model(**inputs)); loss.backward()

The wrappers (and, with backward, full backward hooks) are installed by the context manager and
always removed in ``__exit__``.
"""
from __future__ import annotations

import functools
import warnings

import torch

from tensordiff.errors import TensordiffError
from tensordiff.metrics import local_beyond
from tensordiff.probes.local_error import local_error, mean_abs_ratio
from tensordiff.probes.replay import LOW_PRECISION, dtypes_of
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


def _accumulate(sums: dict, module: str, grads: dict) -> None:
    """Add one call's parameter gradients (attr -> tensor) into per-parameter sums."""
    for attr, g in grads.items():
        key = f"{module}.{attr}"
        sums[key] = g if key not in sums else sums[key] + g


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
        # Backward replay: each call's reference inputs, kept for its backward (a stack per module:
        # backward hooks fire in the reverse order of the forward calls), and the reference's
        # parameter gradients summed over the calls of each module.
        self._forward_inputs: dict = {}
        self._ref_param_grads: dict = {}
        self._floor_param_grads: dict = {}  # the same from the noise-floor copy (low-precision targets)
        # Own-code replay (probes/own_code.py): per open call, its children's calls so far
        self._child_calls: list = []
        self.drilled: dict | None = None
        self._handles = []
        self._wrapped: list = []        # (module, its own instance-level forward or None)
        self._open_calls: list = []     # hook path: the state of each open call
        self._replay_inputs: list = []  # reference-side copies of the inputs of each open call

    def _emit_other(self, name, call, slot, source, tensor):
        self.session.emit_module(name, "forward", call, slot, source, tensor)

    def __enter__(self):
        from torch.nn.modules import module as nn_module

        self._probed_cls = None
        if self.session._rec is not None:
            from tensordiff.probes import fast_records

            self._probed_cls = getattr(fast_records._load(), "Probed", None)

        global_hooks = bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)
        self._kernels = set()
        for raw_name, mod in self.model.named_modules():
            name = raw_name or ROOT
            wanted = self.session.wants_module(name)
            if getattr(mod, "tensordiff_kernel", None):  # a module an external kernel computes
                self._kernels.add(name)
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
        if session.replayer is not None:
            self._child_calls.append([])
        if self._keep_frames:
            # version counters only where a drill-down may re-run the call (they cost a tree walk)
            self._frames.append({"forward": forward, "args": args, "kwargs": kwargs, "below": False,
                                 "versions": _versions((args, kwargs)) if self.drill_down else None})
        # with the C++ wrappers some calls never touch session.scopes: the recorder keeps the depth
        is_root = session._rec.enter() if session._rec is not None else not session.scopes
        scope = f"{name}/forward#{call}"
        session.scopes.append((name, scope))
        if is_root:
            session.begin_forward()
        if session._progress_fd is not None:
            session.progress(scope)
        if wanted:
            if session.replayer is not None:
                self._replay_inputs.append((session.quietly(session.replayer.to_reference, (args, kwargs)),
                                            dtypes_of((args, kwargs))))
            src = user_source_line(start=3)  # past _enter and the wrapper (or hook): torch's __call__
            if session._rec is not None:  # fast mode, C++ recorder
                session.record_tensors(args, name, "forward", call, "input", src, False)
                if kwargs:
                    session.record_tensors(kwargs, name, "forward", call, "input", src, False)
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
        if session._rec is not None:
            session._rec.leave()
        if session._progress_fd is not None:
            session.progress(f"{session.current_scope()[1]} (after {scope})")
        own_fault, ref_inputs = False, None
        children = self._child_calls.pop() if session.replayer is not None and self._child_calls else None
        if failed and wanted and session.replayer is not None and self._replay_inputs:
            self._replay_inputs.pop()
        if failed and session.error is None:  # the innermost call the exception leaves
            self._locate_error(name, scope, self._frames[-1] if self._frames else None)
        if wanted and not failed:
            if session._rec is not None:  # fast mode, C++ recorder
                session.record_tensors(output, name, "forward", call, "output", "", True)
            elif isinstance(output, torch.Tensor) and session.replayer is None:  # the common case
                session.emit_module(name, "forward", call, "output.0", "", output)
            else:
                replayed, ref_inputs, feed = self._replay(name, session, children) \
                    if session.replayer is not None else ({}, None, None)
                judged = False
                for slot, t in _named_tensors(_outputs(output), "output"):
                    extra = None
                    if slot in replayed:
                        extra = session.quietly(self._local_error, name, f"{scope}/{slot}", slot, t,
                                                replayed[slot], ref_inputs, children, feed)
                        if not judged and extra and t.is_floating_point():  # the first float output
                            judged = True
                            own_fault = local_beyond(extra["local_rel_l2"], extra.get("local_floor_rel_l2"),
                                                     session.replayer.budget(f"{scope}/{slot}", t))
                    session.emit_module(name, "forward", call, slot, "", t, extra)
        if children is not None and not failed and self._child_calls:  # the parent's replay answers with it
            self._child_calls[-1].append(session.quietly(self._child_call, name, output, ref_inputs))
        if self._keep_frames:
            self._after_call(name, scope, own_fault)
        if is_root:
            session.end_of_forward()  # no stats wait past a root forward; what came before an error lands

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
        if session._rec is not None and self._probed_cls is not None:
            # fast GPU stats: the whole wrapper in C++ (fast_records.Probed), one call per module call
            probed = self._probed_cls(forward, name, wanted, session._rec, session.begin_forward,
                                      session.end_of_forward, self._emit_other, is_skipped_file)
            for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
                if hasattr(forward, attr):
                    setattr(probed, attr, getattr(forward, attr))
            probed.__wrapped__ = forward  # inspect.signature(module.forward) still sees the real one
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

    def _child_call(self, name: str, output, ref_inputs):
        from tensordiff.probes.own_code import ChildCall

        inputs = ref_inputs[0] if ref_inputs is not None else None
        return ChildCall(name, inputs, self.session.replayer.to_reference(output), dtypes_of(output))

    def _replay(self, name: str, session: CaptureSession, children) -> tuple[dict, tuple | None, float | None]:
        """(slot -> the reference's output of this call on the target's inputs, those inputs, the feed
        error of its own code or None)."""
        ref_inputs = self._replay_inputs.pop() if self._replay_inputs else None
        if ref_inputs is None:
            return {}, None, None
        if self.backward:
            self._forward_inputs.setdefault(name, []).append(ref_inputs)
        ref_out, feed = session.quietly(session.replayer.run_call, name, ref_inputs[0], children)
        if ref_out is None:
            return {}, None, None
        ref_out = (ref_out,) if isinstance(ref_out, torch.Tensor) else ref_out
        return dict(flatten_tensors(ref_out, "output")), ref_inputs, feed

    def _local_error(self, name: str, key: str, slot: str, tgt: torch.Tensor, ref: torch.Tensor,
                     ref_inputs, children=None, feed: float | None = None) -> dict | None:
        """local_rel_l2 (the larger of the output's error and the feed error of the call's own code) /
        local_max_abs; for a low-precision output over budget also the noise floor (the reference
        module in the target's dtype on the same inputs, children answering alike)."""
        local = local_error(tgt, ref)
        if local is None:
            return None
        extra = {"local_rel_l2": max(local[0], feed or 0.0), "local_max_abs": local[1]}
        if name in self._kernels:  # the figure kernel authors judge by, beside ours
            extra["local_mean_abs_ratio"] = mean_abs_ratio(tgt, ref)
        if feed:
            extra["local_feed_rel_l2"] = feed
        replayer = self.session.replayer
        if tgt.dtype in LOW_PRECISION and extra["local_rel_l2"] > replayer.budget(key, tgt) and ref_inputs is not None:
            floor = replayer.module_floor(name, ref_inputs[0], ref_inputs[1], tgt.dtype, ref, slot, children)
            if floor is not None:
                extra["local_floor_rel_l2"] = floor
        return extra

    def _backward_hook(self, name: str):
        session = self.session

        def hook(module, grad_input, grad_output):
            call = session.next_call(name, "backward")
            for slot, t in flatten_tensors(grad_output, "grad_output"):
                session.emit_module(name, "backward", call, slot, "", t)
            local = session.quietly(self._backward_local, name, grad_input, grad_output) \
                if session.replayer is not None else {}
            for slot, t in flatten_tensors(grad_input, "grad_input"):
                session.emit_module(name, "backward", call, slot, "", t, local.get(slot))
            return None

        return hook

    def _backward_local(self, name: str, grad_input, grad_output) -> dict:
        """slot -> local error of this backward call: the target's grad_input against the reference
        module's vector-Jacobian product at the target's inputs and grad_output."""
        saved = self._forward_inputs.get(name)
        if not saved:
            return {}
        replayer = self.session.replayer
        ref_inputs, dtypes = saved.pop()
        vjp = replayer.module_vjp(name, ref_inputs, grad_output)
        if vjp is None:
            return {}
        low = next((g.dtype for g in grad_output if isinstance(g, torch.Tensor) and g.dtype in LOW_PRECISION), None)
        floor = replayer.module_vjp(name, ref_inputs, grad_output, (dtypes, low)) if low is not None else None
        _accumulate(self._ref_param_grads, name, vjp[1])
        if floor is not None:
            _accumulate(self._floor_param_grads, name, floor[1])
        out = {}
        for i, (tgt, ref) in enumerate(zip(grad_input, vjp[0])):
            if isinstance(tgt, torch.Tensor) and ref is not None:
                local = local_error(tgt, ref)
                if local is not None:
                    out[f"grad_input.{i}"] = {"local_rel_l2": local[0], "local_max_abs": local[1]}
                    low_grad = floor[0][i] if floor is not None and i < len(floor[0]) else None
                    if low_grad is not None:
                        out[f"grad_input.{i}"]["local_floor_rel_l2"] = (local_error(low_grad, ref) or (None,))[0]
        return out

    def emit_param_grads(self) -> None:
        """One record per parameter after the backward: ``OWNER/backward#0/param_grad.ATTR``, with the
        local error of the owner's backward where the reference's gradient was replayed."""
        session = self.session
        for pname, param in self.model.named_parameters():
            owner, _, attr = pname.rpartition(".")
            owner = owner or ROOT
            if param.grad is None or not session.wants_module(owner):
                continue
            extra = None
            ref = self._ref_param_grads.get(pname if owner != ROOT else attr)
            if ref is not None:
                local = session.quietly(local_error, param.grad, ref)
                if local is not None:
                    extra = {"local_rel_l2": local[0], "local_max_abs": local[1], "param": pname}
                    low = self._floor_param_grads.get(pname if owner != ROOT else attr)
                    if low is not None:
                        extra["local_floor_rel_l2"] = (session.quietly(local_error, low, ref) or (None,))[0]
            session.emit_module(owner, "backward", 0, f"param_grad.{attr}", "", param.grad,
                                extra or {"param": pname})


def quiet_backward_hook_warnings():
    warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")
    warnings.filterwarnings("ignore", message=".*For backward hooks to be called.*")
