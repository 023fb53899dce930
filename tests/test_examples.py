"""One test per example: each reproduces its story and the tool's conclusion."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case, verdict", [("clean", "match"), ("noncontig-copy", "diverged"),
                                           ("inplace-fallback", "diverged"), ("alloc-round-up", "crashed")])
def test_npu_story_example(tmp_path, case, verdict):
    result = _load("npu_story").run_case(case, runs=tmp_path / "runs", reports=tmp_path / "reports")
    assert result.verdict == verdict
    assert (tmp_path / "reports" / f"echo_npu-{case}" / "report.html").exists()
    if case == "inplace-fallback":
        assert result.culprit["op"] == "aten::masked_fill_.Scalar"
    if case == "noncontig-copy":
        assert "contiguous" in result.culprit["layout_experiment"]


def test_bf16_moe_example(tmp_path):
    result = _load("bf16_moe").run(runs=tmp_path / "runs", reports=tmp_path / "reports")
    assert result.verdict == "match"
    assert (tmp_path / "reports" / "cpu-bf16-qwen-moe" / "summary.json").exists()
