"""summary.json: the stable, documented machine-readable result (see README, "summary.json").

Top-level keys: schema_version, verdict, culprit, first_divergence, first_nan, crash, tolerances,
timing, counts, unmatched, modules (the amplification table), records (per-record metrics), meta,
nan_hunt (where the target's NaN / Inf were born, schema tensordiff-nan-hunt/1; null without any).
"""
from __future__ import annotations

import json
import math

SUMMARY_VERSION = 1
RECORD_FIELDS = ("key", "ref_key", "kind", "direction", "module", "op", "slot", "shape", "ref_dtype", "tgt_dtype",
                 "max_abs", "mean_abs", "rel_l2", "cosine", "max_rel", "frac_outside", "nan_ref", "nan_tgt",
                 "inf_ref", "inf_tgt", "worst_index", "beyond", "status", "local_rel_l2")


def _clean(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else (None if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return _clean(obj.item())
        except (ValueError, AttributeError):
            return str(obj)
    return obj


def summary_dict(result) -> dict:
    table = result.table
    records = []
    if not table.empty:
        cols = [c for c in RECORD_FIELDS if c in table.columns]
        records = table[cols].to_dict("records")
    modules = result.modules.to_dict("records") if not result.modules.empty else []
    backward = result.backward_modules.to_dict("records") if not result.backward_modules.empty else []
    return _clean({
        "schema_version": SUMMARY_VERSION,
        "verdict": result.verdict,
        "culprit": result.culprit,
        "first_divergence": result.first_divergence,
        "first_nan": result.first_nan,
        "rounding": result.rounding,
        "crash": result.crash,
        "tolerances": result.tolerances,
        "timing": result.timing,
        "counts": result.counts,
        "notes": result.notes,
        "flips": result.flips,
        "unmatched": {k: v[:200] for k, v in result.unmatched.items()},
        "modules": modules,
        "backward_modules": backward,
        "state": result.state.to_dict(),
        "load": result.load,
        "nan_hunt": result.nan_hunt,
        "guard": result.guard,
        "cost": result.cost,
        "records": records,
        "meta": {"reference": result.reference, "target": result.target, **result.meta},
    })


def summary_json(result) -> str:
    return json.dumps(summary_dict(result), indent=2, default=str)
