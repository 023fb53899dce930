"""The console report, short enough for a terminal and for a CI log: the verdict and its evidence.
The full per-module table lives in report.md / report.html.

    MATCH: the target agrees with the reference within tolerance
    compared 412 records; worst rel L2 8.99e-03 at __root__/forward#0/output.logits; 12.3 s

A divergence adds the culprit, the first divergence and the path that carried it to the output.
"""
from __future__ import annotations

from tensordiff.render.text import fmt, headline

_VERDICT_STYLE = {"match": "bold green", "diverged": "bold red", "nan": "bold red", "crashed": "bold magenta",
                  "incomplete": "bold yellow"}
PATH_LIMIT = 8


def worst_record(result) -> str:
    table = result.table
    if table.empty or "rel_l2" not in table.columns:
        return "nothing compared"
    errors = table["rel_l2"].astype(float).fillna(-1.0)
    row = table.loc[errors.idxmax()]
    return f"worst rel L2 {fmt(row['rel_l2'])} at {row['key']}"


def error_path(result) -> list[str]:
    """From the culprit to the output: the calls after it that amplified the error most, then the
    model's output (at most PATH_LIMIT steps, in execution order)."""
    mods = result.modules
    culprit = result.culprit or {}
    if mods.empty or not culprit.get("scope"):
        return []
    start = mods[mods["scope"] == culprit["scope"]]
    if start.empty:
        return []
    first = start.iloc[0]
    after = mods[mods["seq"] > first["seq"]]
    amplifiers = after[after["status"] == "amplifies"].nlargest(PATH_LIMIT - 2, "amplification").sort_values("seq")
    steps = [f"{first['module']} (introduces, out {fmt(first['output_err'])})"]
    steps += [f"{r['module']} (x{fmt(r['amplification'])} -> {fmt(r['output_err'])})"
              for r in amplifiers.to_dict("records")]
    if len(after):
        last = after.iloc[-1]
        if last["module"] not in [s.split(" ")[0] for s in steps]:
            steps.append(f"{last['module']} (out {fmt(last['output_err'])})")
    return steps


def render_console(result, console=None, seconds: float | None = None) -> None:
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    lines = headline(result)
    console.print(Text(lines[0], style=_VERDICT_STYLE.get(result.verdict, "bold")))
    took = f"; {seconds:.1f} s" if seconds is not None else ""
    console.print(Text(f"compared {result.counts.get('matched', 0)} records; {worst_record(result)}{took}"))
    for line in lines[1:]:
        console.print(Text(line))
    path = error_path(result)
    if path:
        console.print(Text("path to the output: " + " -> ".join(path)))
    if result.state.rows:
        shown = "; ".join(f"{r['name']}: {r['why']}" for r in result.state.rows[:3])
        console.print(Text(f"state differs ({len(result.state.rows)}): {shown}"))
    if result.verdict != "match":
        console.print(Text("full per-module table: report.md / report.html", style="dim"))
