"""Where a probed forward's extra time goes, part by part: `python benchmarks/gpu_probe_parts.py [SIZE SEQ [ROUNDS]]`.

Builds fast_records.cpp a second time with -DTENSORDIFF_PART_TIMES (clock reads around the source
line lookup, the argument records, the output records and each stats launch) and runs the fast path
with it, one capture per round as `tensordiff.capture` does, interleaved with plain forwards. Prints
per-forward milliseconds of each part and the median per-round ratio. The clock reads add ~1 us per
call, so the ratio here is a little above the real one (gpu_hook_floor.py).
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from tensordiff.models import load_model
from tensordiff.probes import fast_module_stats, fast_records
from tensordiff.probes.module_hooks import ModuleProbe
from tensordiff.probes.session import CaptureSession
from tensordiff.trace import TraceWriter

size, seq = (sys.argv[1], int(sys.argv[2])) if len(sys.argv) > 2 else ("0.5b", 2048)
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 15
src = Path(fast_records.__file__).with_name("fast_records.cpp")
ext = load(name="tensordiff_fast_records_timed", sources=[str(src)],
           extra_cflags=["-O2", "-DNDEBUG", "-DTENSORDIFF_PART_TIMES"])
fast_records._EXT[:] = [ext, True]  # the sessions below use the timed build
cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
bundle = load_model("qwen", size=size, seq_len=seq)
model = bundle.model.to(device, torch.bfloat16 if cuda else torch.float32)
inputs = {k: v.to(device) for k, v in bundle.inputs.kwargs.items()}
tmp = tempfile.TemporaryDirectory()
end_of_forward = [0.0]


def sync():
    if cuda:
        torch.cuda.synchronize()


def plain():
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    sync()
    return time.perf_counter() - t0


def probed():
    with TraceWriter(f"{tmp.name}/t.h5", {}) as w:
        s = CaptureSession(w, save_data=False, fast_gpu_stats=True)
        if not cuda:  # the records without kernels (no CUDA here)
            s.fast = fast_module_stats.choose(w, s.emit_general, recorder="cpp", accept_cpu=True)
        eof = s.end_of_forward

        def timed_end():
            t = time.perf_counter()
            eof()
            end_of_forward[0] += time.perf_counter() - t

        s.end_of_forward = timed_end
        with ModuleProbe(model, s), torch.no_grad():
            sync()
            t0 = time.perf_counter()
            model(**inputs)
            sync()
            return time.perf_counter() - t0


for _ in range(3):  # warm-up: kernels, allocator, the process-wide name tables
    plain(), probed()
end_of_forward[0] = 0.0
before = ext.part_times()
pairs = [(plain(), probed()) for _ in range(rounds)]
d = [b - a for a, b in zip(before, ext.part_times())]
calls = d[4] / rounds
print(f"{size}, 1 x {seq}, {torch.cuda.get_device_name() if cuda else 'cpu'}, {rounds} rounds: "
      f"plain {statistics.median(p for p, _ in pairs) * 1e3:.1f} ms, "
      f"x plain {statistics.median(q / p for p, q in pairs):.3f} (median of paired rounds)")
print(f"{calls:.0f} probed calls, {d[5] / rounds:.0f} launches per forward\n| part | ms per forward | us per call |\n|---|---|---|")
for i, name in ((0, "source line"), (1, "argument records (launches included)"),
                (2, "output records (launches included)"), (3, "stats launches")):
    print(f"| {name} | {d[i] / rounds / 1e6:.3f} | {d[i] / rounds / 1e3 / max(calls, 1):.2f} |")
print(f"| end of forward (block to the writer) | {end_of_forward[0] / rounds * 1e3:.3f} | |")
