"""The NPU stories, reproduced on the echo_npu device; writes reports into reports/<case>/.

    python examples/npu_story.py                 # every case
    python examples/npu_story.py noncontig-copy  # one case

Cases:
  clean             echo_npu without a fault: must match the CPU reference (no false alarm)
  noncontig-copy    device copies ignore strides: the error *shows* at every later layer norm; the
                    culprit is the op whose strided input was copied wrong, confirmed by re-running
                    it on contiguous inputs
  inplace-fallback  masked_fill_ through the CPU fallback never writes back: culprit masked_fill_
  alloc-round-up    the allocator's rounding makes free() abort (SIGABRT): tensordiff survives,
                    names the op that was running and diffs what was captured before the crash
Traces (.h5) stay in runs/examples/ (not committed); the reports are copied to reports/.
"""
import shutil
import sys
from pathlib import Path

from tensordiff.run import TraceJob, trace_job

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "clean": dict(fault="none", level="both", attention_mask=True),
    "noncontig-copy": dict(fault="noncontig-copy", level="both"),
    "inplace-fallback": dict(fault="inplace-fallback", level="both"),
    "alloc-round-up": dict(fault="alloc-round-up", level="both", attention_mask=True),
}


def run_case(name: str, runs: Path = ROOT / "runs" / "examples", reports: Path = ROOT / "reports"):
    job = TraceJob(model="qwen", target="echo_npu", out=str(runs / name), seq_len=128, time_plain=False,
                   **CASES[name])
    outcome = trace_job(job)
    dest = reports / f"echo_npu-{name}"
    dest.mkdir(parents=True, exist_ok=True)
    for report in ("report.md", "report.html", "summary.json"):
        shutil.copy(outcome.out_dir / report, dest / report)
    return outcome.result


def main(argv):
    for name in argv or list(CASES):
        result = run_case(name)
        culprit = result.culprit or {}
        print(f"{name:18s} verdict={result.verdict:9s} culprit={culprit.get('module')} / {culprit.get('op')}")


if __name__ == "__main__":
    main(sys.argv[1:])
