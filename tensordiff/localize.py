"""From per-record metrics to an answer: first divergence, the culprit, amplification, the verdict.

The output error of a record says where error is *visible*; it cannot say who made it. The local
error of a module call is the error that call makes by itself: the reference implementation was run
on the target's own inputs while the target was captured (see probes/replay.py), so upstream error
cancels out. Amplification = output error / input error. The culprit is the deepest module (or op)
whose local error is beyond tolerance; when a module is beyond it and all its children are within,
the error came from the module's own code between its children, and the op is named from op records.

    localize(result, ref_reader, tgt_reader)   # fills result.verdict / culprit / first_divergence
"""
from __future__ import annotations

import math

import pandas as pd

from tensordiff.metrics import local_beyond
from tensordiff.probes.session import ROOT

# Output error at least this many times the input error counts as amplification (below: carried).
AMPLIFY_RATIO = 1.1
# Output error this many times input + local error: the two sides did not run the same module
# (state: weights or buffers that differ), since the call itself and what it was fed are both fine.
INCONSISTENT_RATIO = 10.0


# (input slot prefix, output slot prefix) per direction: a backward call takes the gradient of its
# outputs and gives those of its inputs and parameters.
SLOTS = {"forward": ("input", ("output",)), "backward": ("grad_output", ("grad_input", "param_grad"))}


def _is_float(row: dict) -> bool:
    return "float" in str(row["tgt_dtype"])


def _first_input_output(rows: list[dict], direction: str = "forward"):
    """The main activation of one call: its first float input and output (token ids and masks carry
    no error)."""
    in_prefix, out_prefixes = SLOTS[direction]
    inp = next((r for r in rows if r["slot"].startswith(in_prefix) and _is_float(r)), None)
    out = next((r for r in rows if r["slot"].startswith(out_prefixes) and _is_float(r)), None)
    return inp, out


def _calls(table: pd.DataFrame, direction: str) -> dict[str, list[dict]]:
    """scope -> that module call's records (plain dicts, in table order): a pandas filter per call
    took 1.3 s of a 0.6B model's diff (426 calls)."""
    if table.empty:
        return {}
    mods = table[(table["kind"] == "module") & (table["direction"] == direction)]
    calls: dict[str, list[dict]] = {}
    for row in mods.to_dict("records"):
        calls.setdefault(row["scope"], []).append(row)
    return calls


def _recomputes_flip(module: str, flips: list) -> bool:
    """Does replaying this module re-run a decision that flipped (it is the deciding module or holds
    it)? Then its local error may be the flip's; a module fed the target's decision (the experts
    beside a router) is judged on its own."""
    return any(f["module"] == module or _is_descendant(f["module"], module) for f in flips or [])


def module_table(table: pd.DataFrame, tgt_index: pd.DataFrame, direction: str = "forward",
                 flips: list | None = None) -> pd.DataFrame:
    """One row per module call of one direction, in the order calls finished: input, local and output
    error. Backward: input = the gradient of the outputs, output = that of the inputs (or parameters)."""
    empty = pd.DataFrame(columns=["scope", "module", "input_err", "local_err", "output_err", "max_abs",
                                  "amplification", "status", "seq", "source"])
    calls = _calls(table, direction)
    if not calls:
        return empty
    local = _local_errors(tgt_index, direction)
    names = {r["module"] for group in calls.values() for r in group}
    rows = []
    for scope, group in calls.items():
        inp, out = _first_input_output(group, direction)
        if out is None:
            continue
        in_err = float(inp["rel_l2"]) if inp is not None else 0.0
        out_err = float(out["rel_l2"])
        loc, floor = local.get(scope, (None, None))
        tol = float(out["tol_rel_l2"])
        amp = out_err / in_err if in_err > 0 else (math.inf if out_err > 0 else 1.0)
        if local_beyond(loc, floor, tol) and not _recomputes_flip(out["module"], flips):
            status = "introduces"  # its own error on the target's own inputs, decisions included: no flip explains it
        elif any(r.get("explained") is True for r in group):
            status = "flip"
        elif local_beyond(loc, floor, tol):
            status = "introduces"
        elif loc is not None and loc > tol:
            status = "rounding"  # over budget, but no more than the reference code makes in this dtype
        elif (loc is not None and in_err <= tol and out_err > tol and _is_leaf(out["module"], names)
              and out_err > INCONSISTENT_RATIO * (in_err + loc)):
            # a leaf: nothing but its input, its own code and its state make its output (a composite's
            # local error is that of its own code; its children's errors reach its output too)
            status = "inconsistent"
        elif out_err > tol and in_err > tol and amp > AMPLIFY_RATIO:
            status = "amplifies"
        elif out_err > tol and in_err <= tol and loc is None:
            status = "introduces?"
        elif out_err > tol:
            status = "carries"
        else:
            status = "ok"
        rows.append({"scope": scope, "module": out["module"], "input_err": in_err, "local_err": loc,
                     "local_floor": floor,
                     "output_err": out_err, "max_abs": float(out["max_abs"]) if out["max_abs"] == out["max_abs"]
                     else math.nan, "amplification": amp, "status": status, "seq": int(out["seq"]),
                     "source": out.get("source", "")})
    return pd.DataFrame(rows).sort_values("seq").reset_index(drop=True) if rows else empty


