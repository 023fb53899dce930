"""The ``trace`` job: one model, a reference and a target backend, two traces, one diff, the reports.

    outcome = trace_job(TraceJob(model="qwen", target="cpu-bf16", out="runs/first"))
    outcome.result.verdict, outcome.out_dir
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tensordiff.backends import get_backend
from tensordiff.diff import DiffResult, diff
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
    extra: dict = field(default_factory=dict)


@dataclass
class TraceOutcome:
    out_dir: Path
    result: DiffResult


def write_reports(result: DiffResult, out_dir: Path) -> None:
    from tensordiff.render.summary import summary_json

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(summary_json(result))
    (out_dir / "report.md").write_text(result.to_markdown())
    (out_dir / "report.html").write_text(result.to_html())


def trace_job(job: TraceJob) -> TraceOutcome:
    out_dir = Path(job.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref_backend = get_backend(job.reference)
    tgt_backend = get_backend(job.target)
    bundle = load_model(job.model, size=job.size, batch=job.batch, seq_len=job.seq_len, seed=job.seed,
                        attention_mask=job.attention_mask)
    base_meta = {"model": job.model, "size": job.size, "seed": job.seed, "inputs": bundle.inputs.describe(),
                 "job": asdict(job)}
    timing = {}
    runs = {}
    for role, backend in (("reference", ref_backend), ("target", tgt_backend)):
        model = backend(bundle.model)
        inputs = backend.inputs(bundle.inputs.clone())
        if job.time_plain:
            timing[f"{role}_plain_s"] = time_plain_forward(model, inputs, job.backward)
        result = capture(model, inputs, out_dir / f"{role}.h5", level=job.level, save=job.save,
                         backward=job.backward, module_filter=job.module_filter,
                         replay_model=bundle.model if (role == "target" and job.replay) else None,
                         metadata={**base_meta, "role": role, "backend": backend.describe()})
        timing[f"{role}_traced_s"] = result.seconds
        if job.time_plain and timing[f"{role}_plain_s"] > 0:
            timing[f"{role}_overhead_x"] = result.seconds / timing[f"{role}_plain_s"]
        runs[role] = result
    result = diff(out_dir / "reference.h5", out_dir / "target.h5", atol=job.atol, rtol=job.rtol,
                  rel_l2=job.rel_l2, timing=timing)
    write_reports(result, out_dir)
    return TraceOutcome(out_dir, result)


def load_summary(out_dir: Path) -> dict:
    path = Path(out_dir) / "summary.json"
    return json.loads(path.read_text())
