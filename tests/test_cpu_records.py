"""CPU records made in C++ (probes/fast_records.cpp CpuRecords, used by CaptureSession for records
that keep only stats) against the Python path they replace: the same index rows, field for field
and in the same order, the same stats, the same aliases, and the same refusal to alias a tensor a
raw-pointer writer changed."""
import json

import h5py
import numpy as np
import pytest
import torch

import tensordiff
from tensordiff.models import load_model
from tensordiff.probes import fast_records
from tensordiff.probes.session import CaptureSession
from tensordiff.trace import TraceWriter

pytestmark = pytest.mark.skipif(fast_records.cpu_records() is None,
                                reason="no C++ toolchain for the fast records extension")


def _rows_and_stats(path):
    with h5py.File(path) as f:
        return [json.loads(t) for t in f["index"].asstr()[...]], f["stats"][...]


def _capture(monkeypatch, bundle, path, native: bool, **kw):
    if native:
        monkeypatch.delenv("TENSORDIFF_CPU_RECORDS", raising=False)
    else:
        monkeypatch.setenv("TENSORDIFF_CPU_RECORDS", "python")
    tensordiff.capture(bundle.model, bundle.inputs, path, save="stats", **kw)
    bundle.model.zero_grad(set_to_none=True)
    return _rows_and_stats(path)


@pytest.mark.parametrize("kw", [dict(level="both"), dict(level="both", backward=True),
                                dict(level="op", synchronous=True)])
def test_native_records_equal_the_python_path(tmp_path, monkeypatch, kw):
    bundle = load_model("qwen", size="tiny", seq_len=64, seed=0)
    rows, stats = _capture(monkeypatch, bundle, tmp_path / "native.h5", True, **kw)
    py_rows, py_stats = _capture(monkeypatch, bundle, tmp_path / "python.h5", False, **kw)
    assert len(rows) == len(py_rows) > 900
    for row, py_row in zip(rows, py_rows):
        assert list(row.items()) == list(py_row.items())  # fields, values and their order
    np.testing.assert_array_equal(stats, py_stats)
    aliases = sum("alias_of" in r for r in rows)
    assert aliases > len(rows) // 3  # op inputs are earlier outputs: recorded once
    assert any(r.get("stats_only") for r in rows)  # transposes: same elements, another order


def test_raw_pointer_write_is_not_an_alias_and_odd_tensors_keep_their_order(tmp_path):
    buf = torch.ones(1000)
    ids = torch.arange(6)                  # an integer tensor: the Python path takes it
    grid = torch.randn(8, 8)
    with TraceWriter(tmp_path / "a.h5", {}) as w:
        s = CaptureSession(w, save_data=False, native_cpu=True)
        assert s.native is not None
        base = {"kind": "op", "direction": "forward", "module": "m", "scope": "m/forward#0", "call": 0,
                "op": "aten::x", "op_index": 0, "source": ""}
        s.emit_op(base, "m/forward#0/op0000.x", "in", [buf, ids, grid[:, :3], grid])
        s.emit_op(base, "m/forward#0/op0001.x", "in", [buf])          # unchanged: an alias
        raw = torch.from_numpy(buf.numpy())                            # a raw-pointer writer: no version bump
        raw[3] = 7.0
        s.emit_op(base, "m/forward#0/op0002.x", "in", [buf])          # changed behind torch's back
        s.emit_op(base, "m/forward#0/op0003.t", "out", [grid.t()], same_as=grid)  # same elements, transposed
        assert s.records == 7
    trace = tensordiff.open_trace(tmp_path / "a.h5")
    assert trace.keys() == [f"m/forward#0/op0000.x/in.{i}" for i in range(4)] + [
        "m/forward#0/op0001.x/in.0", "m/forward#0/op0002.x/in.0", "m/forward#0/op0003.t/out.0"]
    rows = trace.rows
    assert rows["m/forward#0/op0001.x/in.0"]["alias_of"] == "m/forward#0/op0000.x/in.0"
    changed = rows["m/forward#0/op0002.x/in.0"]
    assert not isinstance(changed.get("alias_of"), str) and changed["max"] == 7.0
    assert rows["m/forward#0/op0000.x/in.1"]["dtype"] == "int64" and rows["m/forward#0/op0000.x/in.1"]["max"] == 5
    sliced = rows["m/forward#0/op0000.x/in.2"]  # a slice with gaps: the Python path copies it first
    assert sliced["stride"] == [8, 1] and sliced["shape"] == [8, 3] and not sliced["contiguous"]
    assert sliced["max"] == pytest.approx(float(grid[:, :3].max()))
    transposed = rows["m/forward#0/op0003.t/out.0"]
    assert transposed["alias_of"] == "m/forward#0/op0000.x/in.3" and transposed["stats_only"]
    assert transposed["stride"] == [1, 8] and transposed["mean"] == pytest.approx(float(grid.mean()), rel=1e-6)


