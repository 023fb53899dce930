"""report.md: GitHub-renderable; the same content as the console report."""
from __future__ import annotations

from tensordiff.render.text import fmt, headline

MODULE_COLUMNS = ("module", "input_err", "local_err", "output_err", "max_abs", "amplification", "status")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def module_rows(result, limit: int = 400, direction: str = "forward"):
    mods = result.modules if direction == "forward" else result.backward_modules
    if mods is None or mods.empty:
        return []
    return [[r["module"], fmt(r["input_err"]), fmt(r["local_err"]), fmt(r["output_err"]), fmt(r["max_abs"]),
             fmt(r["amplification"]), r["status"]] for r in mods.head(limit).to_dict("records")]


STATE_COLUMNS = ("name", "status", "reference", "target", "rel_l2", "why")


def state_rows_text(result) -> list[list[str]]:
    return [[r["name"], r["status"], f"{r['ref_dtype'] or '-'} {r['ref_shape'] or ''}",
             f"{r['tgt_dtype'] or '-'} {r['tgt_shape'] or ''}", fmt(r.get("rel_l2")), r.get("why", "")]
            for r in result.state.rows]


def state_summary_line(result) -> str:
    state = result.state
    if not state.compared:
        return "state: not compared (a trace without its model's state)"
    counts = ", ".join(f"{n} {s}" for s, n in sorted(state.counts.items()))
    cast = f"; parameters cast {state.usual_cast}" if state.usual_cast else ""
    return f"state (parameters and buffers): {counts}{cast}; {len(state.rows)} difference(s) shown"


def load_rows(result) -> list[list[str]]:
    load = result.load or {}
    return [[what, name] for what in ("missing", "unexpected", "mismatched") for name in load.get(what) or []]


def state_section(result) -> list[str]:
    out = ["", "## State check (parameters and buffers, reference vs target)", "", state_summary_line(result)]
    rows = state_rows_text(result)
    if rows:
        out += ["", "| " + " | ".join(STATE_COLUMNS) + " |", "|" + "---|" * len(STATE_COLUMNS)]
        out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows[:300]]
    loaded = load_rows(result)
    if result.load:
        out += ["", f"## Checkpoint load ({_cell(result.load.get('class'))})", ""]
        if loaded:
            out += ["| tensor | name |", "|---|---|"] + [f"| {_cell(a)} | {_cell(b)} |" for a, b in loaded[:300]]
        else:
            out += ["every tensor of the model was in the checkpoint, and nothing else"]
    return out


def nan_section(result) -> list[str]:
    """Where the target's NaN / Inf were born, from its trace (the nan-hunt lines)."""
    if not result.nan_hunt or not result.nan_hunt.get("findings"):
        return []
    from tensordiff.render.nan_report import finding_lines

    lines = [line for f in result.nan_hunt["findings"] for line in finding_lines(f)]
    return ["", "## Where NaN / Inf are born (target trace; `tensordiff nan-hunt` on the model names the op "
                "inside a module)", "", "```"] + lines + ["```"]


COST_COLUMNS = ("module (all layers)", "reference self s", "target self s", "slowdown", "target calls",
                "reference allocates", "target allocates", "target's largest buffer")


def cost_rows(result, limit: int = 40) -> list[list[str]]:
    """--timing: modules grouped over layers, the target's extra time first."""
    from tensordiff.analysis.cost import human_bytes as _bytes

    rows = (result.cost or {}).get("modules") or []
    return [[g["module"], fmt(g["ref_self_s"]), fmt(g["tgt_self_s"]),
             f"{g['slowdown_x']:.3g}x" if g.get("slowdown_x") else "-", str(g["tgt_calls"]),
             _bytes(g["ref_alloc"]), _bytes(g["tgt_alloc"]),
             f"{_bytes(g['tgt_largest'])} ({g['tgt_largest_op']})" if g["tgt_largest"] else "-"]
            for g in rows[:limit]]


def cost_lines(result) -> list[str]:
    return [n for n in result.notes if n.startswith(("time per forward", "time (own code", "memory:",
                                                     "timing overhead"))]


def render_markdown(result) -> str:
    out = ["# tensordiff report", ""]
    out += [f"**{_cell(line)}**" if i == 0 else f"- {_cell(line)}" for i, line in enumerate(headline(result))]
    out += ["", f"Reference: `{_cell(result.reference)}`  ", f"Target: `{_cell(result.target)}`", ""]
    rows = module_rows(result)
    if rows:
        out += ["## Error per module (execution order)", "",
                "Errors are relative L2 (||t - r|| / ||r||). *local* = the module's own error on the target's "
                "inputs (- where the call was not replayed: measured live, its output was within tolerance); "
                "*amplification* = output / input error.", "",
                "| " + " | ".join(MODULE_COLUMNS) + " |", "|" + "---|" * len(MODULE_COLUMNS)]
        out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    back = module_rows(result, direction="backward")
    if back:
        out += ["", "## Error per module, backward pass (from the loss towards the inputs)", "",
                "*input* = error of the gradient a call receives (grad_output), *output* = of the gradients "
                "it gives (grad_input, parameter gradients), *local* = the call's own error: the reference "
                "backward at the target's inputs and grad_output.", "",
                "| " + " | ".join(MODULE_COLUMNS) + " |", "|" + "---|" * len(MODULE_COLUMNS)]
        out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in back]
    out += state_section(result)
    out += nan_section(result)
    counts = result.counts
    out += ["", "## Counts", "", "| what | number |", "|---|---|"]
    out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in counts.items()]
    if result.cost:
        out += ["", "## Cost side by side", ""] + [f"- {_cell(l)}" for l in cost_lines(result)]
        rows = cost_rows(result)
        if rows:
            out += ["", "| " + " | ".join(COST_COLUMNS) + " |", "|" + "---|" * len(COST_COLUMNS)]
            out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    if result.timing:
        out += ["", "## Timing (seconds)", "", "| what | value |", "|---|---|"]
        out += [f"| {_cell(k)} | {_cell(fmt(v) if isinstance(v, float) else v)} |" for k, v in result.timing.items()]
    ops = result.unmatched.get("ops") or []
    if ops:
        out += ["", "## Unmatched ops", "", "| side | scope | op |", "|---|---|---|"]
        out += [f"| {o['side']} | {_cell(o['scope'])} | {_cell(o['op'])} |" for o in ops[:100]]
    return "\n".join(out) + "\n"
