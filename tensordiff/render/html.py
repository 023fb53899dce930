"""report.html: one self-contained file (inline CSS, inline SVG chart, a few lines of JS to sort).

Every string that comes from a trace (module names, ops, source lines, metadata) goes through
html.escape: a plugin model may name a module ``<script>``.
"""
from __future__ import annotations

import html
import json
import math

from tensordiff.render.markdown import (MODULE_COLUMNS, STATE_COLUMNS, load_rows, module_rows, nan_section,
                                       state_rows_text, state_summary_line)
from tensordiff.render.text import fmt, headline

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em} .verdict{font-size:1.2em;font-weight:bold;padding:.4em .8em;border-radius:4px;display:inline-block}
.match{background:#d9f2d9}.diverged,.nan{background:#f8d0d0}.crashed{background:#ecd5f5}.incomplete{background:#fbeec0}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-family:monospace;font-size:12px}
th{background:#f0f0f0;cursor:pointer}tr.introduces td{background:#fbd5d5}tr.amplifies td{background:#fff4cc}
tr.introduces\\? td{background:#fde6e6}pre{background:#f7f7f7;padding:.5em;overflow:auto;max-height:30em}
"""
_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th){th.onclick=function(){
 var col=th.cellIndex, tb=th.closest('table').tBodies[0], rows=Array.from(tb.rows), asc=th.dataset.asc!=='1';
 rows.sort(function(a,b){var x=a.cells[col].textContent, y=b.cells[col].textContent,
  nx=parseFloat(x), ny=parseFloat(y); if(x==='inf')nx=Infinity; if(y==='inf')ny=Infinity;
  var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y); return asc?c:-c;});
 th.dataset.asc=asc?'1':'0'; rows.forEach(function(r){tb.appendChild(r);});};});
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _scales(n: int, lo: float, hi: float, xs: tuple, ys: tuple):
    """Pixel coordinates of point i (of n) and of value v in [lo, hi], inside xs / ys (left, right) /
    (top, bottom); larger values are drawn higher."""
    def x(i):
        return xs[0] + (xs[1] - xs[0]) * (i / max(n - 1, 1))

    def y(v):
        return ys[0] + (ys[1] - ys[0]) * (hi - v) / (hi - lo)

    return x, y


def _chart(result, width: int = 900, height: int = 220) -> str:
    """Inline SVG: log10 rel L2 per forward record in execution order, divergence and culprit marked."""
    table = result.table
    if table.empty:
        return ""
    fwd = table[table["direction"] == "forward"].reset_index(drop=True)
    if fwd.empty:
        return ""
    vals = [max(float(v), 1e-12) if v == v and not math.isinf(float(v)) else 1e4 for v in fwd["rel_l2"]]
    logs = [math.log10(v) for v in vals]
    lo, hi = min(min(logs), -8.0), max(max(logs), 1.0)
    x, y = _scales(len(vals), lo, hi, (40, width - 10), (10, height - 20))
    pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(logs))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="relative L2 error per record">',
             f'<polyline fill="none" stroke="#3465a4" stroke-width="1" points="{pts}"/>']
    for tick in range(math.ceil(lo), math.floor(hi) + 1, 2):
        parts.append(f'<text x="2" y="{y(tick) + 4:.1f}" font-size="10">1e{tick}</text>'
                     f'<line x1="38" x2="{width}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>')
    keys = list(fwd["key"])
    marks = [("first divergence", (result.first_divergence or {}).get("key"), "#cc0000")]
    if result.culprit:
        scope = result.culprit.get("scope") or result.culprit["key"].rsplit("/", 1)[0]
        marks.append(("culprit", next((k for k in keys if k.startswith(scope + "/")), None), "#8800aa"))
    for label, key, color in marks:
        if key in keys:
            i = keys.index(key)
            parts.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="5" y2="{height - 15}" stroke="{color}" '
                         f'stroke-dasharray="4,2"><title>{_e(label)}: {_e(key)}</title></line>'
                         f'<text x="{x(i) + 3:.1f}" y="{height - 4}" font-size="10" fill="{color}">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _axis_charts(found: dict | None, label: str, width: int = 420, height: int = 90) -> str:
    """Small inline SVG per axis of a record's error map: log10 rel L2 per index, the budget dashed."""
    if not found or not found.get("error_map"):
        return ""
    parts = [f"<h3>{_e(label)}: error along each axis of {_e(found.get('error_map_key'))}</h3><p>"]
    for axis in found["error_map"]:
        vals = [math.log10(min(max(v, 1e-12), 1e12)) for v in axis["rel_l2"]]
        budget = math.log10(max(axis["budget"], 1e-12))
        lo, hi = min(vals + [budget]) - 0.5, max(vals + [budget]) + 0.5
        x, y = _scales(len(vals), lo, hi, (5, width - 5), (5, height - 20))
        pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vals))
        parts.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
                     f'aria-label="rel L2 per index of dim {axis["axis"]}">'
                     f'<polyline fill="none" stroke="#3465a4" stroke-width="1" points="{pts}"/>'
                     f'<line x1="5" x2="{width - 5}" y1="{y(budget):.1f}" y2="{y(budget):.1f}" stroke="#cc0000" '
                     f'stroke-dasharray="4,2"><title>budget {axis["budget"]:.3g}</title></line>'
                     f'<text x="5" y="{height - 4}" font-size="10">dim {axis["axis"]} (size {axis["size"]}): '
                     f'{_e(axis["text"])}</text></svg> ')
    return "".join(parts) + "</p>"


