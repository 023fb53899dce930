"""Pure (ref, tgt) -> metrics, in float64, in bounded memory (chunks of 4M elements).

    m = compare(ref, tgt, Tolerance(atol=1e-5, rtol=1.3e-6, rel_l2=1e-4))
    m["max_abs"], m["rel_l2"], m["cosine"], m["worst_index"]

Elements where both sides are NaN (or the same infinity) count as equal; a non-finite value on one
side only counts as a mismatch and is excluded from the moment-based metrics.

Default tolerances by the *target's* dtype. atol / rtol are torch.testing.assert_close's defaults for
that dtype (per element, one op); rel_l2 is the whole-tensor budget used to call a record diverged.
It is wider because rounding accumulates through a network: measured here on random Qwen3 models,
clean bf16 reaches rel_l2 ~2e-2 at the logits and fp16 ~3e-3 (see tests/test_diff.py), so the budget
is ~3x that. fp32 vs fp32 on one machine is usually bit-identical; 1e-4 leaves room for a different
BLAS or a TF32 matmul to be called out only when it really differs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 1 << 22


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    rel_l2: float


DEFAULT_TOLERANCES = {
    "float64": Tolerance(1e-7, 1e-7, 1e-6),
    "float32": Tolerance(1e-5, 1.3e-6, 1e-4),
    "tf32": Tolerance(1e-5, 1e-3, 5e-3),
    "float16": Tolerance(1e-5, 1e-3, 1e-2),
    "bfloat16": Tolerance(1e-5, 1.6e-2, 6e-2),
}


# A low-precision call is wrong only when its local error exceeds this many times the noise floor
# (the reference code in the target's dtype on the same inputs) plus a tenth of the budget: the
# rule of torch's accuracy minifier and of FlashAttention's tests.
FLOOR_MULTIPLIER = 2.0


def local_beyond(local, floor, tol: float) -> bool:
    """Is a call's local error its own fault? Over budget, and (where a noise floor was measured)
    over FLOOR_MULTIPLIER x the error the reference code itself makes in that dtype."""
    if local is None or local != local or local <= tol:
        return False
    return floor is None or floor != floor or local > FLOOR_MULTIPLIER * floor + tol / 10


def tolerance_for(dtype: str) -> Tolerance:
    return DEFAULT_TOLERANCES.get(dtype.replace("torch.", ""), DEFAULT_TOLERANCES["float32"])


def _f64(t: torch.Tensor) -> torch.Tensor:
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.to(torch.float64)


def compare(ref: torch.Tensor, tgt: torch.Tensor, tol: Tolerance) -> dict:
    """Metrics of tgt against ref. Shapes must match in element count (the logical shapes are reported
    by the caller); a mismatch returns {"status": "shape_mismatch"}."""
    if tuple(ref.shape) != tuple(tgt.shape):
        return {"status": "shape_mismatch"}
    ref = ref.reshape(-1)
    tgt = tgt.reshape(-1)
    n = ref.numel()
    device, chunk = _compare_device(n)
    acc = dict(sq_diff=0.0, sq_ref=0.0, sq_tgt=0.0, dot=0.0, sum_abs=0.0, max_abs=0.0, max_rel=0.0,
               outside=0, worst=-1, n_finite=0, nan_ref=0, nan_tgt=0, inf_ref=0, inf_tgt=0, nonfinite_mismatch=0)
    for start in range(0, n, chunk):
        r = _f64(ref[start:start + chunk].to(device))
        t = _f64(tgt[start:start + chunk].to(device))
        if _accumulate_finite(acc, r, t, start, tol):
            continue
        fr, ft = torch.isfinite(r), torch.isfinite(t)
        acc["nan_ref"] += int(torch.isnan(r).sum())
        acc["nan_tgt"] += int(torch.isnan(t).sum())
        acc["inf_ref"] += int(torch.isinf(r).sum())
        acc["inf_tgt"] += int(torch.isinf(t).sum())
        both = fr & ft
        same_nonfinite = (~fr & ~ft) & ((torch.isnan(r) & torch.isnan(t)) | (r == t))
        bad = ~both & ~same_nonfinite
        n_bad = int(bad.sum())
        if n_bad and acc["nonfinite_mismatch"] == 0:
            acc["worst"] = start + int(torch.nonzero(bad)[0])
        acc["nonfinite_mismatch"] += n_bad
        r = torch.where(both, r, 0.0)
        t = torch.where(both, t, 0.0)
        d = (t - r).abs()
        acc["n_finite"] += int(both.sum())
        acc["sq_diff"] += float((d * d).sum())
        acc["sq_ref"] += float((r * r).sum())
        acc["sq_tgt"] += float((t * t).sum())
        acc["dot"] += float((r * t).sum())
        acc["sum_abs"] += float(d.sum())
        acc["outside"] += int((d > tol.atol + tol.rtol * r.abs()).sum()) + n_bad
        if d.numel():
            i = int(d.argmax())
            if float(d[i]) > acc["max_abs"] or acc["worst"] < 0:
                acc["max_abs"] = max(acc["max_abs"], float(d[i]))
                if acc["nonfinite_mismatch"] == 0:
                    acc["worst"] = start + i
            rel = d / r.abs().clamp(min=tol.atol)
            acc["max_rel"] = max(acc["max_rel"], float(rel.max()))
    return _finish(acc, n)


def _accumulate_finite(acc: dict, r: torch.Tensor, t: torch.Tensor, start: int, tol: Tolerance) -> bool:
    """The common case, both chunks all finite, in a third of the passes of the masked path (no
    isfinite / isnan / isinf / where per element: they were two thirds of a 0.6B trace pair's diff).
    A non-finite value anywhere makes a sum non-finite; then nothing is added and the caller takes
    the masked path."""
    d = t - r
    sums = torch.stack([torch.dot(d, d), torch.dot(r, r), torch.dot(t, t), torch.dot(r, t)])  # BLAS, no temporaries
    ad = d.abs_()
    sum_abs = ad.sum()
    if not bool(torch.isfinite(sums).all() & torch.isfinite(sum_abs)):
        return False
    sq_diff, sq_ref, sq_tgt, dot = sums.tolist()
    acc["n_finite"] += r.numel()
    acc["sq_diff"] += sq_diff
    acc["sq_ref"] += sq_ref
    acc["sq_tgt"] += sq_tgt
    acc["dot"] += dot
    acc["sum_abs"] += float(sum_abs)
    ra = r.abs()  # r may be the caller's own float64 tensor: never in place
    acc["outside"] += int((ad > tol.atol + tol.rtol * ra).sum())
    if ad.numel():
        i = int(ad.argmax())
        worst = float(ad[i])
        if worst > acc["max_abs"] or acc["worst"] < 0:
            acc["max_abs"] = max(acc["max_abs"], worst)
            if acc["nonfinite_mismatch"] == 0:
                acc["worst"] = start + i
        acc["max_rel"] = max(acc["max_rel"], float((ad / ra.clamp_(min=tol.atol)).max()))
    return True


def _compare_device(n: int) -> tuple[torch.device, int]:
    """Large tensors are compared on a GPU where there is one (the float64 arithmetic of a 12 GB trace
    pair took 80 s on the host of the lent H200); small ones stay on the host."""
    if n >= GPU_MIN_ELEMENTS and torch.cuda.is_available():
        return torch.device("cuda"), CHUNK * 8
    return torch.device("cpu"), CHUNK


GPU_MIN_ELEMENTS = 1 << 16


def _finish(acc: dict, n: int) -> dict:
    norm_ref = math.sqrt(acc["sq_ref"])
    norm_diff = math.sqrt(acc["sq_diff"])
    denom = math.sqrt(acc["sq_ref"] * acc["sq_tgt"])
    if norm_ref > 0:
        rel_l2 = norm_diff / norm_ref
    else:
        rel_l2 = 0.0 if norm_diff == 0 else math.inf
    cosine = acc["dot"] / denom if denom > 0 else (1.0 if norm_diff == 0 else 0.0)
    return {
        "status": "ok",
        "numel": n,
        "max_abs": acc["max_abs"],
        "mean_abs": acc["sum_abs"] / max(acc["n_finite"], 1),
        "rel_l2": rel_l2,
        "cosine": cosine,
        "max_rel": acc["max_rel"],
        "frac_outside": (acc["outside"] / n) if n else 0.0,
        "nan_ref": acc["nan_ref"], "nan_tgt": acc["nan_tgt"],
        "inf_ref": acc["inf_ref"], "inf_tgt": acc["inf_tgt"],
        "nonfinite_mismatch": acc["nonfinite_mismatch"],
        "worst_flat": acc["worst"],
    }


def unravel(flat: int, shape) -> list[int]:
    if flat < 0 or not shape:
        return []
    return [int(i) for i in np.unravel_index(flat, tuple(shape))]


def beyond(metrics: dict, tol: Tolerance) -> bool:
    """Is this record diverged? Whole-tensor relative L2 over budget, or non-finite values that the
    reference does not have."""
    if metrics.get("status") != "ok":
        return metrics.get("status") == "shape_mismatch"
    return metrics["rel_l2"] > tol.rel_l2 or metrics["nonfinite_mismatch"] > 0
