"""CUDA backends: run only where torch sees a GPU (the lent H100), skipped cleanly elsewhere."""
import pytest
import torch

from tensordiff.run import trace_job
from tests.conftest import make_job

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("target", ["cuda", "cuda-bf16", "cuda-fp16"])
def test_cuda_targets_match_cpu_reference(tmp_path, target):
    res = trace_job(make_job(tmp_path, target=target, isolate=False)).result
    assert res.verdict == "match", (res.first_divergence, res.culprit)
    logits = res.table[res.table["key"] == "__root__/forward#0/output.logits"].iloc[0]
    assert logits["rel_l2"] < logits["tol_rel_l2"]
    assert res.meta["target"]["backend"]["device"] == "cuda"


def test_nan_hunt_on_cuda_finds_overflow_and_stale_experts_and_clean_runs_stay_clean():
    import sys
    from pathlib import Path

    from tensordiff.analysis.nan_hunt import hunt
    from tensordiff.models import load_model

    sys.path.insert(0, str(Path(__file__).parent / "plugins"))
    import planted

    bundle = load_model("qwen", size="tiny", seq_len=2048)
    model = planted.fp16_overflow_in_layer2_mlp(bundle.model).cuda()
    inputs = {"input_ids": bundle.inputs.kwargs["input_ids"].cuda()}
    f = hunt(model, inputs).findings[0]
    assert (f["op"], f["module"], f["dtype"]) == ("aten::mul.Tensor", "model.layers.2.mlp", "float16")
    assert f["inf"] > 0 and f["first_index"] is not None

    moe = load_model("qwen-moe", size="tiny", seq_len=256)
    model = planted.stale_buffer_experts_17_24(moe.model).cuda()
    f = hunt(model, {"input_ids": moe.inputs.kwargs["input_ids"].cuda()}).findings[0]
    assert f["experts"][0]["bad_experts"] and set(f["experts"][0]["bad_experts"]) <= set(planted.STALE_EXPERTS)

    clean = load_model("qwen", size="tiny", seq_len=2048)
    model = clean.model.cuda().to(torch.bfloat16)
    assert hunt(model, {"input_ids": clean.inputs.kwargs["input_ids"].cuda()}, backward=True).clean
