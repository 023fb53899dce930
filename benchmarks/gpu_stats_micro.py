"""Micro-benchmark of stats strategies on the GPU: `python benchmarks/gpu_stats_micro.py`."""
import time

import torch

from tensordiff.probes.gpu_stats import StatsBatcher, _segmented_stats
from tensordiff.probes.snapshot import _stats_on


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def main():
    ts = [torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(128)]
    flats = [t.reshape(-1) for t in ts]
    print(f"128 x {ts[0].numel()} bf16 ({sum(t.numel() * 2 for t in ts) / 1e9:.2f} GB)")
    print("per-tensor _stats_on   ", timed(lambda: [_stats_on(t) for t in ts]))
    print("segmented              ", timed(lambda: _segmented_stats(flats)))
    print("cat only               ", timed(lambda: torch.cat(flats)))
    buf = torch.cat(flats).float()
    lengths = torch.tensor([f.numel() for f in flats], device="cuda")
    print("segment_reduce sum     ", timed(lambda: torch.segment_reduce(buf, "sum", lengths=lengths)))
    print("foreach norm 1,2,inf   ", timed(lambda: [torch._foreach_norm(flats, o) for o in (1, 2, float("inf"))]))
    rows = buf.view(128, -1)
    print("row sum (equal sizes)  ", timed(lambda: rows.sum(1)))
    print("batcher end-to-end     ", timed(lambda: (lambda b: ([b.add(t) for t in ts], b.flush()))(StatsBatcher())))


if __name__ == "__main__":
    main()
