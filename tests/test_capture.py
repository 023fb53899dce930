from pathlib import Path

import pytest
import torch

import tensordiff
from tensordiff.models import load_model

PLUGINS = Path(__file__).parent / "plugins"


def test_op_level_sees_noncontiguous_copy_with_strides(tmp_path):
    bundle = load_model(f"{PLUGINS}/copy_model.py:build")
    tensordiff.capture(bundle.model, bundle.inputs, tmp_path / "t.h5", level="op")
    idx = tensordiff.open_trace(tmp_path / "t.h5").index
    copies = idx[idx["op"] == "aten::copy_"]
    src = copies[copies["slot"] == "in.1"].iloc[0]
    assert src["stride"] == [1, 8] and src["shape"] == [8, 16] and not src["contiguous"]
    assert src["module"] == "__root__" and "copy_model.py" in src["source"]
    dst = copies[copies["slot"] == "out.0"].iloc[0]
    assert dst["contiguous"] and dst["stride"] == [16, 1]
    # the captured source value is the logical transposed tensor
    trace = tensordiff.open_trace(tmp_path / "t.h5")
    assert torch.equal(trace.tensor(src["key"]), bundle.inputs.args[0].t())


def test_backward_records_for_every_module_with_parameters(tmp_path, qwen):
    tensordiff.capture(qwen.model, qwen.inputs, tmp_path / "b.h5", level="module", backward=True)
    idx = tensordiff.open_trace(tmp_path / "b.h5").index
    bwd = set(idx[idx["direction"] == "backward"]["module"])
    with_params = {n for n, m in qwen.model.named_modules() if n and any(True for _ in m.parameters(recurse=False))}
    assert with_params and with_params <= bwd
    grads = idx[(idx["module"] == "lm_head") & (idx["slot"] == "grad_output.0")]
    assert len(grads) == 1 and grads.iloc[0]["l2"] > 0


def test_module_records_and_keys(tmp_path, qwen):
    tensordiff.capture(qwen.model, qwen.inputs, tmp_path / "m.h5")
    trace = tensordiff.open_trace(tmp_path / "m.h5")
    keys = set(trace.keys())
    assert "model.layers.0.mlp/forward#0/output.0" in keys
    assert "__root__/forward#0/output.logits" in keys
    logits = trace.tensor("__root__/forward#0/output.logits")
    with torch.no_grad():
        expected = qwen.model(**qwen.inputs.kwargs).logits
    assert torch.equal(logits, expected)
    assert trace.meta["level"] == "module" and trace.meta["versions"]["torch"] == torch.__version__


def test_unchanged_tensors_are_aliased_changed_ones_are_not(tmp_path, qwen):
    from tensordiff.probes.session import CaptureSession
    from tensordiff.trace import TraceWriter

    buf = torch.ones(1000)
    with TraceWriter(tmp_path / "a.h5", {}) as w:
        s = CaptureSession(w)
        rec = lambda k: {"key": k, "kind": "module", "direction": "forward", "module": "m", "call": 0,
                         "scope": "m/forward#0", "op": "", "op_index": -1, "slot": k.rsplit("/", 1)[1], "source": ""}
        s.emit(rec("m/forward#0/input.0"), buf)
        s.emit(rec("m/forward#0/input.1"), buf)            # unchanged: alias
        buf.data_ptr()
        raw = torch.from_numpy(buf.numpy())                # a raw-pointer writer: no version bump
        raw[3] = 7.0
        s.emit(rec("m/forward#0/output.0"), buf)           # changed behind torch's back: real copy
    trace = tensordiff.open_trace(tmp_path / "a.h5")
    assert trace.row("m/forward#0/input.1")["alias_of"] == "m/forward#0/input.0"
    assert not isinstance(trace.row("m/forward#0/output.0").get("alias_of"), str)
    assert torch.equal(trace.tensor("m/forward#0/input.1"), torch.ones(1000))
    assert trace.tensor("m/forward#0/output.0")[3] == 7.0
    # module-level capture of a real model stores each activation once
    tensordiff.capture(qwen.model, qwen.inputs, tmp_path / "q.h5")
    idx = tensordiff.open_trace(tmp_path / "q.h5").index
    aliases = idx["alias_of"].apply(lambda a: isinstance(a, str)).sum()
    assert aliases > len(idx) // 3


