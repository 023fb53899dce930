"""The target capture of the trace command with live comparison (observers/live_compare), in process:
its time against the plain forward in the same rounds, and where it goes (cProfile).

    python benchmarks/live_profile.py [--size 0.5b] [--seq-len 2048] [--device cuda] [--rounds 5]

The reference (fp32) is captured once with save=full, keeping its records; each round then times one
plain bf16 forward and one target capture (save=full: data only where beyond tolerance, replay only
there), side by side. Issue 10's goal: the capture <= 5x the plain forward.
"""
import argparse
import copy
import cProfile
import pstats
import statistics
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--fault-layer", type=int, default=None,
                    help="scale that layer's MLP activation by 1.3 in the target (a bug: every call after it diverges)")
    a = ap.parse_args()
    import torch

    from tensordiff.backends.casting import cast_like_deployment
    from tensordiff.models import load_model
    from tensordiff.observers.live_compare import KeptReference, default_keep_bytes
    from tensordiff.tracing import capture, time_plain_forward

    bundle = load_model("qwen", size=a.size, seq_len=a.seq_len, device=a.device)
    reference = bundle.model.to(a.device).eval()
    target = cast_like_deployment(copy.deepcopy(reference), torch.bfloat16).to(a.device)
    if a.fault_layer is not None:
        class Scaled(torch.nn.Module):
            def forward(self, x):
                return torch.nn.functional.silu(x) * 1.3

        target.model.layers[a.fault_layer].mlp.act_fn = Scaled()
    inputs = {k: v.to(a.device) for k, v in bundle.inputs.kwargs.items()}
    with tempfile.TemporaryDirectory() as d:
        kept = KeptReference(default_keep_bytes(torch.device(a.device)))
        capture(reference, inputs, f"{d}/ref.h5", save="full", keep=kept)
        print(f"kept {len(kept)} reference records, {kept.nbytes / 1e9:.2f} GB")
        plain, traced = [], []
        for i in range(a.rounds + 1):
            p = time_plain_forward(target, inputs, False, repeats=3)
            res = capture(target, inputs, f"{d}/t{i}.h5", save="full", replay_model=reference, compare_to=kept)
            if i:  # the first round warms up
                plain.append(p)
                traced.append(res.seconds)
        ratios = [t / p for t, p in zip(traced, plain)]
        print(f"plain forward {statistics.median(plain) * 1e3:.1f} ms, live capture "
              f"{statistics.median(traced) * 1e3:.1f} ms, ratio median {statistics.median(ratios):.2f}x "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
        from tensordiff.trace import open_trace

        with open_trace(f"{d}/t1.h5") as t:
            print("live:", t.meta.get("live"))
        eager = []
        for i in range(2):  # the old path, side by side: every call replayed, every tensor saved
            eager.append(capture(target, inputs, f"{d}/e{i}.h5", save="full", replay_model=reference).seconds)
        print(f"eager replay capture (--no-live), warm: {eager[-1] * 1e3:.1f} ms")
        if a.profile:
            prof = cProfile.Profile()
            prof.enable()
            capture(target, inputs, f"{d}/p.h5", save="full", replay_model=reference, compare_to=kept)
            prof.disable()
            stats = pstats.Stats(prof)
            stats.sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
