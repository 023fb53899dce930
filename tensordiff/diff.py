"""Compare a reference trace with a target trace: metrics per matched record, then localization.

    result = diff("runs/x/reference.h5", "runs/x/target.h5")
    result.verdict, result.first_divergence, result.culprit, result.table.head()
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import pandas as pd

from tensordiff.align import align
from tensordiff.errors import TensordiffError
from tensordiff.metrics import Tolerance, beyond, compare, tolerance_for, unravel
from tensordiff.state_table import StateTable, state_table
from tensordiff.trace import TraceReader, open_trace

VERDICTS = ("match", "diverged", "nan", "crashed", "incomplete")


@dataclass
class DiffResult:
    verdict: str
    reference: str
    target: str
    table: pd.DataFrame
    first_divergence: dict | None = None
    culprit: dict | None = None
    first_nan: dict | None = None
    tolerances: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    unmatched: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    cost: dict | None = None   # time per forward per side; with --timing per module (analysis/cost)
    guard: dict | None = None  # --guard: the target's buffer findings (summary lines, findings)
    crash: dict | None = None
    flips: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    modules: pd.DataFrame = field(default_factory=pd.DataFrame)  # the amplification table
    backward_modules: pd.DataFrame = field(default_factory=pd.DataFrame)  # the same, backward pass
    state: StateTable = field(default_factory=StateTable)  # parameters and buffers, ref vs tgt
    rounding: dict | None = None  # first record over budget when replay shows it is accumulated rounding
    load: dict | None = None  # what loading the checkpoint reported (missing / unexpected tensors)
    nan_hunt: dict | None = None  # where the target's NaN / Inf were born (analysis/nan_hunt.hunt_trace)

    def to_markdown(self) -> str:
        from tensordiff.render.markdown import render_markdown

        return render_markdown(self)

    def to_html(self) -> str:
        from tensordiff.render.html import render_html

        return render_html(self)

    def to_summary(self) -> dict:
        from tensordiff.render.summary import summary_dict

        return summary_dict(self)


@dataclass(frozen=True)
class TolerancePolicy:
    """Default tolerance from the target dtype; optional global override and per-pattern overrides
    (fnmatch patterns on the record key, first match wins)."""
    default: Tolerance | None = None
    per_pattern: tuple = ()   # ((pattern, Tolerance), ...)

    def for_record(self, key: str, tgt_dtype: str) -> Tolerance:
        for pattern, tol in self.per_pattern:
            if fnmatch.fnmatchcase(key, pattern):
                return tol
        return self.default or tolerance_for(tgt_dtype)


def tolerance_policy(atol: float | None = None, rtol: float | None = None, rel_l2: float | None = None,
                     per_pattern: tuple = ()) -> TolerancePolicy:
    """The policy of --atol / --rtol / --rel-l2 / --tol; the capture judges local errors by it too."""
    default = None
    if atol is not None or rtol is not None or rel_l2 is not None:
        base = tolerance_for("float32")
        default = Tolerance(atol if atol is not None else base.atol, rtol if rtol is not None else base.rtol,
                            rel_l2 if rel_l2 is not None else base.rel_l2)
    return TolerancePolicy(default, tuple(per_pattern))


def _metrics_from_stats(r: dict, t: dict) -> dict:
    """Lower bounds when only stats were saved: |l2_t - l2_r| <= ||t - r||."""
    l2r, l2t = r["l2"], t["l2"]
    rel = abs(l2t - l2r) / l2r if l2r else (0.0 if l2t == 0 else math.inf)
    nan_mis = int(max(t["nan"] - r["nan"], 0) + max(t["inf"] - r["inf"], 0))
    return {"status": "ok", "max_abs": max(abs(t["max"] - r["max"]), abs(t["min"] - r["min"])),
            "mean_abs": abs(t["mean"] - r["mean"]), "rel_l2": rel, "cosine": float("nan"),
            "max_rel": float("nan"), "frac_outside": float("nan"), "nan_ref": int(r["nan"]),
            "nan_tgt": int(t["nan"]), "inf_ref": int(r["inf"]), "inf_tgt": int(t["inf"]),
            "nonfinite_mismatch": nan_mis, "worst_flat": -1, "from_stats": True}


def _read_pair(ref: TraceReader, tgt: TraceReader, rrow: dict, trow: dict):
    """Both sides' tensors of one aligned pair, or None where metrics come from stats alone."""
    if list(rrow["shape"]) != list(trow["shape"]) or not (rrow["has_data"] and trow["has_data"]):
        return None
    return ref.tensor(rrow["key"]), tgt.tensor(trow["key"])


