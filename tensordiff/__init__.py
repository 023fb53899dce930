"""tensordiff: differential numeric debugging for PyTorch.

    import tensordiff
    tensordiff.capture(model, inputs, "ref.h5", level="both")
    trace = tensordiff.open_trace("ref.h5"); trace.index.head()
"""
from tensordiff.version import __version__  # noqa: F401


def capture(*args, **kwargs):
    from tensordiff.tracing import capture as _capture

    return _capture(*args, **kwargs)


def open_trace(path):
    from tensordiff.trace import open_trace as _open

    return _open(path)


def diff(reference, target, **kwargs):
    """Diff two traces -> DiffResult (.verdict, .culprit, .first_divergence, .table, .to_markdown())."""
    from tensordiff.diff import diff as _diff

    return _diff(reference, target, **kwargs)
