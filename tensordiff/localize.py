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



def _first_input_output(group: pd.DataFrame):
    ins = group[group["slot"].str.startswith("input")]
    outs = group[group["slot"].str.startswith("output")]
    # The main activation: first float input / output (token ids and masks carry no error).
    ins = ins[ins["tgt_dtype"].str.contains("float")]
    outs = outs[outs["tgt_dtype"].str.contains("float")]
    return (ins.iloc[0] if len(ins) else None), (outs.iloc[0] if len(outs) else None)


def module_table(table: pd.DataFrame, tgt_index: pd.DataFrame) -> pd.DataFrame:
    """One row per forward module call, in the order calls finished: input, local and output error."""
    mods = table[(table["kind"] == "module") & (table["direction"] == "forward")]
    if mods.empty:
        return pd.DataFrame(columns=["scope", "module", "input_err", "local_err", "output_err",
                                     "amplification", "status", "seq"])
    local = _local_errors(tgt_index)
    rows = []
    for scope, group in mods.groupby("scope", sort=False):
        inp, out = _first_input_output(group)
        if out is None:
            continue
        in_err = float(inp["rel_l2"]) if inp is not None else 0.0
        out_err = float(out["rel_l2"])
        loc = local.get(scope)
        tol = float(out["tol_rel_l2"])
        amp = out_err / in_err if in_err > 0 else (math.inf if out_err > 0 else 1.0)
        if loc is not None and loc > tol:
            status = "introduces"
        elif out_err > tol and in_err > tol and amp > 1.0:
            status = "amplifies"
        elif out_err > tol and in_err <= tol and loc is None:
            status = "introduces?"
        elif out_err > tol:
            status = "carries"
        else:
            status = "ok"
        rows.append({"scope": scope, "module": out["module"], "input_err": in_err, "local_err": loc,
                     "output_err": out_err, "max_abs": float(out["max_abs"]) if out["max_abs"] == out["max_abs"]
                     else math.nan, "amplification": amp, "status": status, "seq": int(out["seq"]),
                     "source": out.get("source", "")})
    return pd.DataFrame(rows).sort_values("seq").reset_index(drop=True)


def _local_errors(tgt_index: pd.DataFrame) -> dict:
    """scope -> local rel_l2 of the module's first output, where replay recorded one."""
    if "local_rel_l2" not in tgt_index.columns:
        return {}
    rows = tgt_index[(tgt_index["kind"] == "module") & tgt_index["local_rel_l2"].notna()]
    out: dict = {}
    for scope, val in zip(rows["scope"], rows["local_rel_l2"]):
        out.setdefault(scope, float(val))
    return out


def localize(result, ref, tgt) -> None:
    from tensordiff.diff import first_beyond, first_nan

    table = result.table
    result.first_divergence = first_beyond(table)
    result.first_nan = first_nan(table)
    result.modules = module_table(table, tgt.index) if not table.empty else module_table(table, tgt.index)
    result.culprit = None
    if result.crash is not None:
        result.verdict = "crashed"
    elif result.first_nan is not None:
        result.verdict = "nan"
    elif result.first_divergence is not None:
        result.verdict = "diverged"
    elif not (ref.complete and tgt.complete):
        result.verdict = "incomplete"
    else:
        result.verdict = "match"
    if result.verdict in ("diverged", "nan", "crashed"):
        result.culprit = find_culprit(result.modules, table)


def find_culprit(modules: pd.DataFrame, table: pd.DataFrame) -> dict | None:
    if modules.empty:
        return None
    intro = modules[modules["status"].isin(["introduces", "introduces?"])]
    if intro.empty:
        return None
    row = intro.iloc[0]
    return {"key": f"{row['scope']}/output.0", "module": row["module"], "op": None,
            "local_error": row["local_err"], "source": row.get("source") or None}
