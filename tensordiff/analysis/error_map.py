"""Where along a tensor's axes the error lives: per index of each axis, the relative L2 of that slice
(target against reference) and its max |diff|, and which indices are beyond the record's budget, said
as a kernel author thinks: "dim 1: indices >= 256 of 2048 (from 256 = 2^8)" (a fixed 256-entry buffer),
"dim 1: indices 4-7 of 16" (some heads), "every 64th".

    axes = error_map(reference_tensor, target_tensor, budget=0.06)
    [{"axis": 1, "size": 2048, "text": "indices >= 256 of 2048 (from 256 = 2^8)", "beyond": 1792, ...}]

Non-finite elements on one side only count as infinite error in their slices. The per-index curves
come back downsampled (at most POINTS points) for the HTML report's charts.
"""
from __future__ import annotations

import math

import torch

from tensordiff.analysis.boundary import axis_noun, describe_indices

POINTS = 128


def _curve(values: torch.Tensor) -> list[float]:
    """At most POINTS values: the maximum of each bucket (a narrow spike must stay visible)."""
    n = values.numel()
    if n <= POINTS:
        return [float(v) for v in values]
    edges = torch.linspace(0, n, POINTS + 1).long().tolist()
    return [float(values[a:b].max()) for a, b in zip(edges, edges[1:]) if b > a]


CHUNK_ELEMENTS = 1 << 22  # bounded memory: a 2048 x 151936 logits record is read in slices


def error_map(ref: torch.Tensor, tgt: torch.Tensor, budget: float) -> list[dict]:
    """Per axis of size > 1: the indices whose slice is beyond ``budget`` (rel L2), with the curves.
    Computed in slices along the longest axis (float64, on a GPU when there is one), so memory stays
    bounded whatever the record's size."""
    if tuple(ref.shape) != tuple(tgt.shape) or ref.ndim == 0 or not ref.is_floating_point():
        return []
    shape = tuple(ref.shape)
    device = torch.device("cuda") if torch.cuda.is_available() and ref.numel() > (1 << 16) else torch.device("cpu")
    cut = max(range(len(shape)), key=lambda a: shape[a])
    rest = max(1, ref.numel() // max(shape[cut], 1))
    step = max(1, CHUNK_ELEMENTS // rest)
    axes = [a for a in range(len(shape)) if shape[a] >= 2]
    acc = {a: {k: torch.zeros(shape[a], dtype=torch.float64, device=device) for k in ("num", "den", "max")}
           for a in axes}
    bad = {a: torch.zeros(shape[a], dtype=torch.bool, device=device) for a in axes}
    for start in range(0, shape[cut], step):
        n = min(step, shape[cut] - start)
        r = ref.narrow(cut, start, n).detach().to(device, torch.float64)
        t = tgt.narrow(cut, start, n).detach().to(device, torch.float64)
        both = torch.isfinite(r) & torch.isfinite(t)
        mismatch = ~both & ~(torch.isnan(r) & torch.isnan(t)) & (r != t)
        d = torch.where(both, t - r, 0.0)
        r0 = torch.where(both, r, 0.0)
        dd, rr, ad = d * d, r0 * r0, d.abs()
        for a in axes:
            others = [o for o in range(len(shape)) if o != a]
            parts = {"num": dd.sum(dim=others) if others else dd, "den": rr.sum(dim=others) if others else rr,
                     "max": ad.amax(dim=others) if others else ad}
            hit = mismatch.any(dim=others) if others else mismatch
            if a == cut:  # this slice's own indices
                for k, v in parts.items():
                    acc[a][k][start:start + n] = v
                bad[a][start:start + n] = hit
            else:
                acc[a]["num"] += parts["num"]
                acc[a]["den"] += parts["den"]
                acc[a]["max"] = torch.maximum(acc[a]["max"], parts["max"])
                bad[a] |= hit
    out = []
    for a in axes:
        num, den = acc[a]["num"].sqrt(), acc[a]["den"].sqrt()
        rel = torch.where(den > 0, num / den.clamp(min=1e-300), torch.where(num > 0, math.inf, 0.0))
        rel = torch.where(bad[a], math.inf, rel)
        beyond = torch.nonzero(rel > budget).flatten().tolist()
        noun = "indices" if len(shape) > 2 else axis_noun(a, len(shape))
        text = describe_indices(beyond, shape[a], noun) if beyond else f"no {noun} beyond"
        out.append({"axis": a, "size": shape[a], "beyond": len(beyond), "first": beyond[0] if beyond else None,
                    "text": text, "budget": budget,
                    "rel_l2": _curve(torch.nan_to_num(rel, posinf=1e300).cpu()),
                    "max_abs": _curve(acc[a]["max"].cpu())})
    return out


def map_lines(axes: list[dict]) -> list[str]:
    """One line per axis where the error sits in part of the indices; one line for the axes where it
    is everywhere (or nowhere: the error is spread thinly over the whole tensor)."""
    lines, everywhere = [], []
    for a in axes:
        if 0 < a["beyond"] < a["size"]:
            lines.append(f"dim {a['axis']} (size {a['size']}): {a['text']} beyond tolerance")
        elif a["beyond"] == a["size"]:
            everywhere.append(str(a["axis"]))
    if everywhere:
        lines.append(f"dim {', '.join(everywhere)}: every index beyond tolerance")
    return lines
