"""Target kt_moe: the real kt-kernel MoE kernel (whichever of its bf16 kernels this CPU runs), at the
size such kernels are judged at (64 experts, top-6, hidden 1024), and its planted arena fault."""
import sys

import pytest

from tensordiff.errors import TensordiffError
from tensordiff.run import trace_job
from tests.conftest import make_job


def test_missing_package_is_a_one_line_install_hint(monkeypatch):
    from tensordiff.backends import get_backend

    monkeypatch.setitem(sys.modules, "kt_kernel", None)  # import kt_kernel raises ImportError
    with pytest.raises(TensordiffError) as err:
        get_backend("kt_moe")
    assert "pip install --no-deps kt-kernel" in str(err.value) and "\n" not in str(err.value)


def test_kernel_follows_the_cpu_flags():
    from tensordiff.backends.kt_moe import kernel_name

    assert kernel_name({"avx2", "avx512f", "amx_tile", "amx_bf16"}) == "AMXBF16_MOE"
    assert kernel_name({"avx2", "avx512f", "avx512_bf16"}) == "AVX2BF16_MOE"  # an EPYC: no AMX tiles
    assert kernel_name({"avx2"}) == "AVX2BF16_MOE"


def test_unknown_fault_names_the_choices():
    pytest.importorskip("kt_kernel")
    from tensordiff.backends import get_backend

    with pytest.raises(TensordiffError, match="shared-pool-alias"):
        get_backend("kt_moe", "no-such-fault")


def test_clean_kernel_matches_fp32_reference_at_kernel_size(tmp_path):
    """64 experts, top-6, hidden 1024, 64 tokens, bf16 (in process; the isolated path is the fault test
    below): match; the kernel that ran is in the
    metadata; both figures (kernel authors' mean ratio, our rel L2) are reported per call."""
    pytest.importorskip("kt_kernel")
    res = trace_job(make_job(tmp_path, model="qwen-moe", size="wide", seq_len=64, target="kt_moe",
                             guard=True, isolate=False)).result
    assert res.verdict == "match", res.notes
    assert res.guard == {"summary": [], "findings": []}  # the guard was on and found nothing
    from tensordiff import guard as guards

    assert guards.active() is None  # the job's guard ends with the job
    backend = res.meta["target"]["backend"]
    assert backend["kernel"] in ("AVX2BF16_MOE", "AMXBF16_MOE") and backend["fault"] == "none"
    from tensordiff.trace import open_trace

    index = open_trace(tmp_path / "run" / "target.h5").index
    kernel_rows = index[index["local_mean_abs_ratio"].notna()]
    assert list(kernel_rows["module"]) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert (kernel_rows["local_mean_abs_ratio"] < 0.02).all()  # bf16 weights and activations: ~0.005
    assert (kernel_rows["local_rel_l2"] < 0.02).all()
    assert (kernel_rows["local_rel_l2"] > 1e-4).all()  # bf16, not a silent fp32 fallback
    note = [n for n in res.notes if n.startswith("kernel ")]
    assert len(note) == 1 and "passes" in note[0] and "within" in note[0]
    assert not [n for n in res.notes if n.startswith("per-expert probe")]  # nothing beyond: no probe ran


def test_numeric_bug_in_some_experts_named_by_the_per_expert_probe(tmp_path):
    """stale-scale: experts 17-24's staged weights carry a 1.5 scale (finite, no NaN). The kernel is a
    black box, yet the culprit is layer 0's experts call and the per-expert probe (each expert alone
    on the call's tokens, kernel against fp32) names exactly experts 17-24; a routing near-tie in the
    router beside it does not explain the experts' own error away."""
    pytest.importorskip("kt_kernel")
    res = trace_job(make_job(tmp_path, model="qwen-moe", size="wide", seq_len=64, target="kt_moe",
                             fault="stale-scale", isolate=False)).result
    assert res.verdict == "diverged"
    assert res.culprit["module"] == "model.layers.0.mlp.experts"
    assert res.culprit["experts"] == list(range(17, 25))
    probes = [n for n in res.notes if n.startswith("per-expert probe of model.layers.0.mlp.experts")]
    assert len(probes) == 1 and "experts 17-24 of 64 beyond tolerance" in probes[0]
    from tensordiff.trace import open_trace

    probe = open_trace(tmp_path / "run" / "target.h5").meta["expert_probe"]["model.layers.0.mlp.experts/forward#0"]
    errors = probe["errors"]
    assert min(errors[17:25]) > 0.3 and max(errors[:17] + errors[25:]) < 0.02


def test_shared_pool_alias_through_trace_with_guard(tmp_path):
    """The planted arena fault through `trace --guard` (isolated child): the NaN the reference lacks is
    first seen at layer 0's experts, both kernel figures say it fails, and the guard's findings come
    back from the child in the trace: the overlapping blocks and experts 17-24 polluted before the
    kernel loads them."""
    pytest.importorskip("kt_kernel")
    res = trace_job(make_job(tmp_path, model="qwen-moe", size="wide", seq_len=64, target="kt_moe",
                             fault="shared-pool-alias", guard=True)).result
    assert res.verdict == "nan"
    assert res.first_nan["module"] == "model.layers.0.mlp.experts"
    summary = res.guard["summary"]
    assert sum("share" in line and "conversion scratch" in line for line in summary) == 2
    assert sum("experts 17-24 of 64 polluted before AVX2BF16_MOE.load_weights_task" in line
               or "experts 17-24 of 64 polluted before AMXBF16_MOE.load_weights_task" in line
               for line in summary) == 2
    (kernel,) = [n for n in res.notes if n.startswith("kernel ")]
    assert "FAILS" in kernel and "BEYOND" in kernel


def test_backward_and_models_without_fused_experts_are_refused_in_one_line(tmp_path):
    """The inference kernel has no backward: refused up front, never a silent zero gradient; a model
    without a fused-experts block says so."""
    from tensordiff.backends.kt_moe import to_kt_moe
    from tensordiff.models import load_model

    with pytest.raises(TensordiffError, match="drop --backward"):
        trace_job(make_job(tmp_path, model="qwen-moe", target="kt_moe", backward=True))
    with pytest.raises(TensordiffError, match="no fused-experts MoE block"):
        to_kt_moe(load_model("qwen", size="tiny", seq_len=8).model)
