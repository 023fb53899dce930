"""The error a target's tensor has against the reference's, for one call or op: relative L2 and
max |diff| over finite elements (the local error of replay), and kernel authors' mean ratio.

    rel_l2, max_abs = local_error(target_output, reference_output)
"""
from __future__ import annotations

import math

import torch

from tensordiff.probes.snapshot import read_back


def local_error(tgt: torch.Tensor, ref: torch.Tensor) -> tuple[float, float] | None:
    """(rel_l2, max_abs) of tgt against ref over finite elements; None if shapes differ. Computed on
    ref's device; a target tensor on another device is read back from its bytes first."""
    if tuple(tgt.shape) != tuple(ref.shape) or not (tgt.is_floating_point() or tgt.is_complex()):
        return None
    if tgt.device != ref.device:
        if tgt.device.type not in ("cpu", "cuda"):  # read the device's bytes back: never trust its copy
            tgt = read_back(tgt).materialize()
        tgt = tgt.to(ref.device)
    # float64 on the host; float32 on a GPU (rel L2 against budgets >= 1e-4 needs no more), and one
    # device-to-host read for all four numbers instead of a sync each
    acc = torch.float64 if ref.device.type == "cpu" else torch.float32
    t, r = tgt.detach().to(acc), ref.detach().to(acc)
    if t.numel() == 0:
        return 0.0, 0.0
    d = t - r
    norm_r, norm_d, max_abs = torch.stack([torch.linalg.vector_norm(r), torch.linalg.vector_norm(d),
                                           d.abs().max()]).tolist()
    if math.isfinite(norm_r) and math.isfinite(norm_d):  # all finite: no masks needed (the common case)
        return (norm_d / norm_r if norm_r > 0 else (0.0 if norm_d == 0 else math.inf)), max_abs
    both = torch.isfinite(t) & torch.isfinite(r)
    mismatch = (~both & ~(torch.isnan(t) & torch.isnan(r)) & (t != r)).sum()  # the same infinity is no error
    d = torch.where(both, t - r, 0.0)
    norm_r, norm_d, max_abs, bad = torch.stack([
        torch.linalg.vector_norm(torch.where(both, r, 0.0)), torch.linalg.vector_norm(d), d.abs().max(),
        mismatch.to(acc)]).tolist()
    rel = norm_d / norm_r if norm_r > 0 else (0.0 if norm_d == 0 else math.inf)
    return (math.inf if bad else rel), max_abs


def mean_abs_ratio(tgt: torch.Tensor, ref: torch.Tensor) -> float | None:
    """mean |tgt - ref| / mean |ref| over finite elements: the acceptance figure MoE kernel authors
    use (kt-kernel's tests pass below 0.05), reported beside the relative L2 for kernel modules."""
    if tuple(tgt.shape) != tuple(ref.shape) or not tgt.is_floating_point():
        return None
    t, r = tgt.detach().to(ref.device, torch.float64), ref.detach().to(torch.float64)
    both = torch.isfinite(t) & torch.isfinite(r)
    num, den, new_bad = torch.stack([torch.where(both, t - r, 0.0).abs().sum(), torch.where(both, r, 0.0).abs().sum(),
                                     (~torch.isfinite(t) & torch.isfinite(r)).sum().to(torch.float64)]).tolist()
    if new_bad:  # NaN / Inf the reference lacks: their mean is not a number (their test fails too)
        return math.inf
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
