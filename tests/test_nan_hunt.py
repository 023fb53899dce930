"""nan-hunt: the op, element and expert where NaN / Inf are born, forward and backward, and no finding
on clean runs (fp32, bf16, fp16, MoE, masks written with -inf)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from tensordiff.analysis.boundary import boundary_signature, describe_indices, first_bad_index
from tensordiff.analysis.nan_hunt import hunt, hunt_trace
from tensordiff.models import load_model
from tests.test_cli import run_cli

PLUGINS = Path(__file__).parent / "plugins"
sys.path.insert(0, str(PLUGINS))
import planted  # noqa: E402


@pytest.mark.parametrize("idx,size,text", [
    (range(17, 25), 64, "experts 17-24 of 64"),
    (range(256, 2048), 2048, "rows >= 256 of 2048 (from 256 = 2^8)"),
    (range(384, 2048), 2048, "rows >= 384 of 2048 (from 384 = 3 x 128)"),
    (range(3, 1024, 4), 1024, "rows 3, 7, 11, ... (every 4th; 256 of 1024)"),
    ([1, 2, 5, 9, 10], 16, "rows 1-2, 5, 9-10 of 16 (5 in 3 runs)"),
    (range(8), 8, "all 8 rows"),
    ([], 8, "no rows"),
])
def test_describe_indices(idx, size, text):
    noun = "experts" if text.startswith("experts") else "rows"
    assert describe_indices(idx, size, noun) == text


def test_boundary_signature_and_first_index():
    bad = torch.zeros(6, 10, dtype=torch.bool)
    bad[4:, 8:] = True
    sig = boundary_signature(bad)
    assert [s["text"] for s in sig] == ["rows >= 4 of 6 (from 4 = 2^2)", "columns >= 8 of 10 (from 8 = 2^3)"]
    assert first_bad_index(bad) == (48, [4, 8])
    assert first_bad_index(torch.zeros(3, dtype=torch.bool)) is None


def _model(name, plugin=None, seq_len=256):
    bundle = load_model(name, size="tiny", seq_len=seq_len, seed=0)
    model = getattr(planted, plugin)(bundle.model) if plugin else bundle.model
    return model, bundle.inputs


def test_fp16_overflow_names_the_op_and_element():
    model, inputs = _model("qwen", "fp16_overflow_in_layer2_mlp")
    result = hunt(model, inputs)
    assert not result.clean and len(result.findings) == 1
    f = result.findings[0]
    assert (f["direction"], f["origin"], f["op"], f["module"]) == ("forward", "op", "aten::mul.Tensor",
                                                                   "model.layers.2.mlp")
    assert "modeling_qwen3.py" in f["source"]
    assert f["inf"] > 0 and f["nan"] == 0 and f["dtype"] == "float16"
    # the first element really is the first non-finite one of that op's output, recomputed here
    mlp = model.model.layers[2].mlp
    seen = {}
    mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        model(**inputs.kwargs)
    first = int(torch.nonzero(~torch.isfinite(seen["x"].reshape(-1)))[0])
    assert f["first_index"] == first and f["first_coords"][-1] == first % seen["x"].shape[-1]
    assert all(x["nonfinite"] == 0 for x in f["inputs"]) and len(f["inputs"]) == 2
    assert f["spread"]["module_calls"] >= 3 and f["spread"]["model_output"]["bad_slots"]


def test_backward_only_nan_names_its_forward_module():
    model, inputs = _model("qwen", "zero_div_backward_in_layer1_mlp")
    result = hunt(model, inputs, backward=True)
    assert [f["direction"] for f in result.findings] == ["backward"]  # the forward is clean
    f = result.findings[0]
    assert f["op"] == "aten::div.Tensor" and "_ZeroDivBackward" in f["node"]
    assert f["forward"]["module"] == "model.layers.1.mlp"
    assert "planted.py" in f["source"] and "in backward" in f["source"]
    assert all(x["nonfinite"] == 0 for x in f["inputs"])
    assert f["spread"]["backward_ops"] > 10
    assert any("parameter gradients hold NaN" in n for n in result.notes)


def _routed_experts(model, inputs, layer: int) -> set:
    got = {}
    gate = model.model.layers[layer].mlp.gate
    handle = gate.register_forward_hook(lambda m, a, out: got.update(idx=out[2]))
    with torch.no_grad():
        model(**inputs.kwargs)
    handle.remove()
    return set(got["idx"].unique().tolist())


def test_fused_experts_named_as_a_range_with_per_expert_counts():
    model, inputs = _model("qwen-moe", "stale_buffer_experts_17_24")
    expected = set(planted.STALE_EXPERTS) & _routed_experts(model, inputs, 1)
    assert len(expected) >= 6  # the test means something only if most of 17-24 got tokens
    f = hunt(model, inputs).findings[0]
    assert f["op"] == "aten::where.self" and f["module"] == "model.layers.1.mlp.experts"
    assert f["expert"][1] == min(expected)
    data = [x for x in f["inputs"] if not x.get("constant")]  # the NaN fill value is shown as a constant
    assert len(data) == 2 and all(x["nonfinite"] == 0 for x in data)
    assert [x["constant"] for x in f["inputs"] if x.get("constant")] == ["aten::scalar_tensor"]
    [experts] = f["experts"]
    assert experts["layout"] == "fused" and experts["experts_total"] == 64
    assert set(experts["bad_experts"]) == expected
    for row in experts["per_expert"]:  # NaN from column 64 of each row: first flat index 64
        assert row["first_index"] == planted.STALE_COLUMNS_WRITTEN and row["nan"] % 64 == 0 and row["nan"] > 0
    assert any(b["text"].startswith("columns >= 64 of 128") for b in f["boundary"])
    assert "bisection" not in f  # attribution was enough


def test_black_box_experts_found_by_bisection():
    model, inputs = _model("qwen-moe", "opaque_stale_experts_17_24")
    f = hunt(model, inputs).findings[0]
    assert f["op"] == "tdtest::stale_experts" and "experts" not in f
    b = f["bisection"]
    assert b["block"] == "model.layers.1.mlp/forward#0"
    assert b["guilty"] == list(planted.STALE_EXPERTS) and b["experts_total"] == 64
    assert 8 < b["runs"] < 64  # fewer runs than one per expert
    assert "found by bisection in" in b["text"]


class _ListMoE(torch.nn.Module):
    """A mixture of 16 experts in a ModuleList behind a linear router (Mixtral's layout)."""

    def __init__(self, bad=(), hidden=32, experts=16, k=2):
        super().__init__()
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(hidden, 64), torch.nn.SiLU(),
                                                               torch.nn.Linear(64, hidden)) for _ in range(experts))
        self.k, self.bad = k, set(bad)

    def forward(self, x):
        weights, idx = torch.topk(torch.softmax(self.gate(x), -1), self.k)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(idx == e)
            if rows.numel():
                y = expert(x[rows])
                if e in self.bad:
                    y = y / (y - y)  # the expert's own bug: 0 / 0 and x / 0
                out.index_add_(0, rows, y * weights[rows, slot, None])
        return out


