"""Walk the tensors inside what a module takes or returns (tuples, lists, dicts, ModelOutput), naming
each by its path: ``input.0``, ``output.logits``. Shared by the trace probes, the observers and
nan-hunt, so it depends on nothing of theirs.

    list(flatten_tensors((hidden, {"mask": m}), "input"))   # [("input.0", hidden), ("input.1.mask", m)]
"""
from __future__ import annotations

import torch


def version_of(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None where it has none (inference tensors). Whether a
    tensor held since it was recorded still holds what was recorded."""
    try:
        return t._version
    except RuntimeError:
        return None


def flatten_tensors(obj, prefix: str, depth: int = 0):
    """(slot, tensor) pairs of every tensor inside tuples, lists and dicts (ModelOutput included)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif depth > 4:
        return
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            yield from flatten_tensors(item, f"{prefix}.{i}", depth + 1)
    elif isinstance(obj, dict) or hasattr(obj, "items") and hasattr(obj, "keys") and not isinstance(obj, type):
        try:
            items = list(obj.items())
        except Exception:  # an exotic mapping-like object (a cache): nothing to capture
            return
        for k, item in items:
            yield from flatten_tensors(item, f"{prefix}.{k}", depth + 1)


def clone_tensors(obj):
    """The same structure with every tensor detached and copied by its own clone op (not deepcopy:
    a device under test may lack the storage copy deepcopy uses)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, obj)
