"""Run a model once under the probes and stream every record into a trace file.

    result = capture(model, inputs, "ref.h5", level="both", save="full", backward=True)
    result.records, result.seconds
"""
from __future__ import annotations

import contextlib
import platform
import sys
import time
from dataclasses import dataclass

import torch

from tensordiff.errors import TensordiffError
from tensordiff.models import Inputs
from tensordiff.probes.dispatch_ops import OpProbe
from tensordiff.probes.module_hooks import ModuleProbe, quiet_backward_hook_warnings
from tensordiff.probes.session import CaptureSession
from tensordiff.trace import TraceWriter

LEVELS = ("module", "op", "both")
SAVES = ("full", "stats")


@dataclass
class CaptureResult:
    path: str
    records: int
    seconds: float
    output: object = None


def _as_inputs(inputs) -> Inputs:
    if isinstance(inputs, Inputs):
        return inputs
    if isinstance(inputs, dict):
        return Inputs((), inputs)
    if isinstance(inputs, torch.Tensor):
        return Inputs((inputs,), {})
    return Inputs(tuple(inputs), {})


def default_loss(output, inputs: Inputs) -> torch.Tensor:
    """Next-token cross-entropy for causal LMs; mean square of the first float output otherwise."""
    logits = getattr(output, "logits", None)
    ids = inputs.kwargs.get("input_ids")
    if logits is not None and ids is not None and ids.shape[-1] > 1:
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device))
    from tensordiff.tensors import flatten_tensors

    for _, t in flatten_tensors((output,), "out"):
        if t.is_floating_point():
            return t.float().pow(2).mean()
    raise TensordiffError("--backward: the model output has no floating-point tensor to build a loss from")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_metadata(extra: dict | None = None) -> dict:
    import transformers

    from tensordiff.version import __version__

    import uuid

    return {"run_id": uuid.uuid4().hex, "versions": {"tensordiff": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "host": platform.node(), "command": " ".join(sys.argv), **(extra or {})}


def capture(model: torch.nn.Module, inputs, path, level: str = "module", save: str = "full",
            backward: bool = False, module_filter: str | None = None, metadata: dict | None = None,
            loss_fn=default_loss, compression: str | None = None,
            replay_model: torch.nn.Module | None = None, synchronous: bool = False,
            budget=None, guard=None, keep=None, compare_to=None, tolerance=None) -> CaptureResult:
    """Run ``model`` on ``inputs`` once with probes on, writing the trace to ``path``.

    With ``replay_model`` (the fp32 CPU reference), every module call (and op, at op level) is also
    re-run on the reference with the target's own inputs, giving each record its local error.

    ``keep`` (observers/live_compare.KeptReference): the module records stay in memory for a target
    captured next in this process. ``compare_to`` (those kept records, with ``replay_model``, forward
    at module level): each target record is measured against them as it is made; only the calls
    beyond tolerance are replayed, and with ``save="full"`` only their records keep data
    (``tolerance(key, dtype name) -> Tolerance``: the diff's policy)."""
    if level not in LEVELS:
        raise TensordiffError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")
    if save not in SAVES:
        raise TensordiffError(f"unknown save mode {save!r}; choose one of {', '.join(SAVES)}")
    inputs = _as_inputs(inputs)
    if replay_model is not None:
        _check_separate(model, replay_model)
    live = None
    if compare_to is not None and replay_model is not None and not backward and level == "module":
        from tensordiff.observers.live_compare import LiveCompare

        live = LiveCompare(compare_to, tolerance)
    meta = run_metadata({"level": level, "save": save, "backward": backward, "filter": module_filter,
                         **(metadata or {})})
    if keep is not None:
        meta["run_id"] = keep.run_id
    if live is not None:
        meta["live_reference"] = compare_to.run_id
        meta["save"] = "full where beyond tolerance" if save == "full" else save
    if backward:
        quiet_backward_hook_warnings()
    with TraceWriter(path, meta, compression=compression, synchronous=synchronous) as writer:
        from tensordiff.probes.replay import Replayer

        replayer = None
        if replay_model is not None:
            replayer = Replayer(replay_model, device=_device_of(replay_model), **({"budget": budget} if budget else {}))
        session = CaptureSession(writer, save_data=(save == "full" and live is None), module_filter=module_filter,
                                 replayer=replayer, fast_gpu_stats=(level == "module"), keep=keep, live=live,
                                 native_cpu=(level != "module" and _device_of(model).type == "cpu"))
        session.save_beyond = live is not None and save == "full"
        with contextlib.ExitStack() as stack:
            stack.callback(session.close)  # last out, error or not
            probe = stack.enter_context(ModuleProbe(model, session, backward=backward,
                                                    drill_down=(level == "module")))
            if level in ("op", "both"):
                stack.enter_context(OpProbe(session))
            if guard is not None:  # --guard: every op of the traced run watched for writes into sealed buffers
                stack.enter_context(guard)
            start = time.perf_counter()
            try:
                output = _forward_then_backward(model, inputs, backward, loss_fn, session)
            except Exception as exc:  # where it happened travels with it (innermost call, op)
                exc.tensordiff_place = session.error
                raise
            if backward:
                probe.emit_param_grads()
            session.flush_stats()
            _sync()
            seconds = time.perf_counter() - start
        extra = {}  # one metadata update: each rewrites the attribute and flushes the file
        if guard is not None:
            from tensordiff.guard import summary_lines

            extra["guard"] = {"summary": summary_lines(guard.findings), "findings": guard.summary()}
        if probe.live_summary is not None:
            extra["live"] = probe.live_summary
        writer.set_metadata(at_close=True, **extra, traced_seconds=seconds, replay=replayer is not None, drill_down=probe.drilled,
                            replay_failures=dict(list(replayer.failures.items())[:50]) if replayer else {})
    _release_pinned_host_memory()
    return CaptureResult(str(path), session.records, seconds, output)


def _check_separate(model: torch.nn.Module, replay_model: torch.nn.Module) -> None:
    """The reference a replay runs must share no module with the traced model: a shared module's
    forward is probed, so replaying it would replay it again, without end."""
    traced = {id(m) for m in model.modules()}
    for name, mod in replay_model.named_modules():
        if id(mod) in traced:
            raise TensordiffError(f"replay_model shares module {name or '__root__'!r} with the traced model; "
                                  "the reference must be a separate copy (copy.deepcopy(model), or a second load)")


def _release_pinned_host_memory() -> None:
    """Give back the pinned host blocks the capture's device-to-host copies left in torch's cache
    (rounded up to powers of two: a 1.2 GB logits copy holds 2 GB), so the next step starts from
    the memory it needs."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        empty()


def _device_of(model: torch.nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _forward_then_backward(model, inputs, backward, loss_fn=default_loss, session=None):
    if not backward:
        with torch.no_grad():
            return model(*inputs.args, **inputs.kwargs)
    output = model(*inputs.args, **inputs.kwargs)
    loss = loss_fn(output, inputs)
    if session is None:
        loss.backward()
        return output
    session.direction = "backward"
    try:
        loss.backward()
    finally:
        session.direction = "forward"
    return output


def time_side_by_side(reference, ref_inputs, target, tgt_inputs, backward: bool,
                      repeats: int = 3) -> tuple[float, float, list[float]]:
    """Median seconds per un-probed run of the reference and of the target, timed alternately in one
    loop (after a warm-up of each): a ratio measured side by side, not across phases of the job whose
    load on the machine may differ (a 5x false difference was seen on a loaded 2-core VM). Also the
    target/reference ratio of each adjacent pair: load that comes and goes hits both runs of a pair."""
    sides = [(reference, _as_inputs(ref_inputs)), (target, _as_inputs(tgt_inputs))]
    times = [[], []]
    for i in range(repeats + 1):
        for j, (model, inputs) in enumerate(sides):
            start = time.perf_counter()
            _forward_then_backward(model, inputs, backward)
            _sync()
            if i:
                times[j].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    ratios = [t / r for r, t in zip(*times) if r > 0]
    return sorted(times[0])[repeats // 2], sorted(times[1])[repeats // 2], ratios


def time_plain_forward(model, inputs: Inputs, backward: bool, repeats: int = 3) -> float:
    """Median seconds of an un-probed run (after one warm-up), for the overhead column in summary."""
    inputs = _as_inputs(inputs)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        _forward_then_backward(model, inputs, backward)
        _sync()
        if i:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]
