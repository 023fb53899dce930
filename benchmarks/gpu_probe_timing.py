"""Split the time of fast module-level stats capture on a GPU: `python benchmarks/gpu_probe_timing.py [SIZE SEQ [ROUNDS]]`.

Variants, interleaved with plain forwards: the wrappers alone (a filter that matches no module), the
records without their stats kernels, and the whole fast path, with the per-record work in Python and
in C++ (fast_records.cpp). For each: CPU time until the forward returns, wall time until the GPU is
done, and the ratio of its wall time to the plain forward of the same round (median and quartiles
over rounds: the lent machine's speed drifts by up to 2x between minutes, so only paired ratios are
worth comparing).
"""
import statistics
import sys
import tempfile
import time

import torch

from tensordiff.models import load_model
from tensordiff.probes import fast_module_stats, fused_stats
from tensordiff.probes.module_hooks import ModuleProbe
from tensordiff.probes.session import CaptureSession
from tensordiff.trace import TraceWriter

print(f"fused stats launcher: {fused_stats.launcher_name()}")
size, seq = (sys.argv[1], int(sys.argv[2])) if len(sys.argv) > 2 else ("0.5b", 2048)
b = load_model("qwen", size=size, seq_len=seq)
m = b.model.to("cuda", torch.bfloat16)
inp = {k: v.cuda() for k, v in b.inputs.kwargs.items()}
tmp = tempfile.TemporaryDirectory()
real_add = fused_stats.FusedStatsBuffer.add


def _no_kernel(self, t, contiguous=None):  # the bookkeeping of add() without the launch
    if self.rows >= self.capacity:
        return None
    self.numel.append(t.numel())
    self.rows += 1
    return self.rows - 1


def run(variant):
    with TraceWriter(f"{tmp.name}/x.h5", {}) as w:
        s = CaptureSession(w, save_data=False, module_filter="^$" if variant == "wrappers only" else None,
                           fast_gpu_stats=True)
        fused_stats.FusedStatsBuffer.add = _no_kernel if variant == "records, no kernels" else real_add
        if variant in ("records, no kernels", "fast path, records in Python"):
            s.fast = fast_module_stats.choose(w, s.emit_general, recorder="python")
        if variant == "C++ records, no kernels":  # the floor of a design with batched launches
            from tensordiff.probes import fast_records
            from tensordiff.tensors import flatten_tensors

            rec = fast_records._load().Recorder(0, 1024, flatten_tensors, False)
            s.fast = fast_module_stats.CppModuleStats(w, s.emit_general, rec, fast_records._load().Probed)
        with ModuleProbe(m, s), torch.no_grad():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if variant == "plain":
                with torch.no_grad():
                    m.forward.__wrapped__(**inp) if hasattr(m.forward, "__wrapped__") else m(**inp)
            else:
                m(**inp)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t0) * 1e3, s.records


def plain():
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        m(**inp)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3, 0


variants = {"plain": plain, "wrappers only": lambda: run("wrappers only"),
            "records in Python, no kernels": lambda: run("records, no kernels"),
            "fast path, records in Python": lambda: run("fast path, records in Python"),
            "records in C++, no kernels": lambda: run("C++ records, no kernels"),
            "fast path, records in C++": lambda: run("fast path")}
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 21
for f in variants.values():
    f()
res = {k: [] for k in variants}
for _ in range(rounds):
    for k, f in variants.items():
        res[k].append(f())
plain_walls = [w for _, w, _ in res["plain"]]
print(f"median of {rounds} interleaved rounds; x plain: median (quartiles) of the per-round ratio of wall times")
print("| variant | CPU until forward returns ms | wall ms | x plain | records |\n|---|---|---|---|---|")
for k, v in res.items():
    ratios = statistics.quantiles([x[1] / p for x, p in zip(v, plain_walls)], n=4)
    print(f"| {k} | {statistics.median(x[0] for x in v):.1f} | {statistics.median(x[1] for x in v):.1f} "
          f"| {ratios[1]:.2f} ({ratios[0]:.2f}-{ratios[2]:.2f}) | {v[-1][2]} |")
