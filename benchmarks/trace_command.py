"""Wall time and peak memory of one whole `tensordiff trace` command, and what its summary says.

    python benchmarks/trace_command.py -- --model qwen --size 0.5b --seq-len 2048 --reference cuda --target cuda-bf16

Peak RSS is that of the largest process of the command (the CLI or its isolated target child), from
getrusage(RUSAGE_CHILDREN). Issue 10's goal on the lent H200 for the command above: <= 30 s wall,
target capture with replay <= 5x its plain forward, peak host RSS <= 6 GB, verdict match.
"""
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    args = argv[argv.index("--") + 1:] if "--" in argv else argv
    out = Path(tempfile.mkdtemp(prefix="td_bench_"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tensordiff", "--verbose", "trace", *args, "--out", str(out)])
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    timing = {k: v for k, v in summary.get("timing", {}).items() if not isinstance(v, dict)}
    print(json.dumps({"command": "tensordiff trace " + " ".join(args), "exit": proc.returncode,
                      "wall_s": round(wall, 2), "peak_rss_gb": round(peak_gb, 2),
                      "verdict": summary.get("verdict"), "culprit": (summary.get("culprit") or {}).get("module"),
                      "notes": summary.get("notes"), "timing": timing,
                      "trace_gb": round(sum(p.stat().st_size for p in out.glob("*.h5")) / 1e9, 2)}, indent=1))
    shutil.rmtree(out, ignore_errors=True)  # traces of a 0.5B model run to GBs
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
