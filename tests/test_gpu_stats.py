"""Batched GPU stats agree with the per-tensor reference implementation (CUDA only)."""
import pytest
import torch

from tensordiff.probes.gpu_stats import StatsBatcher
from tensordiff.probes.snapshot import _stats_on

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_batched_stats_match_per_tensor_stats():
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = [torch.randn(1000, device="cuda", generator=gen) * 3,
               torch.randn(64, 33, device="cuda", generator=gen).to(torch.bfloat16),
               torch.zeros(17, device="cuda"),
               torch.tensor([1.0, float("nan"), float("inf"), 0.0, -2.0], device="cuda"),
               torch.randn(8, 8, device="cuda", generator=gen).t(),
               torch.arange(10, device="cuda"),
               torch.randn(5_000_000, device="cuda", generator=gen).to(torch.bfloat16)]  # own reductions
    batcher = StatsBatcher()
    slots = [batcher.add(t) for t in tensors]
    batcher.flush()
    for t, slot in zip(tensors, slots):
        expected = _stats_on(t.cpu()).numpy()
        assert slot.numpy() == pytest.approx(expected, rel=1e-4, abs=1e-5, nan_ok=True)
