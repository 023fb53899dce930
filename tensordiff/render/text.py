"""Shared wording for every renderer: the headline sentence and number formatting."""
from __future__ import annotations

import math

VERDICT_TEXT = {
    "match": "MATCH: the target agrees with the reference within tolerance",
    "diverged": "DIVERGED: the target disagrees with the reference",
    "nan": "NAN: the target produced non-finite values the reference does not have",
    "crashed": "CRASHED: the target process died; the diff covers what was captured before",
    "incomplete": "INCOMPLETE: a trace was cut short; the diff covers what was captured",
}


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.{digits - 1}e}"


def headline(result) -> list[str]:
    lines = [VERDICT_TEXT.get(result.verdict, result.verdict.upper())]
    if result.crash:
        c = result.crash
        lines.append(f"crash: {c.get('reason', '?')}; last op started: {c.get('last_key') or '-'}"
                     + (f" at {c['last_source']}" if c.get("last_source") else ""))
        if c.get("probe"):
            lines.append(f"crash probe: {c['probe']}")
        tail = [l for l in (c.get("stderr_tail") or "").splitlines() if l.strip()]
        if tail:
            lines.append(f"target stderr: {tail[-1].strip()}")
    if result.culprit:
        c = result.culprit
        where = f"{c['module']}" + (f" / {c['op']}" if c.get("op") else "")
        lines.append(f"culprit: {where} (local error {fmt(c.get('local_error'))})"
                     + (f" at {c['source']}" if c.get("source") else ""))
        if c.get("why"):
            lines.append(f"why: {c['why']}")
        lines += [f"  where in {c['error_map_key'].rsplit('/', 1)[-1]}: {w}" for w in c.get("error_map_lines") or []]
    if result.first_divergence:
        d = result.first_divergence
        lines.append(f"first divergence: {d['key']} (max |diff| {fmt(d['max_abs'])}, rel L2 {fmt(d['rel_l2'])}, "
                     f"worst index {d.get('index')})")
        lines += [f"  where: {w}" for w in d.get("error_map_lines") or []]
    if result.first_nan:
        lines.append(f"first NaN/Inf: {result.first_nan['key']} at index {result.first_nan.get('index')}")
    for note in result.notes:
        lines.append(f"note: {note}")
    return lines
