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


def _mixed_tensors():
    gen = torch.Generator(device="cuda").manual_seed(1)
    return [torch.randn(1000, device="cuda", generator=gen) * 3,
            torch.randn(64, 33, device="cuda", generator=gen).to(torch.bfloat16),
            torch.randn(300, device="cuda", generator=gen).half(),
            torch.randn(300, device="cuda", generator=gen).double(),
            torch.zeros(17, device="cuda"),
            torch.tensor([1.0, float("nan"), float("inf"), 0.0, -2.0, -0.0, float("-inf")], device="cuda"),
            torch.full((9,), float("nan"), device="cuda"),
            torch.randn(8, 8, device="cuda", generator=gen).t(),
            torch.randn(4096, 9, device="cuda", generator=gen)[:, 1:],  # strided, unaligned start
            torch.arange(10, device="cuda"),
            torch.empty(0, device="cuda"),
            torch.randn(7_000_001, device="cuda", generator=gen).to(torch.bfloat16) - 5]


@pytest.mark.parametrize("launcher", ["cuda", "triton"])
def test_fused_stats_match_per_tensor_stats(launcher, monkeypatch):
    from tensordiff.probes import fused_stats

    if launcher == "triton":
        if fused_stats.triton is None:
            pytest.skip("no triton")
        monkeypatch.setattr(fused_stats, "_lib", [None, True])
    elif fused_stats._cuda_library() is None:
        pytest.skip("no nvcc")
    tensors = _mixed_tensors()
    buf = fused_stats.FusedStatsBuffer("cuda", 64)
    rows = [buf.add(t) for t in tensors]
    host, event = buf.finish()
    event.synchronize()
    for t, row in zip(tensors, rows):
        expected = _stats_on(t.cpu()).numpy()
        assert host[row].numpy() == pytest.approx(expected, rel=1e-4, abs=1e-4, nan_ok=True), t.shape


def test_fused_stats_are_taken_before_a_later_in_place_op():
    from tensordiff.probes import fused_stats

    if not fused_stats.available():
        pytest.skip("no fused stats launcher")
    x = torch.ones(1 << 20, device="cuda")
    buf = fused_stats.FusedStatsBuffer("cuda", 4)
    row = buf.add(x)
    x.mul_(-3.0)  # after the capture, on the same stream
    host, event = buf.finish()
    event.synchronize()
    assert host[row, 0] == 1.0 and host[row, 1] == 1.0 and host[row, 2] == 1.0


@pytest.mark.parametrize("recorder", ["cpp", "python"])
def test_fast_module_capture_matches_the_general_path(tmp_path, recorder):
    """module+stats on CUDA takes the fast path (wrapped forwards, fused kernels, writer blocks; the
    per-record work in C++ or in Python): same keys, layouts and stats as the general path."""
    import numpy as np

    import tensordiff
    from tensordiff.models import load_model
    from tensordiff.probes import fast_module_stats, fused_stats
    from tensordiff.probes.module_hooks import ModuleProbe
    from tensordiff.probes.session import CaptureSession
    from tensordiff.trace import TraceWriter

    if not fused_stats.available():
        pytest.skip("no fused stats launcher")
    bundle = load_model("qwen", size="tiny", seq_len=64)
    model = bundle.model.cuda().to(torch.bfloat16)
    inputs = {k: v.cuda() for k, v in bundle.inputs.kwargs.items()}

    def run(path, fast):
        with TraceWriter(path, {}) as w:
            s = CaptureSession(w, save_data=False, fast_gpu_stats=fast)
            assert (s.fast is not None) == fast
            if fast and recorder == "python":
                s.fast = fast_module_stats.choose(w, s.emit_general, recorder="python")
                assert isinstance(s.fast, fast_module_stats.PythonModuleStats)
            elif fast:
                assert isinstance(s.fast, fast_module_stats.CppModuleStats)
            with ModuleProbe(model, s), torch.no_grad():
                model(**inputs)
            s.flush_stats()
        return tensordiff.open_trace(path).index

    slow, fast = run(tmp_path / "slow.h5", False), run(tmp_path / "fast.h5", True)
    assert list(slow.key) == list(fast.key)
    for col in ("shape", "stride", "storage_offset", "contiguous", "dtype", "device", "source"):
        assert list(slow[col].astype(str)) == list(fast[col].astype(str)), col
    stats = ["min", "max", "mean", "mean_abs", "std", "l2", "nan", "inf", "zero"]
    np.testing.assert_allclose(fast[stats].to_numpy(), slow[stats].to_numpy(), rtol=1e-3, atol=1e-4)
    # views of captured memory (q_proj's output as q_norm's input) are recognised as the same data
    assert fast["alias_of"].notna().sum() > slow["alias_of"].notna().sum()