class _ListModel(torch.nn.Module):
    def __init__(self, bad=()):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(32, 32)
        self.moe = _ListMoE(bad)

    def forward(self, x):
        return self.moe(self.inp(x))


def test_module_list_experts_attributed():
    model = _ListModel(bad=(5, 6))
    result = hunt(model, torch.randn(512, 32))
    f = result.findings[0]
    assert f["module"] == "moe" and f["op"] == "aten::div.Tensor"
    [experts] = f["experts"]
    assert experts["layout"] == "module list" and experts["bad_experts"] == [5, 6]
    assert experts["text"].startswith("experts 5-6 of 16")
    assert hunt(_ListModel(), torch.randn(512, 32)).clean


@pytest.mark.parametrize("target", ["cpu", "cpu-bf16", "cpu-fp16"])
def test_clean_runs_report_nothing(target):
    from tensordiff.backends import get_backend

    bundle = load_model("qwen", size="tiny", seq_len=1024, attention_mask=True)
    backend = get_backend(target)
    result = hunt(backend(bundle.model), backend.inputs(bundle.inputs), backward=True)
    assert result.clean and not result.notes, result.findings
    assert result.screened["tensors"] > 50 and result.screened["backward_ops"] > 100


def test_clean_moe_and_neg_inf_masks_report_nothing():
    model, inputs = _model("qwen-moe", seq_len=512)
    assert hunt(model, inputs, backward=True).clean

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x, mask):
            return self.proj(torch.softmax(x @ x.T + mask, -1) @ x)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attend = Attend()

        def forward(self, x, mask):
            return x + self.attend(x, mask)

    class Masked(torch.nn.Module):  # a causal mask written with -inf, handed down through layers
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(), Layer()])

        def forward(self, x):
            mask = torch.full((x.shape[0], x.shape[0]), float("-inf")).triu(1)
            for layer in self.layers:
                x = layer(x, mask)
            return x

    assert hunt(Masked(), torch.randn(64, 8)).clean
    assert not hunt(Masked(), torch.randn(64, 8), neg_inf_is_bad=True).clean


