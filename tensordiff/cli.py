"""The ``tensordiff`` command: parse, call, print. No logic lives here.

Exit codes: 0 match, 1 divergence / NaN / crash found, 2 bad input (one-line error; --debug shows it).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Differential numeric debugging for PyTorch: where does the target start to "
                       "disagree with the reference, and why?")
_state = {"debug": False}

EXIT_MATCH, EXIT_FOUND, EXIT_BAD_INPUT = 0, 1, 2
# Models are only ever loaded from local files: without this, a missing model id makes
# huggingface_hub retry HTTP requests (and print each retry) on machines with no network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"tensordiff {version('tensordiff')}")
        raise typer.Exit(EXIT_MATCH)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Progress lines on stderr even "
                                       "without a terminal (a terminal always gets a spinner)."),
          version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")):
    _state["debug"] = debug
    _state["verbose"] = verbose


def _parse_tolerances(specs: list[str]) -> tuple:
    """--tol 'PATTERN=REL_L2' or 'PATTERN=ATOL,RTOL,REL_L2' (fnmatch on record keys, first match wins)."""
    from tensordiff.errors import TensordiffError
    from tensordiff.metrics import Tolerance, tolerance_for

    out = []
    for spec in specs or []:
        pattern, sep, numbers = spec.rpartition("=")
        try:
            values = [float(v) for v in numbers.split(",")]
        except ValueError:
            values = []
        if not sep or not pattern or len(values) not in (1, 3):
            raise TensordiffError(f"bad --tol {spec!r}: expected PATTERN=REL_L2 or PATTERN=ATOL,RTOL,REL_L2")
        base = tolerance_for("float32")
        out.append((pattern, Tolerance(base.atol, base.rtol, values[0]) if len(values) == 1 else Tolerance(*values)))
    return tuple(out)


def _judge_mode(judge: str) -> bool:
    from tensordiff.errors import TensordiffError

    if judge not in ("tolerance", "fp64"):
        raise TensordiffError(f"unknown --judge {judge!r}; choose tolerance or fp64")
    return judge == "fp64"


def _exit_for(verdict: str) -> int:
    return EXIT_MATCH if verdict == "match" else EXIT_FOUND


@app.command()
def trace(
    model: str = typer.Option("qwen", help="qwen | qwen-moe | local dir / HF id in the local cache | file.py:NAME"),
    target: str = typer.Option("echo_npu", help="Target backend: echo_npu, kt_moe, flash_attn, cpu, cpu-bf16, "
                                                "cpu-fp16, cuda[-bf16|-fp16], file.py:NAME, or an installed "
                                                "entry point."),
    fault: str = typer.Option("none", help="echo_npu / kt_moe fault mode (see `tensordiff faults`)."),
    isolate: Optional[bool] = typer.Option(None, "--isolate/--no-isolate",
                                           help="Run the target in a child process (survives crashes). "
                                                "Default: isolated for echo_npu, device:, plugin and "
                                                "entry-point targets; in process for the built-in cpu* / "
                                                "cuda* targets (torch's own kernels)."),
    reference: Optional[str] = typer.Option(None, help="Reference backend (default: cpu; cuda for a cuda "
                                                     "target, fp32 on the same GPU)."),
    model_class: Optional[str] = typer.Option(None, help="transformers class to load a checkpoint with "
                                              "(default: the class its config.json declares)."),
    out: Path = typer.Option(Path("runs/latest"), help="Output directory."),
    size: str = typer.Option("tiny", help="Built-in model size: tiny | small | 0.5b (Qwen3-0.6B shape) | wide (qwen-moe at MoE-kernel size)."),
    batch: int = typer.Option(1, help="Batch size of the generated inputs."),
    seq_len: int = typer.Option(128, help="Sequence length of the generated inputs."),
    seed: int = typer.Option(0, help="Seed for weights and inputs."),
    level: str = typer.Option("module", help="module | op | both"),
    save: str = typer.Option("full", help="full (tensors + stats) | stats"),
    backward: bool = typer.Option(False, help="Also capture gradients after a loss on the logits."),
    replay: bool = typer.Option(True, help="Re-run every target module call on the fp32 reference with the "
                                           "target's own inputs (local error: introduced vs amplified). "
                                           "--no-replay: faster; module-level stats on CUDA then take the "
                                           "fused-kernel path."),
    live: bool = typer.Option(True, help="A target run in this process on the reference's device type is "
                                         "measured against the reference's records as it runs; only calls "
                                         "beyond tolerance are replayed and (with --save full) saved with "
                                         "their tensors. --no-live: replay every call, save every tensor."),
    filter: Optional[str] = typer.Option(None, "--filter", help="Regex on module names to capture."),
    attention_mask: bool = typer.Option(False, help="Pass a padded attention mask."),
    atol: Optional[float] = typer.Option(None, help="Override absolute tolerance."),
    rtol: Optional[float] = typer.Option(None, help="Override relative tolerance."),
    judge: str = typer.Option("tolerance", help="tolerance | fp64: also run the reference in float64 and "
                                                "in the target's dtype, and call a record wrong only when "
                                                "the target's error to fp64 clearly exceeds that noise floor."),
    tol: Optional[list[str]] = typer.Option(None, "--tol", help="Per-record tolerance: 'PATTERN=REL_L2' or "
                                            "'PATTERN=ATOL,RTOL,REL_L2' (fnmatch on keys; repeatable)."),
    guard: bool = typer.Option(False, "--guard", help="Buffer guard on the target: live buffers sharing "
                               "memory, sealed buffers changed before they are read, and the op that wrote."),
    timing: bool = typer.Option(False, "--timing", help="Time each module (CUDA events on a GPU) and count the "
                                "memory its ops allocate, reference and target side by side (two more "
                                "forwards per side, not captured)."),
    sweep_seq: Optional[str] = typer.Option(None, "--sweep-seq", help="Run the pair at each of these sequence "
                                            "lengths (4,64,256,1024 or a range 4..4096) and say where it starts "
                                            "to fail; runs go to OUT/seq_N."),
    bisect: bool = typer.Option(False, "--bisect", help="With --sweep-seq: narrow the boundary between the "
                                "largest passing and the first failing length to one position."),
    lora_rank: int = typer.Option(0, "--lora-rank", help="LoRA of this rank on every MoE block's experts, "
                                  "reference and target (kt_moe then runs kt-kernel's SFT kernel, forward "
                                  "and --backward; LoRA gradients are compared)."),
):
    """Capture the reference and the target, diff them, write traces and reports into --out."""
    from tensordiff.render.console import render_console
    from tensordiff.run import TraceJob, default_reference, trace_job

    job = TraceJob(model=model, target=target, reference=reference or default_reference(target),
                   model_class=model_class, out=str(out), size=size, batch=batch,
                   seq_len=seq_len, seed=seed, level=level, save=save, backward=backward,
                   module_filter=filter, attention_mask=attention_mask, atol=atol, rtol=rtol, fault=fault,
                   isolate=isolate, judge_fp64=_judge_mode(judge), per_pattern=_parse_tolerances(tol),
                   replay=replay, guard=guard, timing=timing, lora_rank=lora_rank, live=live)
    import time

    from tensordiff import progress

    start = time.perf_counter()
    if sweep_seq is not None:
        from tensordiff.sweep import parse_lengths, sweep

        lengths = parse_lengths(sweep_seq)
        with progress.shown(verbose=_state.get("verbose", False)):
            swept = sweep(job, lengths, bisect=bisect)
        head = "SWEEP FAILS" if swept.first_failing is not None else "SWEEP PASSES"
        typer.echo(f"{head}: {swept.text}; {time.perf_counter() - start:.1f} s")
        for length, run in sorted(swept.runs.items()):
            typer.echo(f"  seq {length:6d}: {run['verdict']}" + (f" (culprit {run['culprit']})" if run["culprit"] else ""))
        typer.echo(f"wrote {out}/sweep.json and a run per length in {out}/seq_N")
        raise typer.Exit(EXIT_FOUND if swept.first_failing is not None else EXIT_MATCH)
    if bisect:
        from tensordiff.errors import TensordiffError

        raise TensordiffError("--bisect narrows a --sweep-seq boundary; give --sweep-seq too")
    with progress.shown(verbose=_state.get("verbose", False)):
        outcome = trace_job(job)
    render_console(outcome.result, seconds=time.perf_counter() - start)
    typer.echo(f"wrote {out}/reference.h5, target.h5, summary.json, report.md, report.html")
    raise typer.Exit(_exit_for(outcome.result.verdict))


@app.command("nan-hunt")
def nan_hunt(
    model: str = typer.Option("qwen", help="qwen | qwen-moe | local dir / HF id in the local cache | file.py:NAME"),
    target: str = typer.Option("cpu", help="Backend to run on (as for trace): cpu, cpu-fp16, cuda-bf16, "
                                           "echo_npu, file.py:NAME, ..."),
    fault: str = typer.Option("none", help="echo_npu fault mode."),
    trace_file: Optional[Path] = typer.Option(None, "--trace", help="Hunt over an existing trace (.h5) "
                                              "instead of running a model."),
    size: str = typer.Option("tiny", help="Built-in model size: tiny | small | 0.5b | wide (qwen-moe)."),
    batch: int = typer.Option(1, help="Batch size of the generated inputs."),
    seq_len: int = typer.Option(128, help="Sequence length of the generated inputs."),
    seed: int = typer.Option(0, help="Seed for weights and inputs."),
    model_class: Optional[str] = typer.Option(None, help="transformers class to load a checkpoint with."),
    backward: bool = typer.Option(False, help="Also run a backward (loss on the logits) and hunt there."),
    bisect: str = typer.Option("auto", help="Expert bisection in an MoE layer: auto (when the experts "
                                            "are a black box) | always | never."),
    neg_inf: bool = typer.Option(False, "--neg-inf-is-bad", help="Count tensors whose only non-finite "
                                 "values are -Inf (how attention masks are written) as findings too."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON (schema "
                                                        "tensordiff-nan-hunt/1, see README)."),
    out: Optional[Path] = typer.Option(None, help="Also write nan_hunt.json, nan_hunt.md, nan_hunt.html here."),
    isolate: bool = typer.Option(True, help="Run the model in a child process: a target that crashes "
                                            "(segfault, abort) is reported, not fatal."),
    guard: bool = typer.Option(False, "--guard", help="Buffer guard: report live buffers that share memory, "
                               "sealed buffers (kt_moe's staged weights) changed before the kernel reads them, "
                               "and the op that wrote into them through another buffer."),
    lora_rank: int = typer.Option(0, "--lora-rank", help="LoRA of this rank on every MoE block's experts "
                                  "(kt_moe then runs kt-kernel's SFT kernel)."),
):
    """Find where NaN / Inf values are born: op, module, source line, element, experts. No reference
    needed. Exit 1 when non-finite values were found (or the target crashed), 0 when clean."""
    import json

    from tensordiff.errors import TensordiffError

    if bisect not in ("auto", "always", "never"):
        raise TensordiffError(f"unknown --bisect {bisect!r}; choose auto, always or never")
    if backward and target == "kt_moe" and not lora_rank:
        from tensordiff.backends.kt_moe import BACKWARD_REFUSED

        raise TensordiffError(BACKWARD_REFUSED)
    if isolate and trace_file is None:
        args = ["--model", model, "--target", target, "--fault", fault, "--size", size, "--batch", str(batch),
                "--seq-len", str(seq_len), "--seed", str(seed), "--bisect", bisect,
                *(["--model-class", model_class] if model_class else []), *(["--backward"] if backward else []),
                *(["--neg-inf-is-bad"] if neg_inf else []), *(["--json"] if json_out else []),
                *(["--guard"] if guard else []), *(["--lora-rank", str(lora_rank)] if lora_rank else []),
                *(["--out", str(out)] if out is not None else [])]
        raise typer.Exit(_nan_hunt_isolated(args, json_out, out))
    from tensordiff import progress

    with progress.shown(verbose=_state.get("verbose", False)):
        if trace_file is not None:
            from tensordiff.analysis.nan_hunt import hunt_trace

            result = hunt_trace(trace_file)
        else:
            from tensordiff.analysis.nan_hunt import hunt
            from tensordiff.backends import get_backend
            from tensordiff.models import load_model

            bundle = load_model(model, size=size, batch=batch, seq_len=seq_len, seed=seed, model_class=model_class)
            if lora_rank:
                from tensordiff.backends.kt_sft import prepare_lora_model

                prepare_lora_model(bundle.model, lora_rank, target, seed)
            backend = get_backend(target, fault)
            watch = None
            if guard:
                from tensordiff import guard as guards

                watch = guards.activate()
            progress.status(f"preparing {backend.name}")
            prepared = backend(bundle.model)
            progress.status("screening a run for NaN / Inf")
            source = {"model": model, "target": target, "size": size, "seq_len": seq_len, "backward": backward,
                      **({"fault": fault} if fault != "none" else {}), **({"guard": True} if guard else {}),
                      **({"lora_rank": lora_rank} if lora_rank else {})}
            import contextlib

            with watch if watch is not None else contextlib.nullcontext():
                result = hunt(prepared, backend.inputs(bundle.inputs.clone()), backward=backward, bisect=bisect,
                              neg_inf_is_bad=neg_inf, source=source)
            if watch is not None:
                result.guard = watch.summary()
                result.guard_lines = guards.summary_lines(watch.findings)
    from tensordiff.render.nan_report import nan_html, nan_lines, nan_markdown

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "nan_hunt.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
        (out / "nan_hunt.md").write_text(nan_markdown(result))
        (out / "nan_hunt.html").write_text(nan_html(result))
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        for line in nan_lines(result):
            typer.echo(line)
    raise typer.Exit(EXIT_MATCH if result.clean and not result.guard else EXIT_FOUND)


def _nan_hunt_isolated(args: list[str], json_out: bool, out: Optional[Path]) -> int:
    """``nan-hunt ... --no-isolate`` in a child; its output passes through, its death by a signal
    becomes a one-line crash report (exit 1)."""
    import json
    import signal
    import subprocess

    cmd = [sys.executable, "-m", "tensordiff", *(["--verbose"] if _state.get("verbose") else []),
           *(["--debug"] if _state.get("debug") else []), "nan-hunt", *args, "--no-isolate"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode >= 0:
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        return proc.returncode
    why = f"killed by signal {signal.Signals(-proc.returncode).name}"
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
    doc = {"schema": "tensordiff-nan-hunt/1", "clean": False, "crash": {"reason": why, "stderr_tail": tail}}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "nan_hunt.json").write_text(json.dumps(doc, indent=1))
    if json_out:
        typer.echo(json.dumps(doc, indent=1))
    else:
        typer.echo(f"CRASHED: the target process was {why} during nan-hunt" + (f": {tail[-1]}" if tail else ""))
        typer.echo("(tensordiff trace on the same target writes a crash report naming the last op started)")
    return EXIT_FOUND


@app.command("guard")
def guard_script(
    script: Path = typer.Argument(..., help="Python script to run with the buffer guard on."),
    args: Optional[list[str]] = typer.Argument(None, help="Arguments for the script (after --)."),
    json_out: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
):
    """Run SCRIPT with the buffer guard watching every op: tensors it passes to
    ``tensordiff.guard.watch(tensor, name)`` (and buffers backends register) are reported when a write
    reaches them through another tensor or they change before their own next write. Exit 1 when
    something was found, 0 when clean."""
    import json
    import runpy

    from tensordiff import guard as guards
    from tensordiff.errors import TensordiffError

    if not script.is_file():
        raise TensordiffError(f"guard: script not found: {script}")
    watch = guards.activate()
    saved = sys.argv
    sys.argv = [str(script), *(args or [])]
    try:
        with watch:
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit:
        pass
    except Exception as exc:
        raise TensordiffError(f"guard: {script} raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    finally:
        sys.argv = saved
        guards.deactivate()
    lines = guards.summary_lines(watch.findings)
    if json_out:
        typer.echo(json.dumps({"clean": not lines, "summary": lines, "findings": watch.summary()}, indent=1))
    else:
        typer.echo(f"buffer guard: {len(lines)} finding(s)" if lines else
                   f"CLEAN: buffer guard found nothing ({len(watch.seals)} sealed, {len(watch.live)} live buffers)")
        for line in lines:
            typer.echo(f"  {line}")
    raise typer.Exit(EXIT_FOUND if lines else EXIT_MATCH)


@app.command("import")
def import_cmd(
    dump: Path = typer.Argument(..., help="Folder of the engine's dumped tensors (.npy, .safetensors, .pt, "
                                "raw binary + manifest.json)."),
    map_file: Optional[Path] = typer.Option(None, "--map", help="Map (TOML or JSON): engine names -> records."),
    output: Path = typer.Option(Path("target.h5"), "-o", "--output", help="The trace to write."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference trace: record order, shape "
                                             "checks, records nothing maps to."),
    reference_model: Optional[str] = typer.Option(None, "--reference-model", help="Model (checkpoint folder) "
                                                  "for offline replay: local error of modules whose inputs "
                                                  "and output are imported."),
    suggest_map: bool = typer.Option(False, "--suggest-map", help="Print a starting map from the dump and "
                                     "--reference, write nothing."),
):
    """Import an engine's dumped tensors as a trace (then `tensordiff diff REF.h5 TARGET.h5`)."""
    from tensordiff.engines.importer import import_dump, suggest_map as suggest
    from tensordiff.errors import TensordiffError

    if suggest_map:
        if reference is None:
            raise TensordiffError("--suggest-map pairs the dump's names with a reference trace's records: give "
                                  "--reference REF.h5")
        typer.echo(suggest(dump, reference))
        return
    if map_file is None:
        raise TensordiffError("import needs --map MAP.toml (or --suggest-map --reference REF.h5 to start one)")
    model = None
    if reference_model is not None:
        from tensordiff.models import load_model

        model = load_model(reference_model, seq_len=1).model
    result = import_dump(dump, map_file, output, reference, model)
    typer.echo(f"wrote {output}: {len(result.records)} records from {dump}"
               + (f"; local error for {len(result.local)} module(s) by offline replay" if result.local else
                  "; outputs only (no offline replay): the diff gives the first divergence"))
    if result.unmapped:
        typer.echo(f"  {len(result.unmapped)} dumped name(s) no rule maps: {', '.join(result.unmapped[:8])}"
                   + (" ..." if len(result.unmapped) > 8 else ""))
    if result.missing:
        typer.echo(f"  {len(result.missing)} reference module output(s) nothing maps to (e.g. "
                   f"{', '.join(result.missing[:3])})")


