"""nan-hunt's report as text lines (console and Markdown share them) and as one self-contained HTML
file. Pure functions of ``NanHuntResult``.

    NAN: non-finite values are born in the forward
    born at aten::exp in model.layers.2.mlp (model.py:88 in forward)
      out.0 float16 [1, 128, 512]: 0 NaN, 12 Inf; first at flat 3071 = [0, 5, 511]
      where: all 128 rows; columns 511 of 512
      inputs: in.0 float16 [1, 128, 512] finite, range [-3.2, 11.6]
      spread: 14 later ops in that call, 9 later module calls; model output: output.logits
"""
from __future__ import annotations

import html

from tensordiff.render.text import fmt


def _coords(f: dict) -> str:
    if f.get("first_index") is None:
        return ""
    return f"; first at flat {f['first_index']} = {f.get('first_coords')}"


def _input_line(x: dict) -> str:
    name = f" ({x['tensor']})" if x.get("tensor") else ""
    state = "finite" if not x.get("nonfinite") else f"{x['nonfinite']} NaN/Inf"
    if x.get("constant"):
        state = f"a NaN / Inf constant made by {x['constant']}"
    rng = f", range [{fmt(x.get('min'))}, {fmt(x.get('max'))}]" if "min" in x else ""
    return f"{x['slot']}{name} {x['dtype']} {x['shape']} {state}{rng}"


def finding_lines(f: dict) -> list[str]:
    origin = f.get("origin")
    where = f.get("module") or f.get("scope", "")
    if origin == "input":
        return [f"the model's inputs already hold NaN / Inf ({', '.join(f.get('slots', []))})"]
    if origin == "own_code":
        return [f"NaN / Inf born in the own code of {f['module']} (first seen at {f['key']})", f"  {f['note']}"]
    if origin == "not_reproduced":
        return [f"NaN / Inf first seen in {f.get('scope') or f.get('op')}, not reproduced by a second run",
                f"  {f.get('note', '')}"]
    verb = {"op": "born at", "parameter": "first from a parameter at", "earlier": "first seen at",
            "opaque_call": "born inside"}.get(origin, "at")
    src = f" ({f['source']})" if f.get("source") else ""
    fwd = f.get("forward") or {}
    if f.get("direction") == "backward" and fwd.get("module"):
        where = f"the backward of {fwd['module']}"
    expert = f" for expert {f['expert'][1]}" if f.get("expert") else ""
    lines = [f"{verb} {f['op']} in {where}{expert}{src}"]
    if f.get("node"):
        made = (f"the gradient of {fwd['op']} in {fwd.get('module') or '?'}" if fwd.get("op")
                else f"made in the forward of {fwd['module']}" if fwd.get("module") else "no forward op known")
        lines.append(f"  autograd node {f['node']}: {made}" + (f" ({fwd['source']})" if fwd.get("source") else ""))
    lines.append(f"  {f['slot']} {f['dtype']} {f['shape']}: {f['nan']} NaN, {f['inf']} Inf of {f['numel']}"
                 + _coords(f))
    if f.get("boundary"):
        axes = [b["text"] for b in f["boundary"] if b["size"] > 1]
        if axes:
            lines.append("  where: " + "; ".join(axes))
    for x in f.get("inputs", []):
        lines.append("  input " + _input_line(x))
    for e in f.get("experts", []):
        lines.append(f"  experts of {e['container']} ({e['layout']}): {e['text']}")
        for row in e["per_expert"][:16]:
            lines.append(f"    expert {row['expert']}: {row['op']} nan={row['nan']} inf={row['inf']} "
                         f"first_idx={row['first_index']}")
    b = f.get("bisection")
    if b:
        lines.append(f"  bisection over {b['block']}: {b['text']}")
    sp = f.get("spread") or {}
    if sp:
        parts = [f"{sp.get('ops_in_scope', 0)} later ops in that scope"]
        if "module_calls" in sp:
            parts.append(f"{sp['module_calls']} later module calls (last {sp.get('last_module')})")
        if "backward_ops" in sp:
            parts.append(f"{sp['backward_ops']} later backward ops")
        out = (sp.get("model_output") or {}).get("bad_slots")
        if out:
            parts.append(f"model output: {', '.join(out)}")
        lines.append("  spread: " + "; ".join(parts))
    return lines


def nan_lines(result) -> list[str]:
    if result.clean:
        s = result.screened
        extra = f", {s['backward_ops']} backward ops" if s.get("backward_ops") else ""
        lines = [f"CLEAN: no NaN or Inf ({s.get('tensors', 0)} tensors screened at {s.get('events', 0)} "
                 f"module calls / ops{extra})"]
    else:
        dirs = sorted({f["direction"] for f in result.findings})
        lines = [f"NAN: non-finite values are born in the {' and '.join(dirs)}"]
        for f in result.findings:
            lines += finding_lines(f)
    if result.guard_lines:
        lines.append(f"buffer guard: {len(result.guard_lines)} finding(s)")
        lines += [f"  {line}" for line in result.guard_lines]
    elif result.source.get("guard"):
        lines.append("buffer guard: no overlapping live buffers, no sealed buffer changed")
    lines += [f"note: {n}" for n in result.notes]
    return lines


def nan_markdown(result) -> str:
    src = result.source
    head = ", ".join(f"{k}={v}" for k, v in src.items())
    body = "\n".join(nan_lines(result))
    return f"# tensordiff nan-hunt\n\n{head}\n\n```\n{body}\n```\n"


def nan_html(result) -> str:
    e = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    src = ", ".join(f"{e(k)}={e(v)}" for k, v in result.source.items())
    cls = "clean" if result.clean else "nan"
    lines = nan_lines(result)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>tensordiff nan-hunt</title><style>"
            "body{font:14px system-ui,sans-serif;margin:2em}.clean{background:#d9f2d9}.nan{background:#f8d0d0}"
            "h2{display:inline-block;padding:.3em .6em}pre{background:#f7f7f7;padding:.5em}</style></head><body>"
            f"<h1>tensordiff nan-hunt</h1><p>{src}</p><h2 class='{cls}'>{e(lines[0])}</h2>"
            f"<pre>{e(chr(10).join(lines[1:]))}</pre></body></html>\n")
