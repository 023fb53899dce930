"""Capture built from observers: module calls and aten ops are events (``events.py``); each analysis
is an observer of them (``nan_watch.py``, ``experts.py``). nan-hunt runs on it; the trace recorder and
replay still live in ``tensordiff.probes`` and move here next.

(Not ``tensordiff/capture/``: ``tensordiff.capture`` is the public capture() function.)"""
