"""The first record of a comparison table that matters: beyond tolerance, or NaN / Inf on one side
only. Used by the diff (headline) and by localization (where to start), so it lives apart from both.

    first_beyond(table)   # {"key": ..., "module": ..., "rel_l2": ..., ...} or None
"""
from __future__ import annotations

import pandas as pd


def _record_summary(row: dict) -> dict:
    return {"key": row["key"], "seq": int(row["seq"]), "module": row["module"], "op": row["op"] or None,
            "slot": row["slot"],
            "max_abs": row.get("max_abs"), "rel_l2": row.get("rel_l2"), "index": row.get("worst_index"),
            "source": row.get("source") or None}


def first_beyond(table: pd.DataFrame) -> dict | None:
    """Earliest record in target execution order beyond tolerance (forward records first)."""
    if table.empty:
        return None
    for direction in ("forward", "backward"):
        hits = table[(table["direction"] == direction) & table["beyond"]]
        if len(hits):
            return _record_summary(hits.iloc[0].to_dict())
    return None


def first_nan(table: pd.DataFrame) -> dict | None:
    if table.empty:
        return None
    hits = table[(table["nonfinite_mismatch"].fillna(0) > 0)]
    return _record_summary(hits.iloc[0].to_dict()) if len(hits) else None
