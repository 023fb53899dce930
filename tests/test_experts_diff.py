"""A diff of a fused-experts model whose one expert's weights are off names the expert."""
from pathlib import Path

from tensordiff.run import trace_job
from tests.conftest import make_job

PLUGINS = Path(__file__).parent / "plugins"


def test_fused_expert_weights_off_culprit_names_the_expert(tmp_path):
    res = trace_job(make_job(tmp_path, model="qwen-moe", seq_len=128, isolate=False,
                             target=f"{PLUGINS}/planted.py:other_weights_in_layer1_expert_5")).result
    assert res.verdict == "diverged"
    assert res.culprit["module"] == "model.layers.1.mlp.experts"
    [row] = res.culprit["state"]
    assert row["name"] == "model.layers.1.mlp.experts.down_proj" and row["slices"] == [5]
    assert "experts 5 of 64" in res.culprit["why"]
    assert any("the difference is the module's state" in n for n in res.notes)


def test_clean_fused_experts_state_has_no_slices(tmp_path):
    res = trace_job(make_job(tmp_path, model="qwen-moe", seq_len=128, isolate=False, target="cpu-bf16")).result
    assert res.verdict == "match", res.culprit
    assert not any(r.get("slices") for r in res.state.rows)
