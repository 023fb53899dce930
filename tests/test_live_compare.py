"""Live comparison (observers/live_compare) and the deferred replay (observers/module_replay.DeferredReplay):
an in-process target measured against the kept reference as it runs, only the calls beyond tolerance
replayed and saved. Localization must equal the eager replay's; a clean run replays and saves nothing."""
from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from tensordiff.backends.registry import register
from tensordiff.metrics import Tolerance, compare
from tensordiff.observers.live_compare import KeptReference, LiveCompare, live_fields, metrics_from_live
from tensordiff.probes.snapshot import Snapshot, read_back, tensor_layout
from tensordiff.run import TraceJob, trace_job
from tensordiff.trace import TraceWriter, open_trace


class ScaledSilu(torch.nn.Module):
    """An activation whose own code is wrong by 5%: what the culprit must be."""

    def forward(self, x):
        return torch.nn.functional.silu(x) * 1.05


def _bad_act(model):
    bad = copy.deepcopy(model)
    bad.model.layers[-1].mlp.act_fn = ScaledSilu()
    return bad


register("test-live-bad-act", _bad_act)


def _job(tmp_path, name, **kw):
    return TraceJob(model="qwen", reference="cpu", out=str(tmp_path / name), time_plain=False, **kw)


def test_live_localizes_like_the_eager_replay(tmp_path):
    live = trace_job(_job(tmp_path, "live", target="test-live-bad-act")).result
    eager = trace_job(_job(tmp_path, "eager", target="test-live-bad-act", live=False)).result
    assert live.verdict == eager.verdict == "diverged"
    assert live.culprit["module"] == eager.culprit["module"] == "model.layers.3.mlp.act_fn"
    assert live.first_divergence["key"] == eager.first_divergence["key"]
    assert live.culprit["op"] == eager.culprit["op"]  # the drill-down ran on the deferred path too
    # every record's error is the same number whichever way it was measured
    both = live.table.merge(eager.table, on="key", suffixes=("_live", "_eager"))
    assert len(both) == len(eager.table) > 100
    floats = both[both["rel_l2_eager"].notna() & (both["tgt_dtype_eager"] == "float32")]
    assert ((floats["rel_l2_live"] - floats["rel_l2_eager"]).abs() <= 1e-9 + 1e-6 * floats["rel_l2_eager"]).all()
    assert (floats["beyond_live"] == floats["beyond_eager"]).all()

    with open_trace(tmp_path / "live" / "target.h5") as target:
        summary = target.meta["live"]
        index = target.index
        replayed = set(index.loc[index["local_rel_l2"].notna(), "scope"])
        saved = index[index["has_data"] == True]  # noqa: E712
        # only calls at and after the fault are replayed, their records alone carry data
        assert 0 < summary["calls_replayed"] < len(set(index["scope"])) / 2
        assert "model.layers.3.mlp.act_fn/forward#0" in replayed
        assert not any(s.startswith(("model.layers.0.", "model.layers.2.")) for s in replayed)
        # data outside the replayed calls only where a replayed call's record aliases it (its input
        # is the output of the call before)
        outside = saved[~saved["scope"].isin(replayed)]
        aliased = set(index.loc[index["scope"].isin(replayed), "alias_of"].dropna())
        assert summary["records_saved"] > 0 and set(outside["key"]) <= aliased
        # the culprit's data is there for the error map
        culprit_out = target.tensor("model.layers.3.mlp.act_fn/forward#0/output.0")
        assert culprit_out.dtype == torch.float32
        target_shape = culprit_out.shape
    # the reference got data for exactly those records afterwards: the error maps read both sides
    with open_trace(tmp_path / "live" / "reference.h5") as reference:
        ref_saved = set(reference.index.loc[reference.index["has_data"] == True, "key"])  # noqa: E712
        assert ref_saved == set(saved.loc[saved["kind"] == "module", "key"])  # drill-down op records: target only
        key = "model.layers.3.mlp.act_fn/forward#0/output.0"
        assert reference.tensor(key).shape == target_shape
    assert live.first_divergence.get("error_map_lines") == eager.first_divergence.get("error_map_lines")
    with open_trace(tmp_path / "eager" / "target.h5") as target:
        assert target.index["has_data"].all() or target.index["has_data"].sum() > len(saved)


