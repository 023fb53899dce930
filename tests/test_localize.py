from pathlib import Path

from tensordiff.run import trace_job
from tests.conftest import make_job

PLUGINS = Path(__file__).parent / "plugins"


def _status(res, module):
    mods = res.modules
    return mods[mods["module"] == module].iloc[0]


def test_scaled_attention_culprit_is_that_attention(tmp_path):
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:scale_layer1_attention")).result
    assert res.verdict == "diverged"
    assert res.culprit["module"] == "model.layers.1.self_attn"
    assert abs(res.culprit["local_error"] - 0.01) < 1e-3
    # o_proj (a child) is innocent: the scaling is in the attention's own code
    assert _status(res, "model.layers.1.self_attn.o_proj")["status"] == "ok"
    assert _status(res, "model.layers.1.post_attention_layernorm")["status"] != "introduces"


def test_strided_copy_before_norm_blames_copy_not_norm(tmp_path):
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:strided_copy_before_norm",
                             level="both")).result
    assert res.verdict == "diverged"
    norm = _status(res, "model.layers.1.input_layernorm")
    assert norm["output_err"] > 0.5          # the norm is where the error first shows...
    assert norm["local_err"] < 1e-5          # ...but it computes correctly on what it was given
    assert res.culprit["module"] == "model.layers.1"
    assert res.culprit["op"] == "tdtest::device_copy"
    assert "planted.py" in res.culprit["source"]
    # like the engineers' table, the error first *shows* at the norm; the culprit says who made it
    assert res.first_divergence["key"] == "model.layers.1.input_layernorm/forward#0/input.0"


def test_module_level_drills_down_to_the_copy_in_the_modules_own_code(tmp_path):
    """At module level the culprit is layer 1's own code; the drill-down re-runs that call at op level
    and names the copy, as --level both does, without op-level capture of the whole model."""
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:strided_copy_before_norm")).result
    assert res.culprit["module"] == "model.layers.1" and res.culprit["op"] == "tdtest::device_copy"
    assert res.culprit["drill_down"] is True and "planted.py" in res.culprit["source"]
    assert any(n.startswith("drill-down: model.layers.1/forward#0") for n in res.notes)
    assert _status(res, "model.layers.1.input_layernorm")["status"] == "carries"
    ops = res.table[res.table["kind"] == "op"]
    assert ops.empty  # drill-down records are the target's own evidence, not paired with the reference
    assert res.counts["target_only"] == 0


def test_clean_fp32_run_has_no_culprit(tmp_path):
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:identity", level="both")).result
    assert res.verdict == "match" and res.culprit is None
    assert (res.modules["status"] == "ok").all()


def test_backward_only_bug_is_localized_to_that_module(tmp_path):
    """Forward exact, one module's hand-written backward wrong: that module is the culprit."""
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:wrong_backward_in_layer1_act",
                             backward=True)).result
    assert res.verdict == "diverged"
    assert (res.table[res.table["direction"] == "forward"]["max_abs"] == 0).all()
    assert res.culprit["module"] == "model.layers.1.mlp.act_fn" and res.culprit["direction"] == "backward"
    assert res.culprit["local_error"] > 0.05
    bwd = res.backward_modules.set_index("module")
    assert bwd.loc["model.layers.1.mlp.act_fn", "status"] == "introduces"
    assert bwd.loc["model.layers.1.mlp.gate_proj", "status"] == "carries"  # downstream in backward order


def test_weight_gradient_only_bug_is_localized(tmp_path):
    """Forward and input gradient exact, the weight gradient 10% off (a LoRA-style GEMM bug)."""
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:wrong_weight_grad_in_layer2_up_proj",
                             backward=True)).result
    assert res.verdict == "diverged"
    assert res.culprit["module"] == "model.layers.2.mlp.up_proj"
    assert "model.layers.2.mlp.up_proj.weight" in res.culprit["why"]
    assert abs(res.culprit["local_error"] - 0.1) < 1e-3
    grads = res.table[res.table["slot"].str.startswith("param_grad")]
    assert len(grads) > 30  # one record per parameter
    assert set(grads[grads["beyond"]]["key"]) == {"model.layers.2.mlp.up_proj/backward#0/param_grad.weight"}
    assert res.first_divergence["key"] == "model.layers.2.mlp.up_proj/backward#0/param_grad.weight"


def test_clean_backward_with_replay_raises_nothing(tmp_path):
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:identity", backward=True)).result
    assert res.verdict == "match" and res.culprit is None
    assert (res.backward_modules["status"] == "ok").all()
    assert res.backward_modules["local_err"].notna().sum() > 40
