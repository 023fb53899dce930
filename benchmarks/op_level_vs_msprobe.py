"""Capture cost at module and op level, tensordiff and Ascend msprobe side by side in one run.

    pip install mindstudio-probe     # optional: without it the msprobe rows say so
    OMP_NUM_THREADS=1 python benchmarks/op_level_vs_msprobe.py [--seq-len 128] [--rounds 5]

Setting of issue 11: tiny Qwen3 (4 layers), 1 x 128 tokens, fp32, one thread, whole capture calls
(hooks installed, the run, the dump written). Each configuration runs in its own process (msprobe's
PrecisionDebugger is a process-wide singleton), which times a plain forward (and forward + backward)
of the same model first, then a warm-up capture and ``--rounds`` timed captures; the table gives
medians and the ratio to that process's own plain run. Goals (issue 11): module+op stats <= 3x a plain
forward, module+op full <= 8x, forward + backward module+op full <= 10x.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [
    # name, tool, level, what, backward
    ("tensordiff module stats", "td", "module", "stats", False),
    ("tensordiff module+op stats", "td", "both", "stats", False),
    ("tensordiff module+op full", "td", "both", "full", False),
    ("tensordiff fwd+bwd module+op full", "td", "both", "full", True),
    # floors of any op-level capture through a Python dispatch mode, tensordiff's machinery not involved
    ("floor: a bare TorchDispatchMode", "floor", "mode", "", False),
    ("floor: mode + user source line + one native stats pass per output", "floor", "stats", "", False),
    ("msprobe L0 statistics", "ms", "L0", "statistics", False),
    ("msprobe mix statistics", "ms", "mix", "statistics", False),
    ("msprobe mix tensor", "ms", "mix", "tensor", False),
    ("msprobe fwd+bwd mix tensor", "ms", "mix", "tensor", True),
]


def _model(seq_len: int):
    import torch

    from tensordiff.models import load_model

    torch.set_num_threads(1)
    bundle = load_model("qwen", size="tiny", seq_len=seq_len, seed=0)
    return bundle.model, bundle.inputs


def _plain(model, inputs, backward: bool) -> float:
    import torch

    from tensordiff.tracing import default_loss

    start = time.perf_counter()
    if backward:
        out = model(**inputs.kwargs)
        default_loss(out, inputs).backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(**inputs.kwargs)
    return time.perf_counter() - start


def _td_capture(model, inputs, level, save, backward, path):
    import tensordiff

    start = time.perf_counter()
    tensordiff.capture(model, inputs, path, level=level, save=save, backward=backward)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def _floor_capture(model, inputs, what):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from tensordiff.probes import cpu_stats
    from tensordiff.source_lines import user_source_line

    class Floor(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if what == "stats":
                user_source_line()
                if isinstance(out, torch.Tensor):
                    cpu_stats.stats_and_checksum(out)
            return out

    start = time.perf_counter()
    with torch.no_grad(), Floor():
        model(**inputs.kwargs)
    return time.perf_counter() - start


def _ms_capture(model, inputs, level, task, backward, dump_dir):
    import torch

    from msprobe.pytorch import PrecisionDebugger

    from tensordiff.tracing import default_loss

    start = time.perf_counter()
    debugger = PrecisionDebugger(config_path=str(Path(dump_dir) / "config.json"))
    debugger.start(model)
    if backward:
        out = model(**inputs.kwargs)
        default_loss(out, inputs).backward()
    else:
        with torch.no_grad():
            model(**inputs.kwargs)
    debugger.stop()
    debugger.step()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def worker(index: int, seq_len: int, rounds: int) -> dict:
    name, tool, level, what, backward = CONFIGS[index]
    model, inputs = _model(seq_len)
    work = Path(tempfile.mkdtemp(prefix="td_vs_ms_"))
    if tool == "ms":
        try:
            import msprobe  # noqa: F401
        except ImportError:
            return {"name": name, "error": "msprobe not installed (pip install mindstudio-probe)"}
        cfg = {"task": what, "dump_path": str(work / "dump"), "rank": [], "step": [], "level": level,
               "async_dump": False, what: {"scope": [], "list": [], "data_mode": ["all"]}}
        (work / "config.json").write_text(json.dumps(cfg))

    def run_once(i):
        if tool == "td":
            return _td_capture(model, inputs, level, what, backward, work / f"t{i}.h5")
        if tool == "floor":
            return _floor_capture(model, inputs, level)
        return _ms_capture(model, inputs, level, what, backward, work)

    plains, captures = [], []
    try:
        _plain(model, inputs, backward)
        run_once(0)  # warm-up: first-use costs
        for i in range(rounds):
            plains.append(_plain(model, inputs, backward))
            captures.append(run_once(i + 1))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # msprobe's tensor dumps: 1.5 GB a configuration
    plain, cap = statistics.median(plains), statistics.median(captures)
    return {"name": name, "plain_s": round(plain, 4), "capture_s": round(cap, 4), "x_plain": round(cap / plain, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--worker", type=int, default=None)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.seq_len, args.rounds)))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"tiny Qwen3, 1 x {args.seq_len}, fp32, 1 thread, median of {args.rounds}\n")
    print("| configuration | plain (s) | capture (s) | x plain |\n|---|---|---|---|")
    for i in range(len(CONFIGS)):
        proc = subprocess.run([sys.executable, __file__, "--worker", str(i), "--seq-len", str(args.seq_len),
                               "--rounds", str(args.rounds)], capture_output=True, text=True, env=env)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"name": CONFIGS[i][0], "error": proc.stderr.strip()[-300:]}
        if "error" in row:
            print(f"| {row['name']} | - | - | {row['error']} |")
        else:
            print(f"| {row['name']} | {row['plain_s']} | {row['capture_s']} | {row['x_plain']} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
