"""Replay of one module call's *own code*: the reference module runs on the target's inputs while each
of its children answers with what the target's child returned in that call.

A composite module (a decoder layer, an attention block, the whole model) replayed in full re-runs
every descendant too: its local error then holds the rounding of everything below it (a 28-layer
bf16 stack reads ~0.1 at 2048 tokens with no bug anywhere), and replaying every nesting level costs
one reference forward per level. With the children answering, a composite's local error is the error
of its own code (residual adds, the attention core, masks), every op is replayed once, at its
innermost module. Own code that corrupts what it hands a child is caught too: each child is handed
tensors by the replayed own code, and those are compared with what the target's own code handed it
(the *feed* error).

    calls = [ChildCall("model.layers.0.mlp", ref_inputs, ref_output, dtypes), ...]   # in call order
    out, feed = run_own_code(modules["model.layers.0"], modules, ref_inputs, calls)
"""
from __future__ import annotations

import contextlib
from collections import defaultdict, deque
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map


@dataclass
class ChildCall:
    name: str
    inputs: object   # (args, kwargs): reference copies of what the target's child was given, or None
    output: object   # reference copy of what the target's child returned
    dtypes: object   # the target's dtypes of that output (to hand it over in the target's precision)
    replayed: object = None  # what the fp32 replay of the parent's own code handed the child


class ChildMismatch(Exception):
    """The replayed own code called its children otherwise than the target's did."""


def _clone(obj):
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, obj)


def feed_error(given, recorded) -> float:
    """Largest rel L2 between the float tensors a child was handed by the replay and by the target."""
    from tensordiff.probes.local_error import local_error
    from tensordiff.tensors import flatten_tensors

    if recorded is None:
        return 0.0
    got = dict(flatten_tensors(given, "in"))
    worst = 0.0
    for slot, want in flatten_tensors(recorded, "in"):
        have = got.get(slot)
        if have is None or not want.is_floating_point() or not have.is_floating_point():
            continue
        err = local_error(have.to(want.dtype), want)
        if err is None:
            raise ChildMismatch(f"input {slot} has shape {tuple(have.shape)}, not {tuple(want.shape)}")
        worst = max(worst, err[0])
    return worst


@contextlib.contextmanager
def children_answering(modules: dict, calls: list, answer=None):
    """While open, each child module named in ``calls`` returns its next recorded output (``answer``
    maps a ChildCall to what to return; default: a copy of its output). Yields a one-element list
    holding the largest feed error seen. The fp32 replay (``answer`` None) measures the feed against
    what the target handed the child and keeps what it handed itself; a noise-floor run (an
    ``answer`` in the target's dtypes) measures against that: the reference code's own rounding."""
    queues: dict = defaultdict(deque)
    for call in calls:
        queues[call.name].append(call)
    feed = [0.0]
    saved = {}
    try:
        for name, queue in queues.items():
            mod = modules.get(name)
            if mod is None:
                raise ChildMismatch(f"no module {name} in the reference")
            saved[name] = (mod, mod.__dict__.get("forward"))

            def stub(*args, _queue=queue, **kwargs):
                if not _queue:
                    raise ChildMismatch("a child called more often than in the target")
                call = _queue.popleft()
                if answer is None:
                    call.replayed = (args, kwargs)
                    feed[0] = max(feed[0], feed_error((args, kwargs), call.inputs))
                else:
                    feed[0] = max(feed[0], feed_error((args, kwargs), call.replayed))
                return _clone(call.output if answer is None else answer(call))

            mod.forward = stub
        yield feed
        if any(queues.values()):
            raise ChildMismatch("a child called less often than in the target")
    finally:
        for mod, own in saved.values():
            if own is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = own


def run_own_code(module: torch.nn.Module, modules: dict, ref_inputs, calls: list, answer=None):
    """(output, feed error) of ``module`` on ``ref_inputs`` with its children answering from
    ``calls``; raises ChildMismatch when the call structure differs (the caller replays in full)."""
    args, kwargs = ref_inputs
    with torch.no_grad(), children_answering(modules, calls, answer) as feed:
        out = module(*args, **kwargs)
    return out, feed[0]
