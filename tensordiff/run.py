"""The ``trace`` job: one model, a reference and a target backend, two traces, one diff, the reports.

    outcome = trace_job(TraceJob(model="qwen", target="cpu-bf16", out="runs/first"))
    outcome.result.verdict, outcome.out_dir
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tensordiff.backends import get_backend
from tensordiff.backends.registry import is_builtin
from tensordiff.diff import DiffResult, diff
from tensordiff.progress import status
from tensordiff.model_state import (base_tensors, load_inputs, load_state, save_inputs, save_state,
                                    state_file_paths, state_rows)
from tensordiff.models import load_model
from tensordiff.tracing import capture, time_plain_forward


@dataclass
class TraceJob:
    model: str = "qwen"
    target: str = "cpu-bf16"
    reference: str = "cpu"
    out: str = "runs/latest"
    size: str = "tiny"
    batch: int = 1
    seq_len: int = 128
    seed: int = 0
    level: str = "module"
    replay: bool = True
    save: str = "full"
    backward: bool = False
    module_filter: str | None = None
    attention_mask: bool = False
    atol: float | None = None
    rtol: float | None = None
    rel_l2: float | None = None
    time_plain: bool = True
    fault: str = "none"
    judge_fp64: bool = False
    per_pattern: tuple = ()  # ((fnmatch pattern, Tolerance), ...)
    isolate: bool | None = None  # None: isolate_by_default(target)
    model_class: str | None = None
    guard: bool = False  # buffer guard on the target (see tensordiff.guard)
    timing: bool = False  # per-module time and allocations per side (analysis/cost)
    state_dir: str | None = None  # where an isolated child finds the parent's state (default: out)
    lora_rank: int = 0  # LoRA of this rank on the MoE experts (kt_moe: its SFT kernel; backends/kt_sft)
    live: bool = True  # compare an in-process target with the kept reference as it runs (live_comparable)

    def __post_init__(self):
        # through JSON (the isolated child's copy of the job) a Tolerance arrives as a dict
        from tensordiff.metrics import Tolerance

        self.per_pattern = tuple((p, Tolerance(**t) if isinstance(t, dict) else t) for p, t in self.per_pattern)


@dataclass
class TraceOutcome:
    out_dir: Path
    result: DiffResult


def default_reference(target: str) -> str:
    """A CUDA target is compared with fp32 on the same GPU (and replayed there); anything else with
    the fp32 CPU."""
    return "cuda" if target.startswith("cuda") else "cpu"


def isolate_by_default(target: str) -> bool:
    """Targets that run code under test (echo_npu, a PrivateUse1 module, a plugin file or entry point)
    run in a child process, so that a segfault or abort becomes a crash report. The built-in
    cpu* / cuda* dtype targets run torch's own kernels: they run in this process, which saves the
    child's start, imports and state transfer (11 s of a 60 s 0.6B run on the lent H200); a Python
    exception there is still a crash report (``_capture_in_process``)."""
    from tensordiff.backends.registry import is_registered

    return not is_builtin(target) and not is_registered(target)  # a registered one exists only here


def build_device(job: TraceJob) -> str:
    """Where a built-in random model is initialised: on the reference's GPU when the reference runs
    there (a 0.6B model's seeded init took 12 s on the lent machine's host), else the host."""
    device = str(get_backend(job.reference).device)
    return device if device.startswith("cuda") and job.model in ("qwen", "qwen-moe") else "cpu"


def write_reports(result: DiffResult, out_dir: Path) -> None:
    from tensordiff.render.summary import summary_json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(summary_json(result))
    (out_dir / "report.md").write_text(result.to_markdown())
    (out_dir / "report.html").write_text(result.to_html())


def _bundle(job: TraceJob, state_from: Path | None = None):
    """The model and inputs. With ``state_from`` (an isolated target's child), the parent's state and
    inputs replace what this process built: both sides start from bit-identical numbers."""
    bundle = load_model(job.model, size=job.size, batch=job.batch, seq_len=job.seq_len, seed=job.seed,
                        attention_mask=job.attention_mask, model_class=job.model_class,
                        empty=state_from is not None,
                        device="cpu" if state_from is not None else build_device(job))
    if job.lora_rank:
        from tensordiff.backends.kt_sft import prepare_lora_model

        # the child adds the adapters too (its state file has them) but takes the parent's numbers
        note = prepare_lora_model(bundle.model, job.lora_rank, job.target if state_from is None else "", job.seed)
        if note:
            bundle.info["lora_note"] = note
    if state_from is not None:
        status("loading the reference's model state")
        state, inputs = state_file_paths(state_from)
        load_state(bundle.model, state)
        bundle.inputs = load_inputs(inputs)
    return bundle


def capture_role(job: TraceJob, role: str, bundle=None, crash_safe: bool = False, kept=None) -> dict:
    """Capture one side into OUT/ROLE.h5; returns its timing. Runs in the child for isolated targets.
    ``kept`` (observers/live_compare.KeptReference): the reference keeps its records there, an
    in-process target is compared with them as it runs."""
    if role == "target" and job.guard:
        from tensordiff import guard as guards

        try:
            return _capture_role(job, role, bundle, crash_safe, kept)
        finally:
            guards.deactivate()  # this job's guard: a later job in the process starts without one
    return _capture_role(job, role, bundle, crash_safe, kept)


def live_comparable(job: TraceJob) -> bool:
    """Can the target be compared with the reference while it runs? Both in this process, on one
    device type, forward at module level with replay (what the deferred replay covers)."""
    isolated = job.isolate if job.isolate is not None else isolate_by_default(job.target)
    if not job.live or isolated or job.backward or job.level != "module" or not job.replay or job.guard \
            or job.judge_fp64:  # the fp64 judge reads every target tensor
        return False
    ref, tgt = get_backend(job.reference), get_backend(job.target, job.fault)
    return torch.device(ref.device).type == torch.device(tgt.device).type


def _capture_role(job: TraceJob, role: str, bundle=None, crash_safe: bool = False, kept=None) -> dict:
    bundle = bundle or _bundle(job, state_from=Path(job.state_dir or job.out) if crash_safe else None)
    backend = get_backend(job.reference) if role == "reference" else get_backend(job.target, job.fault)
    guard = None
    if role == "target" and job.guard:
        from tensordiff import guard as guards

        guard = guards.activate()  # before the backend prepares: its buffers are registered and sealed
    status(f"preparing the {role} ({backend.name})")
    model = backend(bundle.model)
    status(f"checking the {role}'s parameters and buffers")
    state = state_rows(model, base_tensors(bundle.model))
    inputs = backend.inputs(bundle.inputs.clone())
    if backend.name == "echo_npu":
        from tensordiff.backends.echo_npu import load_extension

        load_extension().reset_counts()
    meta = {"model": job.model, "size": job.size, "seed": job.seed, "inputs": bundle.inputs.describe(),
            "job": asdict(job), "role": role, "backend": backend.describe(),
            "load": bundle.info.get("load"), "state": state,
            **({"lora_note": bundle.info["lora_note"]} if bundle.info.get("lora_note") else {})}
    timing = {}
    # Code under test is captured first: a target that crashes must leave its trace, not die in an
    # untraced timing run. torch's own kernels are timed first: the timing's warm-up run then also
    # takes the one-time costs (kernel selection, lazy inits) out of the capture's figure.
    plain_first = job.time_plain and is_builtin(backend.name)
    if plain_first:
        timing.update(_time_plain(job, role, model, inputs, bundle))
    status(f"capturing the {role} ({backend.name}{', with replay' if role == 'target' and job.replay else ''})")
    replay = _replay_model(job, bundle.model) if (role == "target" and job.replay) else None
    live, save = {}, job.save
    if kept is not None:
        live = {"keep": kept} if role == "reference" else {"compare_to": kept, "tolerance": _tolerance(job)}
        if role == "reference":
            # its data is written after the target ran, for the records the comparison needs
            # (add_reference_data): a clean 0.6B run at 2048 tokens wrote 8 GB nobody read
            save = "stats"
            meta["save"] = "data added for the records the target's live comparison needed" \
                if job.save == "full" else job.save
    result = capture(model, inputs, Path(job.out) / f"{role}.h5", level=job.level, save=save,
                     backward=job.backward, module_filter=job.module_filter, metadata=meta,
                     replay_model=replay, synchronous=crash_safe, budget=_budget(job), guard=guard, **live)
    if backend.info.get("attention_kernel") and role == "target":
        _judge_attention(backend, model, inputs, Path(job.out) / f"{role}.h5")
    if replay is not None and job.save == "full":
        _probe_experts_beyond(job, model, replay, Path(job.out) / f"{role}.h5")
    timing[f"{role}_traced_s"] = result.seconds
    if backend.name == "echo_npu":  # the device's op counters, for the captured run alone
        from tensordiff.backends.echo_npu import op_counts

        timing["echo_npu_ops"] = op_counts()
    if job.time_plain and not plain_first:
        timing.update(_time_plain(job, role, model, inputs, bundle))
    if job.time_plain:
        plain = timing[f"{role}_plain_s"]
        timing[f"{role}_overhead_x"] = result.seconds / plain if plain > 0 else None
    if job.timing:
        from tensordiff.analysis.cost import measure_cost
        from tensordiff.trace import annotate

        status(f"timing each module of the {role}")
        annotate(Path(job.out) / f"{role}.h5",
                 cost=measure_cost(model, inputs, timing.get(f"{role}_plain_s"), job.batch * job.seq_len))
    return timing


def _judge_attention(backend, model, inputs, path: Path) -> None:
    """Kernel authors' rule for an attention kernel, per call, beside our verdict: one more forward
    outside the capture (its float64 and plain-dtype attentions must not become records)."""
    from tensordiff.backends.flash_attn import judge_lines, judging
    from tensordiff.trace import annotate

    status("judging each attention call by kernel authors' rule")
    with judging() as calls, torch.no_grad():
        model(*inputs.args, **inputs.kwargs)
    annotate(path, attention_rule={"lines": judge_lines(calls, backend.info.get("kernel", backend.name)),
                                   "calls": calls})


def _probe_experts_beyond(job: TraceJob, model, replay, path: Path) -> None:
    """Experts calls whose own (local) error is beyond tolerance get an error per expert: each expert
    alone on the call's recorded tokens, target against the fp32 reference (analysis/expert_probe).
    A black-box kernel's bad experts are named without looking inside it."""
    from tensordiff.analysis.expert_probe import describe_probe, probe_experts
    from tensordiff.trace import annotate, open_trace

    budget = _budget(job)
    found = {}
    with open_trace(path) as trace:
        index = trace.index
        if "local_rel_l2" not in index.columns:
            return
        outs = index[(index["kind"] == "module") & (index["direction"] == "forward")
                     & (index["slot"] == "output.0") & index["local_rel_l2"].notna()]
        for row in outs.to_dict("records"):
            if not row["local_rel_l2"] > budget(row["key"], row["dtype"]):
                continue
            name, scope = row["module"], row["scope"]
            try:
                target, reference = model.get_submodule(name), replay.get_submodule(name)
            except AttributeError:
                continue
            gate_up = getattr(reference, "gate_up_proj", None)
            keys = [f"{scope}/input.{i}" for i in range(3)]
            if not (isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3 and all(k in trace.rows for k in keys)
                    and all(trace.rows[k]["has_data"] for k in keys)):
                continue
            status(f"probing each expert of {name} alone")
            hidden, ids, weights = (trace.tensor(k) for k in keys)
            rows = probe_experts(target, reference, hidden, top_k=int(ids.shape[-1]),
                                 experts=int(gate_up.shape[0]), weights_dtype=weights.dtype)
            found[scope] = {"module": name, "tokens": int(hidden.shape[0]),
                            **describe_probe(rows, budget(row["key"], row["dtype"]), int(gate_up.shape[0]))}
    if found:
        annotate(path, expert_probe=found)


def _time_side_by_side(job: TraceJob, bundle, model, inputs) -> dict:
    """Reference and target timed alternately in one loop (the reference rebuilt from the bundle: a
    shared-weights copy where device and dtype allow)."""
    from tensordiff.tracing import time_side_by_side

    status("timing the reference and the target side by side")
    ref_backend = get_backend(job.reference)
    try:
        reference = ref_backend(bundle.model)
        ref_s, tgt_s, ratios = time_side_by_side(reference, ref_backend.inputs(bundle.inputs.clone()), model,
                                                 inputs, job.backward)
    except Exception as exc:  # the comparison is extra: a failure here must not lose the trace
        return {"side_by_side_error": f"{type(exc).__name__}: {exc}"}
    return {"side_by_side_reference_s": ref_s, "side_by_side_target_s": tgt_s, "side_by_side_ratios": ratios}


def _time_plain(job: TraceJob, role: str, model, inputs, bundle) -> dict:
    """The side's plain forward time; the target's is timed alternately with the reference's (as many
    target runs as a lone timing: slow targets pay nothing more)."""
    if role == "target":
        side = _time_side_by_side(job, bundle, model, inputs)
        if "side_by_side_target_s" in side:
            return {"target_plain_s": side["side_by_side_target_s"], **side}
    status(f"timing a plain run of the {role}")
    return {f"{role}_plain_s": time_plain_forward(model, inputs, job.backward)}


def _run_child(job: TraceJob):
    """Run ``python -m tensordiff.child`` on the job; (its CompletedProcess with stderr, progress file)."""
    import os
    import subprocess
    import sys

    out = Path(job.out)
    progress = out / "target.progress"
    with open(progress, "wb") as fh, open(out / "target.stderr", "w+") as err:
        env = {**os.environ, "TENSORDIFF_PROGRESS_FD": str(fh.fileno())}
        child = subprocess.Popen([sys.executable, "-m", "tensordiff.child", json.dumps(asdict(job))], env=env,
                                 pass_fds=(fh.fileno(),), stdout=subprocess.DEVNULL, stderr=err, text=True)
        _relay_status(child, progress)
        err.seek(0)
        proc = subprocess.CompletedProcess(child.args, child.returncode, "", err.read())
    (out / "target.stderr").unlink(missing_ok=True)
    return proc, progress


def _capture_isolated(job: TraceJob) -> tuple[dict, dict | None]:
    """Capture the target in a child process; a segfault or abort there becomes a crash report."""
    import signal

    out = Path(job.out)
    proc, progress = _run_child(job)
    timing_file = out / "target.timing.json"
    timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if proc.returncode == 0:
        return timing, None
    if proc.returncode == 2 and "error: " in proc.stderr:  # a user error in the child: say it as ours
        from tensordiff.errors import TensordiffError

        raise TensordiffError(proc.stderr.strip().splitlines()[-1].removeprefix("error: "))
    code = proc.returncode
    reason = (f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
    crash = {"reason": reason, "returncode": code, **_crash_place(progress), "stderr_tail": proc.stderr[-3000:]}
    if code < 0 and job.level == "module":
        crash["module_call"] = crash["last_key"]
        crash.update(_probe_crash(job, code))
    return timing, crash


def _probe_crash(job: TraceJob, code: int) -> dict:
    """A signal gives the dying process no chance to say which op it was in, and module-level
    breadcrumbs only name the call. Run the target once more in another child with op breadcrumbs
    (op level, stats only, no replay): where it dies again is the op."""
    from dataclasses import replace

    status("the target crashed: running it again at op level to name the op")
    probe = replace(job, out=str(Path(job.out) / "crash_probe"), level="op", save="stats", replay=False,
                    time_plain=False, state_dir=job.state_dir or job.out)
    Path(probe.out).mkdir(parents=True, exist_ok=True)
    proc, progress = _run_child(probe)
    if proc.returncode != code:
        return {"probe": f"re-run at op level ended otherwise (status {proc.returncode}): the crash does not "
                         "repeat; the place above is the module call"}
    place = _crash_place(progress)
    return {"last_key": place["last_key"], "last_source": place["last_source"],
            "probe": "the target crashed again when re-run at op level: the op above is where"}


def _budget(job: TraceJob):
    """(record key, dtype) -> rel L2 budget under the job's tolerances (the capture decides with it)."""
    tolerance = _tolerance(job)
    return lambda key, dtype: tolerance(key, dtype).rel_l2


def add_reference_data(out_dir: Path, kept) -> int:
    """The reference's data for the records whose target data was saved (the calls beyond
    tolerance): what the diff's exact metrics and error maps read."""
    from tensordiff.trace import add_data, open_trace

    target = out_dir / "target.h5"
    if not target.exists():
        return 0
    with open_trace(target) as trace:
        keys = [row["key"] for row in trace.rows.values() if row["has_data"]]
    if keys:
        status(f"saving the reference's data of {len(keys)} records")
    return add_data(out_dir / "reference.h5", {key: kept.get(key) for key in keys})


def _tolerance(job: TraceJob):
    """(record key, dtype) -> Tolerance: the diff's policy under the job's --atol / --rtol / --tol."""
    from tensordiff.diff import tolerance_policy

    policy = tolerance_policy(job.atol, job.rtol, job.rel_l2, job.per_pattern)
    return policy.for_record


def _replay_model(job: TraceJob, model):
    """The fp32 model the target's calls are replayed on, where the reference runs: a CUDA reference
    replays on its GPU (a CPU replay of a 0.6B model at 2048 tokens took 30 s and 21 GB of host
    memory), anything else on the CPU."""
    import torch

    from tensordiff.backends.casting import converted_copy

    device = torch.device(get_backend(job.reference).device)
    if device.type == "cpu" and next(iter(model.parameters()), torch.empty(0)).device.type == "cpu":
        return model  # the built model itself: it stays untouched on the host
    return converted_copy(model, device, torch.float32, like_deployment=False).eval()


def _relay_status(child, progress: Path) -> None:
    """Wait for the child, showing the status lines it writes (an extension build, the capture)."""
    import time

    from tensordiff import progress as shown

    offset = 0
    while True:
        done = child.poll() is not None
        with open(progress, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]
        offset += len(complete)
        shown.relay(complete.decode(errors="replace").splitlines())
        if done:
            return
        time.sleep(0.2)


def _capture_in_process(job: TraceJob, bundle, kept=None) -> tuple[dict, dict | None]:
    """--no-isolate: a Python exception in the target is a crash report too, not a traceback."""
    import traceback

    from tensordiff.errors import TensordiffError

    try:
        return capture_role(job, "target", bundle, kept=kept), None
    except TensordiffError:
        raise
    except Exception as exc:
        place = getattr(exc, "tensordiff_place", None) or {}
        scope, op = place.get("scope", ""), place.get("op")
        return {}, {"reason": f"raised {type(exc).__name__}: {exc}"[:300], "returncode": None,
                    "last_key": f"{scope} / {op}" if op else scope, "last_source": place.get("source", ""),
                    "module": place.get("module"), "op": op, "stderr_tail": traceback.format_exc()[-3000:]}


def _crash_place(progress: Path) -> dict:
    """Where the child was: the innermost module call an exception left and the op that raised (an
    ``error`` breadcrumb), else the last call or op started (a signal gives no chance to say more)."""
    lines = [l for l in progress.read_text(errors="replace").splitlines()
             if l.strip() and not l.startswith("status\t")]
    errors = [l.split("\t") for l in lines if l.startswith("error\t")]
    if errors:
        _, scope, op, source = (errors[0] + ["", "", ""])[:4]
        return {"last_key": f"{scope} / {op}" if op else scope, "last_source": source,
                "module": scope.rsplit("/", 1)[0], "op": op or None}
    last = lines[-1].split("\t") if lines else ["", ""]
    return {"last_key": last[0], "last_source": last[1] if len(last) > 1 else ""}


def _judge_traces(job: TraceJob, bundle) -> dict:
    """Traces for the fp64 judge: the reference in float64, and the reference in the target's dtype
    (the noise floor of that precision). Module level, no replay: only the values are needed."""
    import torch

    from tensordiff.backends.registry import Backend

    from tensordiff.trace import open_trace

    with open_trace(Path(job.out) / "target.h5") as target:
        tgt_dtype = getattr(torch, target.meta.get("backend", {}).get("dtype", "float32"))
    paths = {}
    for name, dtype in (("fp64", torch.float64), ("floor", tgt_dtype)):
        backend = Backend(f"cpu-{name}", "cpu", dtype)
        paths[name] = Path(job.out) / f"judge_{name}.h5"
        capture(backend(bundle.model), backend.inputs(bundle.inputs.clone()), paths[name], level="module",
                save="full", backward=job.backward, module_filter=job.module_filter,
                metadata={"model": job.model, "role": f"judge-{name}"})
    return paths


def trace_job(job: TraceJob) -> TraceOutcome:
    if job.backward and job.target == "kt_moe" and not job.lora_rank:
        from tensordiff.backends.kt_moe import BACKWARD_REFUSED
        from tensordiff.errors import TensordiffError

        raise TensordiffError(BACKWARD_REFUSED)
    out_dir = Path(job.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    get_backend(job.reference)
    status(f"building the model ({job.model})")
    bundle = _bundle(job)
    kept = None
    if live_comparable(job):
        from tensordiff.observers.live_compare import KeptReference, default_keep_bytes

        kept = KeptReference(default_keep_bytes(torch.device(get_backend(job.reference).device)))
    timing = capture_role(job, "reference", bundle, kept=kept)
    crash = None
    if job.isolate if job.isolate is not None else isolate_by_default(job.target):
        state_path, inputs_path = state_file_paths(out_dir)
        status("writing the model state for the target's process")
        save_state(bundle.model, state_path)
        save_inputs(bundle.inputs, inputs_path)
        status("starting the target in a child process")
        try:
            target_timing, crash = _capture_isolated(job)
        finally:
            state_path.unlink(missing_ok=True)
            inputs_path.unlink(missing_ok=True)
    else:
        try:
            target_timing, crash = _capture_in_process(job, bundle, kept)
            if kept is not None and job.save == "full":
                add_reference_data(out_dir, kept)
        finally:
            if kept is not None:
                kept.release()
    timing.update(target_timing)
    if crash is not None and not (out_dir / "target.h5").exists():
        from tensordiff.errors import TensordiffError

        raise TensordiffError(f"the target crashed before writing any trace ({crash['reason']}): "
                              f"{crash['stderr_tail'].strip().splitlines()[-1] if crash['stderr_tail'].strip() else ''}")
    judge = _judge_traces(job, bundle) if job.judge_fp64 else {}
    status("comparing the traces")
    result = diff(out_dir / "reference.h5", out_dir / "target.h5", atol=job.atol, rtol=job.rtol,
                  rel_l2=job.rel_l2, per_pattern=job.per_pattern, timing=timing, crash=crash, **judge)
    status("writing the reports")
    write_reports(result, out_dir)
    return TraceOutcome(out_dir, result)


def load_summary(out_dir: Path) -> dict:
    path = Path(out_dir) / "summary.json"
    return json.loads(path.read_text())
