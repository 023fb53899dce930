"""Cost of nan-hunt on a clean run against a plain forward, side by side in one process.

    python benchmarks/nan_hunt_overhead.py --device cpu --seq-len 512          # CPU, fp32
    python benchmarks/nan_hunt_overhead.py --device cuda --dtype bf16 --seq-len 2048

A Qwen3-0.6B-shaped model (``--size 0.5b``: hidden 1024, 28 layers) with random weights. Plain
forwards and hunts alternate (after one warm-up of each) so clock drift hits both; the median of each
is reported. Issue 11's goal: a clean forward under nan-hunt <= 1.3x a plain forward.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tensordiff.analysis.nan_hunt import hunt  # noqa: E402
from tensordiff.models import load_model  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bundle = load_model(args.model, size=args.size, seq_len=args.seq_len)
    model = bundle.model.to(device=args.device, dtype=dtype).eval()
    ids = bundle.inputs.kwargs["input_ids"].to(args.device)

    def plain():
        with torch.no_grad():
            model(input_ids=ids)

    def hunted():
        result = hunt(model, {"input_ids": ids})
        assert result.clean, result.findings
        return result

    times = {"plain": [], "nan_hunt": []}
    for i in range(args.repeats + 1):
        for name, fn in (("plain", plain), ("nan_hunt", hunted)):
            _sync(args.device)
            start = time.perf_counter()
            out = fn()
            _sync(args.device)
            if i:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"model": f"{args.model} {args.size}", "device": args.device, "dtype": args.dtype,
                      "seq_len": args.seq_len, "threads": torch.get_num_threads(),
                      "plain_s": round(med["plain"], 4), "nan_hunt_s": round(med["nan_hunt"], 4),
                      "ratio": round(med["nan_hunt"] / med["plain"], 3),
                      "tensors_screened": out.screened["tensors"], "events": out.screened["events"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