def _table(headers, rows, css_rows=None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{_e(css_rows[i])}"' if css_rows else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def render_html(result) -> str:
    lines = headline(result)
    rows = module_rows(result, limit=5000)
    records = []
    if not result.table.empty:
        for r in result.table.head(5000).to_dict("records"):
            records.append([r["key"], r["tgt_dtype"], fmt(r.get("max_abs")), fmt(r.get("rel_l2")),
                            fmt(r.get("cosine"), 6), fmt(r.get("frac_outside")), r.get("worst_index"),
                            "yes" if r["beyond"] else ""])
    meta = json.dumps(result.meta, indent=2, default=str)
    body = [f"<h1>tensordiff report</h1>",
            f'<div class="verdict {_e(result.verdict)}">{_e(lines[0])}</div>',
            "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in lines[1:]) + "</ul>",
            f"<p>Reference: <code>{_e(result.reference)}</code><br>Target: <code>{_e(result.target)}</code></p>",
            "<h2>Relative L2 error per record, execution order</h2>", _chart(result),
            _axis_charts(result.culprit, "Culprit"), _axis_charts(result.first_divergence, "First divergence")]
    if rows:
        body += ["<h2>Error per module</h2><p>local = the module's own error on the target's inputs (- where "
                 "the call was not replayed: measured live, its output was within tolerance); "
                 "amplification = output / input error. Click a header to sort.</p>",
                 _table(MODULE_COLUMNS, rows, [r[-1] for r in rows])]
    back = module_rows(result, limit=5000, direction="backward")
    if back:
        body += ["<h2>Error per module, backward pass</h2><p>input = the gradient a call receives, output = "
                 "the gradients it gives (inputs, parameters), local = its own error: the reference backward "
                 "at the target's inputs and grad_output.</p>", _table(MODULE_COLUMNS, back, [r[-1] for r in back])]
    body += ["<h2>State check (parameters and buffers)</h2>", f"<p>{_e(state_summary_line(result))}</p>"]
    if result.state.rows:
        body.append(_table(STATE_COLUMNS, state_rows_text(result)))
    if result.load:
        loaded = load_rows(result)
        body.append(f"<h2>Checkpoint load ({_e(result.load.get('class'))})</h2>")
        body.append(_table(("tensor", "name"), loaded) if loaded else
                    "<p>every tensor of the model was in the checkpoint, and nothing else</p>")
    nan_lines = nan_section(result)
    if nan_lines:
        body += [f"<h2>{_e(nan_lines[1][3:])}</h2>", f"<pre>{_e(chr(10).join(nan_lines[4:-1]))}</pre>"]
    body += ["<h2>Counts</h2>", _table(("what", "number"), list(result.counts.items()))]
    if result.cost:
        from tensordiff.render.markdown import COST_COLUMNS, cost_lines, cost_rows

        body += ["<h2>Cost side by side</h2>"] + [f"<p>{_e(l)}</p>" for l in cost_lines(result)]
        rows = cost_rows(result)
        if rows:
            body.append(_table(COST_COLUMNS, rows))
    if result.timing:
        body += ["<h2>Timing</h2>", _table(("what", "value"), [(k, fmt(v) if isinstance(v, float) else v)
                                                                for k, v in result.timing.items()])]
    if result.crash:
        body += ["<h2>Crash</h2>", f"<pre>{_e(json.dumps(result.crash, indent=2, default=str))}</pre>"]
    if records:
        body += ["<h2>All matched records</h2>",
                 _table(("key", "target dtype", "max |diff|", "rel L2", "cosine", "outside allclose",
                         "worst index", "beyond"), records)]
    body += ["<h2>Run metadata</h2>", f"<pre>{_e(meta)}</pre>"]
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>tensordiff report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}<script>{_SORT_JS}</script></body></html>\n")
