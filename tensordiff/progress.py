"""What the job is doing now, for a person watching: one status line (rich spinner on a terminal,
plain lines with --verbose (time since start, peak host memory so far), nothing in a log otherwise). A child process (the isolated target)
sends its status lines to the parent through the breadcrumb descriptor, so a 40 s extension build
in the child is visible too.

    with progress.shown(console_is_tty, verbose):
        progress.status("capturing the reference")
"""
from __future__ import annotations

import contextlib
import os
import sys

_show = None  # callable(text) while a display is open in this process


def status(text: str) -> None:
    fd = os.environ.get("TENSORDIFF_PROGRESS_FD")
    if fd:  # in the isolated child: the parent shows it
        os.write(int(fd), f"status\t{text}\n".encode())
        return
    if _show is not None:
        _show(text)


@contextlib.contextmanager
def shown(tty: bool | None = None, verbose: bool = False):
    """Open the display: a spinner on a TTY, lines on stderr with ``verbose``, else silence."""
    global _show
    tty = sys.stderr.isatty() if tty is None else tty
    if not tty and not verbose:
        yield
        return
    if not tty:
        import time

        start = time.perf_counter()
        _show = lambda text: print(f"tensordiff [{time.perf_counter() - start:6.1f} s, {_peak_rss_gb():5.1f} GB] "  # noqa: E731
                                   f"{text}", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            _show = None
        return
    from rich.console import Console

    with Console(stderr=True).status("starting") as spinner:
        _show = lambda text: spinner.update(text)  # noqa: E731
        try:
            yield
        finally:
            _show = None


def _peak_rss_gb() -> float:
    """This process's peak resident memory so far (a step that needs a lot of host memory shows)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def relay(lines: list[str]) -> None:
    """Show the status lines a child wrote (``status<TAB>text``)."""
    for line in lines:
        if line.startswith("status\t"):
            status(line.split("\t", 1)[1])