class _Odd(torch.nn.Module):
    """Ops that take the C++ op handler's side roads: an uninitialised allocation (handed back to
    the Python handler), outputs in a tuple and a list, integer and boolean tensors, views with gaps,
    keyword arguments, and a module name that needs escaping in JSON."""

    def __init__(self):
        super().__init__()
        self.parts = torch.nn.ModuleDict({'q"\\é': torch.nn.Linear(16, 16)})

    def forward(self, x):
        h = self.parts['q"\\é'](x)
        buf = torch.empty(h.shape[0], 16)   # aten::empty: values mean nothing until written
        buf.copy_(h)
        top, idx = torch.topk(buf, 3, dim=-1)
        first, second = torch.split(h, 8, dim=-1)
        mask = idx > 4
        gaps = h[:, ::2]                      # a view with gaps
        total = torch.sum(gaps * 2, dim=1, keepdim=True) + mask.sum() + top.sum()
        zeros = torch.zeros(3, dtype=torch.float64)  # (keyword arguments)
        return total + first.mean() + second.t().mean() + zeros.sum()


def _capture_with(monkeypatch, model, x, path, mode):
    for name in ("TENSORDIFF_CPU_RECORDS", "TENSORDIFF_OP_HANDLER"):
        monkeypatch.delenv(name, raising=False)
    if mode == "python":
        monkeypatch.setenv("TENSORDIFF_CPU_RECORDS", "python")
    elif mode == "records":
        monkeypatch.setenv("TENSORDIFF_OP_HANDLER", "python")
    tensordiff.capture(model, (x,), path, level="both", save="stats")
    return _rows_and_stats(path)


def test_cpp_op_handler_equals_the_python_handler_on_odd_ops(tmp_path, monkeypatch):
    from tensordiff.probes.dispatch_ops import OpProbe

    torch.manual_seed(0)
    model, x = _Odd(), torch.randn(32, 16)
    with TraceWriter(tmp_path / "probe.h5", {}) as w:  # the C++ handler is the one chosen here
        assert OpProbe(CaptureSession(w, save_data=False, native_cpu=True)).native is not None
    results = {mode: _capture_with(monkeypatch, model, x, tmp_path / f"{mode}.h5", mode)
               for mode in ("handler", "records", "python")}
    rows, stats = results["handler"]
    ops = {r["op"] for r in rows if r["kind"] == "op"}
    assert {"aten::empty.memory_format", "aten::topk", "aten::split.Tensor", "aten::gt.Scalar",
            "aten::zeros"} <= ops
    for mode in ("records", "python"):
        other_rows, other_stats = results[mode]
        assert len(rows) == len(other_rows) > 40
        # Never-written memory (empty()'s buffer before copy_) holds garbage that may even change
        # between two reads (pages the allocator gave back lazily, MADV_FREE): its records must say
        # so in every mode, while whether a second read matched the first is not compared.
        garbage = [i for i, r in enumerate(rows) if r.get("uninitialized")]
        assert garbage and garbage == [i for i, r in enumerate(other_rows) if r.get("uninitialized")]
        for i, (row, other) in enumerate(zip(rows, other_rows)):
            if i in garbage:
                assert (row["key"], row["shape"]) == (other["key"], other["shape"])
            else:
                assert list(row.items()) == list(other.items()), mode
        written = [i for i in range(len(rows)) if i not in garbage]
        np.testing.assert_array_equal(stats[written], other_stats[written])
    by_key = {r["key"]: r for r in rows}
    this_file = __file__
    topk = [r for r in rows if r["op"] == "aten::topk" and r["slot"] == "out.1"][0]
    assert topk["dtype"] == "int64" and topk["source"].startswith(f"{this_file}:")
    line = int(topk["source"][len(this_file) + 1:].split(" ")[0])
    assert "torch.topk" in open(this_file).read().splitlines()[line - 1]
    assert any(k.startswith('parts.q"\\é/forward#0/op') for k in by_key)
    gaps = [r for r in rows if r["op"] == "aten::slice.Tensor" and r["slot"] == "out.0"][-1]
    assert gaps["stride"] == [16, 2] and not gaps["contiguous"]
    # read again by the next op: the same elements, confirmed by a checksum read in place
    doubled = [r for r in rows if r["op"] == "aten::mul.Tensor" and r["slot"] == "in.0"][0]
    assert doubled["alias_of"] == gaps["key"]
    with torch.no_grad():  # (as the capture ran it: a CPU matmul may take another kernel with grad)
        expected = float(model.parts['q"\\é'](x)[:, ::2].max())
    assert stats[list(by_key).index(gaps["key"]), 1] == pytest.approx(expected, rel=1e-5)
