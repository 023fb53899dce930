"""The native one-pass CPU stats and checksum (probes/cpu_stats.c) against float64 torch, and the
op probe's use of them: view outputs with the same elements become aliases with the right stats."""
import math

import pytest
import torch

import tensordiff
from tensordiff.probes import cpu_stats
from tensordiff.probes.snapshot import _stats_on
from tensordiff.schema import STAT_NAMES
from tensordiff.trace import TensordiffError, TraceReader

pytestmark = pytest.mark.skipif(not cpu_stats.available(), reason="no C compiler: the numpy path runs")


def _reference(x: torch.Tensor) -> list[float]:
    """STAT_NAMES in float64 torch, over the finite elements."""
    x = x.double().reshape(-1)
    finite = x[torch.isfinite(x)]
    n = max(finite.numel(), 1)
    nan, inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
    zero = int((x == 0).sum())
    if finite.numel() == 0:
        return [math.nan] * 6 + [nan, inf, zero]
    mean = float(finite.sum()) / n
    l2 = float(finite.pow(2).sum().sqrt())
    std = math.sqrt(max(l2 * l2 / n - mean * mean, 0.0))
    return [float(finite.min()), float(finite.max()), mean, float(finite.abs().sum()) / n, std, l2, nan, inf, zero]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("numel", [1, 7, 255, 256, 257, 100_003])
def test_stats_match_float64_torch_with_nan_inf_zero(dtype, numel):
    g = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=g) * 3).to(dtype)
    if numel >= 7:
        x[1], x[3], x[5], x[6] = float("nan"), float("inf"), -float("inf"), 0.0
        x[4] = -0.0
    got = cpu_stats.stats(x).tolist()
    want = _reference(x)
    for name, a, b in zip(STAT_NAMES, got, want):
        if math.isnan(b):
            assert math.isnan(a), name
        else:
            # float32 block sums: relative error of a few 1e-7 of the sum of magnitudes
            assert a == pytest.approx(b, rel=2e-6, abs=1e-6 * max(1.0, abs(want[5]))), (name, a, b)
    assert got[6:] == want[6:]  # counts are exact


def test_all_nonfinite_gives_nan_moments_and_counts():
    x = torch.tensor([float("nan"), float("inf"), -float("inf")])
    got = cpu_stats.stats(x).tolist()
    assert all(math.isnan(v) for v in got[:6]) and got[6:] == [1.0, 2.0, 0.0]


def test_strided_views_agree_with_their_copies():
    x = torch.randn(64, 48)
    for view in (x.t(), x[:, 5:30], x[::3], x.unsqueeze(0).expand(2, 64, 48)):
        assert torch.allclose(cpu_stats.stats(view), cpu_stats.stats(view.contiguous()), rtol=1e-6, equal_nan=True)
        assert cpu_stats.checksum(view) == cpu_stats.checksum(view.contiguous())
    # the stats path of the snapshot gives the same numbers as the numpy fallback
    assert torch.allclose(_stats_on(x.t()), cpu_stats.stats(x), rtol=1e-6)


def test_checksum_sees_any_changed_element_and_ignores_order():
    x = torch.randn(4096)
    base = cpu_stats.checksum(x)
    assert cpu_stats.checksum(x.flip(0).contiguous()) == base  # order-free: a transpose's copy agrees
    for i in (0, 1, 2047, 4095):
        y = x.clone()
        y[i] = torch.nextafter(y[i], torch.tensor(math.inf))  # one ulp
        assert cpu_stats.checksum(y) != base
    assert cpu_stats.stats_and_checksum(x)[1] == base
    for dtype in (torch.int64, torch.int32, torch.bool, torch.uint8, torch.bfloat16):
        t = torch.arange(100).to(dtype)
        u = t.clone()
        u[17] = 0 if dtype != torch.bool else False
        assert (cpu_stats.checksum(t) == cpu_stats.checksum(u)) == torch.equal(t, u)


def test_view_outputs_become_aliases_with_their_own_stats(tmp_path):
    """A transpose and a reshape hold their input's elements: alias records, no second stats pass.
    Their stats are the real ones; a transpose's data is not the input's order: stats only."""

    class M(torch.nn.Module):
        def forward(self, x):
            y = x * 2.0
            return (y.t() + 1.0, y.view(-1) - 1.0, y[:, :3] * 1.0)

    x = torch.randn(8, 6)
    path = tmp_path / "t.h5"
    tensordiff.capture(M(), {"x": x}, path, level="both", save="full")
    trace = TraceReader(path)
    rows = trace.index.set_index("key")
    t_out = [k for k in rows.index if k.endswith("op0001.t/out.0")][0]
    v_out = [k for k in rows.index if k.endswith("op0003.view/out.0")][0]
    s_out = [k for k in rows.index if ".slice" in k and k.endswith("/out.0")][0]
    y = x * 2.0
    assert isinstance(rows.loc[t_out, "alias_of"], str) and isinstance(rows.loc[v_out, "alias_of"], str)
    assert not isinstance(rows.loc[s_out, "alias_of"], str)  # a slice: other elements, own stats
    for key, value in ((t_out, y.t()), (v_out, y.view(-1)), (s_out, y[:, :3])):
        got = trace.row(key)
        assert got["l2"] == pytest.approx(float(value.double().norm()), rel=1e-6)
        assert got["min"] == pytest.approx(float(value.min()))
    assert torch.equal(trace.tensor(v_out), y.view(-1))  # same order: the data is there
    with pytest.raises(TensordiffError, match="stats only"):
        trace.tensor(t_out)


def test_full_capture_through_a_small_staging_ring_keeps_every_value(tmp_path, monkeypatch):
    """Copies go into a reused ring that wraps many times (and is full at times: then a clone):
    every saved tensor still reads back equal to the value at capture time, also a transpose's
    input and a tensor changed in place right after it was captured."""
    from tensordiff.probes import staging

    monkeypatch.setattr(staging, "RING_BYTES", 256 << 10)
    monkeypatch.setattr(staging, "_free", [])

    class M(torch.nn.Module):
        def forward(self, x):
            outs = []
            for i in range(40):  # 40 x 32 KB of new tensors: the 256 KB ring wraps
                y = x * float(i + 1)
                z = y.t() @ x      # mm of a transpose: its input is saved in memory order, rebuilt
                y.add_(1.0)        # in place after capture: the record keeps the value before
                outs.append(z.sum() + y.sum())
            return torch.stack(outs)

    x = torch.randn(128, 64)
    path = tmp_path / "ring.h5"
    tensordiff.capture(M(), {"x": x}, path, level="both", save="full")
    trace = TraceReader(path)
    rows = trace.index
    muls = [k for k in rows["key"] if ".mul.Tensor/out.0" in k]
    mms = [k for k in rows["key"] if ".mm/in.0" in k]
    assert len(muls) == 40 and len(mms) == 40
    for i, (k_mul, k_mm) in enumerate(zip(muls, mms)):
        want = x * float(i + 1)
        assert torch.equal(trace.tensor(k_mul), want), k_mul
        assert torch.equal(trace.tensor(k_mm), want.t()), k_mm
