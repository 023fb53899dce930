"""Cost of the buffer guard on a clean run: a plain forward against the same forward with the guard
watching every op and every parameter and buffer of the model sealed (what `--guard` adds when all of
them are guarded), rounds interleaved, medians.

    python benchmarks/guard_overhead.py [--size tiny] [--seq-len 128] [--rounds 9]
"""
import argparse
import statistics
import time

import torch

from tensordiff.guard import Guard
from tensordiff.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    bundle = load_model("qwen", size=args.size, seq_len=args.seq_len)
    model, kwargs = bundle.model, bundle.inputs.kwargs
    guard = Guard()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        guard.register(name, t.detach())
        guard.seal(t.detach(), name)
    plain, guarded = [], []
    with torch.no_grad():
        model(**kwargs)  # warm-up
        for _ in range(args.rounds):
            start = time.perf_counter()
            model(**kwargs)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            with guard:
                model(**kwargs)
            guarded.append(time.perf_counter() - start)
    p, g = statistics.median(plain), statistics.median(guarded)
    print(f"qwen {args.size} x {args.seq_len} tokens, {len(guard.seals)} sealed tensors, "
          f"{torch.get_num_threads()} threads: plain {p * 1e3:.1f} ms, guarded {g * 1e3:.1f} ms, "
          f"{g / p:.2f}x; findings: {len(guard.findings)}")


if __name__ == "__main__":
    main()