@app.command("weights")
def weights_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint: a folder of .safetensors / .bin / .pt, or one file."),
    model: str = typer.Option(..., "--model", help="config.json, its folder, or a built-in model (qwen, qwen-moe)."),
    size: str = typer.Option("tiny", help="Built-in model size (with --model qwen / qwen-moe)."),
    batch: int = typer.Option(1, help="Memory plan: batch."),
    seq_len: int = typer.Option(4096, help="Memory plan: tokens per sequence (KV cache and activations)."),
    engine_manifest: Optional[Path] = typer.Option(None, "--engine-manifest", help="JSON an engine wrote: the "
                                                   "tensors it looked for, its dimensions, its arena bytes."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON (schema tensordiff-weights/1)."),
):
    """Check a checkpoint against the model's config (and an engine's manifest): missing, unexpected,
    shape / dtype mismatches, fused vs per-expert layouts, config fields the weights contradict, and a
    memory plan. Exit 0 consistent, 1 findings, 2 bad input."""
    import json

    from tensordiff.engines.weights import check_weights

    report = check_weights(checkpoint, model, size, batch, seq_len, engine_manifest)
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=1, default=str))
    else:
        for line in report.lines():
            typer.echo(line)
    raise typer.Exit(EXIT_MATCH if report.consistent else EXIT_FOUND)


