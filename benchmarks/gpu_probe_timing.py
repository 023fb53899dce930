import time, torch, contextlib, tempfile
from tensordiff.models import load_model, Inputs
from tensordiff.probes.module_hooks import ModuleProbe
from tensordiff.probes.session import CaptureSession
from tensordiff.trace import TraceWriter
b = load_model("qwen", size="0.5b", seq_len=2048)
m = b.model.to("cuda", torch.bfloat16)
inp = {k: v.cuda() for k, v in b.inputs.kwargs.items()}
for rep in range(3):
    with TraceWriter("/tmp/x.h5", {}) as w:
        s = CaptureSession(w, save_data=False)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        with ModuleProbe(m, s), torch.no_grad():
            m(**inp)
        t1 = time.perf_counter()
        s.flush_stats(); t2 = time.perf_counter()
        torch.cuda.synchronize(); t3 = time.perf_counter()
        qs = w._queue.qsize()
    t4 = time.perf_counter()
    print(f"forward+hooks {t1-t0:.3f}  flush {t2-t1:.3f}  gpu drain {t3-t2:.3f}  writer drain {t4-t3:.3f} queue {qs} records {s.records}")
