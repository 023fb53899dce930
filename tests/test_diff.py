from pathlib import Path

import pandas as pd
import pytest
import torch

from tensordiff.align import align
from tensordiff.metrics import Tolerance, beyond, compare
from tensordiff.run import trace_job
from tests.conftest import make_job

PLUGINS = Path(__file__).parent / "plugins"
TOL = Tolerance(1e-5, 1.3e-6, 1e-4)
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("ref, tgt, key, expected", [
    ([0.0, 0.0], [0.0, 0.0], "rel_l2", 0.0),
    ([1.0, 2.0], [1.0, 2.0], "max_abs", 0.0),
    ([3.0, 4.0], [3.0, 4.5], "rel_l2", 0.1),
    ([3.0, 4.0], [3.0, 4.5], "max_abs", 0.5),
    ([1.0, NAN], [1.0, NAN], "nonfinite_mismatch", 0),
    ([1.0, 2.0], [1.0, NAN], "nonfinite_mismatch", 1),
    ([1.0, INF], [1.0, INF], "nonfinite_mismatch", 0),
    ([1.0, INF], [1.0, -INF], "nonfinite_mismatch", 1),
    ([0.0, 0.0], [0.0, 1e-3], "rel_l2", INF),
    ([1.0, -1.0], [-1.0, 1.0], "cosine", -1.0),
])
def test_metric_edge_cases(ref, tgt, key, expected):
    m = compare(torch.tensor(ref), torch.tensor(tgt), TOL)
    assert m[key] == pytest.approx(expected)


def test_low_precision_inputs_compared_in_float64():
    ref = torch.linspace(-3, 3, 1000)
    for dtype in (torch.bfloat16, torch.float16):
        m = compare(ref, ref.to(dtype), TOL)
        assert 0 < m["rel_l2"] < (4e-3 if dtype == torch.bfloat16 else 5e-4)
        assert m["worst_flat"] >= 0


def test_worst_index_and_shape_mismatch():
    ref = torch.zeros(3, 4)
    tgt = ref.clone()
    tgt[2, 1] = 5.0
    m = compare(ref, tgt, TOL)
    assert m["worst_flat"] == 9 and beyond(m, TOL)
    assert compare(ref, torch.zeros(4, 3), TOL)["status"] == "shape_mismatch"


def _index(rows):
    df = pd.DataFrame(rows)
    df["seq"] = range(len(df))
    return df.set_index("key", drop=False)


def _op(scope, i, op, slot):
    return {"key": f"{scope}/op{i:04d}.{op}/{slot}", "kind": "op", "scope": scope, "op_index": i, "op": op,
            "slot": slot, "module": scope.split("/")[0], "shape": [4, 4]}


def test_alignment_survives_fused_op_and_missing_record():
    s = "m/forward#0"
    ref = _index([_op(s, 0, "aten::mm", "out.0"), _op(s, 1, "aten::add.Tensor", "out.0"),
                  _op(s, 2, "aten::relu", "out.0"),
                  {"key": "m/forward#0/output.0", "kind": "module", "scope": s, "op_index": -1, "op": "",
                   "slot": "output.0", "module": "m", "shape": [4, 4]},
                  {"key": "n/forward#0/output.0", "kind": "module", "scope": "n/forward#0", "op_index": -1,
                   "op": "", "slot": "output.0", "module": "n", "shape": [4, 4]}])
    # target: mm+add fused into addmm, then relu; module n missing
    tgt = _index([_op(s, 0, "aten::addmm", "out.0"), _op(s, 1, "aten::relu", "out.0"),
                  {"key": "m/forward#0/output.0", "kind": "module", "scope": s, "op_index": -1, "op": "",
                   "slot": "output.0", "module": "m", "shape": [4, 4]}])
    a = align(ref, tgt)
    pairs = dict(a.pairs)
    assert pairs[f"{s}/op0002.aten::relu/out.0"] == f"{s}/op0001.aten::relu/out.0"
    assert pairs["m/forward#0/output.0"] == "m/forward#0/output.0"
    assert "n/forward#0/output.0" in a.ref_only
    unmatched = {(o["side"], o["op"]) for o in a.unmatched_ops}
    assert unmatched == {("reference", "aten::mm"), ("reference", "aten::add.Tensor"), ("target", "aten::addmm")}


@pytest.mark.parametrize("model", ["qwen", "qwen-moe"])
@pytest.mark.parametrize("target", ["cpu-bf16", "cpu-fp16"])
def test_low_precision_targets_raise_no_false_alarm(tmp_path, model, target):
    res = trace_job(make_job(tmp_path, model=model, target=target)).result
    assert res.verdict == "match", (res.first_divergence, res.culprit)
    assert res.culprit is None
    logits = res.table[res.table["key"] == "__root__/forward#0/output.logits"].iloc[0]
    assert 0 < logits["rel_l2"] < logits["tol_rel_l2"]
    if model == "qwen-moe" and res.flips:  # a flipped top-k choice is said, not called a bug
        assert all(f["module"].endswith(".mlp.gate") for f in res.flips)
        assert any("not a bug" in n for n in res.notes)


def test_moe_bug_in_one_expert_is_found_in_bf16(tmp_path):
    res = trace_job(make_job(tmp_path, model="qwen-moe", target=f"{PLUGINS}/planted.py:corrupt_expert_17")).result
    assert res.verdict == "diverged"
    assert res.culprit["module"] == "model.layers.0.mlp.experts"


def test_html_escapes_module_names(tmp_path):
    res = trace_job(make_job(tmp_path, model=f"{PLUGINS}/script_model.py:build",
                             target=f"{PLUGINS}/script_model.py:break_it")).result
    assert res.verdict == "diverged"
    html = (tmp_path / "run" / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert" not in html
    md = (tmp_path / "run" / "report.md").read_text()
    assert "<script>" not in md


@pytest.mark.parametrize("target, verdict", [
    ("cpu-bf16", "match"),
    ("cpu-fp16", "match"),
    (f"{PLUGINS}/planted.py:scale_layer1_attention", "diverged"),
])
def test_fp64_judge(tmp_path, target, verdict):
    res = trace_job(make_job(tmp_path, target=target, judge_fp64=True)).result
    assert res.verdict == verdict
    logits = res.table[res.table["key"] == "__root__/forward#0/output.logits"].iloc[0]
    assert logits["fp64_err_tgt"] > 0 and logits["fp64_err_floor"] >= 0
    if verdict == "diverged":
        assert res.culprit["module"] == "model.layers.1.self_attn"
        assert res.first_divergence["key"].startswith("model.layers.1.self_attn")
    else:  # bf16/fp16 error to fp64 is at the level of that dtype's own rounding
        assert logits["fp64_err_tgt"] < 2 * logits["fp64_err_floor"] + logits["tol_rel_l2"] / 10