@app.command()
def faults():
    """List the planted fault modes of the echo_npu, kt_moe and flash_attn targets."""
    from tensordiff.backends.echo_npu import FAULTS
    from tensordiff.backends.kt_moe import FAULTS as KT_FAULTS

    typer.echo("echo_npu:")
    for name, (_, text) in FAULTS.items():
        typer.echo(f"  {name:18s} {text}")
    typer.echo("kt_moe:")
    for name, text in KT_FAULTS.items():
        typer.echo(f"  {name:18s} {text}")
    from tensordiff.backends.flash_attn import FAULTS as FA_FAULTS

    typer.echo("flash_attn:")
    for name, text in FA_FAULTS.items():
        typer.echo(f"  {name:18s} {text}")


FORMATS = ("console", "md", "html", "json")


def _emit(result, fmt: str) -> None:
    from tensordiff.render.console import render_console
    from tensordiff.render.summary import summary_json

    if fmt == "console":
        render_console(result)
    elif fmt == "md":
        typer.echo(result.to_markdown())
    elif fmt == "html":
        typer.echo(result.to_html())
    elif fmt == "json":
        typer.echo(summary_json(result))


def _check_format(fmt: str) -> None:
    from tensordiff.errors import TensordiffError

    if fmt not in FORMATS:
        raise TensordiffError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")


