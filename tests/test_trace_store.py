import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tensordiff.errors import TensordiffError
from tensordiff.probes.snapshot import snapshot
from tensordiff.trace import TraceWriter, open_trace


def _rec(key, seq=0):
    return {"key": key, "kind": "module", "direction": "forward", "module": "m", "call": 0,
            "scope": "m/forward#0", "op": "", "op_index": -1, "slot": key.rsplit("/", 1)[-1], "source": ""}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_roundtrip_is_lossless(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    src = (torch.randn(7, 5, generator=gen) * 100).to(dtype)
    view = src.t()  # non-contiguous: stored in logical shape, layout kept in the index
    with TraceWriter(tmp_path / "t.h5", {"model": "x"}) as w:
        w.write(_rec("m/forward#0/output.0"), snapshot(view))
    trace = open_trace(tmp_path / "t.h5")
    back = trace.tensor("m/forward#0/output.0")
    assert back.dtype == dtype and back.shape == view.shape
    assert torch.equal(back, view)
    row = trace.row("m/forward#0/output.0")
    assert row["stride"] == [1, 5] and row["contiguous"] is False
    assert trace.complete and trace.meta["model"] == "x"


def test_stats_match_torch(tmp_path):
    x = torch.tensor([[1.0, -2.0, 0.0], [float("nan"), float("inf"), 4.0]])
    with TraceWriter(tmp_path / "t.h5", {}) as w:
        w.write(_rec("a/forward#0/output.0"), snapshot(x))
    row = open_trace(tmp_path / "t.h5").row("a/forward#0/output.0")
    finite = torch.tensor([1.0, -2.0, 0.0, 4.0])
    assert row["min"] == -2.0 and row["max"] == 4.0
    assert row["mean"] == pytest.approx(finite.mean().item())
    assert row["l2"] == pytest.approx(finite.norm().item())
    assert (row["nan"], row["inf"], row["zero"]) == (1, 1, 1)


def test_capture_is_a_copy(tmp_path):
    """A later in-place op must not rewrite what was captured."""
    x = torch.ones(4)
    with TraceWriter(tmp_path / "t.h5", {}) as w:
        w.write(_rec("a/forward#0/output.0"), snapshot(x))
        x.mul_(3)
    assert torch.equal(open_trace(tmp_path / "t.h5").tensor("a/forward#0/output.0"), torch.ones(4))


def test_killed_writer_leaves_readable_partial_trace(tmp_path):
    path = tmp_path / "killed.h5"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from tensordiff.trace import TraceWriter
        from tensordiff.probes.snapshot import snapshot
        w = TraceWriter({str(path)!r}, {{"model": "killed"}})
        for i in range(5):
            w.write({{"key": f"m/forward#{{i}}/output.0", "kind": "module", "direction": "forward",
                      "module": "m", "call": i, "scope": f"m/forward#{{i}}", "op": "", "op_index": -1,
                      "slot": "output.0", "source": ""}}, snapshot(torch.full((1000,), float(i))))
        import time
        while w.acknowledged < 5:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    trace = open_trace(path)
    assert trace.complete is False
    assert len(trace) == 5
    assert torch.equal(trace.tensor("m/forward#4/output.0"), torch.full((1000,), 4.0))


def test_reader_errors_are_one_line(tmp_path):
    with pytest.raises(TensordiffError, match="not found"):
        open_trace(tmp_path / "missing.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(TensordiffError, match="bad.h5"):
        open_trace(bad)


def test_block_of_fast_records_is_written_with_layouts_and_aliases(tmp_path):
    """The fast GPU path hands the writer blocks of tuples and a stats array: the rows it writes match
    what the general path writes (contiguity from shape and stride, aliases sharing the stats)."""
    stats = torch.tensor([[-1.0, 2.0, 0.5, 0.7, 0.9, 3.0, 0, 0, 1], [0.0, 1.0, 0.5, 0.5, 0.5, 1.0, 2, 1, 4]],
                         dtype=torch.float64)
    cuda0 = torch.device("cuda", 0)
    block = [(("a", "forward", 0, "output.0"), "x.py:1 in f", torch.Size([2, 3]), (3, 1), 0, torch.bfloat16, 0, None,
              cuda0),
             (("b", "forward", 0, "input.0"), "x.py:2 in f", torch.Size([3, 2]), (1, 3), 0, torch.bfloat16, -1,
              ("a", "forward", 0, "output.0"), cuda0),
             (("b", "forward", 0, "output.0"), "", torch.Size([4, 1, 2]), (2, 99, 1), 5, torch.float32, 1, None,
              cuda0)]
    with TraceWriter(tmp_path / "t.h5", {}) as w:
        w.write_block(block, [(stats, None)])
    idx = open_trace(tmp_path / "t.h5").index
    assert list(idx["key"]) == ["a/forward#0/output.0", "b/forward#0/input.0", "b/forward#0/output.0"]
    a, b_in, b_out = (idx.loc[k] for k in idx["key"])
    assert a["contiguous"] and not b_in["contiguous"] and b_out["contiguous"]  # size-1 dims ignore stride
    assert b_in["alias_of"] == "a/forward#0/output.0" and b_in["l2"] == a["l2"] == 3.0
    assert b_out["storage_offset"] == 5 and b_out["dtype"] == "float32" and b_out["device"] == "cuda:0"
    assert (b_out["nan"], b_out["inf"], b_out["zero"]) == (2, 1, 4) and not b_out["has_data"]
    assert a["source"] == "x.py:1 in f" and a["scope"] == "a/forward#0"


def test_schema_1_files_still_read(tmp_path):
    """A trace written by schema 1 (one /data dataset per record) reads as before."""
    import json

    import h5py
    import numpy as np
    import torch

    from tensordiff.trace import open_trace

    t = torch.randn(3, 4).to(torch.bfloat16)
    with h5py.File(tmp_path / "v1.h5", "w") as f:
        f.attrs.update(format="tensordiff-trace", schema_version=1, complete=True, metadata="{}")
        row = {"key": "m/forward#0/output.0", "seq": 0, "kind": "module", "direction": "forward", "module": "m",
               "call": 0, "scope": "m/forward#0", "op": "", "op_index": -1, "slot": "output.0", "source": "",
               "shape": [3, 4], "dtype": "bfloat16", "device": "cpu", "stride": [4, 1], "storage_offset": 0,
               "contiguous": True, "has_data": True}
        f.create_dataset("index", data=[json.dumps(row)], dtype=h5py.string_dtype())
        f.create_dataset("stats", data=np.zeros((1, 9)))
        f.create_group("data").create_dataset("0000000", data=t.view(torch.uint16).numpy()).attrs["dtype"] = "bfloat16"
    assert torch.equal(open_trace(tmp_path / "v1.h5").tensor("m/forward#0/output.0"), t)


def test_plain_add_api_builds_traces_the_diff_reads(tmp_path):
    """What an importer of a foreign dump does: tensors by module and slot, no probes."""
    import torch

    from tensordiff.diff import diff
    from tensordiff.errors import TensordiffError
    from tensordiff.trace import TraceWriter, open_trace

    torch.manual_seed(0)
    acts = {f"layers.{i}": torch.randn(4, 8) for i in range(3)}
    for name, scale in (("ref", 1.0), ("tgt", 1.5)):
        with TraceWriter(tmp_path / f"{name}.h5", {"role": name}) as w:
            for i, (module, t) in enumerate(acts.items()):
                w.add({"module": module, "slot": "output.0"}, t * (scale if i == 1 else 1.0))
            with pytest.raises(TensordiffError, match="already in the trace"):
                w.add({"module": "layers.0", "slot": "output.0"}, t)
    trace = open_trace(tmp_path / "ref.h5")
    assert torch.equal(trace.tensor("layers.2/forward#0/output.0"), acts["layers.2"])
    assert trace.row("layers.1/forward#0/output.0")["max"] == pytest.approx(float(acts["layers.1"].max()))
    result = diff(tmp_path / "ref.h5", tmp_path / "tgt.h5")
    assert result.verdict == "diverged" and result.first_divergence["module"] == "layers.1"


def test_records_across_chunks_and_commits_read_back_exactly(tmp_path):
    """Records of odd sizes, straddling /blob chunks, committed in many small commits (the partial
    last chunk is written again with its continuation): the direct read from the file's pages and
    h5py's own read give the same bytes as the tensors written."""
    from tensordiff.trace import BLOB_CHUNK

    gen = torch.Generator().manual_seed(3)
    sizes = [5, BLOB_CHUNK // 4 + 3, 17, BLOB_CHUNK + 11, 1, 3 * BLOB_CHUNK // 8 - 1, 2 * BLOB_CHUNK // 4]
    tensors = {f"m{i}/forward#0/output.0": torch.randn(n, generator=gen) for i, n in enumerate(sizes)}
    with TraceWriter(tmp_path / "t.h5", {}, synchronous=True) as w:  # one commit per record
        for key, t in tensors.items():
            w.write(_rec(key), snapshot(t))
    trace = open_trace(tmp_path / "t.h5")
    assert trace._raw_chunks() is not None  # the direct path is the one under test
    blob = trace._file["blob"]
    for key, t in tensors.items():
        assert torch.equal(trace.tensor(key), t), key
        row = trace.row(key)
        via_h5py = blob[int(row["data_offset"]):int(row["data_offset"]) + int(row["data_nbytes"])]
        assert via_h5py.tobytes() == t.numpy().tobytes(), key
    assert blob.shape[0] == sum(t.numel() * 4 for t in tensors.values())


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_a_new_trace_over_an_old_one_leaves_its_open_reader_alone(tmp_path, compression):
    """Each writer starts from a copy of an empty trace file renamed over the path: an open reader
    of the old file keeps reading it, and the new file has the attributes and datasets of the
    schema (bool ``complete``, integer ``schema_version``, the metadata), compressed if asked."""
    import h5py

    path = tmp_path / "t.h5"
    with TraceWriter(path, {"run": "old"}) as w:
        w.write(_rec("a/forward#0/output.0"), snapshot(torch.arange(6.0)))
    old = open_trace(path)
    assert old.complete and len(old) == 1
    with TraceWriter(path, {"run": "new"}, compression=compression) as w:
        for i in range(3):
            w.write(_rec(f"b/forward#0/output.{i}"), snapshot(torch.full((300,), float(i))))
        assert not open_trace(path).complete  # (open: a crash now leaves it partial)
    assert torch.equal(old.tensor("a/forward#0/output.0"), torch.arange(6.0)) and old.meta["run"] == "old"
    new = open_trace(path)
    assert new.complete and new.meta["run"] == "new" and len(new) == 3
    assert torch.equal(new.tensor("b/forward#0/output.2"), torch.full((300,), 2.0))
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"].dtype == bool and f.attrs["schema_version"].dtype.kind == "i"
        assert f["blob"].compression == compression
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]  # nothing left beside it
