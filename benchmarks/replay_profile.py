"""Where the time of a replayed target capture goes (cProfile), and the fixed costs of a child process.

    python benchmarks/replay_profile.py [--size 0.5b] [--seq-len 2048] [--device cuda]

Prints: import time of tensordiff.run, the build of an uninitialised model (as the isolated child
does), the plain bf16 forward, the capture with replay (save=stats) and its 25 most expensive
functions by own time and by cumulative time.
"""
import argparse
import cProfile
import copy
import pstats
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    t = time.perf_counter()
    import torch

    import tensordiff.run  # noqa: F401
    print(f"import tensordiff.run: {time.perf_counter() - t:.2f} s")
    from tensordiff.backends.registry import cast_like_deployment
    from tensordiff.models import load_model
    from tensordiff.tracing import capture, time_plain_forward

    t = time.perf_counter()
    load_model("qwen", size=a.size, seq_len=a.seq_len, empty=True)
    print(f"uninitialised build: {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    bundle = load_model("qwen", size=a.size, seq_len=a.seq_len)
    print(f"initialised build: {time.perf_counter() - t:.2f} s")
    target = cast_like_deployment(copy.deepcopy(bundle.model), torch.bfloat16).to(a.device)
    replay = copy.deepcopy(bundle.model).to(a.device)
    inputs = {k: v.to(a.device) for k, v in bundle.inputs.kwargs.items()}
    plain = time_plain_forward(target, inputs, False)
    print(f"plain forward: {plain * 1e3:.1f} ms")
    with tempfile.TemporaryDirectory() as d:
        capture(target, inputs, f"{d}/warm.h5", save="stats", replay_model=replay)
        prof = cProfile.Profile()
        prof.enable()
        res = capture(target, inputs, f"{d}/t.h5", save="stats", replay_model=replay)
        prof.disable()
    print(f"capture with replay: {res.seconds:.2f} s = {res.seconds / plain:.0f}x plain")
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
