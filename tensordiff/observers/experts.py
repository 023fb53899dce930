"""Which expert an op works for, inside a mixture-of-experts layer, in either weight layout.

- A ``ModuleList`` of same-class modules (``mlp.experts.17.gate_proj``): the list index of the call;
  ops of the block's own code after expert 17's call (weighting, scatter) work for 17 until the
  next expert is called.
- Fused 3-D parameters (transformers' ``mlp.experts.gate_up_proj`` [E, 2I, H]): the slice the
  module's code takes of its fused parameter (``gate_up_proj[17]``); ops after it work for that
  expert until the next slice.

A container only counts as experts once a router confirmed it: a ``topk`` over exactly E entries
ran inside the container's parent call but outside the container (``mlp.gate`` beside
``mlp.experts``). That keeps ``model.layers`` (a ModuleList too) from ever being called experts.

    tracker = ExpertTracker(model)     # fed by an observer: enter / leave / on_op
    tracker.current(op)                # ("model.layers.1.mlp.experts", 17) or None
"""
from __future__ import annotations

from collections import defaultdict

import torch

from tensordiff.analysis.boundary import describe_indices
from tensordiff.schema import ROOT


def _parent(name: str) -> str:
    return name.rpartition(".")[0] or ROOT


def expert_containers(model: torch.nn.Module) -> tuple[dict, dict]:
    """(ModuleList name -> expert count, fused module name -> (expert count, {data_ptr: param}))."""
    lists, fused = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1:
            lists[name] = len(mod)
        params = [(n, p) for n, p in mod.named_parameters(recurse=False)
                  if p.ndim == 3 and p.is_floating_point() and p.device.type != "meta"]
        sizes = {p.shape[0] for _, p in params}
        if params and len(sizes) == 1 and sizes.pop() >= 2:
            fused[name or ROOT] = (params[0][1].shape[0], {p.data_ptr(): (n, p) for n, p in params})
    return lists, fused


class ExpertTracker:
    def __init__(self, model: torch.nn.Module):
        self.lists, self.fused = expert_containers(model)
        self.confirmed: set[str] = set()
        self.routers: list[dict] = []          # every top-k seen: scopes around it, n, k
        self._slice: dict[str, int] = {}       # open fused container call scope -> current expert
        self._after: dict[str, tuple] = {}     # open block call scope -> the expert call that left last
        self.ran: dict[str, set] = defaultdict(set)
        self.born_in: dict[tuple, dict] = {}   # (container, expert) -> first non-finite op of it

    # -- events -----------------------------------------------------------------------------------
    def enter(self, call) -> None:
        if call.name in self.fused:
            self._slice.pop(call.scope, None)
        head, _, last = call.name.rpartition(".")
        if last.isdigit() and head in self.lists:
            self.ran[head].add(int(last))

    def leave(self, call) -> None:
        self._slice.pop(call.scope, None)
        self._after.pop(call.scope, None)
        head, _, last = call.name.rpartition(".")
        if last.isdigit() and head in self.lists and call.parent is not None:
            self._after[call.parent.scope] = (head, int(last))

    def on_op(self, op, args, out) -> None:
        name = op.name
        if name == "aten::topk" and args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 1:
            self._router(op, int(args[0].shape[-1]), int(args[1]) if len(args) > 1 else 1)
            return
        if args and isinstance(args[0], torch.Tensor):
            self._fused_slice(op, args, out)

    def _router(self, op, n: int, k: int) -> None:
        chain = []
        call = op.module
        while call is not None:
            chain.append(call)
            call = call.parent
        names = {c.name for c in chain}
        self.routers.append({"scopes": [c.scope for c in chain], "experts": n, "top_k": k})
        for container, size in list(self.lists.items()) + [(c, v[0]) for c, v in self.fused.items()]:
            inside = any(x == container or x.startswith(container + ".") for x in names)
            if size == n and _parent(container) in names and not inside:
                self.confirmed.add(container)

    def _fused_slice(self, op, args, out) -> None:
        """An op inside a fused container that takes one expert's slice of its 3-D parameter."""
        call = op.module
        while call is not None and call.name not in self.fused:
            call = call.parent
        if call is None:
            return
        n, params = self.fused[call.name]
        src = args[0]
        hit = params.get(src.data_ptr())
        if hit is None or tuple(src.shape) != tuple(hit[1].shape) or not isinstance(out, torch.Tensor) \
                or out.ndim != src.ndim - 1:
            return
        index = None
        if out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():  # a view: from its offset
            step = src.stride(0) * src.element_size()
            index = (out.data_ptr() - src.data_ptr()) // step if step else None
        elif len(args) > 1 and isinstance(args[1], (list, tuple)) and args[1] and \
                isinstance(args[1][0], torch.Tensor) and args[1][0].numel() == 1:
            index = int(args[1][0])
        if index is not None and 0 <= index < n:
            self._slice[call.scope] = int(index)
            self.ran[call.name].add(int(index))

    # -- attribution -----------------------------------------------------------------------------
    def current(self, op) -> tuple[str, int] | None:
        call = op.module
        while call is not None:
            if call.name in self.fused and call.scope in self._slice and call.name in self.confirmed:
                return call.name, self._slice[call.scope]
            head, _, last = call.name.rpartition(".")
            if last.isdigit() and head in self.confirmed and head in self.lists:
                return head, int(last)
            after = self._after.get(call.scope)
            if after is not None and after[0] in self.confirmed:
                return after
            call = call.parent
        return None

    def born(self, expert: tuple[str, int], op: str, nan: int, inf: int, first: int | None) -> None:
        self.born_in.setdefault(expert, {"expert": expert[1], "op": op, "nan": nan, "inf": inf,
                                         "first_index": first})

    def size(self, container: str) -> int:
        return self.lists.get(container) or self.fused[container][0]

    def report(self) -> list[dict]:
        """Per confirmed container with non-finite values born in an expert: the experts, as a range."""
        out = []
        for container in sorted({c for c, _ in self.born_in}):
            if container not in self.confirmed:
                continue
            n = self.size(container)
            rows = sorted((v for (c, _), v in self.born_in.items() if c == container), key=lambda r: r["expert"])
            bad = [r["expert"] for r in rows]
            ran = sorted(self.ran.get(container, set()) | set(bad))
            clean = len(set(ran) - set(bad))
            text = describe_indices(bad, n, "experts")
            text += f"; {clean} other routed experts clean" if clean else ""
            text += f"; {n - len(ran)} not routed" if len(ran) < n else ""
            out.append({"container": container, "experts_total": n, "bad_experts": bad, "routed": len(ran),
                        "per_expert": rows, "layout": "module list" if container in self.lists else "fused",
                        "text": text, "method": "attribution"})
        return out