def _is_leaf(module: str, names: set) -> bool:
    return not any(_is_descendant(n, module) for n in names)


def _floor(row) -> float | None:
    v = row.get("local_floor_rel_l2")
    return None if v is None or v != v else float(v)


def _local_errors(tgt_index: pd.DataFrame, direction: str = "forward") -> dict:
    """scope -> (local rel_l2, noise floor or None), where replay ran: of the module's first output
    (forward); the largest over its input and parameter gradients (backward)."""
    if "local_rel_l2" not in tgt_index.columns:
        return {}
    rows = tgt_index[(tgt_index["kind"] == "module") & (tgt_index["direction"] == direction)
                     & tgt_index["local_rel_l2"].notna()]
    out: dict = {}
    for row in rows.to_dict("records"):
        value = (float(row["local_rel_l2"]), _floor(row))
        if direction == "forward":
            out.setdefault(row["scope"], value)
        elif row["scope"] not in out or value[0] > out[row["scope"]][0]:
            out[row["scope"]] = value
    return out


def _parent(module: str) -> str:
    return module.rsplit(".", 1)[0] if "." in module else ROOT


def decision_flips(table: pd.DataFrame) -> list[dict]:
    """Module calls whose integer outputs (top-k indices, masks) differ from the reference although
    their float inputs are within tolerance: a near-tie decided the other way by rounding (a bf16
    router choosing another expert), not a bug. At most a quarter of the decisions may flip."""
    flips = []
    for scope, group in _calls(table, "forward").items():
        outs = [r for r in group if r["slot"].startswith("output")]
        discrete = [r for r in outs if not _is_float(r) and r["max_abs"] > 0]
        if not discrete:
            continue
        floats_in = [r for r in group if r["slot"].startswith("input") and _is_float(r)]
        floats_out = [r for r in outs if _is_float(r)]
        if any(bool(r["beyond"]) for r in floats_in + floats_out):
            continue
        if any(_num(r.get("local_rel_l2")) > r["tol_rel_l2"] for r in floats_out):
            continue
        row = discrete[0]
        changed = float(row["frac_outside"])
        if changed == changed and changed > 0.25:
            continue
        flips.append({"module": row["module"], "scope": scope, "key": row["key"], "changed_fraction": changed,
                      "numel": int(row.get("numel") or 0), "affects": _parent(row["module"])})
    return flips


def _opt(value) -> float | None:
    return None if value is None or value != value else float(value)


def _num(value) -> float:
    """A local error that may be missing (None / NaN) as a number that compares below any budget."""
    return float(value) if value is not None and value == value else -math.inf


def _mark_explained(table: pd.DataFrame, flips: list[dict]) -> None:
    """Records inside the module that consumed a flipped decision are explained by the flip."""
    explained = pd.Series(False, index=table.index)
    for flip in flips:
        parent = flip["affects"]
        inside = table["module"].map(lambda m: m == parent or _is_descendant(m, parent))
        after = table["seq"] >= table.loc[table["key"] == flip["key"], "seq"].min()
        explained |= inside & after & (table["direction"] == "forward")
        # Its backward follows the decision too (gradients flow to the experts each side chose). A
        # record whose own local error (the reference's backward at the target's inputs, decisions
        # included) is beyond tolerance is not explained: a wrong weight gradient stays a finding.
        backward = inside & (table["direction"] == "backward")
        if backward.any():
            own = table[backward].apply(lambda r: local_beyond(_opt(r.get("local_rel_l2")),
                                                               _opt(r.get("local_floor_rel_l2")),
                                                               float(r["tol_rel_l2"]))
                                        and not _recomputes_flip(r["module"], [flip]), axis=1)
            explained |= backward & ~own.reindex(table.index, fill_value=False)
    table["explained"] = explained
    table["beyond"] = table["beyond"] & ~explained


