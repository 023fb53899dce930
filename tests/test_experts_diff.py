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


def test_expert_probe_measures_each_expert_alone_on_transformers_experts():
    """probe_experts on transformers' own fused experts (64 experts, top-6): a copy whose experts 40-43
    are off by 1% is measured per expert, the others are bit-equal."""
    import copy

    import torch

    from tensordiff.analysis.expert_probe import describe_probe, probe_experts
    from tensordiff.models import load_model

    model = load_model("qwen-moe", size="tiny", seq_len=8).model
    ref = model.model.layers[0].mlp.experts
    tgt = copy.deepcopy(ref)
    with torch.no_grad():
        tgt.down_proj[40:44].mul_(1.01)
    hidden = torch.randn(48, ref.gate_up_proj.shape[-1], generator=torch.Generator().manual_seed(0))
    rows = probe_experts(tgt, ref, hidden, top_k=6, experts=64)
    errors = dict(rows)
    assert all(abs(errors[e] - 0.01) < 1e-4 for e in range(40, 44))
    assert all(errors[e] == 0.0 for e in range(64) if not 40 <= e < 44)
    probe = describe_probe(rows, budget=1e-4, experts=64)
    assert probe["beyond"] == [40, 41, 42, 43] and probe["text"].startswith("experts 40-43 of 64 beyond")