def test_module_probe_wraps_forward_and_restores_it(tmp_path):
    """Modules without hooks get an instance-level forward wrapper (removed afterwards, a user's own
    instance forward restored); a module with a user's forward hook is probed through hooks, so its
    record shows what the hook returned."""
    bundle = load_model("qwen", size="tiny", seq_len=16)
    model = bundle.model
    mlp = model.model.layers[1].mlp
    mlp.register_forward_hook(lambda mod, args, out: out * 2.0)
    norm = model.model.norm
    own_forward = norm.forward  # a user's patched forward, as an instance attribute
    norm.forward = own_forward
    with torch.no_grad():
        expected = model(**bundle.inputs.kwargs).logits
    tensordiff.capture(model, bundle.inputs, tmp_path / "t.h5", level="module", save="full")
    assert "forward" not in model.model.layers[0].mlp.__dict__ and norm.__dict__["forward"] is own_forward
    trace = tensordiff.open_trace(tmp_path / "t.h5")
    hooked = trace.tensor("model.layers.1.mlp/forward#0/output.0")
    inner = trace.tensor("model.layers.1.mlp.down_proj/forward#0/output.0")
    torch.testing.assert_close(hooked, inner * 2.0)
    torch.testing.assert_close(trace.tensor("lm_head/forward#0/output.0"), expected)
    # the line that called the decoder layer: model code, never torch's or tensordiff's own frames
    source = trace.index.loc["model.layers.0/forward#0/input.0", "source"]
    assert "transformers" in source and "/torch/nn/" not in source and "tensordiff" not in source


def test_cpp_recorder_writes_the_same_records_as_the_general_path(tmp_path):
    """The C++ per-record path of fast GPU stats (fast_records.cpp), run here on CPU tensors without
    a stats kernel: same keys, layouts, sources and order as the general path, plus aliases for
    contiguous views of captured memory (q_proj's output as q_norm's input)."""
    from tensordiff.probes import fast_module_stats
    from tensordiff.probes.module_hooks import ModuleProbe
    from tensordiff.probes.session import CaptureSession
    from tensordiff.trace import TraceWriter

    bundle = load_model("qwen", size="tiny", seq_len=16)

    def run(path, cpp):
        with TraceWriter(path, {}) as w:
            s = CaptureSession(w, save_data=False)
            if cpp:
                # 64: several buffers
                s.fast = fast_module_stats.choose(w, s.emit_general, recorder="cpp", capacity=64, accept_cpu=True)
                assert s.fast is not None
            with ModuleProbe(bundle.model, s), torch.no_grad():
                bundle.model(**bundle.inputs.kwargs)
            s.flush_stats()
        return tensordiff.open_trace(path).index

    general, cpp = run(tmp_path / "g.h5", False), run(tmp_path / "c.h5", True)
    assert list(general["key"]) == list(cpp["key"]) and len(cpp) == 158
    for col in ("shape", "stride", "storage_offset", "contiguous", "dtype", "device", "source", "seq"):
        assert list(general[col].astype(str)) == list(cpp[col].astype(str)), col
    aliased = cpp[cpp["alias_of"].notna()]
    assert set(general[general["alias_of"].notna()]["key"]) < set(aliased["key"])
    assert cpp.loc["model.layers.0.self_attn.q_norm/forward#0/input.0", "alias_of"] == \
        "model.layers.0.self_attn.q_proj/forward#0/output.0"


def test_cpp_wrapper_with_backward_keeps_every_record_in_order(tmp_path):
    """Fast mode with gradients: forward records from the C++ wrapper, backward records from the
    backward hooks, in the same order and with the same keys as the general path."""
    from tensordiff.probes import fast_module_stats
    from tensordiff.probes.module_hooks import ModuleProbe
    from tensordiff.probes.session import CaptureSession
    from tensordiff.trace import TraceWriter
    from tensordiff.tracing import _forward_then_backward

    bundle = load_model("qwen", size="tiny", seq_len=16)

    def run(path, cpp):
        with TraceWriter(path, {}) as w:
            s = CaptureSession(w, save_data=False)
            if cpp:
                s.fast = fast_module_stats.choose(w, s.emit_general, recorder="cpp", accept_cpu=True)
            with ModuleProbe(bundle.model, s, backward=True):
                _forward_then_backward(bundle.model, bundle.inputs, True, session=s)
            s.flush_stats()
        bundle.model.zero_grad(set_to_none=True)
        return tensordiff.open_trace(path).index

    general, cpp = run(tmp_path / "g.h5", False), run(tmp_path / "c.h5", True)
    assert list(general["key"]) == list(cpp["key"])
    assert (cpp["direction"] == "backward").sum() > 50 and list(cpp["seq"]) == list(range(len(cpp)))


