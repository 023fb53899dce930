"""A bf16 Qwen3-MoE target with no bug: tensordiff must say "match", and say that bf16 flipped some
router top-k choices instead of calling that a bug. Writes reports/cpu-bf16-qwen-moe/.

    python examples/bf16_moe.py
"""
import shutil
from pathlib import Path

from tensordiff.run import TraceJob, trace_job

ROOT = Path(__file__).resolve().parent.parent


def run(runs: Path = ROOT / "runs" / "examples", reports: Path = ROOT / "reports"):
    outcome = trace_job(TraceJob(model="qwen-moe", target="cpu-bf16", out=str(runs / "bf16-moe"),
                                 time_plain=False))
    dest = reports / "cpu-bf16-qwen-moe"
    dest.mkdir(parents=True, exist_ok=True)
    for report in ("report.md", "report.html", "summary.json"):
        shutil.copy(outcome.out_dir / report, dest / report)
    return outcome.result


if __name__ == "__main__":
    result = run()
    print(result.verdict, *result.notes, sep="\n")