def localize(result, ref, tgt) -> None:
    from tensordiff.first_records import first_beyond, first_nan

    table = result.table
    result.flips = decision_flips(table)
    if not table.empty:
        _mark_explained(table, result.flips)
    for flip in result.flips:
        result.notes.append(
            f"{flip['module']} chose differently for {flip['changed_fraction']:.1%} of its discrete outputs "
            f"(e.g. top-k experts) while its inputs match within tolerance: a rounding near-tie, not a bug; "
            f"differences inside {flip['affects']} that follow from it (forward, and its backward where each "
            f"call's own gradient is right) are not counted as divergence")
    result.first_divergence = first_beyond(table)
    result.first_nan = first_nan(table)
    result.modules = module_table(table, tgt.index, flips=result.flips)
    result.backward_modules = module_table(table, tgt.index, "backward", flips=result.flips)
    result.culprit = None
    if result.crash is not None:
        result.verdict = "crashed"
    elif result.first_nan is not None and (result.first_divergence is None
                                           or result.first_nan["seq"] <= result.first_divergence["seq"]):
        result.verdict = "nan"  # non-finite values are where it starts, not a late consequence
    elif result.first_divergence is not None:
        result.verdict = "diverged"
    elif not (ref.complete and tgt.complete):
        result.verdict = "incomplete"
    else:
        result.verdict = "match"
    if result.verdict in ("diverged", "nan", "crashed") and not table.empty:
        result.culprit = find_culprit(result, tgt)
        if result.culprit is not None:
            _attach_state(result.culprit, result.state)
    if result.verdict == "diverged" and result.culprit is None and rounding_only(result, tgt):
        d = result.first_divergence
        worst = table[table["direction"] == "forward"]["rel_l2"].max()
        explained = table["explained"] if "explained" in table.columns else False
        counted = table[(table["direction"] == "backward") & ~pd.Series(explained, index=table.index, dtype=bool)]
        worst = max(worst, counted["rel_l2"].max()) if len(counted) else worst
        cause = ("errors each call may make (rounding) and the decisions that flipped (above) carried through "
                 "the network" if result.flips else
                 "errors each call may make (rounding) accumulated through the network")
        result.notes.append(
            f"output error exceeds its budget from {d['key']} on (rel L2 up to {worst:.3g}), yet no module or op "
            f"makes an error of its own beyond its tolerance or noise floor: {cause}, not a bug")
        result.rounding = d
        result.first_divergence = None
        result.verdict = "match" if ref.complete and tgt.complete else "incomplete"


def rounding_only(result, tgt) -> bool:
    """Every record over budget is explained by replay: each module call over budget (forward or
    backward) had its local error measured and none is the call's own fault (local_beyond), nothing
    is inconsistent, no op over budget has a local error of its own beyond."""
    index = tgt.index
    if "local_rel_l2" not in index.columns or not index["local_rel_l2"].notna().any():
        return False
    table = result.table
    for direction, mods in (("forward", result.modules), ("backward", result.backward_modules)):
        if mods.empty:
            continue
        if mods["status"].isin(["introduces", "introduces?", "inconsistent"]).any():
            return False
        measured = set(_local_errors(index, direction))
        over = table[(table["kind"] == "module") & (table["direction"] == direction) & table["beyond"]]
        # what a call receives (forward inputs, a backward's grad_output) is made by another call; only
        # what it makes (outputs, grad_input, parameter gradients) needs its own local error
        over = over[~over["slot"].astype(str).str.startswith("grad_output" if direction == "backward" else "input")]
        if not set(over["scope"]) <= measured:
            return False
    if table[(table["kind"] == "op") & table["beyond"] & (table["direction"] != "forward")].shape[0] \
            and not _local_errors(index, "backward"):
        # autograd's ops have no replay of their own: only the module-level backward replay (each
        # module's vector-Jacobian product on the target's own inputs, checked above) can vouch for them
        return False
    ops = table[(table["kind"] == "op") & table["beyond"]]
    return not any(local_beyond(r.get("local_rel_l2"), _floor(r), float(r["tol_rel_l2"]))
                   for r in ops.to_dict("records"))