@pytest.mark.parametrize("level,save", [("module", "full"), ("both", "stats")])
def test_general_cuda_path_measures_before_a_later_in_place_op(tmp_path, level, save):
    """The general path (op level, full capture) on CUDA: a Linear's output is measured before the
    ReLU(inplace=True) that follows rewrites it, and its stats agree with the bytes read back."""
    import tensordiff
    from tensordiff.models import Inputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(inplace=True),
                                torch.nn.Linear(512, 64)).cuda()
    x = torch.randn(4096, 256, device="cuda")
    with torch.no_grad():
        before = model[0](x)
    path = tmp_path / "t.h5"
    tensordiff.capture(model, Inputs((x,), {}), path, level=level, save=save)
    with tensordiff.open_trace(path) as trace:
        idx = trace.index
        linear_out = idx.loc["0/forward#0/output.0"]
        assert linear_out["min"] == pytest.approx(before.min().item(), rel=1e-5) and linear_out["min"] < -1
        assert linear_out["mean"] == pytest.approx(before.double().mean().item(), rel=1e-4, abs=1e-6)
        assert linear_out["zero"] == (before == 0).sum().item()
        assert idx.loc["1/forward#0/output.0", "min"] == 0.0  # the ReLU's own output: after the change
        if save == "full":
            data = trace.tensor("0/forward#0/output.0")
            assert torch.equal(data, before.cpu())


def test_fast_path_with_backward_matches_the_general_path(tmp_path):
    """module+stats with gradients on CUDA (forward records from the fast path, gradients from the
    backward hooks) against a full capture (general path): same keys in the same order, same stats."""
    import numpy as np

    import tensordiff
    from tensordiff.models import load_model

    bundle = load_model("qwen", size="tiny", seq_len=64)
    model = bundle.model.cuda()
    inputs = bundle.inputs.__class__((), {k: v.cuda() for k, v in bundle.inputs.kwargs.items()})
    fast = tensordiff.capture(model, inputs, tmp_path / "fast.h5", save="stats", backward=True)
    model.zero_grad(set_to_none=True)
    full = tensordiff.capture(model, inputs, tmp_path / "full.h5", save="full", backward=True)
    a, b = tensordiff.open_trace(tmp_path / "fast.h5").index, tensordiff.open_trace(tmp_path / "full.h5").index
    assert fast.records == full.records and list(a.key) == list(b.key)
    assert (a.direction == "backward").sum() > 50
    stats = ["min", "max", "mean", "mean_abs", "std", "l2", "nan", "inf", "zero"]
    np.testing.assert_allclose(a[stats].to_numpy(), b[stats].to_numpy(), rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fast_path_on_a_model_split_over_two_gpus(tmp_path):
    """Layers on cuda:0 and cuda:1 with cuda:0 current: each stats kernel runs on its tensor's device
    and stream, and the records of both devices hold the right numbers."""
    import tensordiff
    from tensordiff.models import Inputs

    class Split(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(64, 128).to("cuda:0")
            self.b = torch.nn.Linear(128, 32).to("cuda:1")

        def forward(self, x):
            return self.b(self.a(x).to("cuda:1"))

    torch.manual_seed(0)
    model, x = Split(), torch.randn(2048, 64, device="cuda:0")
    with torch.no_grad():
        a_out = model.a(x)
        b_out = model.b(a_out.to("cuda:1"))
    torch.cuda.set_device(0)
    tensordiff.capture(model, Inputs((x,), {}), tmp_path / "t.h5", save="stats")
    idx = tensordiff.open_trace(tmp_path / "t.h5").index
    for key, t, device in (("a/forward#0/output.0", a_out, "cuda:0"), ("b/forward#0/output.0", b_out, "cuda:1")):
        row = idx.loc[key]
        assert row["device"] == device
        assert row["min"] == pytest.approx(t.min().item(), rel=1e-5)
        assert row["l2"] == pytest.approx(t.double().norm().item(), rel=1e-4)
