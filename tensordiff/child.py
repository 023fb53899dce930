"""Child process for an isolated target capture: ``python -m tensordiff.child JOB_JSON``.

A target that segfaults or aborts takes only this process down; the parent reads the partial trace
and the breadcrumbs (TENSORDIFF_PROGRESS_FD) and reports the crash.
"""
import json
import sys
from pathlib import Path

from tensordiff.errors import TensordiffError
from tensordiff.run import TraceJob, capture_role


def main() -> int:
    job = TraceJob(**json.loads(sys.argv[1]))
    try:
        timing = capture_role(job, "target", crash_safe=True)
    except TensordiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (Path(job.out) / "target.timing.json").write_text(json.dumps(timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