def test_cpp_wrapper_lets_an_error_through_and_keeps_what_came_before(tmp_path):
    """A module raising inside the C++ wrapper: the caller gets the same exception, the records of
    the calls before it land in the trace, and every forward is restored afterwards."""
    from tensordiff.probes import fast_module_stats
    from tensordiff.probes.module_hooks import ModuleProbe
    from tensordiff.probes.session import CaptureSession
    from tensordiff.trace import TraceWriter

    class Boom(torch.nn.Module):
        def forward(self, x):
            raise ValueError("kernel exploded at row 7")

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), Boom(), torch.nn.Linear(8, 8))
    path = tmp_path / "t.h5"
    with TraceWriter(path, {}) as w:
        s = CaptureSession(w, save_data=False)
        s.fast = fast_module_stats.choose(w, s.emit_general, recorder="cpp", capacity=64, accept_cpu=True)
        with ModuleProbe(model, s), torch.no_grad():
            assert type(model[0].forward).__name__ == "Probed"
            with pytest.raises(ValueError, match="kernel exploded at row 7"):
                model(torch.randn(4, 8))
        s.flush_stats()
    assert all("forward" not in m.__dict__ for m in model.modules())
    keys = list(tensordiff.open_trace(path).index["key"])
    assert keys[:5] == ["__root__/forward#0/input.0", "0/forward#0/input.0", "0/forward#0/output.0",
                        "1/forward#0/input.0", "1/forward#0/output.0"]
    assert "2/forward#0/input.0" in keys and not any(k.startswith("3/") or "output" in k and k.startswith("2/")
                                                     for k in keys)


def test_replay_model_sharing_a_module_with_the_traced_model_is_refused(tmp_path):
    """Replaying a module the probe wraps would replay it again without end (it ran for minutes):
    one clear error instead; a separate copy replays."""
    import copy

    from tensordiff.errors import TensordiffError

    bundle = load_model("qwen", size="tiny", seq_len=16, seed=0)
    with pytest.raises(TensordiffError, match="shares module '__root__'"):
        tensordiff.capture(bundle.model, bundle.inputs, tmp_path / "self.h5", replay_model=bundle.model)
    half = copy.deepcopy(bundle.model)
    half.model.layers[1] = bundle.model.model.layers[1]  # one decoder layer shared
    with pytest.raises(TensordiffError, match="shares module 'model.layers.1'"):
        tensordiff.capture(bundle.model, bundle.inputs, tmp_path / "half.h5", replay_model=half)
    res = tensordiff.capture(bundle.model, bundle.inputs, tmp_path / "copy.h5", save="stats",
                             replay_model=copy.deepcopy(bundle.model))
    rows = tensordiff.open_trace(res.path).rows
    assert res.records > 100 and rows["model.norm/forward#0/output.0"]["local_rel_l2"] < 1e-6


@pytest.mark.parametrize("level,save,backward", [("both", "stats", False), ("both", "stats", True),
                                                 ("module", "full", False)])
def test_a_finished_capture_leaves_no_writer_or_file_handle_behind(tmp_path, qwen, level, save, backward):
    """Each capture's writer, HDF5 handles and tensor table are freed once it returns: a sweep of
    many captures in one process must not grow (it did: a cycle through the native records, which
    the garbage collector cannot see, kept every capture's writer and open HDF5 objects)."""
    import gc

    from h5py import _objects

    from tensordiff.trace import TraceWriter

    def alive() -> tuple[int, int]:  # writers, h5py object ids
        gc.collect()
        objects = gc.get_objects()
        return sum(isinstance(o, TraceWriter) for o in objects), sum(isinstance(o, _objects.ObjectID) for o in objects)

    def one(i):
        tensordiff.capture(qwen.model, qwen.inputs, tmp_path / f"t{i}.h5", level=level, save=save, backward=backward)
        qwen.model.zero_grad(set_to_none=True)

    one(0)
    writers, handles = alive()
    for i in range(1, 4):
        one(i)
    # nor do h5py's object ids of the three later files stay (each File.close walks them all)
    assert alive() == (writers, handles)


def test_an_error_in_an_op_level_capture_names_its_module_and_keeps_what_came_before(tmp_path):
    """A module that raises: the error leaves with its place (the innermost module call), and the
    records made before it are in the trace."""
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.ReLU(), Boom()))
    with pytest.raises(ValueError, match="boom") as info:
        tensordiff.capture(model, (torch.ones(2, 4),), tmp_path / "e.h5", level="both", save="stats")
    assert info.value.tensordiff_place["scope"] == "1.1/forward#0"
    index = tensordiff.open_trace(tmp_path / "e.h5").index
    assert "0/forward#0/output.0" in set(index["key"]) and "1.0/forward#0/output.0" in set(index["key"])
    assert not any(k.startswith("1/forward#0/output") for k in index["key"])
