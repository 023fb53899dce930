"""nan-hunt: where non-finite values are born, down to the op, the element and the expert.

Coarse to fine, so a clean run costs little:
1. *Screen* (``NanScreen``): the model runs once with one ``aminmax`` per new input / output tensor
   of each outer module call (the root, decoder layers, MoE blocks: modules with a composite child)
   on its device and one host sync at the end (with ``backward``, every backward op too).
2. *Trace* (``NanTracer``), only when the screen saw NaN / Inf: the model runs again on the same
   inputs, and inside the module call where the values first appeared every op is counted exactly.
   The first op whose output is non-finite while its inputs are finite is the birth: op, module,
   source line, counts, first element, boundary signature, each input's range; then how far the
   values spread. A birth the second run does not reproduce is said to be so (uninitialised memory,
   races): that is a finding too.
3. *Experts*: inside a mixture-of-experts layer each op is attributed to its expert (both weight
   layouts); where the experts are a black box, the layer is re-run with routing restricted to
   halves of the experts until the guilty ones are found (``bisect_experts``).

    result = hunt(model, inputs, backward=True)
    result.clean, result.findings[0]["op"], result.findings[0]["experts"]
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from tensordiff.observers.events import observe
from tensordiff.observers.nan_watch import NanScreen, NanTracer, tensor_range
from tensordiff.tensors import flatten_tensors

SCHEMA = "tensordiff-nan-hunt/1"
MAX_BISECT_RUNS = 256


@dataclass
class NanHuntResult:
    clean: bool
    findings: list = field(default_factory=list)   # one per direction where values were born
    screened: dict = field(default_factory=dict)   # how much the screen looked at
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    source: dict = field(default_factory=dict)     # model / target / trace file
    guard: list = field(default_factory=list)      # --guard: buffer findings (tensordiff.guard.Finding dicts)
    guard_lines: list = field(default_factory=list)  # the same, one line per group of buffers

    def to_dict(self) -> dict:
        out = {"schema": SCHEMA, "clean": self.clean, "source": self.source, "screened": self.screened,
               "seconds": round(self.seconds, 4), "notes": self.notes, "findings": self.findings}
        if self.guard or self.guard_lines:
            out["guard"] = {"summary": self.guard_lines, "findings": self.guard}
        return out


def _run(model, inputs, observers, backward: bool, loss_fn):
    with observe(model, observers) as events:
        if not backward:
            with torch.no_grad():
                return model(*inputs.args, **inputs.kwargs)
        output = model(*inputs.args, **inputs.kwargs)
        loss = loss_fn(output, inputs)
        with events.backward():
            loss.backward()
    return output


def hunt(model: torch.nn.Module, inputs, backward: bool = False, loss_fn=None, bisect: str = "auto",
         source: dict | None = None, neg_inf_is_bad: bool = False) -> NanHuntResult:
    """Screen one run; trace where values were born; attribute experts. ``bisect``: auto (when the
    experts are a black box), always, never. -Inf alone (no NaN, no +Inf in the tensor) is how masks
    are written and is not a finding unless ``neg_inf_is_bad``."""
    from tensordiff.tracing import _as_inputs, default_loss

    loss_fn = loss_fn or default_loss
    pristine = _as_inputs(inputs)  # never run on: the fine run starts from the same values
    start = time.perf_counter()
    screen = NanScreen(backward=backward, neg_inf_is_bad=neg_inf_is_bad)
    output = _run(model, _fresh(pristine), [screen], backward, loss_fn)
    result = NanHuntResult(clean=True, source=source or {})
    result.screened = {"events": len(screen.events), "tensors": screen.tensors,
                       "backward_ops": sum(e.kind == "op" for e in screen.events)}
    first = screen.first_bad("forward")
    if first is not None:
        result.findings.append(_forward_finding(model, pristine, screen, first, bisect, loss_fn, neg_inf_is_bad))
    elif backward and screen.first_bad("backward") is not None:
        result.findings.append(_backward_finding(model, pristine, screen, loss_fn, neg_inf_is_bad))
    if backward:
        _param_grads(model, result)
        model.zero_grad(set_to_none=True)
    result.clean = not result.findings
    result.seconds = time.perf_counter() - start
    del output
    return result


def _fresh(inputs):
    """A copy of the inputs made by each tensor's own clone op: deepcopy goes through storage copies,
    which a device under test may not implement (echo_npu's crashes)."""
    from tensordiff.models import Inputs
    from tensordiff.tensors import clone_tensors

    return Inputs(*clone_tensors((inputs.args, inputs.kwargs)))


def _output_summary(screen: NanScreen) -> dict:
    roots = [e for e in screen.events if e.kind == "leave" and e.call.parent is None]
    return {"bad_slots": roots[-1].bad} if roots else {}


def _forward_finding(model, inputs, screen, first, bisect: str, loss_fn, neg_inf_is_bad: bool) -> dict:
    if first.kind == "enter" and first.call.parent is None:  # the model's own inputs
        return {"direction": "forward", "origin": "input", "scope": first.scope, "module": first.call.name,
                "slots": first.bad, "spread": {}, "note": "the model's inputs already hold NaN / Inf"}
    # born in the call's own code (outputs bad, inputs clean), or in the parent's code before it
    # handed this call a bad input
    call = first.call if first.kind == "leave" else first.call.parent
    tracer = NanTracer(model, call.scope, "forward", keep_inputs_of=set(call.chain()), neg_inf_is_bad=neg_inf_is_bad,
                       keep_composites=True)
    _run(model, _fresh(inputs), [tracer], False, loss_fn)
    later = screen.bad_after(first)
    spread = {"ops_in_scope": tracer.spread_ops, "module_calls": sum(e.kind == "leave" for e in later),
              "last_module": later[-1].call.name if later else call.name, "model_output": _output_summary(screen)}
    screen_info = {"event": first.kind, "scope": first.scope, "slots": first.bad}
    if tracer.birth is None:
        return {"direction": "forward", "origin": "not_reproduced", "scope": call.scope, "module": call.name,
                "screen": screen_info, "spread": spread, "ops_checked": tracer.ops_checked,
                "note": f"the first run saw NaN / Inf appear in {call.scope}; a second run on the same "
                        "inputs did not: the values depend on more than the inputs (uninitialised or "
                        "shared memory, a race)"}
    finding = {**tracer.birth, "screen": screen_info, "spread": spread}
    experts = tracer.experts.report()
    if experts:
        finding["experts"] = experts
    block = moe_block(tracer.experts.routers, finding.get("chain", []))
    if block is not None and (bisect == "always" or (bisect == "auto" and not experts)):
        scope, n, k = block
        kept = tracer.kept_inputs.get(scope)
        if kept is not None:
            module = model.get_submodule(scope.split("/")[0]) if not scope.startswith("__root__") else model
            finding["bisection"] = {"block": scope, **bisect_experts(module, kept, n, k)}
    return finding


def moe_block(routers: list[dict], chain: list[str]) -> tuple[str, int, int] | None:
    """The mixture-of-experts layer around a birth: the nearest common call of the birth and a router
    (a top-k over experts) that is the router's own call or its parent (``mlp`` around ``mlp.gate`` and
    ``mlp.experts``), so a birth elsewhere in the same decoder layer never counts."""
    inside = set(chain)
    for router in reversed(routers):
        for depth, scope in enumerate(router["scopes"][:2]):
            if scope in inside:
                return scope, router["experts"], router["top_k"]
    return None


class _RestrictRouting(torch.utils._python_dispatch.TorchDispatchMode):
    """Every top-k over ``n`` entries sees only the allowed experts (the others at the dtype's lowest
    value, so with at least k allowed they are never chosen)."""

    def __init__(self, n: int, allowed):
        super().__init__()
        self.n = n
        self.allowed = sorted(allowed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.topk.default and args[0].shape[-1] == self.n and args[0].is_floating_point():
            x = args[0]
            mask = torch.ones(self.n, dtype=torch.bool, device=x.device)
            mask[self.allowed] = False
            args = (x.masked_fill(mask, torch.finfo(x.dtype).min), *args[1:])
        return func(*args, **kwargs)


def bisect_experts(module: torch.nn.Module, kept: tuple, n: int, k: int,
                   max_runs: int = MAX_BISECT_RUNS) -> dict:
    """Re-run one MoE layer on its recorded inputs with routing restricted to subsets of its ``n``
    experts, halving the subsets that still give NaN / Inf. A subset smaller than top-k is padded with
    experts already proven clean."""
    from tensordiff.tensors import clone_tensors

    runs = 0
    clean: set[int] = set()

    def nonfinite(subset) -> int | None:
        nonlocal runs
        allowed = set(subset)
        if len(allowed) < k:
            pad = sorted(clean - allowed)[: k - len(allowed)]
            if len(pad) < k - len(allowed):
                return None
            allowed |= set(pad)
        runs += 1
        args, kwargs = clone_tensors(kept)
        with torch.no_grad(), _RestrictRouting(n, allowed):
            out = module(*args, **kwargs)
        return sum(int((~torch.isfinite(t)).sum()) for _, t in flatten_tensors(out, "out") if t.is_floating_point())

    if not nonfinite(range(n)):
        return {"runs": runs, "reproduced": False, "guilty": [], "text": "the layer re-run alone gives no NaN / Inf"}
    guilty, counts, unresolved, waiting = [], {}, [], []
    queue = [list(range(n))]
    while queue and runs < max_runs:
        group = queue.pop(0)
        if len(group) == 1:
            guilty.append(group[0])
            continue
        halves = (group[: len(group) // 2], group[len(group) // 2:])
        found = False
        for half in halves:
            bad = nonfinite(half)
            if bad is None:
                waiting.append(half)
            elif bad:
                found = True
                queue.append(half)
                if len(half) == 1:
                    counts[half[0]] = bad
            else:
                clean.update(half)
        if not found and not any(h in waiting for h in halves):
            unresolved.append(group)  # bad together, clean apart
        if not queue and waiting:  # clean experts found since: try again with padding
            retry, waiting = waiting, []
            for half in retry:
                bad = nonfinite(half)
                if bad:
                    queue.append(half)
                    if len(half) == 1:
                        counts[half[0]] = bad
                elif bad == 0:
                    clean.update(half)
                else:
                    unresolved.append(half)
    from tensordiff.analysis.boundary import describe_indices

    guilty = sorted(set(guilty))
    text = describe_indices(guilty, n, "experts") if guilty else "no single expert"
    return {"runs": runs, "reproduced": True, "guilty": guilty, "experts_total": n, "top_k": k,
            "per_expert": [{"expert": e, "nonfinite_in_layer_output": counts.get(e)} for e in guilty],
            "unresolved": unresolved, "text": f"{text} (found by bisection in {runs} runs of the layer)"}


def _backward_finding(model, inputs, screen, loss_fn, neg_inf_is_bad: bool) -> dict:
    tracer = NanTracer(model, None, "backward", neg_inf_is_bad=neg_inf_is_bad)
    _run(model, _fresh(inputs), [tracer], True, loss_fn)
    first = screen.first_bad("backward")
    later = screen.bad_after(first)
    spread = {"ops_in_scope": tracer.spread_ops, "backward_ops": len(later)}
    screen_info = {"event": "op", "op": first.op, "node": first.node, "slots": first.bad}
    if tracer.birth is None:
        return {"direction": "backward", "origin": "not_reproduced", "op": first.op, "node": first.node,
                "screen": screen_info, "spread": spread,
                "note": "a second run on the same inputs gave no NaN / Inf in the backward"}
    return {**tracer.birth, "screen": screen_info, "spread": spread}


def _param_grads(model, result: NanHuntResult) -> None:
    bad = []
    total = 0
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        total += 1
        info = tensor_range(p.grad)
        if info["nonfinite"]:
            bad.append({"param": name, "nonfinite": info["nonfinite"], "numel": p.grad.numel()})
    result.screened["param_grads"] = total
    if bad:
        result.screened["param_grads_nonfinite"] = bad[:50]
        result.notes.append(f"{len(bad)} of {total} parameter gradients hold NaN / Inf (first: {bad[0]['param']})")


def hunt_trace(path) -> NanHuntResult:  # path: a trace file or an open TraceReader
    """The same question over a finished trace: the first record (execution order) holding NaN / Inf
    whose inputs (the op's ``in.N``, or the module call's ``input.*``) are finite. Element positions
    and boundaries come from the saved tensor where the trace kept data."""
    from tensordiff.analysis.boundary import boundary_signature, first_bad_index
    from tensordiff.trace import open_trace

    from tensordiff.trace import TraceReader

    start = time.perf_counter()
    trace = path if isinstance(path, TraceReader) else open_trace(path)
    path = trace.path
    idx = trace.index.sort_values("seq")
    result = NanHuntResult(clean=True, source={"trace": str(path), "complete": trace.complete})
    bad = (idx["nan"].fillna(0) + idx["inf"].fillna(0)) > 0
    result.screened = {"records": len(idx), "records_nonfinite": int(bad.sum())}
    for direction in ("forward", "backward"):
        rows = idx[bad & (idx["direction"] == direction)]
        for row in rows.to_dict("records"):
            slot = str(row["slot"])
            if slot.startswith("in.") or slot.startswith("input"):
                if row["kind"] == "module" and row["scope"].startswith("__root__"):
                    result.findings.append({"direction": direction, "origin": "input", "slots": [slot],
                                            "scope": row["scope"], "module": row["module"]})
                    break
                if row["kind"] == "module":  # made by the caller's own code just before this call
                    parent = row["module"].rpartition(".")[0] or "__root__"
                    result.findings.append({
                        "direction": direction, "origin": "own_code", "key": row["key"], "module": parent,
                        "scope": row["scope"], "op": "", "slot": slot, "nan": int(row["nan"]), "inf": int(row["inf"]),
                        "note": f"born in the own code of {parent} before it called {row['module']}; this trace "
                                "has no op records there: run `tensordiff nan-hunt` on the model for the op"})
                    break
                continue  # an op's input: born earlier, in the op that made it
            same = idx[(idx["scope"] == row["scope"]) & (idx["kind"] == row["kind"])]
            if row["kind"] == "op":
                same = same[same["op_index"] == row["op_index"]]
            ins = same[same["slot"].astype(str).str.startswith(("in.", "input"))]
            inputs_bad = bool(((ins["nan"].fillna(0) + ins["inf"].fillna(0)) > 0).any())
            f = {"direction": direction, "origin": "earlier" if inputs_bad else "op", "key": row["key"],
                 "op": row["op"] or f"{row['module']} ({row['kind']})", "module": row["module"],
                 "scope": row["scope"], "source": row.get("source") or "", "slot": slot,
                 "shape": list(row["shape"]), "dtype": row["dtype"], "numel": math.prod(int(x) for x in row["shape"]),
                 "nan": int(row["nan"]), "inf": int(row["inf"]),
                 "inputs": [{"slot": r["slot"], "shape": list(r["shape"]), "dtype": r["dtype"],
                             "nonfinite": int(r["nan"] + r["inf"]), "min": r["min"], "max": r["max"]}
                            for r in ins.to_dict("records")]}
            if trace.has_data(row["key"]) or isinstance(row.get("alias_of"), str):
                t = trace.tensor(row["key"])
                mask = ~torch.isfinite(t.float() if t.dtype == torch.bfloat16 else t)
                first = first_bad_index(mask)
                f.update(first_index=first[0] if first else None, first_coords=first[1] if first else None,
                         boundary=boundary_signature(mask))
            later = rows[rows["seq"] > row["seq"]]
            f["spread"] = {"ops_in_scope": int((later["kind"] == "op").sum()),
                           "module_calls": int(later[later["kind"] == "module"]["scope"].nunique())}
            result.findings.append(f)
            break
        if result.findings:
            break  # a forward birth explains the backward's
    result.clean = not result.findings
    result.seconds = time.perf_counter() - start
    return result