def _attach_state(culprit: dict, state) -> None:
    """A culprit whose module's parameters or buffers differ between the sides says so."""
    rows = state.for_module(culprit.get("module") or "")
    if rows:
        culprit["state"] = rows
        culprit["why"] += "; its state differs: " + "; ".join(f"{r['name']}: {r['why']}" for r in rows[:3])


def _tol(row, table_tol: dict, policy) -> float:
    return table_tol.get(row["key"]) or policy.for_record(row["key"], row["dtype"]).rel_l2


def _is_descendant(child: str, parent: str) -> bool:
    return parent == ROOT and child != ROOT or child.startswith(parent + ".")


def find_culprit(result, tgt) -> dict | None:
    """Deepest, earliest record whose *local* error is beyond tolerance (see module docstring)."""
    table = result.table
    tgt_index = tgt.index
    table_tol = dict(zip(table["key"], table["tol_rel_l2"]))
    fwd = tgt_index[tgt_index["direction"] == "forward"]
    if "local_rel_l2" in fwd.columns:
        local = fwd[fwd["local_rel_l2"].notna()]
        beyond_local = [r for r in local.to_dict("records")
                        if local_beyond(r["local_rel_l2"], _floor(r), _tol(r, table_tol, result.policy))]
    else:
        beyond_local = []
    if "explained" in table.columns:  # inside a module that consumed a flipped decision
        explained_scopes = set(table.loc[table["explained"], "scope"])
        beyond_local = [r for r in beyond_local if r["scope"] not in explained_scopes
                        or not _recomputes_flip(r["module"], result.flips)]
    ops = [r for r in beyond_local if r["kind"] == "op"]
    if ops:  # an op whose own result, on its own inputs, differs from the reference's: most precise
        row = min(ops, key=lambda r: r["seq"])
        culprit = _culprit(row, row["local_rel_l2"], "op computes a wrong result from its own inputs")
        ins = tgt_index[(tgt_index["scope"] == row["scope"]) & (tgt_index["op_index"] == row["op_index"])
                        & tgt_index["slot"].str.startswith("in.")]
        strided = [f"{r['slot']} shape {r['shape']} stride {r['stride']}" for r in ins.to_dict("records")
                   if not r["contiguous"]]
        if strided:
            culprit["noncontiguous_inputs"] = strided
            culprit["why"] += "; non-contiguous input(s): " + ", ".join(strided)
        experiment = row.get("layout_experiment")
        if isinstance(experiment, str):
            culprit["layout_experiment"] = experiment
            culprit["why"] += "; " + experiment
        return culprit
    mods = [r for r in beyond_local if r["kind"] == "module"]
    if not mods:
        return (_inconsistent_culprit(result) or backward_culprit(result, tgt_index, table_tol)
                or _culprit_without_replay(result))
    names = {r["module"] for r in mods}
    deepest = [r for r in mods if not any(_is_descendant(n, r["module"]) for n in names)]
    row = min(deepest, key=lambda r: r["seq"])
    children_ran = any(_is_descendant(m, row["module"]) for m in set(fwd["module"]))
    why = ("the module's own code between its children (every child's local error is within tolerance)"
           if children_ran else "the module computes a wrong result from its own inputs")
    culprit = _culprit(row, row["local_rel_l2"], why)
    op = culprit_op_in_scope(table, row["scope"], result.unmatched.get("ops", []), tgt)
    if op is not None:
        culprit.update(op=op["op"], op_key=op["key"], source=op.get("source") or culprit["source"])
    return culprit


def _culprit(row: dict, local_err: float, why: str) -> dict:
    return {"key": row["key"], "module": row["module"], "scope": row["scope"],
            "op": row["op"] or None, "local_error": local_err, "source": row.get("source") or None,
            "why": why}


def backward_culprit(result, tgt_index: pd.DataFrame, table_tol: dict) -> dict | None:
    """A forward without fault, a backward with one: the deepest module whose backward, run by the
    reference at the target's inputs with the target's grad_output, gives other input or parameter
    gradients (the earliest in backward order among the deepest)."""
    if "local_rel_l2" not in tgt_index.columns:
        return None
    bwd = tgt_index[(tgt_index["direction"] == "backward") & (tgt_index["kind"] == "module")
                    & tgt_index["local_rel_l2"].notna()]
    beyond = [r for r in bwd.to_dict("records")
              if local_beyond(r["local_rel_l2"], _floor(r), _tol(r, table_tol, result.policy))]
    if not beyond:
        return None
    names = {r["module"] for r in beyond}
    deepest = [r for r in beyond if not any(_is_descendant(n, r["module"]) for n in names)]
    row = min(deepest, key=lambda r: r["seq"])
    if row["slot"].startswith("param_grad"):
        why = (f"its gradient for {row.get('param') or row['slot']} is wrong: the reference backward at the "
               "target's inputs and grad_output gives another one (the forward and its input gradient may "
               "well be right)")
    else:
        why = ("its backward computes a wrong gradient: the reference backward at the target's inputs and "
               f"grad_output gives another {row['slot']}")
    culprit = _culprit(row, row["local_rel_l2"], why)
    culprit["direction"] = "backward"
    return culprit


