"""Capture overhead vs a plain forward: `python benchmarks/capture_overhead.py [--size small] [--seq-len 512]`.

Prints one Markdown row per mode (plain, module+stats, module+full, both+full); paste into RESULTS.md.
"""
import argparse
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
            start = time.perf_counter()
            r = tensordiff.capture(model, inputs, f"{d}/t.h5", level=level, save=save)
            total = time.perf_counter() - start
            print(f"| {level}+{save} | {r.seconds:.4f} (with drain {total:.4f}) | {r.seconds / plain:.2f} | {r.records} |")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    main()
