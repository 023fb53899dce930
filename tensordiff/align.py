"""Pair reference and target records.

Module records pair by their stable key. Op records can differ between backends (a fused op on one
side, a decomposition on the other), so inside each module scope the two op sequences are aligned by
op name (longest common subsequence); ops left over are reported as unmatched, never mis-paired.

    alignment = align(ref.index, tgt.index)
    alignment.pairs  # [(ref_key, tgt_key)], in target execution order
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass
class Alignment:
    pairs: list = field(default_factory=list)        # (ref_key, tgt_key)
    ref_only: list = field(default_factory=list)     # keys
    tgt_only: list = field(default_factory=list)
    unmatched_ops: list = field(default_factory=list)  # {"side", "scope", "op", "op_index"}


def _ops_by_scope(index):
    """scope -> (op indices, tokens); a token is the op name with its tensor shapes, so that two
    different implementations are never paired on a name alone (a view of another tensor)."""
    ops = index[index["kind"] == "op"]
    table = {}
    for scope, group in ops.groupby("scope", sort=False):
        tokens = {}
        for op_index, op, slot, shape in zip(group["op_index"], group["op"], group["slot"], group["shape"]):
            name, shapes = tokens.setdefault(op_index, (op, []))
            shapes.append((slot, tuple(shape)))
        order = sorted(tokens)
        table[scope] = (order, [(tokens[i][0], tuple(tokens[i][1])) for i in order])
    return table


def align(ref_index, tgt_index) -> Alignment:
    result = Alignment()
    ref_mod = ref_index[ref_index["kind"] == "module"]
    tgt_mod = tgt_index[tgt_index["kind"] == "module"]
    ref_keys = set(ref_mod["key"])
    tgt_keys = set(tgt_mod["key"])
    pairs = [(k, k) for k in tgt_mod["key"] if k in ref_keys]
    result.ref_only += [k for k in ref_mod["key"] if k not in tgt_keys]
    result.tgt_only += [k for k in tgt_mod["key"] if k not in ref_keys]

    ref_ops, tgt_ops = _ops_by_scope(ref_index), _ops_by_scope(tgt_index)
    # (scope, op_index) -> {slot: key} for each side
    ref_slots = _slots(ref_index)
    tgt_slots = _slots(tgt_index)
    for scope in list(tgt_ops) + [s for s in ref_ops if s not in tgt_ops]:
        r_idx, r_names = ref_ops.get(scope, ([], []))
        t_idx, t_names = tgt_ops.get(scope, ([], []))
        if r_names == t_names:
            matched = list(zip(r_idx, t_idx))
        else:
            sm = difflib.SequenceMatcher(a=r_names, b=t_names, autojunk=False)
            matched = [(r_idx[b.a + i], t_idx[b.b + i]) for b in sm.get_matching_blocks() for i in range(b.size)]
        got_r = {m[0] for m in matched}
        got_t = {m[1] for m in matched}
        for i, name in zip(r_idx, r_names):
            if i not in got_r:
                result.unmatched_ops.append({"side": "reference", "scope": scope, "op": name[0], "op_index": i})
                result.ref_only += list(ref_slots[(scope, i)].values())
        for i, name in zip(t_idx, t_names):
            if i not in got_t:
                result.unmatched_ops.append({"side": "target", "scope": scope, "op": name[0], "op_index": i})
                result.tgt_only += list(tgt_slots[(scope, i)].values())
        for ri, ti in matched:
            rs, ts = ref_slots[(scope, ri)], tgt_slots[(scope, ti)]
            pairs += [(rs[slot], ts[slot]) for slot in ts if slot in rs]
            result.ref_only += [rs[s] for s in rs if s not in ts]
            result.tgt_only += [ts[s] for s in ts if s not in rs]
    seq = dict(zip(tgt_index["key"], tgt_index["seq"]))
    result.pairs = sorted(pairs, key=lambda p: seq[p[1]])
    return result


def _slots(index) -> dict:
    table: dict = {}
    ops = index[index["kind"] == "op"]
    for key, scope, op_index, slot in zip(ops["key"], ops["scope"], ops["op_index"], ops["slot"]):
        table.setdefault((scope, op_index), {})[slot] = key
    return table
