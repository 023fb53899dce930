"""Where a clean nan-hunt's time goes over a plain forward (cProfile of the hunts, after timing both).

    python benchmarks/nan_hunt_profile.py --device cuda --seq-len 2048
"""
import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tensordiff.analysis.nan_hunt import hunt  # noqa: E402
from tensordiff.models import load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    bundle = load_model("qwen", size=args.size, seq_len=args.seq_len)
    model = bundle.model.to(device=args.device, dtype=torch.bfloat16 if args.device != "cpu" else torch.float32)
    ids = bundle.inputs.kwargs["input_ids"].to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def plain():
        with torch.no_grad():
            model(input_ids=ids)
        sync()

    def hunted():
        hunt(model, {"input_ids": ids})
        sync()

    for fn in (plain, hunted):
        fn()
    for name, fn in (("plain", plain), ("hunt", hunted), ("plain", plain), ("hunt", hunted)):
        start = time.perf_counter()
        for _ in range(args.rounds):
            fn()
        print(name, f"{(time.perf_counter() - start) / args.rounds * 1e3:.2f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.rounds):
        hunted()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
