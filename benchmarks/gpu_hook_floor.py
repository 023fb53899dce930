"""Where the time of module-level stats capture goes on a GPU: `python benchmarks/gpu_hook_floor.py`.

Splits a plain forward into CPU issue time and GPU time, then measures, interleaved round by round
(the lent machine is noisy): empty hooks on every module, hooks that launch one fused stats kernel
per tensor, and ``tensordiff.capture(level="module", save="stats")``. Prints the median over rounds
of milliseconds and of the per-round ratio to the plain forward.
"""
import argparse
import gc
import statistics
import tempfile
import time

import torch

import tensordiff
from tensordiff.models import Inputs, load_model
from tensordiff.probes import fused_stats


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, (t1 - t0) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(f"fused stats launcher: {fused_stats.launcher_name()} (ready in {time.perf_counter() - t0:.1f} s)")
    bundle = load_model("qwen", size=args.size, seq_len=args.seq_len)
    model = bundle.model.to("cuda", torch.bfloat16)
    inputs = {k: v.cuda() for k, v in bundle.inputs.kwargs.items()}

    def forward():
        with torch.no_grad():
            model(**inputs)

    def with_hooks(pre, post):
        def run():
            hs = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                                       m.register_forward_hook(post, with_kwargs=True))]
            try:
                return timed(forward)
            finally:
                for h in hs:
                    h.remove()
        return run

    buf = [fused_stats.FusedStatsBuffer("cuda", 4096)]

    def add(t):
        if isinstance(t, torch.Tensor) and buf[0].add(t) is None:
            buf[0].finish()
            buf[0] = fused_stats.FusedStatsBuffer("cuda", 4096)
            buf[0].add(t)

    def pre(m, a, k):
        for t in a:
            add(t)
        for t in k.values():
            add(t)

    def post(m, a, k, o):
        for t in (o if isinstance(o, tuple) else (o,)):
            add(t)

    tmp = tempfile.TemporaryDirectory()
    gc_runs = []
    gc.callbacks.append(lambda phase, info: gc_runs.append(info["generation"]) if phase == "start" else None)

    def capture():
        path = f"{tmp.name}/t.h5"
        gc_runs.clear()
        t0 = time.perf_counter()
        r = tensordiff.capture(model, Inputs((), inputs), path, level="module", save="stats")
        total = (time.perf_counter() - t0) * 1e3
        capture.records, capture.gcs = r.records, list(gc_runs)
        return r.seconds * 1e3, total

    variants = {"plain": lambda: timed(forward),
                "empty hooks (Module.__call__ slow path)": with_hooks(lambda m, a, k: None, lambda m, a, k, o: None),
                "hooks + one fused stats launch per tensor": with_hooks(pre, post),
                "tensordiff.capture module+stats": capture}
    for fn in variants.values():  # warm-up: kernels compiled, allocator and caches primed
        fn()
    results = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            results[name].append(fn())
    plain = [w for w, _ in results["plain"]]
    print(f"{args.size} bf16, 1 x {args.seq_len}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"median of {args.rounds} interleaved rounds")
    print("| run | wall ms | second column ms | x plain (median and quartiles of per-round ratios) |\n|---|---|---|---|")
    for name, vals in results.items():
        walls = [w for w, _ in vals]
        q = statistics.quantiles([w / p for w, p in zip(walls, plain)], n=4)
        second = "CPU issue" if name != "tensordiff.capture module+stats" else "whole call incl. file + writer drain"
        print(f"| {name} | {statistics.median(walls):.1f} | {statistics.median(x for _, x in vals):.1f} ({second}) "
              f"| {q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f}) |")
    print(f"capture: {capture.records} records; GC collections during the last capture call: {capture.gcs}")
    # Full capture is bounded by the disk: compare its throughput with a plain sequential write.
    import os
    import subprocess

    path = f"{tmp.name}/full.h5"
    t0 = time.perf_counter()
    r = tensordiff.capture(model, Inputs((), inputs), path, level="module", save="full")
    total = time.perf_counter() - t0
    size = os.path.getsize(path) / 1e9
    dd = subprocess.run(f"dd if=/dev/zero of={tmp.name}/dd bs=16M count=128 conv=fdatasync 2>&1 | tail -1",
                        shell=True, capture_output=True, text=True).stdout.strip()
    print(f"module+full: {r.records} records, {size:.2f} GB in {total:.2f} s = {size / total:.2f} GB/s "
          f"(forward until outputs ready {r.seconds:.2f} s); dd with fdatasync: {dd}")


if __name__ == "__main__":
    main()
