"""Capture overhead vs a plain forward: `python benchmarks/capture_overhead.py [--size small] [--seq-len 512]`.

Prints one Markdown row per mode (plain, module+stats, module+full, both+full); paste into RESULTS.md.
Each mode is captured once untimed (first-use costs: extension load, first buffers), then ``--rounds``
times, each right after a plain forward; ``x plain`` is the median (and range) of those paired ratios,
as the machines here drift in speed from one minute to the next.
"""
import argparse
import os
import statistics
import tempfile
import time

import torch

import tensordiff
from tensordiff.models import load_model
from tensordiff.tracing import time_plain_forward


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="small")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--modes", default="module+stats,module+full,both+full")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bundle = load_model("qwen", size=args.size, seq_len=args.seq_len)
    model = bundle.model.to(args.device, getattr(torch, args.dtype))
    inputs = tensordiff.models.Inputs((), {k: v.to(args.device) for k, v in bundle.inputs.kwargs.items()})
    plain = time_plain_forward(model, inputs, False)
    print(f"{args.size} {args.dtype} on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
          f"1 x {args.seq_len} tokens, torch {torch.__version__}")
    print(f"| mode | seconds | x plain | records |\n|---|---|---|---|\n| plain | {plain:.4f} | 1.00 | - |")
    # The floor of any Python hook approach: a pre- and post-hook doing nothing, on every module.
    handles = [h for mod in model.modules() for h in (mod.register_forward_pre_hook(lambda *a: None),
                                                      mod.register_forward_hook(lambda *a: None))]
    hooks = time_plain_forward(model, inputs, False)
    for h in handles:
        h.remove()
    print(f"| empty hooks on every module | {hooks:.4f} | {hooks / plain:.2f} | - |")
    for level, save in (m.split("+") for m in args.modes.split(",")):
        with tempfile.TemporaryDirectory() as d:
            tensordiff.capture(model, inputs, f"{d}/warm.h5", level=level, save=save)
            ratios, seconds, totals = [], [], []
            for i in range(args.rounds):
                base = time_plain_forward(model, inputs, False)
                start = time.perf_counter()
                r = tensordiff.capture(model, inputs, f"{d}/t{i}.h5", level=level, save=save)
                totals.append(time.perf_counter() - start)
                seconds.append(r.seconds)
                ratios.append(r.seconds / base)
                os.remove(f"{d}/t{i}.h5")  # full captures of a 0.6B model are 4 GB each
            print(f"| {level}+{save} | {statistics.median(seconds):.4f} (with drain {statistics.median(totals):.4f}) "
                  f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | {r.records} |")

if __name__ == "__main__":
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    main()
