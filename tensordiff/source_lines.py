"""'file.py:LINE in func' of the user's code that is running: the innermost frame outside torch and
tensordiff's own capture machinery. Shared by the probes, the observers and nan-hunt.

    user_source_line()   # '/src/model.py:88 in forward'
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parent
# Frames of torch and of tensordiff's own capture machinery are never "the user's line"; backends
# shipped in tensordiff (echo_npu's attention) are user code from the probes' point of view.
_SKIP_DIRS = (str(Path(torch.__file__).parent), str(_PACKAGE / "probes"), str(_PACKAGE / "observers"),
              str(_PACKAGE / "analysis"), str(_PACKAGE / "tracing.py"), str(_PACKAGE / "run.py"),
              str(_PACKAGE / "child.py"), str(_PACKAGE / "source_lines.py"),
              str(_PACKAGE / "guard.py"))


_SKIP_FILE: dict[str, bool] = {}  # co_filename -> not user code (a dict hit instead of prefix tests)


def is_skipped_file(fname: str) -> bool:
    """Frames of this file are never 'the user's line' (torch, tensordiff's capture machinery)."""
    return fname.startswith(_SKIP_DIRS) or fname.startswith("<")


def user_source_line(max_depth: int = 64, start: int = 1) -> str:
    """'file.py:LINE in func' of the innermost frame outside torch and tensordiff. ``start`` skips
    frames known to be ours without materialising them (each frame object costs ~1 us on 3.12)."""
    try:
        frame = sys._getframe(start)
    except ValueError:
        frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        code = frame.f_code
        fname = code.co_filename
        skip = _SKIP_FILE.get(fname)
        if skip is None:
            skip = _SKIP_FILE[fname] = is_skipped_file(fname)
        if not skip:
            return f"{fname}:{frame.f_lineno} in {code.co_name}"
        frame = frame.f_back
    return ""
