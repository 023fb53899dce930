"""The rich console report: verdict, culprit, then the amplification table."""
from __future__ import annotations

from tensordiff.render.markdown import MODULE_COLUMNS, module_rows
from tensordiff.render.text import headline

_STYLE = {"introduces": "bold red", "introduces?": "red", "amplifies": "yellow", "carries": "dim yellow",
          "ok": "green"}
_VERDICT_STYLE = {"match": "bold green", "diverged": "bold red", "nan": "bold red", "crashed": "bold magenta",
                  "incomplete": "bold yellow"}


def render_console(result, console=None, max_rows: int = 60) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    lines = headline(result)
    console.print(Text(lines[0], style=_VERDICT_STYLE.get(result.verdict, "bold")))
    for line in lines[1:]:
        console.print(Text(line))
    rows = module_rows(result)
    if not rows:
        return
    table = Table(title="error per module (rel L2), execution order", show_lines=False)
    for col in MODULE_COLUMNS:
        if col == "module":
            table.add_column(col, overflow="fold", min_width=24)
        else:
            table.add_column(col, justify="left" if col == "status" else "right", no_wrap=True)
    shown = rows
    if len(rows) > max_rows:  # keep the interesting rows: everything not "ok", then fill with the rest
        interesting = [r for r in rows if r[-1] != "ok"]
        shown = interesting[:max_rows] if interesting else rows[:max_rows]
    for row in shown:
        table.add_row(*[Text(str(c)) for c in row[:-1]], Text(row[-1], style=_STYLE.get(row[-1], "")))
    console.print(table)
    if len(shown) < len(rows):
        console.print(Text(f"({len(rows) - len(shown)} more rows in report.md / report.html)", style="dim"))
