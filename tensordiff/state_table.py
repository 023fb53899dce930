"""The state check: parameters and buffers of the reference vs the target, after each backend prepared
its model, checked before any activation is compared.

Each side's trace carries one row per tensor against the state both started from (model_state.py:
same / cast / value / shape / missing / extra). Here the two sides are paired by name. A low-precision
target casts every parameter the same way (float32 -> bfloat16): those rows are expected and only
counted; what is shown is what a real deployment would not do: a tensor missing or extra, another
shape, values beyond the rounding of the common dtype, a non-persistent buffer (rotary ``inv_freq``)
or a tensor cast differently from the parameters.

    table = state_table(ref_meta["state"], tgt_meta["state"])
    table.rows (notable), table.counts, table.for_module("model.rotary_emb")
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

SHOWN = ("missing", "extra", "shape", "value")


@dataclass
class StateTable:
    rows: list = field(default_factory=list)      # notable rows, dicts (see pair_row)
    counts: dict = field(default_factory=dict)    # status -> tensors
    usual_cast: str | None = None                 # "float32 -> bfloat16": how the parameters were cast
    compared: bool = False                        # both traces carried their state

    def for_module(self, module: str) -> list:
        if module in ("", "__root__"):
            return list(self.rows)
        return [r for r in self.rows if r["name"].startswith(module + ".")]

    def to_dict(self) -> dict:
        return {"compared": self.compared, "counts": self.counts, "usual_cast": self.usual_cast,
                "rows": self.rows}


def _pair_row(name: str, ref: dict | None, tgt: dict | None) -> dict:
    row = {"name": name, "ref_dtype": (ref or {}).get("dtype"), "tgt_dtype": (tgt or {}).get("dtype"),
           "ref_shape": (ref or {}).get("shape"), "tgt_shape": (tgt or {}).get("shape"),
           "kind": (tgt or ref or {}).get("kind"), "persistent": (tgt or ref or {}).get("persistent", True),
           "rel_l2": (tgt or {}).get("rel_l2"), "max_abs": (tgt or {}).get("max_abs"),
           "beyond_rounding": (tgt or {}).get("beyond_rounding"),
           **{k: (tgt or {})[k] for k in ("slices", "slices_of", "slice_noun") if k in (tgt or {})}}
    ref_status = (ref or {}).get("status", "missing")
    tgt_status = (tgt or {}).get("status", "missing")
    if ref is None or ref_status == "missing":
        row["status"] = "extra" if tgt_status != "missing" else "same"
    elif tgt is None or tgt_status == "missing":
        row["status"] = "missing"
    elif row["ref_shape"] != row["tgt_shape"] or tgt_status == "shape":
        row["status"] = "shape"
    elif (tgt_status == "value") != (ref_status == "value"):  # one side left the shared state
        row["status"] = "value"
        if ref_status == "value":
            row["rel_l2"], row["max_abs"] = ref.get("rel_l2"), ref.get("max_abs")
            row["beyond_rounding"] = ref.get("beyond_rounding")
            row.update({k: ref[k] for k in ("slices", "slices_of", "slice_noun") if k in ref})
    elif row["ref_dtype"] != row["tgt_dtype"]:
        row["status"] = "cast"
    else:
        row["status"] = "same"
    return row


def state_table(ref_rows: list | None, tgt_rows: list | None) -> StateTable:
    if not ref_rows or not tgt_rows:
        return StateTable()
    ref = {r["name"]: r for r in ref_rows if r.get("status") != "missing"}
    tgt = {r["name"]: r for r in tgt_rows if r.get("status") != "missing"}
    names = list(ref) + [n for n in tgt if n not in ref]
    paired = [_pair_row(n, ref.get(n), tgt.get(n)) for n in names]
    casts = Counter(f"{r['ref_dtype']} -> {r['tgt_dtype']}" for r in paired
                    if r["status"] == "cast" and r["kind"] == "parameter")
    usual = casts.most_common(1)[0][0] if casts else None

    def notable(r):
        if r["status"] in SHOWN:
            return True
        if r["status"] != "cast":
            return False
        unusual = f"{r['ref_dtype']} -> {r['tgt_dtype']}" != usual
        return unusual or not r["persistent"]

    rows = []
    for r in paired:
        if notable(r):
            r["why"] = _why(r, usual)
            rows.append(r)
    return StateTable(rows=rows, counts=dict(Counter(r["status"] for r in paired)), usual_cast=usual,
                      compared=True)


def _why(r: dict, usual: str | None) -> str:
    status = r["status"]
    if status == "missing":
        return "the reference has it, the target does not"
    if status == "extra":
        return "the target has it, the reference does not"
    if status == "shape":
        return f"shape {r['ref_shape']} in the reference, {r['tgt_shape']} in the target"
    if status == "value":
        where = ""
        if r.get("slices"):
            from tensordiff.analysis.boundary import describe_indices

            where = f" in {describe_indices(r['slices'], r['slices_of'], r.get('slice_noun', 'dim-0 slices'))}"
        return (f"values differ beyond the rounding of the common dtype{where} ({r['beyond_rounding']} elements, "
                f"rel L2 {r['rel_l2']:.3g})")
    if not r["persistent"]:
        return (f"non-persistent buffer cast {r['ref_dtype']} -> {r['tgt_dtype']} (rel L2 {r['rel_l2']:.3g}); "
                "a real deployment (from_pretrained with a dtype) keeps it as built")
    return f"cast {r['ref_dtype']} -> {r['tgt_dtype']}, unlike the parameters ({usual or 'not cast'})"