@app.command("diff")
def diff_cmd(
    reference: Path = typer.Argument(..., help="Reference trace (.h5)."),
    target: Path = typer.Argument(..., help="Target trace (.h5)."),
    out: Optional[Path] = typer.Option(None, help="Also write summary.json, report.md, report.html here."),
    atol: Optional[float] = typer.Option(None, help="Absolute tolerance for every record."),
    rtol: Optional[float] = typer.Option(None, help="Relative tolerance for every record."),
    rel_l2: Optional[float] = typer.Option(None, help="Relative L2 budget for calling a record diverged."),
    format: str = typer.Option("console", "--format", help="console | md | html | json"),
    tol: Optional[list[str]] = typer.Option(None, "--tol", help="Per-record tolerance: 'PATTERN=REL_L2' or "
                                            "'PATTERN=ATOL,RTOL,REL_L2' (fnmatch on keys; repeatable)."),
):
    """Diff two existing traces."""
    from tensordiff.diff import diff
    from tensordiff.run import write_reports

    _check_format(format)
    result = diff(reference, target, atol=atol, rtol=rtol, rel_l2=rel_l2, per_pattern=_parse_tolerances(tol))
    if out is not None:
        write_reports(result, out)
    _emit(result, format)
    raise typer.Exit(_exit_for(result.verdict))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A directory written by `tensordiff trace`."),
    format: str = typer.Option("console", "--format", help="console | md | html | json"),
):
    """Re-render the reports of a finished run from its traces."""
    from tensordiff.diff import diff
    from tensordiff.errors import TensordiffError
    from tensordiff.run import load_summary, write_reports

    _check_format(format)
    if not (run_dir / "reference.h5").exists() or not (run_dir / "target.h5").exists():
        raise TensordiffError(f"{run_dir} holds no reference.h5 / target.h5 (not a `tensordiff trace` output)")
    previous = load_summary(run_dir) if (run_dir / "summary.json").exists() else {}
    result = diff(run_dir / "reference.h5", run_dir / "target.h5", timing=previous.get("timing"),
                  crash=previous.get("crash"))
    write_reports(result, run_dir)
    _emit(result, format)
    raise typer.Exit(_exit_for(result.verdict))