def _row_metrics(rrow: dict, trow: dict, tol: Tolerance, tensors, live: bool = False) -> dict:
    if list(rrow["shape"]) != list(trow["shape"]):
        return {"status": "shape_mismatch"}
    if tensors is not None:
        m = compare(*tensors, tol)
        m["from_stats"] = False
        return m
    if live:  # measured against this very reference while the target ran (observers/live_compare)
        from tensordiff.observers.live_compare import metrics_from_live

        m = metrics_from_live(trow, rrow, trow)
        if m is not None:
            return m
    return _metrics_from_stats(rrow, trow)


def _prefetched_pairs(ref: TraceReader, tgt: TraceReader, pairs: list):
    """(rrow, trow, tensors) for each aligned pair, the next pair read in a thread while this one is
    compared (reading 12.5 GB and comparing it on the GPU took 8 s one after the other)."""
    from concurrent.futures import ThreadPoolExecutor

    rows = [(ref.rows[rkey], tgt.rows[tkey]) for rkey, tkey in pairs]
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(_read_pair, ref, tgt, *rows[0]) if rows else None
        for i, (rrow, trow) in enumerate(rows):
            tensors = ahead.result()
            ahead = pool.submit(_read_pair, ref, tgt, *rows[i + 1]) if i + 1 < len(rows) else None
            yield rrow, trow, tensors


# fp64 judge (torch's accuracy minifier rule, `same(..., fp64_ref)`): wrong when the target's error to
# fp64 exceeds MULTIPLIER x the noise floor's error to fp64 plus a tenth of the tolerance.
JUDGE_MULTIPLIER = 2.0


def _judge(judge: dict, key: str, trow: dict, tol: Tolerance, tgt: TraceReader) -> dict:
    """Errors to an fp64 run of the reference: the target's, and the noise floor's (the reference
    implementation run in the target's dtype, so bf16 rounding is not called a bug)."""
    fp64, floor = judge["fp64"], judge["floor"]
    if key not in fp64.rows or key not in floor.rows or not trow["has_data"]:
        return {}
    exact = fp64.tensor(key)
    if not exact.is_floating_point() or list(exact.shape) != list(trow["shape"]):
        return {}
    err_tgt = compare(exact, tgt.tensor(key), tol)["rel_l2"]
    err_floor = compare(exact, floor.tensor(key), tol)["rel_l2"]
    wrong = err_tgt > JUDGE_MULTIPLIER * err_floor + tol.rel_l2 / 10
    return {"fp64_err_tgt": err_tgt, "fp64_err_floor": err_floor, "fp64_wrong": wrong}


