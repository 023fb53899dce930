"""The echo_npu PrivateUse1 device (compiled on first use): clean runs match, faults are localized."""
import json
import os
import subprocess
import sys

import pytest

from tensordiff.run import trace_job
from tests.conftest import make_job


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return trace_job(make_job(tmp_path_factory.mktemp("npu"), target="echo_npu", level="both",
                              attention_mask=True)).result


def test_clean_echo_npu_matches_cpu_with_op_counts(clean):
    assert clean.verdict == "match" and clean.culprit is None
    logits = clean.table[clean.table["key"] == "__root__/forward#0/output.logits"].iloc[0]
    assert logits["max_abs"] < 1e-5
    ops = clean.timing["echo_npu_ops"]
    assert ops["native"]["aten::mm"] > 0 and ops["native"]["aten::_copy_from"] > 0
    assert ops["native"]["aten::masked_fill_.Scalar"] > 0  # the port's attention path ran on the device
    assert sum(ops["fallback"].values()) > 0


def test_noncontig_copy_blames_the_strided_op_and_clears_the_norms(tmp_path):
    res = trace_job(make_job(tmp_path, target="echo_npu", fault="noncontig-copy", level="both")).result
    assert res.verdict == "diverged"
    culprit = res.culprit
    assert culprit["noncontiguous_inputs"]
    # the confirmation experiment: the same op on contiguous copies of its inputs is right
    assert culprit["layout_experiment"].startswith("correct when its strided inputs are made contiguous")
    assert culprit["source"] and "modeling_qwen3.py" in culprit["source"]
    assert res.first_divergence["key"] == culprit["key"]  # nothing diverged before the culprit op
    norms = res.modules[res.modules["module"].str.endswith("layernorm")]
    bad_norms = norms[norms["output_err"] > 0.5]
    assert len(bad_norms) >= 3                      # the error is visible at every later norm...
    assert (bad_norms["local_err"] < 1e-5).all()    # ...and none of them made it
    assert set(bad_norms["status"]) <= {"carries", "amplifies"}


def test_inplace_fallback_blames_the_inplace_op(tmp_path):
    res = trace_job(make_job(tmp_path, target="echo_npu", fault="inplace-fallback", level="both")).result
    assert res.verdict == "diverged"
    assert res.culprit["op"] == "aten::masked_fill_.Scalar"
    assert res.culprit["module"] == "model.layers.0.self_attn"
    assert res.culprit["local_error"] > 0.1
    assert res.timing["echo_npu_ops"]["fallback"]["aten::masked_fill_.Scalar"] > 0  # went the buggy way


