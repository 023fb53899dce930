"""Cost side by side (analysis/cost): time per forward per side always, and with --timing the modules
responsible for a slow or memory-hungry target, measured on real kernels."""
import json

from tensordiff.run import trace_job
from tests.conftest import make_job

KERNELS = '''
import torch


def row_by_row(q, k, v, causal, scale):
    """Correct, and slow: one query row of one head at a time (slow enough to stand far above the
    timing noise of a loaded 2-core machine)."""
    out = torch.empty_like(q)
    for h in range(q.shape[1]):
        for i in range(q.shape[2]):
            s = (q[:, h:h + 1, i:i + 1] @ k[:, h:h + 1, :i + 1].transpose(-1, -2)) * scale
            out[:, h:h + 1, i:i + 1] = torch.softmax(s, dim=-1) @ v[:, h:h + 1, :i + 1]
    return out


def outer_product(q, k, v, causal, scale):
    """Correct, and hungry: q . k through a [b, h, s, s, d] product before the sum."""
    s = (q[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1) * scale
    n = s.shape[-1]
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v
'''


def test_slow_and_hungry_attention_kernels_are_named_with_their_modules(tmp_path):
    path = tmp_path / "kernels.py"
    path.write_text(KERNELS)
    slow = trace_job(make_job(tmp_path, name="slow", seq_len=128, target=f"{path}:row_by_row", isolate=False,
                              timing=True, time_plain=True)).result
    assert slow.verdict == "match", slow.notes      # correct: cost is the only finding
    cost = slow.cost
    assert cost["slowdown_x"] > 1.5 and cost["target_tokens_per_s"] < cost["reference_tokens_per_s"]
    top = cost["modules"][0]
    assert top["module"] == "model.layers.*.self_attn" and top["slowdown_x"] > 3 and top["tgt_calls"] == 4
    # the self time of the rest is not blamed: the MLPs run the same torch kernels on both sides
    mlp = next(g for g in cost["modules"] if g["module"] == "model.layers.*.mlp")
    assert mlp["tgt_self_s"] - mlp["ref_self_s"] < 0.3 * (top["tgt_self_s"] - top["ref_self_s"])
    line = next(n for n in slow.notes if n.startswith("time (own code"))
    assert "is in model.layers.*.self_attn" in line
    assert any(n.startswith("time per forward (plain runs, timed alternately, median of 3)") and "tokens/s" in n for n in slow.notes)
    assert any(n.startswith("timing overhead (target)") for n in slow.notes)
    summary = json.loads((tmp_path / "slow" / "summary.json").read_text())
    assert summary["cost"]["modules"][0]["module"] == "model.layers.*.self_attn"
    assert "Cost side by side" in (tmp_path / "slow" / "report.html").read_text()

    hungry = trace_job(make_job(tmp_path, name="hungry", seq_len=128, target=f"{path}:outer_product",
                                isolate=False, timing=True, time_plain=True)).result
    assert hungry.verdict == "match", hungry.notes
    attn = next(g for g in hungry.cost["modules"] if g["module"] == "model.layers.*.self_attn")
    assert attn["tgt_largest"] == 1 * 4 * 128 * 128 * 64 * 4           # the [b, h, s, s, d] float32 product
    assert attn["tgt_largest_op"] == "aten::mul.Tensor"
    memory = next(n for n in hungry.notes if n.startswith("memory:"))
    assert "model.layers.*.self_attn allocates 16 MB in one buffer (aten::mul.Tensor)" in memory


def test_a_plain_run_has_no_per_module_cost_and_no_false_slowdown(tmp_path):
    res = trace_job(make_job(tmp_path, seq_len=128, target="cpu", time_plain=True)).result
    assert res.verdict == "match"
    assert "modules" not in res.cost                      # --timing not asked
    # the same kernels on both sides, timed alternately (a band: a shared 2-core VM moves single timings 2x)
    assert 1 / 3 < res.cost["slowdown_x"] < 3
    assert not any(n.startswith(("time (own code", "memory:")) for n in res.notes)


def test_cuda_timing_uses_events_and_device_peaks(tmp_path):
    import torch

    if not torch.cuda.is_available():
        import pytest

        pytest.skip("no CUDA device")
    from tensordiff.trace import open_trace

    res = trace_job(make_job(tmp_path, name="gpu", seq_len=256, target="cuda-bf16", reference="cuda",
                             timing=True, time_plain=True)).result
    assert res.verdict == "match", res.notes
    assert res.cost["target"]["device"].startswith("cuda")
    with open_trace(tmp_path / "gpu" / "target.h5") as trace:
        modules = trace.meta["cost"]["modules"]
    root = modules["__root__"]
    assert root["time_s"] > 0 and root["peak_device_bytes"] > 0
    attn = modules["model.layers.0.self_attn"]
    assert 0 < attn["time_s"] < root["time_s"] and attn["peak_device_bytes"] <= root["peak_device_bytes"]


def test_speed_verdict_rests_on_adjacent_pairs_and_says_when_load_hid_it():
    """The ratio is the median over adjacent (reference, target) pairs; pairs on both sides of 1 that
    disagree by more than 1.5x give no speed verdict (a loaded VM once made identical kernels look
    5.6x apart by the two medians)."""
    from tensordiff.analysis.cost import cost_section

    meta = {"job": {"batch": 1, "seq_len": 128}}
    steady, lines = cost_section({"side_by_side_reference_s": 0.01, "side_by_side_target_s": 0.17,
                                  "side_by_side_ratios": [16.0, 17.0, 18.5]}, meta, meta)
    assert steady["slowdown_x"] == 17.0 and "the target is 17x slower" in lines[0]
    loaded, lines = cost_section({"side_by_side_reference_s": 0.05, "side_by_side_target_s": 0.009,
                                  "side_by_side_ratios": [0.18, 1.02, 1.1]}, meta, meta)
    assert loaded["slowdown_x"] == 1.02 and loaded["unsteady"] == [0.18, 1.1]
    assert "no clear difference" in lines[0] and "faster" not in lines[0]
