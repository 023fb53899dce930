"""Replay as an observer of module calls: each target call is run again on the fp32 reference with the
target's own inputs, which gives every output its local error (introduced here vs carried from
before), the noise floor of a low-precision output over budget, and with backward the local error of
each call's backward (the reference module's vector-Jacobian product at the target's inputs and
grad_output) and of each parameter's gradient.

The module probe delivers the events and writes the records; this observer only answers what each
record gets beside its tensor (``extra``), so a capture without a replayer pays nothing for it:

    replay = ModuleReplay(session, kernels)
    replay.on_enter(name, wanted, args, kwargs)             # before the call runs
    extras, own_fault, ref_inputs = replay.on_leave(name, scope, wanted, output, failed)
    local = replay.on_backward(name, grad_input, grad_output)
    extra = replay.param_grad_extra(pname, owner, attr, grad)
"""
from __future__ import annotations

import torch

from tensordiff.metrics import local_beyond
from tensordiff.probes.local_error import local_error, mean_abs_ratio
from tensordiff.probes.replay import LOW_PRECISION, dtypes_of
from tensordiff.schema import ROOT
from tensordiff.tensors import flatten_tensors, version_of as _version_of


def _accumulate(sums: dict, module: str, grads: dict) -> None:
    """Add one call's parameter gradients (attr -> tensor) into per-parameter sums."""
    for attr, g in grads.items():
        key = f"{module}.{attr}"
        sums[key] = g if key not in sums else sums[key] + g


def _outputs(output):
    return (output,) if isinstance(output, torch.Tensor) else output


class ModuleReplay:
    """Local errors of module calls by replay on the session's replayer (``probes.replay.Replayer``).
    ``kernels``: names of modules an external kernel computes (their records also get kernel authors'
    figure, mean|diff| / mean|ref|)."""

    def __init__(self, session, kernels: set, backward: bool = False):
        self.session = session
        self.replayer = session.replayer
        self.kernels = kernels
        self.backward = backward
        self._inputs: list = []          # per open wanted call: (reference-side inputs, their dtypes)
        # Own-code replay (probes/own_code.py): per open call, its children's calls so far; a parent's
        # replay has its children answer with what the target's children returned
        self._children: list = []
        # Backward: each call's reference inputs, kept for its backward (a stack per module: backward
        # hooks fire in the reverse order of the forward calls), and the reference's parameter
        # gradients summed over the calls of each module
        self._forward_inputs: dict = {}
        self._ref_param_grads: dict = {}
        self._floor_param_grads: dict = {}  # the same from the noise-floor copy (low-precision targets)

    # -- forward ---------------------------------------------------------------------------------
    def on_enter(self, name: str, wanted: bool, args, kwargs) -> None:
        self._children.append([])
        if wanted:
            self._inputs.append((self.session.quietly(self.replayer.to_reference, (args, kwargs)),
                                 dtypes_of((args, kwargs))))

    def on_leave(self, name: str, scope: str, wanted: bool, output, failed: bool,
                 named_outputs: list | None = None) -> tuple[dict, bool, tuple | None]:
        """(slot -> extra fields of that output's record, whether the call's own error is beyond
        tolerance, the reference-side inputs). ``named_outputs``: the (slot, tensor) pairs the probe
        records. The call's answer is handed to its parent's replay."""
        session = self.session
        children = self._children.pop() if self._children else None
        extras, own_fault, ref_inputs = {}, False, None
        if failed:
            if wanted and self._inputs:
                self._inputs.pop()
        elif wanted:
            replayed, ref_inputs, feed = self._replay(name, children)
            judged = False
            pairs = named_outputs if named_outputs is not None else flatten_tensors(_outputs(output), "output")
            for slot, t in pairs:
                if slot not in replayed:
                    continue
                extra = session.quietly(self._local_error, name, f"{scope}/{slot}", slot, t, replayed[slot],
                                        ref_inputs, children, feed)
                if extra:
                    extras[slot] = extra
                    if not judged and t.is_floating_point():  # the first float output
                        judged = True
                        own_fault = local_beyond(extra["local_rel_l2"], extra.get("local_floor_rel_l2"),
                                                 self.replayer.budget(f"{scope}/{slot}", t))
        if children is not None and not failed and self._children:  # the parent's replay answers with it
            self._children[-1].append(session.quietly(self._child_call, name, output, ref_inputs))
        return extras, own_fault, ref_inputs

    def _child_call(self, name: str, output, ref_inputs):
        from tensordiff.probes.own_code import ChildCall

        inputs = ref_inputs[0] if ref_inputs is not None else None
        return ChildCall(name, inputs, self.replayer.to_reference(output), dtypes_of(output))

    def _replay(self, name: str, children) -> tuple[dict, tuple | None, float | None]:
        """(slot -> the reference's output of this call on the target's inputs, those inputs, the feed
        error of its own code or None)."""
        ref_inputs = self._inputs.pop() if self._inputs else None
        if ref_inputs is None:
            return {}, None, None
        if self.backward:
            self._forward_inputs.setdefault(name, []).append(ref_inputs)
        ref_out, feed = self.session.quietly(self.replayer.run_call, name, ref_inputs[0], children)
        if ref_out is None:
            return {}, None, None
        return dict(flatten_tensors(_outputs(ref_out), "output")), ref_inputs, feed

    def _local_error(self, name: str, key: str, slot: str, tgt: torch.Tensor, ref: torch.Tensor,
                     ref_inputs, children=None, feed: float | None = None) -> dict | None:
        """local_rel_l2 (the larger of the output's error and the feed error of the call's own code) /
        local_max_abs; for a low-precision output over budget also the noise floor (the reference
        module in the target's dtype on the same inputs, children answering alike)."""
        local = local_error(tgt, ref)
        if local is None:
            return None
        extra = {"local_rel_l2": max(local[0], feed or 0.0), "local_max_abs": local[1]}
        if name in self.kernels:  # the figure kernel authors judge by, beside ours
            extra["local_mean_abs_ratio"] = mean_abs_ratio(tgt, ref)
        if feed:
            extra["local_feed_rel_l2"] = feed
        if tgt.dtype in LOW_PRECISION and extra["local_rel_l2"] > self.replayer.budget(key, tgt) and ref_inputs is not None:
            floor = self.replayer.module_floor(name, ref_inputs[0], ref_inputs[1], tgt.dtype, ref, slot, children)
            if floor is not None:
                extra["local_floor_rel_l2"] = floor
        return extra

    # -- backward --------------------------------------------------------------------------------
    def on_backward(self, name: str, grad_input, grad_output) -> dict:
        """slot -> local error of this backward call: the target's grad_input against the reference
        module's vector-Jacobian product at the target's inputs and grad_output."""
        saved = self._forward_inputs.get(name)
        if not saved:
            return {}
        ref_inputs, dtypes = saved.pop()
        vjp = self.replayer.module_vjp(name, ref_inputs, grad_output)
        if vjp is None:
            return {}
        low = next((g.dtype for g in grad_output if isinstance(g, torch.Tensor) and g.dtype in LOW_PRECISION), None)
        floor = self.replayer.module_vjp(name, ref_inputs, grad_output, (dtypes, low)) if low is not None else None
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

    def param_grad_extra(self, pname: str, owner: str, attr: str, grad: torch.Tensor) -> dict | None:
        """The local error of one parameter's gradient, where the reference's was replayed."""
        key = pname if owner != ROOT else attr
        ref = self._ref_param_grads.get(key)
        if ref is None:
            return None
        local = self.session.quietly(local_error, grad, ref)
        if local is None:
            return None
        extra = {"local_rel_l2": local[0], "local_max_abs": local[1], "param": pname}
        low = self._floor_param_grads.get(key)
        if low is not None:
            extra["local_floor_rel_l2"] = (self.session.quietly(local_error, low, ref) or (None,))[0]
        return extra


