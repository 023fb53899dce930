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
