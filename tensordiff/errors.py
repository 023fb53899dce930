"""Two kinds of failure: the user's (one clear line, exit 2) and ours (a bug, with traceback).

    raise TensordiffError("model file 'm.py' has no function 'build'")
"""


class TensordiffError(Exception):
    """Bad input: a missing or corrupt file, an unknown option, an unloadable model or plugin.

    The CLI prints ``error: <message>`` on one line and exits 2; ``--debug`` shows the traceback."""


class InternalError(Exception):
    """A bug in tensordiff itself; always shown with its traceback."""
