"""The ``tensordiff`` command: parse, call, print. No logic lives here.

Exit codes: 0 match, 1 divergence / NaN / crash found, 2 bad input (one-line error; --debug shows it).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Differential numeric debugging for PyTorch: where does the target start to "
                       "disagree with the reference, and why?")
_state = {"debug": False}

EXIT_MATCH, EXIT_FOUND, EXIT_BAD_INPUT = 0, 1, 2


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")):
    _state["debug"] = debug


def _exit_for(verdict: str) -> int:
    return EXIT_MATCH if verdict == "match" else EXIT_FOUND


@app.command()
def trace(
    model: str = typer.Option("qwen", help="qwen | qwen-moe | local dir / HF id in the local cache | file.py:NAME"),
    target: str = typer.Option("cpu-bf16", help="Target backend: cpu, cpu-bf16, cpu-fp16, cuda[-bf16|-fp16], "
                                                "file.py:NAME, or an installed entry point."),
    reference: str = typer.Option("cpu", help="Reference backend."),
    out: Path = typer.Option(Path("runs/latest"), help="Output directory."),
    size: str = typer.Option("tiny", help="Built-in model size: tiny | small | 0.5b (Qwen3-0.6B shape)."),
    batch: int = typer.Option(1, help="Batch size of the generated inputs."),
    seq_len: int = typer.Option(128, help="Sequence length of the generated inputs."),
    seed: int = typer.Option(0, help="Seed for weights and inputs."),
    level: str = typer.Option("module", help="module | op | both"),
    save: str = typer.Option("full", help="full (tensors + stats) | stats"),
    backward: bool = typer.Option(False, help="Also capture gradients after a loss on the logits."),
    filter: Optional[str] = typer.Option(None, "--filter", help="Regex on module names to capture."),
    attention_mask: bool = typer.Option(False, help="Pass a padded attention mask."),
    atol: Optional[float] = typer.Option(None, help="Override absolute tolerance."),
    rtol: Optional[float] = typer.Option(None, help="Override relative tolerance."),
):
    """Capture the reference and the target, diff them, write traces and reports into --out."""
    from tensordiff.render.console import render_console
    from tensordiff.run import TraceJob, trace_job

    job = TraceJob(model=model, target=target, reference=reference, out=str(out), size=size, batch=batch,
                   seq_len=seq_len, seed=seed, level=level, save=save, backward=backward,
                   module_filter=filter, attention_mask=attention_mask, atol=atol, rtol=rtol)
    outcome = trace_job(job)
    render_console(outcome.result)
    typer.echo(f"wrote {out}/reference.h5, target.h5, summary.json, report.md, report.html")
    raise typer.Exit(_exit_for(outcome.result.verdict))


def main() -> None:
    from tensordiff.errors import TensordiffError

    try:
        app(standalone_mode=False)
    except TensordiffError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.BadParameter, __import__("click").exceptions.ClickException) as exc:
        exc.show()
        sys.exit(EXIT_BAD_INPUT)
    except typer.Abort:
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
