"""report.md: GitHub-renderable; the same content as the console report."""
from __future__ import annotations

from tensordiff.render.text import fmt, headline

MODULE_COLUMNS = ("module", "input_err", "local_err", "output_err", "max_abs", "amplification", "status")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def module_rows(result, limit: int = 400):
    mods = result.modules
    if mods.empty:
        return []
    return [[r["module"], fmt(r["input_err"]), fmt(r["local_err"]), fmt(r["output_err"]), fmt(r["max_abs"]),
             fmt(r["amplification"]), r["status"]] for r in mods.head(limit).to_dict("records")]


def render_markdown(result) -> str:
    out = ["# tensordiff report", ""]
    out += [f"**{_cell(line)}**" if i == 0 else f"- {_cell(line)}" for i, line in enumerate(headline(result))]
    out += ["", f"Reference: `{_cell(result.reference)}`  ", f"Target: `{_cell(result.target)}`", ""]
    rows = module_rows(result)
    if rows:
        out += ["## Error per module (execution order)", "",
                "Errors are relative L2 (||t - r|| / ||r||). *local* = the module's own error on the target's "
                "inputs; *amplification* = output / input error.", "",
                "| " + " | ".join(MODULE_COLUMNS) + " |", "|" + "---|" * len(MODULE_COLUMNS)]
        out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    counts = result.counts
    out += ["", "## Counts", "", "| what | number |", "|---|---|"]
    out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in counts.items()]
    if result.timing:
        out += ["", "## Timing (seconds)", "", "| what | value |", "|---|---|"]
        out += [f"| {_cell(k)} | {_cell(fmt(v) if isinstance(v, float) else v)} |" for k, v in result.timing.items()]
    ops = result.unmatched.get("ops") or []
    if ops:
        out += ["", "## Unmatched ops", "", "| side | scope | op |", "|---|---|---|"]
        out += [f"| {o['side']} | {_cell(o['scope'])} | {_cell(o['op'])} |" for o in ops[:100]]
    return "\n".join(out) + "\n"