def test_live_clean_bf16_replays_and_saves_nothing(tmp_path):
    out = trace_job(_job(tmp_path, "clean", target="cpu-bf16", seq_len=256))
    assert out.result.verdict == "match" and out.result.culprit is None
    with open_trace(tmp_path / "clean" / "target.h5") as target:
        summary = target.meta["live"]
        assert summary["calls_replayed"] == 0 and summary["records_saved"] == 0
        assert summary["records_measured"] > 100 and summary["records_not_kept"] == 0
        assert not target.index["has_data"].any()
    # the table's numbers are the live ones, not lower bounds from stats
    table = out.result.table
    floats = table[table["tgt_dtype"] == "bfloat16"]
    assert (floats["live"] == True).all() and (floats["rel_l2"] > 0).all()  # noqa: E712


def test_live_metrics_are_used_only_against_their_own_reference(tmp_path):
    trace_job(_job(tmp_path, "a", target="test-live-bad-act"))
    trace_job(_job(tmp_path, "b", target="test-live-bad-act", seed=1, live=False))
    from tensordiff.diff import diff

    crossed = diff(tmp_path / "b" / "reference.h5", tmp_path / "a" / "target.h5")
    # another reference (another seed): the live numbers do not apply, stats bounds are used instead
    assert "live" not in crossed.table.columns
    assert crossed.table["from_stats"].astype(bool).sum() > 50
    same = diff(tmp_path / "a" / "reference.h5", tmp_path / "a" / "target.h5")
    assert same.table["live"].fillna(False).astype(bool).sum() > 50


def test_writer_amends_committed_and_pending_rows(tmp_path):
    path = tmp_path / "t.h5"
    xs = [torch.randn(64, 32) for _ in range(4)]
    with TraceWriter(path, {}) as writer:
        for i, x in enumerate(xs[:3]):
            writer.add({"module": f"m{i}", "slot": "output.0"}, x, save=False)
        deadline = time.time() + 10
        while writer.acknowledged < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert writer.acknowledged == 3
        writer.add({"module": "m3", "slot": "output.0"}, xs[3], save=False)
        writer.amend("m1/forward#0/output.0", {"live_rel_l2": 0.25},
                     Snapshot(tensor_layout(xs[1]), None, read_back(xs[1]), True))
        writer.amend("m3/forward#0/output.0", {"live_rel_l2": 0.5},
                     Snapshot(tensor_layout(xs[3]), None, read_back(xs[3]), True))
        writer.amend("m0/forward#0/output.0", {"local_rel_l2": 0.125})
    with open_trace(path) as trace:
        rows = trace.rows
        assert rows["m1/forward#0/output.0"]["live_rel_l2"] == 0.25
        assert rows["m3/forward#0/output.0"]["live_rel_l2"] == 0.5
        assert rows["m0/forward#0/output.0"]["local_rel_l2"] == 0.125 and not rows["m0/forward#0/output.0"]["has_data"]
        assert torch.equal(trace.tensor("m1/forward#0/output.0"), xs[1])
        assert torch.equal(trace.tensor("m3/forward#0/output.0"), xs[3])
        assert not rows["m2/forward#0/output.0"]["has_data"]
        assert abs(rows["m2/forward#0/output.0"]["l2"] - float(xs[2].norm())) < 1e-3


