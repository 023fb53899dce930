import json
from pathlib import Path

from tensordiff.diff import diff
from tensordiff.run import trace_job
from tests.conftest import make_job

PLUGINS = Path(__file__).parent / "plugins"


def test_cpu_vs_cpu_is_identical(tmp_path):
    out = trace_job(make_job(tmp_path, target="cpu"))
    res = out.result
    assert res.verdict == "match"
    assert len(res.table) > 100
    assert float(res.table["max_abs"].max()) == 0.0
    assert res.counts["reference_only"] == 0 and res.counts["target_only"] == 0
    for name in ("reference.h5", "target.h5", "summary.json", "report.md", "report.html"):
        assert (out.out_dir / name).exists()


def test_cpu_vs_bf16_same_keys_plausible_differences(tmp_path):
    res = trace_job(make_job(tmp_path, target="cpu-bf16")).result
    assert res.verdict == "match"
    assert res.counts["reference_only"] == 0 and res.counts["target_only"] == 0
    logits = res.table[res.table["key"] == "__root__/forward#0/output.logits"].iloc[0]
    # bf16 keeps 8 mantissa bits: visible but small error at the logits
    assert 1e-3 < logits["rel_l2"] < 6e-2
    assert logits["cosine"] > 0.999


def test_planted_bug_differs_there_and_nowhere_earlier(tmp_path):
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:scale_layer1_mlp")).result
    assert res.verdict == "diverged"
    table = res.table
    first_bad = table[table["beyond"]].iloc[0]
    assert first_bad["key"] == "model.layers.1.mlp/forward#0/output.0"
    assert abs(first_bad["rel_l2"] - 0.01) < 1e-4
    assert (table[table["seq"] < first_bad["seq"]]["max_abs"] == 0).all()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["first_divergence"]["key"] == "model.layers.1.mlp/forward#0/output.0"