class LoggedCall:
    """One finished module call of a deferred replay: what its replay needs, held until settle()."""
    __slots__ = ("name", "scope", "wanted", "args", "kwargs", "versions", "output", "named", "out_versions",
                 "children", "forward", "beyond", "own_fault", "below", "held")

    def __init__(self, name, scope, wanted, args, kwargs, versions, output, named, children, forward):
        self.name, self.scope, self.wanted = name, scope, wanted
        self.args, self.kwargs, self.versions = args, kwargs, versions
        self.output, self.named, self.children, self.forward = output, named, children, forward
        # what the call returned may be changed in place later (a parent scaling it): judged only
        # while unchanged
        self.out_versions = [_version_of(t) for _, t in named] if named else []
        self.beyond = self.own_fault = self.below = False
        self.held = True

    def output_unchanged(self, i: int) -> bool:
        v = self.out_versions[i] if i < len(self.out_versions) else None
        return v is not None and _version_of(self.named[i][1]) == v


def arg_tensors(args, kwargs) -> list:
    """The tensors among a call's arguments, top level and one level down (a list of tensors)."""
    out = []
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(x for x in v if isinstance(x, torch.Tensor))
    return out


def flat_versions(args, kwargs) -> list:
    """Version counters of a call's argument tensors (``arg_tensors``): a replay after the forward
    is valid only while they have not moved."""
    return [_version_of(t) for t in arg_tensors(args, kwargs)]