def test_host_live_metrics_equal_compare():
    torch.manual_seed(0)
    ref = torch.randn(256, 64)
    tgt = (ref + 0.01 * torch.randn_like(ref)).to(torch.bfloat16)
    tgt[3, 5] = float("nan")
    kept = KeptReference(1 << 30)
    kept.keep("k", ref)
    live = LiveCompare(kept)
    live.add("k", tgt)
    m = live.results()["k"]
    want = compare(ref, tgt, Tolerance(1e-5, 1.6e-2, 6e-2))
    for name in ("rel_l2", "max_abs", "mean_abs", "cosine"):
        assert math.isclose(m[name], want[name], rel_tol=1e-9), name
    assert m["nonfinite_mismatch"] == want["nonfinite_mismatch"] == 1
    back = metrics_from_live(live_fields(m), {"nan": 0, "inf": 0}, {"nan": 1, "inf": 0})
    assert back["rel_l2"] == m["rel_l2"] and back["nonfinite_mismatch"] == 1 and back["live"]
    # a reference changed in place after it was kept is not compared (its values are gone)
    ref.add_(1)
    live2 = LiveCompare(kept)
    live2.add("k", tgt)
    assert live2.results() == {} and live2.not_kept == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_pair_pass_equals_compare(dtype):
    """cpu_stats.pair_metrics against metrics.compare: every sum, the max, and non-finite values on
    either side (NaN on both sides and the same infinity are no mismatch), over a length that is no
    multiple of anything, and a strided target."""
    from tensordiff.probes import cpu_stats

    if not cpu_stats.available():
        pytest.skip("no C compiler: compare() does the work")
    torch.manual_seed(1)
    ref = torch.randn(3001, 7)
    tgt = (ref * (1 + 1e-3 * torch.randn_like(ref))).to(dtype)
    tgt[5, 1], ref[5, 1] = float("nan"), float("nan")           # NaN both: equal
    tgt[6, 2], ref[6, 2] = float("inf"), float("inf")           # same infinity: equal
    tgt[7, 3] = float("-inf")                                   # one side: mismatch
    ref[8, 4] = float("nan")                                    # one side: mismatch
    for t, r in ((tgt, ref), (tgt.t().contiguous().t(), ref)):
        kept = KeptReference(1 << 30)
        kept.keep("k", r)
        live = LiveCompare(kept)
        live.add("k", t)
        m, want = live.results()["k"], compare(r, t, Tolerance(1e-5, 1e-3, 1e-2))
        assert m["nonfinite_mismatch"] == want["nonfinite_mismatch"] == 2
        for name in ("rel_l2", "max_abs", "cosine"):
            assert math.isclose(m[name], want[name], rel_tol=1e-9), name
        assert math.isclose(m["mean_abs"], want["mean_abs"], rel_tol=1e-3)  # count: finite on both sides


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pair_kernel_equals_compare():
    from tensordiff.probes import fused_stats

    if fused_stats.pair_launcher() is None:
        pytest.skip("no nvcc: the pair kernel is not built")
    torch.manual_seed(0)
    kept = KeptReference(1 << 34)
    live = LiveCompare(kept)
    cases = {}
    for i, (n, dtype) in enumerate([(4096 * 896, torch.bfloat16), (1000, torch.float16), (7, torch.float32),
                                    (2048 * 4864, torch.bfloat16)]):
        ref = torch.randn(n, device="cuda")
        tgt = (ref * (1 + 0.01 * torch.randn_like(ref))).to(dtype)
        if i == 0:
            tgt[12345] = float("inf")
            tgt[999] = float("nan")
            ref[999] = float("nan")  # NaN on both sides is no mismatch
        kept.keep(f"k{i}", ref)
        live.add(f"k{i}", tgt)
        cases[f"k{i}"] = (ref, tgt)
    got = live.results()
    for key, (ref, tgt) in cases.items():
        want = compare(ref.cpu(), tgt.cpu(), Tolerance(1e-5, 1e-3, 1e-2))
        m = got[key]
        assert m["nonfinite_mismatch"] == want["nonfinite_mismatch"]
        assert math.isclose(m["rel_l2"], want["rel_l2"], rel_tol=1e-3)
        assert math.isclose(m["max_abs"], want["max_abs"], rel_tol=1e-5)
        assert math.isclose(m["cosine"], want["cosine"], rel_tol=1e-5)


