"""An engine we did not write: ONNX Runtime runs a graph of pre-norm MLP blocks built from a torch
model's weights, every intermediate exposed as an output and dumped as .npy; `import` maps ONNX names
to module records, offline replay gives local errors, `diff` localizes a wrong LayerNorm epsilon in
block 1 (an exporter bug) and finds nothing in the clean graph."""
import numpy as np
import pytest
import torch
from torch import nn

import tensordiff
from tensordiff.diff import diff
from tensordiff.engines.importer import import_dump

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

HIDDEN, TOKENS, BLOCKS = 256, 512, 3

MAP = r"""
[[rule]]
name = 'blk(\d+)\.in'
record = ['blocks.\1/forward#0/input.0', 'blocks.\1.norm/forward#0/input.0']

[[rule]]
name = 'blk(\d+)\.ln'
record = ['blocks.\1.norm', 'blocks.\1.up/forward#0/input.0']

[[rule]]
name = 'blk(\d+)\.up'
record = ['blocks.\1.up', 'blocks.\1.act/forward#0/input.0']

[[rule]]
name = 'blk(\d+)\.act'
record = ['blocks.\1.act', 'blocks.\1.down/forward#0/input.0']

[[rule]]
name = 'blk(\d+)\.down'
record = 'blocks.\1.down'

[[rule]]
name = 'blk(\d+)\.out'
record = 'blocks.\1'
"""


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.act = nn.GELU()
        self.down = nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x):
        return x + self.down(self.act(self.up(self.norm(x))))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _graph(model: Stack, eps_by_block: dict):
    """The ONNX graph of ``model`` (opset 20: LayerNormalization, Gelu), every block's tensors named."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    prev = "x"
    for i, b in enumerate(model.blocks):
        p = f"blk{i}"
        w = {f"{p}.g": b.norm.weight, f"{p}.b": b.norm.bias, f"{p}.wu": b.up.weight.T, f"{p}.bu": b.up.bias,
             f"{p}.wd": b.down.weight.T, f"{p}.bd": b.down.bias}
        inits += [numpy_helper.from_array(v.detach().contiguous().numpy(), k) for k, v in w.items()]
        nodes += [helper.make_node("Identity", [prev], [f"{p}.in"]),
                  helper.make_node("LayerNormalization", [f"{p}.in", f"{p}.g", f"{p}.b"], [f"{p}.ln"], axis=-1,
                                   epsilon=eps_by_block.get(i, b.norm.eps)),
                  helper.make_node("MatMul", [f"{p}.ln", f"{p}.wu"], [f"{p}.upm"]),
                  helper.make_node("Add", [f"{p}.upm", f"{p}.bu"], [f"{p}.up"]),
                  helper.make_node("Gelu", [f"{p}.up"], [f"{p}.act"]),
                  helper.make_node("MatMul", [f"{p}.act", f"{p}.wd"], [f"{p}.downm"]),
                  helper.make_node("Add", [f"{p}.downm", f"{p}.bd"], [f"{p}.down"]),
                  helper.make_node("Add", [f"{p}.in", f"{p}.down"], [f"{p}.out"])]
        outputs += [f"{p}.{n}" for n in ("in", "ln", "up", "act", "down", "out")]
        prev = f"{p}.out"
    shape = [1, TOKENS, HIDDEN]
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), outputs


def _run_ort(model, x, folder, eps_by_block=None):
    proto, names = _graph(model, eps_by_block or {})
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    folder.mkdir()
    for name, value in zip(names, session.run(names, {"x": x.numpy()})):
        np.save(folder / f"{name}.npy", value)
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(1, TOKENS, HIDDEN)
    ref = root / "reference.h5"
    tensordiff.capture(model, x, ref, level="module", save="full")
    (root / "map.toml").write_text(MAP)
    return root, model, x, ref


def test_onnx_runtime_clean_matches_and_wrong_epsilon_is_localized(stack):
    root, model, x, ref = stack
    clean = import_dump(_run_ort(model, x, root / "clean"), root / "map.toml", root / "clean.h5", ref, model)
    assert not clean.unmapped and len(clean.records) == BLOCKS * 10
    assert len(clean.local) == BLOCKS * 5                    # each block and its 4 children replayed offline
    res = diff(ref, root / "clean.h5")
    assert res.verdict == "match", (res.first_divergence, res.notes)
    assert 0 < res.table["rel_l2"].max() < 1e-5               # another engine's kernels: close, not identical

    _run_ort(model, x, root / "eps", eps_by_block={1: 1e-1})  # block 1's LayerNorm exported with epsilon 0.1
    import_dump(root / "eps", root / "map.toml", root / "eps.h5", ref, model)
    bad = diff(ref, root / "eps.h5")
    assert bad.verdict == "diverged"
    assert bad.first_divergence["key"] == "blocks.1.norm/forward#0/output.0"
    assert bad.culprit["module"] == "blocks.1.norm"
    # the modules after it only carry the error: their own (local) error, by offline replay, is tiny
    with tensordiff.open_trace(root / "eps.h5") as trace:
        local = dict(zip(trace.index["key"], trace.index["local_rel_l2"]))
    assert local["blocks.1.norm/forward#0/output.0"] > 1e-2
    assert local["blocks.1.up/forward#0/output.0"] < 1e-5 and local["blocks.2.norm/forward#0/output.0"] < 1e-5
