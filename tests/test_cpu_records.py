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
