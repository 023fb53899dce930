"""Where the time of one whole ``trace`` job goes: the job in this process under cProfile, the
verbose steps (time, peak host memory) on stderr, then the functions that took the most time.

    python benchmarks/trace_profile.py --size 0.5b --seq-len 2048 --reference cuda --target cuda-bf16

Every option after the script's name is a TraceJob field (``--seq-len`` -> seq_len).
"""
import cProfile
import pstats
import sys
import tempfile
import time


def main(argv: list[str]) -> int:
    t0 = time.perf_counter()
    from tensordiff import progress
    from tensordiff.run import TraceJob, trace_job

    print(f"import tensordiff.run: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    fields = {}
    for name, value in zip(argv[::2], argv[1::2]):
        key = name.lstrip("-").replace("-", "_")
        fields[key] = int(value) if value.isdigit() else value
    job = TraceJob(out=tempfile.mkdtemp(prefix="td_prof_"), **fields)
    prof = cProfile.Profile()
    with progress.shown(tty=False, verbose=True):
        prof.enable()
        outcome = trace_job(job)
        prof.disable()
    print("verdict:", outcome.result.verdict, file=sys.stderr)
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
