"""Where the time of module-level stats capture goes on a GPU: `python benchmarks/gpu_hook_floor.py`.

Splits a plain forward into CPU issue time and GPU time, then adds, one at a time: empty hooks on
every module, hooks that launch one fused stats kernel per tensor, and the full capture. Prints
milliseconds (median of --repeats) and ratios to the plain forward.
"""
import argparse
import statistics
import tempfile
import time

import torch

import tensordiff
from tensordiff.models import Inputs, load_model
from tensordiff.probes import fused_stats


def timed(fn, repeats):
    walls, issues = [], []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i:
            walls.append(t2 - t0)
            issues.append(t1 - t0)
    return statistics.median(walls) * 1e3, statistics.median(issues) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(f"fused stats launcher: {fused_stats.launcher_name()} (ready in {time.perf_counter() - t0:.1f} s)")
    bundle = load_model("qwen", size=args.size, seq_len=args.seq_len)
    model = bundle.model.to("cuda", torch.bfloat16)
    inputs = {k: v.cuda() for k, v in bundle.inputs.kwargs.items()}

    def forward():
        with torch.no_grad():
            model(**inputs)

    rows = []
    plain, plain_issue = timed(forward, args.repeats)
    rows.append(("plain", plain, plain_issue))

    def with_hooks(pre, post):
        hs = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                                   m.register_forward_hook(post, with_kwargs=True, always_call=True))]
        try:
            return timed(forward, args.repeats)
        finally:
            for h in hs:
                h.remove()

    rows.append(("empty hooks",) + with_hooks(lambda m, a, k: None, lambda m, a, k, o: None))

    buf = [None]
    seen = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            b = buf[0]
            if b.add(t) is None:
                b.finish()
                buf[0] = fused_stats.FusedStatsBuffer("cuda", 4096)
                buf[0].add(t)

    def pre(m, a, k):
        for t in a:
            add(t)
        for t in k.values():
            add(t)

    def post(m, a, k, o):
        if isinstance(o, torch.Tensor):
            add(o)
        elif isinstance(o, tuple):
            for t in o:
                add(t)

    def dedup_add(t):
        if isinstance(t, torch.Tensor):
            hit = seen.get(id(t))
            if hit is not None and hit[0] is t and hit[1] == t._version:
                return
            seen[id(t)] = (t, t._version)
            add(t)

    def dpre(m, a, k):
        for t in a:
            dedup_add(t)
        for t in k.values():
            dedup_add(t)

    def dpost(m, a, k, o):
        if isinstance(o, torch.Tensor):
            dedup_add(o)
        elif isinstance(o, tuple):
            for t in o:
                dedup_add(t)
        if m is model:
            seen.clear()

    if fused_stats.available():
        buf[0] = fused_stats.FusedStatsBuffer("cuda", 4096)
        rows.append(("hooks + fused stats kernel per tensor",) + with_hooks(pre, post))
        rows.append(("hooks + fused stats, unchanged tensors once",) + with_hooks(dpre, dpost))
        # launch cost alone
        x = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
        b = fused_stats.FusedStatsBuffer("cuda", 4096)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(2000):
            b.add(x)
            if b.rows >= 4000:
                b = fused_stats.FusedStatsBuffer("cuda", 4096)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"fused stats launch: {(t1 - t0) / 2000 * 1e6:.1f} us per tensor (CPU)")
        t0 = time.perf_counter()
        for _ in range(2000):
            torch.aminmax(x)
        t1 = time.perf_counter()
        print(f"torch.aminmax launch: {(t1 - t0) / 2000 * 1e6:.1f} us per call (CPU)")

    for save in ("stats", "full"):
        with tempfile.TemporaryDirectory() as d:
            walls = []
            for i in range(3):
                t0 = time.perf_counter()
                r = tensordiff.capture(model, Inputs((), inputs), f"{d}/t{i}.h5", level="module", save=save)
                walls.append((r.seconds * 1e3, (time.perf_counter() - t0) * 1e3))
            mid = sorted(walls)[1]
            rows.append((f"tensordiff.capture module+{save} ({r.records} records; with drain {mid[1]:.1f} ms)",
                         mid[0], float("nan")))

    print(f"{args.size} bf16, 1 x {args.seq_len}, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| run | wall ms | CPU issue ms | x plain |\n|---|---|---|---|")
    for name, wall, issue in rows:
        print(f"| {name} | {wall:.1f} | {issue:.1f} | {wall / plain:.2f} |")


if __name__ == "__main__":
    main()
