"""Where bad elements sit in a tensor, said the way a kernel author thinks: "rows 256-2047 of 2048
(from 256 = 2^8)", "columns 3, 7, 11, ... (every 4th; 256 of 1024)", "experts 17-24 of 64".

    describe_indices([17, 18, 19, 20, 21, 22, 23, 24], 64, "experts")  -> "experts 17-24 of 64"
    boundary_signature(torch.isnan(out))   -> [{"axis": 0, "text": "rows 256-2047 of 2048 ...", ...}, ...]

A layout that starts at a power of two or a multiple of a chunk size points at a buffer or tile
boundary; a stride pattern points at an interleaving bug. The mask is reduced on its own device (one
``any`` per axis) and only the 1-D per-axis answers come to the host.
"""
from __future__ import annotations

import torch

CHUNKS = (4096, 2048, 1024, 512, 256, 128, 64, 32, 16)
MAX_RUNS_SHOWN = 4


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in idx:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def _boundary_note(start: int) -> str:
    """Why a start index may be a boundary: a power of two, or a multiple of a usual chunk size."""
    if start < 2:
        return ""
    if start & (start - 1) == 0:
        return f"from {start} = 2^{start.bit_length() - 1}"
    for chunk in CHUNKS:
        if chunk < start and start % chunk == 0:
            return f"from {start} = {start // chunk} x {chunk}"
    return ""


def describe_indices(idx, size: int, noun: str = "indices") -> str:
    """One phrase for a sorted set of indices along an axis of ``size``."""
    idx = sorted({int(i) for i in idx})
    if not idx:
        return f"no {noun}"
    if len(idx) == size:
        return f"all {size} {noun}"
    runs = _runs(idx)
    if len(runs) == 1:
        a, b = runs[0]
        text = f"{noun} {_span(a, b)} of {size}"
        if b == size - 1 and a > 0:
            text = f"{noun} >= {a} of {size}"
        note = _boundary_note(a)
        return f"{text} ({note})" if note else text
    steps = {b - a for a, b in zip(idx, idx[1:])}
    if len(steps) == 1 and len(idx) >= 3:
        step = steps.pop()
        return f"{noun} {idx[0]}, {idx[1]}, {idx[2]}, ... (every {step}th; {len(idx)} of {size})"
    shown = ", ".join(_span(a, b) for a, b in runs[:MAX_RUNS_SHOWN])
    more = f", ... ({len(runs) - MAX_RUNS_SHOWN} more runs)" if len(runs) > MAX_RUNS_SHOWN else ""
    return f"{noun} {shown}{more} of {size} ({len(idx)} in {len(runs)} runs)"


def axis_noun(axis: int, ndim: int) -> str:
    if ndim >= 2 and axis == ndim - 1:
        return "columns"
    if ndim >= 2 and axis == ndim - 2:
        return "rows"
    return f"dim {axis} indices"


def boundary_signature(bad: torch.Tensor, nouns: list[str] | None = None) -> list[dict]:
    """Per axis of a boolean mask: which indices hold at least one bad element, as indices and text."""
    out = []
    if bad.ndim == 0:
        return out
    for axis in range(bad.ndim):
        others = [d for d in range(bad.ndim) if d != axis]
        along = bad.any(dim=others) if others else bad
        idx = torch.nonzero(along).flatten().tolist()
        noun = nouns[axis] if nouns and axis < len(nouns) else axis_noun(axis, bad.ndim)
        out.append({"axis": axis, "size": int(bad.shape[axis]), "first": idx[0] if idx else None,
                    "count": len(idx), "text": describe_indices(idx, int(bad.shape[axis]), noun)})
    return out


def first_bad_index(bad: torch.Tensor) -> tuple[int, list[int]] | None:
    """(flat index in row-major order, coordinates) of the first bad element."""
    flat = torch.nonzero(bad.reshape(-1))
    if flat.numel() == 0:
        return None
    first = int(flat[0, 0])
    coords, rest = [], first
    for size in reversed(bad.shape):
        coords.append(rest % size)
        rest //= size
    return first, coords[::-1]