@app.command()
def inspect(
    trace_file: Path = typer.Argument(..., help="A trace (.h5)."),
    limit: int = typer.Option(40, help="Records to list."),
    filter: Optional[str] = typer.Option(None, "--filter", help="Regex on record keys."),
):
    """Records, stats, metadata and completeness of one trace."""
    import json
    import re

    from rich.console import Console
    from rich.table import Table

    from tensordiff.render.text import fmt
    from tensordiff.trace import open_trace

    trace = open_trace(trace_file)
    idx = trace.index
    if filter:
        idx = idx[[bool(re.search(filter, k)) for k in idx["key"]]]
    console = Console()
    state = "complete" if trace.complete else "PARTIAL (the writer did not finish: crash or kill)"
    console.print(f"{trace_file}: {len(trace)} records, {state}")
    meta = trace.meta
    console.print(json.dumps({k: meta.get(k) for k in ("model", "role", "backend", "level", "save", "versions")},
                             default=str))
    table = Table()
    for col in ("seq", "key", "shape", "dtype", "stride", "min", "max", "mean", "nan"):
        table.add_column(col, overflow="fold")
    for r in idx.head(limit).to_dict("records"):
        table.add_row(str(r["seq"]), r["key"], str(r["shape"]), r["dtype"], str(r["stride"]), fmt(r["min"]),
                      fmt(r["max"]), fmt(r["mean"]), str(int(r["nan"])))
    console.print(table)


def main() -> None:
    from tensordiff.errors import TensordiffError

    try:
        code = app(standalone_mode=False)  # click returns the typer.Exit code here
        sys.exit(code if isinstance(code, int) else 0)
    except TensordiffError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if not _is_usage_error(exc):
            raise
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        typer.echo(f"error: {' '.join(message.split()) or type(exc).__name__} (see tensordiff --help)", err=True)
        sys.exit(EXIT_BAD_INPUT)


def _is_usage_error(exc: Exception) -> bool:
    """Click's errors (unknown command or option, bad or missing value, abort), from click itself or
    the copy typer vendors (typer._click): the user's mistake, said in one line."""
    return any(cls.__module__.endswith("click.exceptions") for cls in type(exc).__mro__)


if __name__ == "__main__":
    main()
