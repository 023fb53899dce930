"""Module-level probe: inputs and outputs of every module call, and gradients with backward.

    with ModuleProbe(model, session, backward=True):
        loss = loss_fn(model(**inputs)); loss.backward()

Hooks are installed by the context manager and always removed in ``__exit__``.
"""
from __future__ import annotations

import warnings

import torch

from tensordiff.probes.replay import local_error
from tensordiff.probes.session import ROOT, CaptureSession, flatten_tensors, user_source_line


def _record(module: str, direction: str, call: int, slot: str, source: str = "") -> dict:
    scope = f"{module}/{direction}#{call}"
    return {"key": f"{scope}/{slot}", "kind": "module", "direction": direction, "module": module,
            "call": call, "scope": scope, "op": "", "op_index": -1, "slot": slot, "source": source}


class ModuleProbe:
    def __init__(self, model: torch.nn.Module, session: CaptureSession, backward: bool = False):
        self.model = model
        self.session = session
        self.backward = backward
        self._handles = []
        self._replay_inputs: list = []  # reference-side copies of the inputs of each open call

    def __enter__(self):
        for raw_name, mod in self.model.named_modules():
            name = raw_name or ROOT
            self._handles.append(mod.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._post_hook(name), with_kwargs=True,
                                                           always_call=True))
            # The root returns a ModelOutput, on which full backward hooks never fire (torch warns).
            if self.backward and raw_name and self.session.wants_module(name):
                self._handles.append(mod.register_full_backward_hook(self._backward_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _pre_hook(self, name: str):
        session = self.session

        def hook(module, args, kwargs):
            call = session.next_call(name, "forward")
            session.scopes.append((name, f"{name}/forward#{call}"))
            session.progress(f"{name}/forward#{call}")
            if session.replayer is not None and session.wants_module(name):
                self._replay_inputs.append(session.quietly(session.replayer.to_reference, (args, kwargs)))
            if session.wants_module(name):
                src = user_source_line()
                for slot, t in flatten_tensors(args, "input"):
                    session.emit(_record(name, "forward", call, slot, src), t)
                for slot, t in flatten_tensors(kwargs, "input"):
                    session.emit(_record(name, "forward", call, slot, src), t)
            return None

        return hook

    def _post_hook(self, name: str):
        session = self.session

        def hook(module, args, kwargs, output):
            _, scope = session.scopes.pop() if session.scopes else (None, f"{name}/forward#0")
            call = int(scope.rsplit("#", 1)[1])
            session.progress(f"{session.current_scope()[1]} (after {scope})")
            if not session.scopes:
                session.flush_stats()  # end of a root forward: no stats wait past it
            if session.wants_module(name):
                outs = (output,) if isinstance(output, torch.Tensor) else output
                replayed = self._replay(name, session) if session.replayer is not None else {}
                for slot, t in flatten_tensors(outs, "output"):
                    rec = _record(name, "forward", call, slot)
                    if slot in replayed:
                        local = session.quietly(local_error, t, replayed[slot])
                        if local is not None:
                            rec["local_rel_l2"], rec["local_max_abs"] = local
                    session.emit(rec, t)
            return None

        return hook

    def _replay(self, name: str, session: CaptureSession) -> dict:
        """slot -> the reference module's output on the target's inputs of this call."""
        ref_inputs = self._replay_inputs.pop() if self._replay_inputs else None
        if ref_inputs is None:
            return {}
        ref_out = session.quietly(session.replayer.run_module, name, ref_inputs)
        if ref_out is None:
            return {}
        ref_out = (ref_out,) if isinstance(ref_out, torch.Tensor) else ref_out
        return dict(flatten_tensors(ref_out, "output"))

    def _backward_hook(self, name: str):
        session = self.session

        def hook(module, grad_input, grad_output):
            call = session.next_call(name, "backward")
            for slot, t in flatten_tensors(grad_output, "grad_output"):
                session.emit(_record(name, "backward", call, slot), t)
            for slot, t in flatten_tensors(grad_input, "grad_input"):
                session.emit(_record(name, "backward", call, slot), t)
            return None

        return hook


def quiet_backward_hook_warnings():
    warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")
    warnings.filterwarnings("ignore", message=".*For backward hooks to be called.*")