def test_over_a_trace_file(tmp_path):
    from tensordiff.tracing import capture

    model, inputs = _model("qwen", "fp16_overflow_in_layer2_mlp", seq_len=64)
    capture(model, inputs, tmp_path / "t.h5", level="both", save="full")
    f = hunt_trace(tmp_path / "t.h5").findings[0]
    assert (f["origin"], f["op"], f["module"]) == ("op", "aten::mul.Tensor", "model.layers.2.mlp")
    assert f["first_index"] is not None and all(x["nonfinite"] == 0 for x in f["inputs"])
    capture(model, inputs, tmp_path / "m.h5", level="module", save="stats")
    f = hunt_trace(tmp_path / "m.h5").findings[0]
    assert (f["origin"], f["module"]) == ("own_code", "model.layers.2.mlp")


def test_cli_exit_codes_json_and_reports(tmp_path):
    proc = run_cli("nan-hunt", "--model", "qwen", "--seq-len", "64", "--target",
                   f"{PLUGINS}/planted.py:fp16_overflow_in_layer2_mlp", "--json", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "tensordiff-nan-hunt/1" and not doc["clean"]
    assert doc["findings"][0]["op"] == "aten::mul.Tensor"
    assert "aten::mul.Tensor" in (tmp_path / "nan_hunt.md").read_text()
    assert "<script" not in (tmp_path / "nan_hunt.html").read_text()
    clean = run_cli("nan-hunt", "--seq-len", "32", "--no-isolate")  # the isolated path is run above
    assert clean.returncode == 0 and clean.stdout.startswith("CLEAN"), clean.stderr
    for bad in (["--trace", str(tmp_path / "missing.h5")], ["--bisect", "sometimes"]):
        proc = run_cli("nan-hunt", *bad)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and len(proc.stderr.splitlines()) == 1


def test_trace_with_nan_target_reports_where_they_are_born(tmp_path):
    from tensordiff.run import trace_job
    from tests.conftest import make_job

    res = trace_job(make_job(tmp_path, target=f"{PLUGINS}/planted.py:fp16_overflow_in_layer2_mlp",
                             isolate=False, level="both")).result
    # its weights differ too (diverged at layer 2's projections first); the Inf come right after
    assert res.verdict == "diverged" and res.first_nan is not None
    [f] = res.nan_hunt["findings"]
    assert (f["origin"], f["op"], f["module"]) == ("op", "aten::mul.Tensor", "model.layers.2.mlp")
    md = (Path(tmp_path) / "run" / "report.md").read_text()
    assert "## Where NaN / Inf are born" in md and "born at aten::mul.Tensor in model.layers.2.mlp" in md
    assert "born at aten::mul.Tensor" in (Path(tmp_path) / "run" / "report.html").read_text()
    summary = json.loads((Path(tmp_path) / "run" / "summary.json").read_text())
    assert summary["nan_hunt"]["findings"][0]["op"] == "aten::mul.Tensor"
