"""Length sweep: the same reference / target pair at several sequence lengths, and where it starts to
fail. Kernels are unit-tested at toy sizes (seq_len 4) and break at real ones (a 256-entry buffer,
an int32 index past 46K positions); the sweep says so plainly, and with ``bisect`` narrows the
boundary to one position.

    result = sweep(TraceJob(model="qwen", target="flash_attn", fault="seq-cap-256"), [4, 64, 512], bisect=True)
    result.text   # "passes at 4, 64 (the smallest is a unit test's size); fails at 512; first failing length 257 ..."
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tensordiff.errors import TensordiffError
from tensordiff.progress import status


@dataclass
class SweepResult:
    runs: dict = field(default_factory=dict)       # length -> {"verdict", "culprit", "out"}
    largest_passing: int | None = None
    first_failing: int | None = None
    bisect_runs: int = 0
    text: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def parse_lengths(spec: str) -> list[int]:
    """'4,64,256' or 'A..B' (powers of two from A to B, and B itself)."""
    try:
        if ".." in spec:
            lo, hi = (int(x) for x in spec.split("..", 1))
            out, n = [], lo
            while n < hi:
                out.append(n)
                n *= 2
            return sorted(set(out + [hi]))
        lengths = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise TensordiffError(f"--sweep-seq {spec!r}: give lengths like 4,64,256,1024 or a range like 4..4096") from None
    if not lengths or lengths[0] < 1:
        raise TensordiffError(f"--sweep-seq {spec!r}: lengths must be positive integers")
    return lengths


def _run(job, length: int, verdict_only: bool = True) -> dict:
    """One length. ``verdict_only``: no replay (the verdict does not need it, and a diverged run's
    replay and drill-down cost most of its time); the first failing length is run again in full for
    its culprit."""
    from tensordiff.run import trace_job

    status(f"sweep: sequence length {length}")
    out = Path(job.out) / f"seq_{length}"
    run = replace(job, seq_len=length, out=str(out), time_plain=False)
    if verdict_only:
        run = replace(run, replay=False)
    result = trace_job(run).result
    culprit = (result.culprit or {}).get("module")
    return {"verdict": result.verdict, "culprit": culprit, "out": str(out)}


def sweep(job, lengths: list[int], bisect: bool = False) -> SweepResult:
    result = SweepResult()
    for length in lengths:
        result.runs[length] = _run(job, length)
    ok = [n for n in lengths if result.runs[n]["verdict"] == "match"]
    bad = [n for n in lengths if result.runs[n]["verdict"] != "match"]
    result.largest_passing = max((n for n in ok if not bad or n < min(bad)), default=None)
    result.first_failing = min(bad) if bad else None
    if bisect and result.first_failing is not None and result.largest_passing is not None:
        lo, hi = result.largest_passing, result.first_failing  # lo passes, hi fails
        while hi - lo > 1:
            mid = (lo + hi) // 2
            result.runs[mid] = _run(job, mid)
            result.bisect_runs += 1
            if result.runs[mid]["verdict"] == "match":
                lo = mid
            else:
                hi = mid
        result.largest_passing, result.first_failing = lo, hi
    if result.first_failing is not None and job.replay:  # the culprit, with replay, where it starts
        result.runs[result.first_failing] = _run(job, result.first_failing, verdict_only=False)
    result.text = _describe(result, lengths)
    Path(job.out).mkdir(parents=True, exist_ok=True)
    (Path(job.out) / "sweep.json").write_text(json.dumps(result.to_dict(), indent=1, default=str))
    return result


def _describe(result: SweepResult, lengths: list[int]) -> str:
    passing = [n for n in lengths if result.runs[n]["verdict"] == "match"]
    failing = [n for n in lengths if result.runs[n]["verdict"] != "match"]
    parts = []
    if passing:
        parts.append(f"passes at {', '.join(map(str, passing))}")
    if failing:
        parts.append(f"fails at {', '.join(map(str, failing))}")
    if result.first_failing is None:
        return "; ".join(parts) + ": no length fails"
    text = "; ".join(parts)
    if result.bisect_runs:
        text += (f"; bisected in {result.bisect_runs} more runs: passes at {result.largest_passing}, "
                 f"fails from {result.first_failing} on")
    elif result.largest_passing is not None:
        text += f"; the boundary lies between {result.largest_passing} and {result.first_failing}"
    culprit = result.runs[result.first_failing].get("culprit")
    if culprit:
        text += f" (culprit at {result.first_failing}: {culprit})"
    if passing and min(lengths) in passing and min(lengths) <= 16:
        text += f"; a unit test at {min(lengths)} positions passes"
    return text