class DeferredReplay(ModuleReplay):
    """Replay decided after the forward: every call is logged (its inputs and outputs held, nothing
    copied or run), each record measured against the reference's as it is made
    (``observers/live_compare``); ``settle()`` reads the measurements once and replays only the calls
    whose first float output is beyond tolerance, children answering from the target's own outputs as
    in the eager replay. A clean forward replays nothing. Forward only (a backward replay needs the
    forward's reference inputs, which the eager ModuleReplay keeps)."""

    def __init__(self, session, kernels: set, live):
        super().__init__(session, kernels, backward=False)
        self.live = live
        self.log: list[LoggedCall] = []
        self._open: list = []
        self.metrics: dict = {}
        self.replayed = 0
        self.not_held_beyond: list = []  # scopes of calls beyond tolerance that could not be replayed

    def on_enter(self, name: str, wanted: bool, args, kwargs, forward=None) -> None:
        self._children.append([])
        self._open.append((args, kwargs, flat_versions(args, kwargs) if wanted else None, forward))

    def on_leave(self, name: str, scope: str, wanted: bool, output, failed: bool,
                 named_outputs: list | None = None) -> tuple[dict, bool, tuple | None]:
        children = self._children.pop() if self._children else []
        args, kwargs, versions, forward = self._open.pop() if self._open else ((), {}, None, None)
        if failed:
            return {}, False, None
        held = self.live.holding and all(self.live.hold(t) for t in
                                            [t for _, t in named_outputs or ()] + arg_tensors(args, kwargs))
        if not held:  # past the memory share: measured, but nothing held for a replay
            call = LoggedCall(name, scope, wanted, (), {}, None, None, None, children, None)
            call.held = False
        else:
            call = LoggedCall(name, scope, wanted, args, kwargs, versions, output, named_outputs, children, forward)
        if self._children:
            self._children[-1].append(call)
        self.log.append(call)
        return {}, False, None

    def settle(self, amend) -> list[LoggedCall]:
        """Replay the calls beyond tolerance; ``amend(key, fields, tensor or None)`` for every record
        measured (its live metrics, its local error, its data where the call is replayed). Returns
        the logged calls in the order they finished, each with ``beyond`` / ``own_fault``."""
        session, live = self.session, self.live
        metrics = self.metrics = live.results()
        budget = self.replayer.budget
        replayed = 0
        self.not_held_beyond = []
        for call in self.log:
            if not call.held:
                if call.wanted and any(live.beyond(k, metrics.get(k), self.replayer._budget)
                                       for k in live.keys_of(call.scope)):
                    self.not_held_beyond.append(call.scope)
                continue
            if not call.wanted or call.named is None:
                continue
            first = next(((slot, t) for slot, t in call.named if t.is_floating_point()), None)
            if first is None:
                continue
            # beyond when any float output is (a router's top-k weights may flip while its logits agree)
            for slot, t in call.named:
                if t.is_floating_point():
                    key = f"{call.scope}/{slot}"
                    m = metrics.get(key)
                    if m is None or m["nonfinite_mismatch"] > 0 or m["rel_l2"] > budget(key, t):
                        call.beyond = True
                        break
            if not call.beyond:
                continue
            extras = session.quietly(self._replay_logged, call)
            replayed += 1
            for slot, t in call.named:
                key = f"{call.scope}/{slot}"
                extra = extras.get(slot)
                if extra:
                    amend(key, extra, None)
                    if slot == first[0] and t.is_floating_point():
                        call.own_fault = local_beyond(extra["local_rel_l2"], extra.get("local_floor_rel_l2"),
                                                      budget(key, t))
        self.replayed = replayed
        self._mark_below()
        return self.log

    def _mark_below(self) -> None:
        def below(call) -> bool:
            found = False
            for child in call.children:
                found |= below(child) or child.own_fault
            call.below = found
            return found

        for call in self.log:
            if call.children and not call.below:
                below(call)

    def _replay_logged(self, call: LoggedCall) -> dict:
        """slot -> local-error extra of one logged call, replayed now on its held inputs."""
        if call.versions != flat_versions(call.args, call.kwargs):
            self.replayer.failures.setdefault(call.name, "its inputs changed in place before the replay")
            return {}
        to_ref = self.replayer.to_reference
        ref_inputs = (to_ref((call.args, call.kwargs)), dtypes_of((call.args, call.kwargs)))
        # a child whose output changed in place since cannot answer with what it returned: the call
        # is replayed in full then (its descendants' rounding included)
        changed = any(not c.output_unchanged(i) for c in call.children for i in range(len(c.named or ())))
        children = None if changed else [self._child_answer(c) for c in call.children]
        ref_out, feed = self.replayer.run_call(call.name, ref_inputs[0], children)
        if ref_out is None:
            return {}
        replayed = dict(flatten_tensors(_outputs(ref_out), "output"))
        extras = {}
        for i, (slot, t) in enumerate(call.named):
            if not call.output_unchanged(i):
                self.replayer.failures.setdefault(f"{call.name} ({slot})",
                                                  "its output changed in place after the call: no local error")
                continue
            if slot in replayed:
                extra = self._local_error(call.name, f"{call.scope}/{slot}", slot, t, replayed[slot], ref_inputs,
                                          children, feed)
                if extra:
                    extras[slot] = extra
        return extras

    def _child_answer(self, child: LoggedCall):
        from tensordiff.probes.own_code import ChildCall

        to_ref = self.replayer.to_reference
        inputs = to_ref((child.args, child.kwargs)) if child.versions is not None else None
        return ChildCall(child.name, inputs, to_ref(child.output), dtypes_of(child.output))

    def release(self) -> None:
        self.log.clear()
