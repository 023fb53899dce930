"""Torch's SDPA backends against math on a Qwen3-0.6B-shaped model (issue 13, lent H200):

    python benchmarks/sdpa_backends.py --seq-lens 2048,8192 --dtypes bf16,fp16 --out results.jsonl

For every dtype, length and backend (math, flash, efficient, cudnn) one `trace` (fp32 reference on the
same GPU, replay on, stats saved) gives the verdict, the per-layer divergence (each decoder layer's
output error and its attention's own error), kernel authors' rule per call, and the time per forward of
both sides, timed alternately. Beside it, the kernel alone on random q, k, v of the model's attention
shape: its error map along the sequence against float64, and plain same-dtype attention's error.
With ``--slow-kernel FILE:NAME`` a user kernel runs through ``trace --timing`` too: its slowdown factor
and the modules responsible. ``--kinds`` also takes ``FILE.py:NAME`` attention kernels (e.g.
benchmarks/third_party_attention.py:sage). One JSON line per run goes to ``--out`` as it finishes.
"""
import argparse
import json
import re
import tempfile
import time

import torch

from tensordiff.analysis.error_map import error_map
from tensordiff.backends.sdpa import SDPA_KINDS, sdpa_kernel_call
from tensordiff.errors import TensordiffError
from tensordiff.run import TraceJob, trace_job

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16}


def per_layer(res) -> list[dict]:
    """Each decoder layer's output error and its attention's own (local) error."""
    rows = []
    modules = res.modules
    for i in range(64):
        layer = modules[modules["module"] == f"model.layers.{i}"]
        if layer.empty:
            break
        attn = modules[modules["module"] == f"model.layers.{i}.self_attn"]
        rows.append({"layer": i, "output_err": float(layer["output_err"].max()),
                     "attn_local_err": float(attn["local_err"].max()) if not attn.empty else None,
                     "attn_output_err": float(attn["output_err"].max()) if not attn.empty else None})
    return rows


def kernel_alone(kind: str, dtype: torch.dtype, seq: int, device: str, heads: int = 16, dim: int = 128) -> dict:
    """The backend on random q, k, v (causal): max error to float64, plain same-dtype attention's, and
    the error map along the sequence at the dtype's rel-L2 budget."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, dim, device=device, generator=gen).to(dtype) for _ in range(3))
    if ".py:" in kind:  # a user's / third party's kernel(q, k, v, causal, scale)
        from tensordiff.models import _from_file

        out = _from_file(kind)(q, k, v, causal=True, scale=dim ** -0.5)
    else:
        out = sdpa_kernel_call(kind)(q, k, v, None, dim ** -0.5)
    plain = sdpa_kernel_call("math")(q, k, v, None, dim ** -0.5)
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    budget = 2e-2 if dtype == torch.bfloat16 else 2e-3
    axes = error_map(exact, out, budget=budget)
    return {"max_err": float((out.double() - exact).abs().max()),
            "plain_max_err": float((plain.double() - exact).abs().max()),
            "error_map": [a["text"] for a in axes if a.get("text")]}


def one(seq: int, dtype: str, target: str, size: str, device: str, reference: str | None = None, **kw) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        try:
            res = trace_job(TraceJob(model="qwen", size=size, seq_len=seq, reference=reference or device, target=target,
                                     save="stats", isolate=False, out=out, **kw)).result
        except TensordiffError as exc:
            return {"target": target, "seq_len": seq, "error": str(exc)}
    rule = [n for n in res.notes if n.startswith("kernel authors' rule")]
    row = {"target": target, "seq_len": seq, "dtype": dtype, "verdict": res.verdict,
           "culprit": (res.culprit or {}).get("module"), "worst_rel_l2": float(res.table["rel_l2"].max()),
           "authors_rule": re.sub(r"^.*?\): ", "", rule[0]) if rule else None,
           "cost": res.cost, "layers": per_layer(res), "wall_s": round(time.perf_counter() - start, 1)}
    if kw.get("timing"):
        row["cost_notes"] = [n for n in res.notes if "slower" in n or "extra time" in n or "faster" in n]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", default="2048,8192")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--kinds", default=",".join(SDPA_KINDS))
    ap.add_argument("--size", default="0.5b")
    ap.add_argument("--slow-kernel", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a quick check of this script on a small --size")
    ap.add_argument("--out", default="sdpa_backends.jsonl")
    args = ap.parse_args()
    with open(args.out, "a") as sink:
        def emit(row):
            print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
            sink.write(json.dumps(row) + "\n")
            sink.flush()

        if args.slow_kernel:
            emit(one(int(args.seq_lens.split(",")[0]), "bf16", f"{args.device}-bf16+{args.slow_kernel}", args.size, args.device,
                     reference=f"{args.device}-bf16", timing=True))  # against the plain bf16 attention it replaces
        for dtype in args.dtypes.split(","):
            for seq in map(int, args.seq_lens.split(",")):
                for kind in args.kinds.split(","):
                    attention = kind if ".py:" in kind else f"sdpa-{kind}"
                    row = one(seq, dtype, f"{args.device}-{dtype}+{attention}", args.size, args.device)
                    try:
                        row["kernel_alone"] = kernel_alone(kind, _DT[dtype], seq, args.device)
                    except Exception as exc:  # noqa: BLE001 (a third party's kernel may raise anything)
                        row["kernel_alone"] = {"error": f"{type(exc).__name__}: {exc}"}
                    emit(row)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
