"""Op-level probe: every aten op under a TorchDispatchMode, inside the innermost module scope.

Each op gets records for its tensor inputs (``in.N``, taken *before* the op runs, so an in-place op's
destination shows its old value) and outputs (``out.N``), with strides, storage offset and contiguity:
layout bugs (a copy that ignores strides) live there. View ops keep their layout and stats but not
their data: about 40% of ops are views, and their data is captured anyway where a real op reads them.

    with ModuleProbe(model, session), OpProbe(session):
        model(**inputs)
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tensordiff.probes.replay import (LOW_PRECISION, dtypes_of, layout_experiment, local_error, output_tensors,
                                      replayable)
from tensordiff.probes.session import CaptureSession
from tensordiff.source_lines import user_source_line

# Ops whose only job is metadata or that tensordiff itself never needs to compare.
_IGNORED = frozenset({"aten::detach"})


def op_short_name(func) -> str:
    name = func.name().split("::", 1)[-1]
    return name[:-8] if name.endswith(".default") else name


class OpProbe(TorchDispatchMode):
    def __init__(self, session: CaptureSession):
        super().__init__()
        self.session = session

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        session = self.session
        if session.busy or func.name() in _IGNORED:
            return func(*args, **kwargs)
        module, scope = session.current_scope()
        index = session.op_counts[scope]
        session.op_counts[scope] = index + 1
        short = op_short_name(func)
        base = {"kind": "op", "direction": session.direction, "module": module, "scope": scope,
                "call": int(scope.rsplit("#", 1)[1]), "op": func.name(), "op_index": index,
                "source": user_source_line()}
        if session.drilling:
            base["drill"] = True
        prefix = f"{scope}/op{index:04d}.{short}"
        session.progress(f"{prefix}\t{base['source']}")
        is_view = bool(getattr(func, "is_view", False))
        flat_in, _ = tree_flatten((args, kwargs))
        slot = 0
        for item in flat_in:
            if isinstance(item, torch.Tensor):
                session.emit({**base, "key": f"{prefix}/in.{slot}", "slot": f"in.{slot}"}, item,
                             save_data=False if is_view else None)
                slot += 1
        replayer = session.replayer if session.direction == "forward" and replayable(func) else None
        ref_in = session.quietly(replayer.to_reference, (args, kwargs)) if replayer else None
        dtypes = dtypes_of((args, kwargs)) if replayer else None
        out = func(*args, **kwargs)
        ref_out = output_tensors(session.quietly(replayer.run_op, func, ref_in)) if replayer else []
        for i, item in enumerate(output_tensors(out)):
            rec = {**base, "key": f"{prefix}/out.{i}", "slot": f"out.{i}"}
            if i < len(ref_out):
                local = session.quietly(local_error, item, ref_out[i])
                if local is not None:
                    rec["local_rel_l2"], rec["local_max_abs"] = local
                    budget = replayer.budget(rec["key"], item)
                    if i == 0 and local[0] > budget:
                        if item.dtype in LOW_PRECISION:
                            floor = session.quietly(replayer.op_floor, func, ref_in, dtypes, ref_out[0])
                            if floor is not None:
                                rec["local_floor_rel_l2"] = floor
                        verdict = session.quietly(layout_experiment, func, args, kwargs, ref_out[0], budget)
                        if verdict:
                            rec["layout_experiment"] = verdict
            session.emit(rec, item, save_data=False if is_view else None)
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