def compare_traces(ref: TraceReader, tgt: TraceReader, policy: TolerancePolicy,
                   judge: dict | None = None) -> tuple[pd.DataFrame, object]:
    tindex = tgt.index
    if "drill" in tindex.columns:  # drill-down op records have no reference counterpart by design
        tindex = tindex[tindex["drill"].isna() | (tindex["drill"] != True)]  # noqa: E712
    alignment = align(ref.index, tindex)
    live = tgt.meta.get("live_reference") is not None and tgt.meta.get("live_reference") == ref.meta.get("run_id")
    rows = []
    for rrow, trow, tensors in _prefetched_pairs(ref, tgt, alignment.pairs):
        rkey, tkey = rrow["key"], trow["key"]
        tol = policy.for_record(tkey, trow["dtype"])
        # memory no op has written yet (aten::empty...) holds the allocator's leftovers on both sides
        uninitialized = rrow.get("uninitialized") is True or trow.get("uninitialized") is True
        m = {"status": "uninitialized"} if uninitialized else _row_metrics(rrow, trow, tol, tensors, live and rkey == tkey)
        del tensors
        judged = _judge(judge, tkey, trow, tol, tgt) if judge and not uninitialized else {}
        rows.append({
            "key": tkey, "ref_key": rkey, "seq": trow["seq"], "kind": trow["kind"],
            "direction": trow["direction"], "module": trow["module"], "scope": trow["scope"],
            "op": trow["op"], "slot": trow["slot"], "source": trow["source"], "shape": trow["shape"],
            "ref_dtype": rrow["dtype"], "tgt_dtype": trow["dtype"],
            "ref_stride": rrow["stride"], "tgt_stride": trow["stride"], "tgt_contiguous": trow["contiguous"],
            "ref_mean": rrow["mean"], "tgt_mean": trow["mean"], "ref_std": rrow["std"], "tgt_std": trow["std"],
            "ref_max": rrow["max"], "tgt_max": trow["max"],
            "op_index": trow["op_index"], "local_rel_l2": trow.get("local_rel_l2"),
            **{k: v for k, v in m.items()},
            "worst_index": unravel(m.get("worst_flat", -1), trow["shape"]),
            "atol": tol.atol, "rtol": tol.rtol, "tol_rel_l2": tol.rel_l2,
            "beyond": False if uninitialized else
                      judged["fp64_wrong"] or m.get("nonfinite_mismatch", 0) > 0 if judged else beyond(m, tol),
            **judged,
        })
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values("seq").reset_index(drop=True)
    return table, alignment


def load_notes(load: dict | None) -> list[str]:
    """Plain words for what the checkpoint lacked or had in excess: never a silent random init."""
    if not load:
        return []
    notes = []
    for what, text in (("missing", "the checkpoint lacks {n} tensor(s) that {cls} needs; they were "
                                   "initialised at random (the same values on both sides): {names}"),
                       ("unexpected", "the checkpoint has {n} tensor(s) that {cls} does not use: {names}"),
                       ("mismatched", "{n} tensor(s) of the checkpoint have another shape in {cls} and "
                                      "were initialised at random: {names}")):
        names = load.get(what) or []
        if names:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            notes.append(text.format(n=len(names), cls=load.get("class", "the model"), names=shown))
    return notes


def state_notes(state: StateTable) -> list[str]:
    if not state.rows:
        return []
    names = ", ".join(r["name"] for r in state.rows[:4]) + (", ..." if len(state.rows) > 4 else "")
    return [f"state: {len(state.rows)} parameter/buffer difference(s) between reference and target "
            f"beyond the usual cast ({names}); see the state table"]