class BadSilu(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.silu(x) * 1.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_live_localizes_like_the_eager_replay(tmp_path):
    from tensordiff.backends.registry import Backend

    def adapt(model):
        model.model.layers[-1].mlp.act_fn = BadSilu()
        return model

    register("test-live-bad-act-cuda", Backend("test-live-bad-act-cuda", "cuda", torch.bfloat16, adapt=adapt))
    kw = dict(target="test-live-bad-act-cuda", reference="cuda", seq_len=1024)
    live = trace_job(TraceJob(model="qwen", out=str(tmp_path / "live"), time_plain=False, **kw)).result
    eager = trace_job(TraceJob(model="qwen", out=str(tmp_path / "eager"), time_plain=False, live=False, **kw)).result
    assert live.verdict == eager.verdict == "diverged"
    assert live.culprit["module"] == eager.culprit["module"] == "model.layers.3.mlp.act_fn"
    assert live.first_divergence["key"] == eager.first_divergence["key"]
    both = live.table.merge(eager.table, on="key", suffixes=("_live", "_eager"))
    floats = both[both["tgt_dtype_eager"] == "bfloat16"]
    assert len(floats) > 100 and (floats["beyond_live"] == floats["beyond_eager"]).all()
    assert ((floats["rel_l2_live"] - floats["rel_l2_eager"]).abs() <= 1e-4 + 1e-3 * floats["rel_l2_eager"]).all()
    with open_trace(tmp_path / "live" / "target.h5") as target:
        summary = target.meta["live"]
        assert 0 < summary["calls_replayed"] < 20 and summary["records_not_kept"] == 0
    clean = trace_job(TraceJob(model="qwen", target="cuda-bf16", reference="cuda", seq_len=2048,
                               out=str(tmp_path / "clean"), time_plain=False)).result
    assert clean.verdict == "match"
    with open_trace(tmp_path / "clean" / "target.h5") as target:
        assert target.meta["live"]["calls_replayed"] == 0 and not target.index["has_data"].any()


def test_live_with_outputs_changed_in_place(tmp_path):
    """The parent scales a child's output in place: the reference's record is not kept (its value is
    gone), so that call is replayed and saved as before; a clean target raises nothing, a bug after
    it is still named."""
    from pathlib import Path

    from tensordiff.models import _from_file

    plugins = Path(__file__).parent / "plugins"
    model = f"{plugins}/inplace_model.py:make"
    register("test-live-inplace-bad", _from_file(f"{plugins}/inplace_model.py:bad_last_out"))
    register("test-live-inplace-clean", lambda m: m)
    clean = trace_job(TraceJob(model=model, target="test-live-inplace-clean", out=str(tmp_path / "c"),
                               time_plain=False)).result
    assert clean.verdict == "match" and clean.culprit is None
    with open_trace(tmp_path / "c" / "target.h5") as target:
        assert target.meta["live"]["records_not_kept"] >= 3  # each block's proj output
    bad = trace_job(TraceJob(model=model, target="test-live-inplace-bad", out=str(tmp_path / "b"),
                             time_plain=False)).result
    assert bad.verdict == "diverged" and bad.culprit["module"] == "blocks.2.out"


def test_live_past_the_memory_share_says_so(tmp_path, monkeypatch):
    """Held target tensors are capped: calls past the cap are measured but not replayed, and a
    divergence among them is reported with the advice to run --no-live, never silently dropped."""
    monkeypatch.setattr(LiveCompare, "HOLD_BYTES", 600_000)  # about the first layer of the tiny Qwen3
    res = trace_job(_job(tmp_path, "capped", target="test-live-bad-act")).result
    assert res.verdict == "diverged"
    with open_trace(tmp_path / "capped" / "target.h5") as target:
        live = target.meta["live"]
    assert live["records_not_held"] > 50 and live["beyond_not_replayed_count"] >= 1
    assert any("--no-live" in n and "memory share" in n for n in res.notes)
    assert res.first_divergence["module"].startswith("model.layers.3.mlp")


def test_cli_live_and_no_live(tmp_path):
    """The command line: live by default for an in-process target (stats and live numbers, the note
    says so), --no-live saves every tensor and replays every call."""
    import subprocess
    import sys

    for flag, name in (([], "live"), (["--no-live"], "eager")):
        proc = subprocess.run([sys.executable, "-m", "tensordiff", "trace", "--model", "qwen", "--target", "cpu-bf16",
                               "--seq-len", "64", "--out", str(tmp_path / name), *flag],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with open_trace(tmp_path / name / "target.h5") as target:
            index = target.index
            if name == "live":
                assert target.meta["live"]["calls_replayed"] == 0 and not index["has_data"].any()
                assert "live comparison:" in proc.stdout.replace("\n", " ")
            else:
                assert "live" not in target.meta and index["has_data"].all()
                assert index["local_rel_l2"].notna().sum() > 50
