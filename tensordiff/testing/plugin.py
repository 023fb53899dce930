"""pytest plugin (entry point ``pytest11``: loaded wherever tensordiff is installed, so it imports
nothing heavy until a test asks for its fixture).

    def test_attention(tensordiff_check):
        tensordiff_check(my_attention)                       # sizes from --tensordiff-sizes or the call
        tensordiff_check(my_gemm, torch.matmul, inputs_at=[64, 4096], make_inputs=make)

Options: ``--tensordiff-sizes 4,1024,4096`` replaces every check's sizes (run the same tests at the
sizes of a real deployment); ``--tensordiff-keep DIR`` keeps the model runs' traces and reports.
"""
from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("tensordiff", "kernels against their reference (tensordiff)")
    group.addoption("--tensordiff-sizes", default=None, metavar="SIZES",
                    help="comma-separated sizes for every tensordiff_check (default: each call's own)")
    group.addoption("--tensordiff-keep", default=None, metavar="DIR",
                    help="keep the traces and reports of the model runs under DIR")


def _sizes(text: str | None):
    if not text:
        return None
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise pytest.UsageError(f"--tensordiff-sizes {text!r}: give sizes like 4,1024,4096") from None
    if not sizes or min(sizes) < 1:
        raise pytest.UsageError(f"--tensordiff-sizes {text!r}: give positive sizes")
    return sizes


def pytest_configure(config):
    _sizes(config.getoption("--tensordiff-sizes"))  # a bad value stops the run before any test


@pytest.fixture
def tensordiff_check(request):
    """``check(target, reference=None, **options)``: tensordiff.testing.assert_matches_reference with
    the command line's sizes and keep folder."""
    from pathlib import Path

    from tensordiff.testing import assert_matches_reference

    sizes = _sizes(request.config.getoption("--tensordiff-sizes"))
    keep = request.config.getoption("--tensordiff-keep")

    def check(target, reference=None, **options):
        if sizes:
            options["inputs_at"] = sizes
        if keep and "out" not in options:
            options["out"] = str(Path(keep) / request.node.name)
        return assert_matches_reference(target, reference, **options)

    return check