def diff(reference, target, atol: float | None = None, rtol: float | None = None, rel_l2: float | None = None,
         per_pattern: tuple = (), crash: dict | None = None, timing: dict | None = None,
         fp64=None, floor=None) -> DiffResult:
    """Diff two trace files (paths or open readers). With ``fp64`` (a trace of the reference in
    float64) and ``floor`` (the reference in the target's dtype), records are judged by the fp64 rule
    instead of the plain tolerance: noise in the target's precision is not a divergence."""
    ref = reference if isinstance(reference, TraceReader) else open_trace(reference)
    tgt = target if isinstance(target, TraceReader) else open_trace(target)
    policy = tolerance_policy(atol, rtol, rel_l2, per_pattern)
    default = policy.default
    judge = None
    if fp64 is not None and floor is not None:
        judge = {"fp64": fp64 if isinstance(fp64, TraceReader) else open_trace(fp64),
                 "floor": floor if isinstance(floor, TraceReader) else open_trace(floor)}
    table, alignment = compare_traces(ref, tgt, policy, judge)
    from tensordiff.localize import localize

    ref_meta = {k: v for k, v in ref.meta.items() if k not in ("state", "load")}
    tgt_meta = {k: v for k, v in tgt.meta.items() if k not in ("state", "load")}
    result = DiffResult(verdict="match", reference=str(ref.path), target=str(tgt.path), table=table,
                        meta={"reference": ref_meta, "target": tgt_meta,
                              "reference_complete": ref.complete, "target_complete": tgt.complete},
                        crash=crash, timing=timing or {},
                        state=state_table(ref.meta.get("state"), tgt.meta.get("state")),
                        load=tgt.meta.get("load") or ref.meta.get("load"))
    result.notes += load_notes(result.load) + state_notes(result.state)
    result.policy = policy
    result.unmatched = {"reference_only": alignment.ref_only, "target_only": alignment.tgt_only,
                        "ops": alignment.unmatched_ops}
    tgt_dtypes = sorted(set(table["tgt_dtype"])) if not table.empty else []
    result.tolerances = {"default": vars(default) if default else
                         {d: vars(tolerance_for(d)) for d in tgt_dtypes},
                         "per_pattern": {p: vars(t) for p, t in per_pattern},
                         "judge": (f"fp64: wrong when err(target, fp64) > {JUDGE_MULTIPLIER} x err(reference in "
                                   "target dtype, fp64) + rel_l2 / 10") if judge else "tolerance"}
    result.counts = {"reference_records": len(ref.index), "target_records": len(tgt.index),
                     "matched": len(table), "beyond_tolerance": int(table["beyond"].sum()) if len(table) else 0,
                     "reference_only": len(alignment.ref_only), "target_only": len(alignment.tgt_only)}
    if len(table) == 0 and (len(ref.index) or len(tgt.index)) and crash is None:
        raise TensordiffError(f"no record of {tgt.path} matches a record of {ref.path}: "
                              "were they captured from the same model?")
    localize(result, ref, tgt)
    result.notes += live_notes(tgt.meta, ref.meta)
    result.notes += drill_notes(tgt.meta.get("drill_down"), result.culprit)
    result.notes += kernel_notes(tgt.index, tgt.meta.get("backend") or {}, policy)
    result.notes += (tgt.meta.get("attention_rule") or {}).get("lines") or []
    lora_note = tgt.meta.get("lora_note") or ref.meta.get("lora_note")  # the parent's build says it
    if lora_note:
        result.notes.append(lora_note)
    imported = tgt.meta.get("import")
    if imported:  # an engine outside PyTorch: say what the localization rests on
        result.notes.append(f"target imported from {tgt.meta['backend'].get('dump')} by "
                            f"{tgt.meta['backend'].get('map')}: {imported['records']} records; local error: "
                            f"{imported['local_error']}"
                            + (f"; {len(imported['unmapped_names'])} dumped names unmapped"
                               if imported["unmapped_names"] else ""))
    result.notes += expert_probe_notes(tgt.meta.get("expert_probe") or {}, result.culprit)
    attach_error_maps(result, ref, tgt)
    from tensordiff.analysis.cost import cost_section

    result.cost, lines = cost_section(result.timing, ref.meta, tgt.meta)
    result.notes += lines
    guard = tgt.meta.get("guard")
    if guard is not None:
        result.guard = guard
        result.notes += [f"buffer guard: {line}" for line in guard["summary"]] or \
            ["buffer guard: no overlapping live buffers, no sealed buffer changed"]
    if result.first_nan is not None:  # the target has NaN / Inf the reference lacks: where were they born
        from tensordiff.analysis.nan_hunt import hunt_trace

        result.nan_hunt = hunt_trace(tgt).to_dict()
    return result


# kt-kernel's own MoE tests accept a kernel whose mean |diff| / mean |ref| to an fp32 reference is
# below this; our verdict rests on the relative L2 budget, and both figures are shown.
KERNEL_AUTHORS_BAR = 0.05


def kernel_notes(tgt_index, backend: dict, policy) -> list[str]:
    """One line per external kernel the target ran (modules marked ``tensordiff_kernel``): its worst
    local error over all its calls in both figures, kernel authors' and ours."""
    if "local_mean_abs_ratio" not in tgt_index.columns:
        return []
    rows = tgt_index[tgt_index["local_mean_abs_ratio"].notna()]
    if rows.empty:
        return []
    worst_ratio = float(rows["local_mean_abs_ratio"].max())
    worst_l2 = float(rows["local_rel_l2"].max())
    budget = policy.for_record(rows.index[0], rows.iloc[0]["dtype"]).rel_l2
    name = backend.get("kernel") or "external kernel"
    return [f"kernel {name}: {len(rows)} call(s), each against the fp32 reference on the kernel's own inputs: "
            f"mean|diff|/mean|ref| at most {worst_ratio:.3g} (kernel authors' bar {KERNEL_AUTHORS_BAR}: "
            f"{'passes' if worst_ratio < KERNEL_AUTHORS_BAR else 'FAILS'}), relative L2 at most {worst_l2:.3g} "
            f"(our budget {budget:.3g}: {'within' if worst_l2 <= budget else 'BEYOND'})"]


