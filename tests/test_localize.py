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


def test_module_level_names_the_module_whose_own_code_holds_the_copy(tmp_path):
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:strided_copy_before_norm")).result
    assert res.culprit["module"] == "model.layers.1" and res.culprit["op"] is None
    assert "own code" in res.culprit["why"]
    assert _status(res, "model.layers.1.input_layernorm")["status"] == "carries"


def test_clean_fp32_run_has_no_culprit(tmp_path):
    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:identity", level="both")).result
    assert res.verdict == "match" and res.culprit is None
    assert (res.modules["status"] == "ok").all()