def test_alloc_round_up_crash_is_survived_and_reported(tmp_path):
    out = tmp_path / "crash"
    proc = subprocess.run([sys.executable, "-m", "tensordiff", "trace", "--model", "qwen", "--seq-len", "64",
                           "--target", "echo_npu", "--fault", "alloc-round-up", "--attention-mask",
                           "--level", "both", "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 1, proc.stderr
    assert "CRASHED" in proc.stdout and "SIGABRT" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "crashed"
    crash = summary["crash"]
    assert crash["reason"] == "killed by signal SIGABRT"
    assert "invalid pointer" in crash["stderr_tail"]
    assert "/op" in crash["last_key"] and crash["last_source"]   # the op that was running, and its line
    assert summary["counts"]["target_records"] > 0              # the partial trace was diffed
    assert summary["meta"]["target_complete"] is False
    assert all(not r["beyond"] for r in summary["records"])     # what was captured before is clean


_ON_DEVICE = """
import copy
from tensordiff.backends.registry import get_backend
from tensordiff.models import load_model
from tensordiff.tracing import default_loss

bundle = load_model("qwen", seq_len=16)
backend = get_backend("echo_npu")
model = backend(bundle.model)
inputs = backend.inputs(bundle.inputs.clone())
assert next(model.parameters()).device.type == "echo_npu"
loss = default_loss(model(**inputs.kwargs), inputs)
loss.backward()
ref = copy.deepcopy(bundle.model)
ref_loss = default_loss(ref(**bundle.inputs.kwargs), bundle.inputs)
ref_loss.backward()
assert abs(loss.item() - ref_loss.item()) < 1e-5, (loss.item(), ref_loss.item())
assert (model.lm_head.weight.grad.cpu() - ref.lm_head.weight.grad).abs().max() < 1e-5
ids = bundle.inputs.kwargs["input_ids"][:, :8]
out = model.generate(input_ids=ids.to("echo_npu"), max_new_tokens=6, do_sample=False, use_cache=True)
expected = ref.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=True)
assert out.cpu().tolist() == expected.tolist(), (out, expected)
print("ok")
"""


def test_qwen_forward_backward_and_generate_on_the_device():
    # Own process: autograd sizes its per-device queues at the first backward of a process, so a
    # PrivateUse1 device must be registered before any backward ran (tensordiff's targets run in a
    # child process for the same reason).
    proc = subprocess.run([sys.executable, "-c", _ON_DEVICE], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_device_module_target_runs_any_privateuse1_extension(tmp_path):
    res = trace_job(make_job(tmp_path, target="device:tensordiff.backends.echo_npu.register")).result
    assert res.verdict == "match"
    assert res.meta["target"]["backend"]["device"] == "echo_npu"


def test_device_module_that_does_not_exist_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tensordiff", "trace", "--target", "device:no_such_npu_pkg",
                           "--out", str(tmp_path / "x"), "--seq-len", "16"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no_such_npu_pkg" in proc.stderr


def test_noncontig_copy_of_an_expanded_view_reads_only_its_storage():
    """The fault reads a view in memory order. An expanded view (repeat_kv's stride-0 KV heads) has
    more elements than its storage: past the storage's end the simulator reads zeros, the same on every
    run, instead of whatever the heap holds there."""
    import torch

    from tensordiff.backends import echo_npu

    echo_npu.load_extension()
    try:
        echo_npu.set_fault("noncontig-copy")
        view = torch.arange(1.0, 7.0).to(echo_npu.DEVICE).expand(3, 6)  # 18 elements over 6 stored
        first, second = view.cpu(), view.cpu()
        assert torch.equal(first, torch.cat([torch.arange(1.0, 7.0), torch.zeros(12)]).view(3, 6))
        assert torch.equal(first, second)
        # the fault itself, inside the storage: a transposed view arrives in memory order
        t = torch.arange(12.0).view(3, 4).to(echo_npu.DEVICE).t()
        assert torch.equal(t.cpu(), torch.arange(12.0).view(4, 3))
        echo_npu.set_fault("none")
        assert torch.equal(view.cpu(), torch.arange(1.0, 7.0).expand(3, 6))  # clean: the right values
    finally:
        echo_npu.set_fault("none")


@pytest.mark.parametrize("backward", [False, True])
def test_qwen_moe_runs_clean_on_echo_npu(tmp_path, backward):
    """The grouped-mm experts path counts tokens with histc on int32 on any non-CPU device: the port
    has it natively, forward and backward match the CPU."""
    res = trace_job(make_job(tmp_path, model="qwen-moe", target="echo_npu", backward=backward)).result
    assert res.verdict == "match", (res.crash, res.culprit)
    assert res.timing["echo_npu_ops"]["native"]["aten::histc"] > 0
    assert res.counts["matched"] > 50
    if backward:
        assert (res.table["direction"] == "backward").sum() > 10


def test_exception_in_isolated_target_names_module_and_op(tmp_path):
    """A Python exception inside the target is a crash that names the innermost call and the op."""
    from pathlib import Path

    plugin = Path(__file__).parent / "plugins" / "planted.py"
    res = trace_job(make_job(tmp_path, target=f"{plugin}:unsupported_op_in_layer0_mlp")).result
    assert res.verdict == "crashed"
    assert res.crash["module"] == "model.layers.0.mlp.down_proj"
    assert res.crash["op"] == "tdtest::unsupported"
    assert res.crash["last_key"] == "model.layers.0.mlp.down_proj/forward#0 / tdtest::unsupported"
    assert "planted.py" in res.crash["last_source"]


@pytest.mark.parametrize("fault, op", [("noncontig-copy", "aten::mul.Tensor"),
                                       ("inplace-fallback", "aten::masked_fill_.Scalar")])
def test_readme_main_command_names_the_op_of_each_fault(tmp_path, fault, op):
    """Default options (module level): the drill-down names the op, as --level both does."""
    res = trace_job(make_job(tmp_path, target="echo_npu", fault=fault, seq_len=128)).result
    assert res.verdict == "diverged"
    assert res.culprit["module"] == "model.layers.0.self_attn"
    assert res.culprit["op"] == op and res.culprit["drill_down"] is True
    assert any(n.startswith("drill-down: model.layers.0.self_attn/forward#0") for n in res.notes)
    if fault == "noncontig-copy":
        assert res.culprit["layout_experiment"].startswith("correct when its strided inputs are made contiguous")


def test_exception_in_process_target_is_a_crash_report_too(tmp_path):
    from pathlib import Path

    plugin = Path(__file__).parent / "plugins" / "planted.py"
    res = trace_job(make_job(tmp_path, target=f"{plugin}:unsupported_op_in_layer0_mlp", isolate=False)).result
    assert res.verdict == "crashed"
    assert res.crash["reason"].startswith("raised NotImplementedError")
    assert res.crash["last_key"] == "model.layers.0.mlp.down_proj/forward#0 / tdtest::unsupported"
    assert not res.meta["target_complete"] and res.counts["matched"] > 10  # what came before is compared


def test_alloc_round_up_at_module_level_names_the_op_by_a_probe_run(tmp_path):
    """The README main command (module level) with the crashing fault: the signal leaves only module
    breadcrumbs, so the target is run once more at op level and the op it dies in again is named."""
    res = trace_job(make_job(tmp_path, target="echo_npu", fault="alloc-round-up")).result
    assert res.verdict == "crashed"
    crash = res.crash
    assert crash["reason"] == "killed by signal SIGABRT"
    assert "/op" in crash["last_key"] and crash["last_source"]
    assert "/op" not in crash["module_call"]  # what the module-level breadcrumbs alone said
    assert crash["probe"].startswith("the target crashed again")


def test_nan_hunt_on_the_device_is_clean_forward_and_backward():
    """nan-hunt runs on a PrivateUse1 device (its inputs copied by the device's own clone op, not
    deepcopy's storage copies, which echo_npu does not implement) and finds nothing on a clean run.
    Own process, like every backward on the device."""
    from tests.test_cli import run_cli

    proc = run_cli("nan-hunt", "--target", "echo_npu", "--seq-len", "64", "--backward", "--json", "--guard")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["clean"] and doc["screened"]["tensors"] > 20 and doc["screened"]["backward_ops"] > 100
    assert "guard" not in doc  # red zones and poison on every device block, forward and backward: nothing


def test_guard_reports_the_allocator_size_mismatch_at_the_op_instead_of_aborting(tmp_path):
    """alloc-round-up with --guard: the mis-sized block is reported after the op that allocated it, with
    the line, and the process lives (without --guard it dies in glibc: the test below)."""
    from tests.test_cli import run_cli

    proc = run_cli("nan-hunt", "--target", "echo_npu", "--fault", "alloc-round-up", "--seq-len", "32",
                   "--guard", "--json")
    assert proc.returncode == 1, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["clean"] is True and "crash" not in doc  # no NaN, no abort
    (line,) = doc["guard"]["summary"]
    assert line.startswith("echo_npu allocator: allocator size mismatch: block #")
    assert "8 bytes past the start of its allocation" in line and "free(): invalid pointer" in line
    first = doc["guard"]["findings"][0]["evidence"]
    assert first["op"].startswith("aten::") and ".py:" in first["source"] and "tensordiff" not in first["source"]


def test_nan_hunt_survives_a_crashing_target(tmp_path):
    from tests.test_cli import run_cli

    proc = run_cli("nan-hunt", "--target", "echo_npu", "--fault", "alloc-round-up", "--seq-len", "32",
                   "--out", str(tmp_path))
    assert proc.returncode == 1 and proc.stdout.startswith("CRASHED: the target process was killed by signal")
    assert "Traceback" not in proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "nan_hunt.json").read_text())
    assert doc["crash"]["reason"].startswith("killed by signal") and doc["clean"] is False