def _inconsistent_culprit(result) -> dict | None:
    mods = result.modules
    cand = mods[mods["status"] == "inconsistent"] if not mods.empty else mods
    if cand.empty:
        return None
    row = cand.iloc[0]
    return {"key": f"{row['scope']}/output.0", "module": row["module"], "scope": row["scope"], "op": None,
            "local_error": row["local_err"], "source": row.get("source") or None,
            "why": (f"its input (rel L2 {row['input_err']:.2g}) and its own error on the target's inputs "
                    f"({row['local_err']:.2g}) are within tolerance, yet its output is off by "
                    f"{row['output_err']:.2g}: reference and target disagree about this module's state "
                    "(parameters, buffers); see the state table")}


def _culprit_without_replay(result) -> dict | None:
    """No local errors recorded (diff of traces captured without replay): the earliest module whose
    output is beyond tolerance while its input is within (error appeared inside it)."""
    mods = result.modules
    cand = mods[mods["status"] == "introduces?"] if not mods.empty else mods
    if cand.empty:
        return None
    names = set(cand["module"])
    deepest = cand[[not any(_is_descendant(n, m) for n in names) for m in cand["module"]]]
    row = deepest.iloc[0]
    return {"key": f"{row['scope']}/output.0", "module": row["module"], "scope": row["scope"], "op": None,
            "local_error": None, "source": row.get("source") or None,
            "why": "output beyond tolerance while input within (no replay: local error not measured)"}


def culprit_op_in_scope(table: pd.DataFrame, scope: str, unmatched_ops: list, tgt) -> dict | None:
    """Inside one module call, the first op that turns good values into bad ones: an aligned op whose
    inputs match the reference and whose output does not, or a target-only op that changes the value
    it was given (an extra copy or scale the reference does not have)."""
    tgt_index = tgt.index
    ops = tgt_index[(tgt_index["kind"] == "op") & (tgt_index["scope"] == scope)]
    if ops.empty:
        return None
    rows = table[(table["kind"] == "op") & (table["scope"] == scope)]
    by_op = {i: g for i, g in rows.groupby("op_index")} if "op_index" in rows.columns else {}
    target_only = {o["op_index"] for o in unmatched_ops if o["side"] == "target" and o["scope"] == scope}
    for op_index, group in ops.groupby("op_index", sort=True):
        first = group.iloc[0].to_dict()
        if op_index in target_only:
            if _changes_value(group, tgt):
                return first
            continue
        g = by_op.get(op_index)
        if g is None:
            continue
        ins = g[g["slot"].str.startswith("in.")]
        outs = g[g["slot"].str.startswith("out.")]
        if len(outs) and outs["beyond"].any() and not (len(ins) and ins["beyond"].any()):
            return outs.iloc[0].to_dict() | {"op": first["op"]}
    return None


def _changes_value(group: pd.DataFrame, tgt) -> bool:
    """Does a target-only op's first output differ from its (last) input of the same shape? Compared on
    the data when saved (a scrambling copy keeps every statistic), else on the stats."""
    ins = group[group["slot"].str.startswith("in.")]
    outs = group[group["slot"].str.startswith("out.")]
    if outs.empty:
        return False
    out = outs.iloc[0]
    same_shape = ins[[list(s) == list(out["shape"]) for s in ins["shape"]]]
    if same_shape.empty:
        return False
    src = same_shape.iloc[-1]
    if out["has_data"] and src["has_data"]:
        from tensordiff.probes.local_error import local_error

        a, b = tgt.tensor(src["key"]), tgt.tensor(out["key"])
        if not a.is_floating_point():
            return not bool((a == b).all())
        err = local_error(b, a)
        return err is not None and err[0] > 1e-6
    fields = ["mean", "l2", "min", "max"]
    return any(abs(float(out[f]) - float(src[f])) > 1e-6 * (abs(float(src[f])) + 1e-12) for f in fields)
