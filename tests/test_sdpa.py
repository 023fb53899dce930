"""Targets ``<device>[-dtype]+sdpa-<backend>``: the model's attention forced onto one of torch's SDPA
backends, judged by our tolerance and by kernel authors' rule per call. On the CPU torch has the
flash and math backends; the CUDA ones (flash, efficient, cudnn) run on the lent GPU machine."""
import subprocess
import sys

import pytest
import torch

from tensordiff.backends.registry import get_backend, is_builtin
from tensordiff.backends.sdpa import sdpa_kernel_call
from tensordiff.run import isolate_by_default, trace_job
from tests.conftest import make_job


def test_names_parse_and_run_in_process():
    assert is_builtin("cpu-bf16+sdpa-flash") and is_builtin("cuda+sdpa-cudnn")
    assert not is_builtin("cpu+sdpa-bogus") and not is_builtin("cpu+flash")
    assert not isolate_by_default("cpu-bf16+sdpa-math")  # torch's own kernels: no child process
    backend = get_backend("cpu-bf16+sdpa-flash")
    assert backend.dtype == torch.bfloat16 and backend.info["sdpa_backend"] == "flash"


def test_forced_backend_is_the_one_that_runs():
    """The flash kernel on the CPU differs from math in its rounding: forcing each gives two
    different results, each within float rounding of float64."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1024, 64, generator=gen) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    flash = sdpa_kernel_call("flash")(q, k, v, None, 64 ** -0.5)
    math = sdpa_kernel_call("math")(q, k, v, None, 64 ** -0.5)
    assert not torch.equal(flash, math)
    for out in (flash, math):
        assert (out.double() - exact).abs().max() < 1e-5


@pytest.mark.parametrize("target,seq_len", [("cpu+sdpa-flash", 1024), ("cpu-bf16+sdpa-flash", 512)])
def test_clean_backend_matches_and_passes_authors_rule(tmp_path, target, seq_len):
    res = trace_job(make_job(tmp_path, seq_len=seq_len, target=target, isolate=False)).result
    assert res.verdict == "match", res.notes
    assert res.meta["target"]["backend"]["sdpa_backend"] == "flash"
    rule = [n for n in res.notes if n.startswith("kernel authors' rule")]
    assert len(rule) == 1 and "torch SDPA flash backend" in rule[0] and "passes in all 4 calls" in rule[0], res.notes


def test_a_backend_that_cannot_take_the_call_is_one_line(tmp_path):
    """efficient attention has no CPU kernel: one line naming the backend and the call, exit 2 (not
    torch's silent fallback, not a traceback)."""
    out = subprocess.run([sys.executable, "-m", "tensordiff", "trace", "--model", "qwen", "--seq-len", "32",
                          "--target", "cpu+sdpa-efficient", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert any("SDPA backend 'efficient' cannot run this call" in line and "(1, 4, 32, 64)" in line
               for line in lines), out.stderr


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("kind", ["flash", "efficient", "cudnn"])
def test_cuda_backends_match_at_2048_in_bf16(tmp_path, kind):
    res = trace_job(make_job(tmp_path, seq_len=2048, reference="cuda", target=f"cuda-bf16+sdpa-{kind}",
                             isolate=False, save="stats")).result
    assert res.verdict == "match", res.notes
    rule = [n for n in res.notes if n.startswith("kernel authors' rule")]
    assert len(rule) == 1 and "passes in all" in rule[0], res.notes