def attach_error_maps(result: DiffResult, ref: TraceReader, tgt: TraceReader) -> None:
    """The culprit's and the first divergence's records get their error per index of each axis
    (analysis/error_map): where in the tensor the error sits."""
    from tensordiff.analysis.error_map import error_map, map_lines

    table = result.table
    if table.empty:
        return
    rows = {r["key"]: r for r in table[["key", "ref_key", "tol_rel_l2"]].to_dict("records")}
    for found in (result.culprit, result.first_divergence):
        key = (found or {}).get("op_key") or (found or {}).get("key")
        row = rows.get(key)
        if row is None or not (ref.rows[row["ref_key"]]["has_data"] and tgt.rows[key]["has_data"]):
            continue
        axes = error_map(ref.tensor(row["ref_key"]), tgt.tensor(key), float(row["tol_rel_l2"]))
        found["error_map"] = axes
        found["error_map_lines"] = map_lines(axes)
        found["error_map_key"] = key


def expert_probe_notes(probes: dict, culprit: dict | None) -> list[str]:
    """The per-expert probe's verdict for each experts call it ran on; the culprit's why names its
    experts."""
    notes = []
    for scope, probe in probes.items():
        notes.append(f"per-expert probe of {scope} (each expert alone on the call's {probe['tokens']} tokens, "
                     f"target against the reference): {probe['text']}")
        if culprit and culprit.get("scope") == scope and probe["beyond"]:
            culprit["experts"] = probe["beyond"]
            culprit["why"] = culprit.get("why", "") + f"; per expert: {probe['text']}"
    return notes


def live_notes(tgt_meta: dict, ref_meta: dict) -> list[str]:
    """Say how the target was compared when it was measured against the reference as it ran."""
    live = tgt_meta.get("live")
    if not live:
        return []
    if tgt_meta.get("live_reference") != ref_meta.get("run_id"):
        return ["the target was measured live against another reference trace: records it saved without "
                "data are compared from stats here (lower bounds)"]
    text = (f"live comparison: {live['records_measured']} records measured against the reference as the "
            f"target ran; {live['calls_replayed']} call(s) beyond tolerance replayed, {live['records_saved']} "
            "record(s) saved with data (--no-live replays every call and saves every tensor)")
    if live.get("beyond_not_replayed_count"):
        text += (f"; {live['beyond_not_replayed_count']} call(s) beyond tolerance came after the memory share for "
                 f"held tensors was used up and were not replayed (first: {live['beyond_not_replayed'][0]}): "
                 "run with --no-live to replay every call")
    if live.get("records_not_kept"):
        text += (f"; {live['records_not_kept']} record(s) without a kept reference (changed in place after "
                 "they were recorded, or past the memory share) compared from stats where no data was saved")
    return [text]


def drill_notes(drill: dict | None, culprit: dict | None) -> list[str]:
    """Say that a drill-down ran, where, and what it found."""
    if not drill:
        return []
    if not drill.get("ran"):
        return [f"drill-down of {drill['scope']} at op level did not run: {drill.get('why')}"]
    text = f"drill-down: {drill['scope']} was re-run at op level on the target's own inputs"
    if culprit and culprit.get("scope") == drill["scope"]:  # an op found there has the call's scope too
        if culprit.get("op"):
            culprit["drill_down"] = True
            return [f"{text}; it names {culprit['op']}"]
        if culprit.get("state"):  # its ops replay right on the target's weights: the weights are the difference
            names = ", ".join(r["name"] for r in culprit["state"][:3])
            return [f"{text}; every op agrees with the reference given the target's own inputs and weights: "
                    f"the difference is the module's state ({names}; see the state table)"]
        return [f"{text}; no op of its own code is wrong on its own inputs: the difference lies in which ops "
                "run or what they are fed (an op added, dropped, or given another tensor)"]
    return [text]
