"""The echo_npu PrivateUse1 device (compiled on first use): clean runs match, faults are localized."""
import pytest

from tensordiff.run import trace_job
from tests.conftest import make_job


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return trace_job(make_job(tmp_path_factory.mktemp("npu"), target="echo_npu")).result


def test_clean_echo_npu_matches_cpu_with_op_counts(clean):
    assert clean.verdict == "match" and clean.culprit is None
    logits = clean.table[clean.table["key"] == "__root__/forward#0/output.logits"].iloc[0]
    assert logits["max_abs"] < 1e-5
    ops = clean.timing["echo_npu_ops"]
    assert ops["native"]["aten::mm"] > 0 and ops["native"]["aten::_copy_from"] > 0
    assert sum(ops["fallback"].values()) > 0


def test_noncontig_copy_fault_blames_an_op_with_strided_input(tmp_path):
    res = trace_job(make_job(tmp_path, target="echo_npu", fault="noncontig-copy", level="both")).result
    assert res.verdict in ("diverged", "nan")
    culprit = res.culprit
    assert culprit["op"] is not None and culprit["noncontiguous_inputs"]
    assert "_copy_from" in culprit["why"]
    # the norm after it computes correctly on what it gets: no local error, only carried error
    norm = res.modules[res.modules["module"] == "model.layers.0.post_attention_layernorm"].iloc[0]
    assert norm["local_err"] < 1e-5 and norm["status"] in ("carries", "amplifies")
