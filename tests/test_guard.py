"""Buffer guard: live buffers sharing memory, sealed buffers changed behind their back (checked before
they are written or read), and the op that wrote into them through another tensor."""
import ctypes

import pytest
import torch

from tensordiff import guard as guards
from tensordiff.guard import Guard


class CacheModel(torch.nn.Module):
    """A KV-cache-like buffer; ``bug`` adds into it through a view (an in-place op on a slice)."""

    def __init__(self, bug: bool):
        super().__init__()
        self.register_buffer("cache", torch.zeros(8, 16))
        self.proj = torch.nn.Linear(16, 16)
        self.bug = bug

    def forward(self, x):
        y = self.proj(x)
        window = self.cache[2:4]       # a view of the watched buffer
        if self.bug:
            window.add_(y[:2])         # writes into the cache through the view
        else:
            y = y + window.sum(0)      # reads it only
        self.cache.mul_(1.0)           # the buffer's own write: allowed, checked before it runs
        return y


def test_write_through_a_view_is_caught_at_the_op_and_line():
    torch.manual_seed(0)
    model, x = CacheModel(bug=True), torch.randn(4, 16)
    watch = guards.watch(model.cache, "model.cache")
    try:
        with torch.no_grad():
            model(x)
    finally:
        found = guards.stop()
    writers = [f for f in found if f.kind == "writer"]
    assert len(writers) == 1, [f.text for f in found]
    ev = writers[0].evidence
    assert ev["op"] == "aten::add_" and __file__ in ev["source"]
    assert int(ev["source"].split(":")[1].split()[0]) == CacheModel.forward.__code__.co_firstlineno + 4  # the window.add_ line
    assert ev["changed"] == 32 and ev["first_changed_index"] == 32  # rows 2-3 of 16 columns
    # the buffer's own next write then checks it first: the same 32 changed elements, reported there too
    (polluted,) = [f for f in found if f.kind == "polluted"]
    assert polluted.evidence["where"] == "before aten::mul_ writes it" and polluted.evidence["changed"] == 32
    assert watch is not None and len(found) == 2


def test_clean_model_raises_nothing():
    torch.manual_seed(0)
    model, x = CacheModel(bug=False), torch.randn(4, 16)
    guards.watch(model.cache, "model.cache")
    try:
        with torch.no_grad():
            model(x)
    finally:
        found = guards.stop()
    assert found == []


def test_overlapping_live_buffers_are_named_with_sites():
    pool = torch.empty(4096, dtype=torch.uint8)
    g = Guard()
    g.register("a", pool[0:1024], site="alloc.py:1")
    g.register("b", pool[1024:2048], site="alloc.py:2")
    assert g.findings == []  # adjacent, not overlapping
    g.register("c", pool[1500:1600], site="alloc.py:3")
    (f,) = g.findings
    assert f.kind == "overlap" and f.evidence["first"] == "b" and f.evidence["second"] == "c"
    assert f.evidence["bytes"] == 100 and f.evidence["first_range"] == [476, 576]
    g.release("b")
    g.register("d", pool[1024:1100], site="alloc.py:4")  # b was freed: reusing its bytes is fine
    assert len(g.findings) == 1
    g.register("raw", pool.data_ptr() + 10, nbytes=4, site="ext.cpp:7")  # a raw pointer an extension holds
    assert g.findings[-1].evidence["first"] == "a" and g.findings[-1].evidence["second"] == "raw"


def test_external_write_is_polluted_before_read_with_evidence():
    """Bytes changed by code no op event sees (here ctypes.memset on the data pointer, as a C kernel
    would): the probe point before the next reader reports counts, range and the first index."""
    weights = torch.randn(4, 256)
    g = Guard()
    for e in range(4):
        g.seal(weights[e], f"expert {e}", group="weights", unit=("experts", e, 4))
    assert g.check_all("before the kernel") == []
    ctypes.memset(weights[2].data_ptr() + 40 * 4, 0xFF, 8 * 4)  # 8 float32 NaNs in expert 2
    (f,) = g.check_all("before the kernel")
    assert f.kind == "polluted" and f.buffer == "expert 2"
    assert (f.evidence["nan"], f.evidence["changed"], f.evidence["first_changed_index"]) == (8, 8, 40)
    (line,) = guards.summary_lines(g.findings)
    assert line.startswith("weights of experts 2 of 4") and line.endswith(
        "polluted before the kernel: zeros=0/256, nan=8, inf=0, range "
        f"[{f.evidence['range'][0]:.3g}, {f.evidence['range'][1]:.3g}], 8 element(s) changed since sealed "
        "(first at index 40)")


def _kt_hunt(fault: str):
    from tensordiff.analysis.nan_hunt import hunt
    from tensordiff.backends import get_backend
    from tensordiff.backends.kt_moe import to_kt_moe
    from tensordiff.models import load_model

    bundle = load_model("qwen-moe", size="wide", seq_len=64)
    g = Guard()
    model = to_kt_moe(bundle.model, fault, guard=g)
    with g:
        result = hunt(model, get_backend("cpu-bf16").inputs(bundle.inputs.clone()))
    return result, g


def test_kt_moe_shared_pool_alias_found_by_nan_hunt_and_guard():
    """The arena fault on the real kernel: NaN born inside layer 0's experts call with finite inputs,
    experts 17-24 of 64 by bisection; the guard names the two overlapping live blocks, the staged
    weights of experts 17-24 polluted before the kernel loads them, and the op and line that wrote."""
    pytest.importorskip("kt_kernel")
    result, g = _kt_hunt("shared-pool-alias")
    assert not result.clean
    (birth,) = result.findings
    assert birth["origin"] == "opaque_call" and birth["module"] == "model.layers.0.mlp.experts"
    assert all(i.get("nan", 0) == 0 and i.get("inf", 0) == 0 for i in birth["inputs"])
    assert "experts 17-24 of 64" in " ".join(str(v) for v in birth.get("bisection", {}).values()) or \
        "experts 17-24 of 64" in str(birth)
    lines = guards.summary_lines(g.findings)
    overlaps = [f for f in g.findings if f.kind == "overlap"]
    assert {(f.evidence["first"], f.evidence["second"]) for f in overlaps} == {
        (f"kt_moe layer {i} arena/gate_up staging", f"kt_moe layer {i} arena/conversion scratch") for i in (0, 1)}
    polluted = [l for l in lines if "polluted before" in l]
    assert len(polluted) == 2 and all("experts 17-24 of 64" in l and "load_weights_task" in l for l in polluted)
    writers = [f for f in g.findings if f.kind == "writer"]
    assert {f.evidence["op"] for f in writers} == {"aten::copy_"}
    assert all("kt_moe.py" in f.evidence["source"] and f.evidence["writer"].endswith("conversion scratch")
               for f in writers)
    assert sum(f.evidence["nan"] for f in g.findings if f.kind == "polluted") > 0


def test_kt_moe_clean_with_guard_raises_nothing():
    pytest.importorskip("kt_kernel")
    result, g = _kt_hunt("none")
    assert result.clean and g.findings == []


SCRIPT = '''
import sys, torch
from tensordiff import guard
weights = torch.ones(64, 8)
guard.watch(weights, "weights")
rows = weights[16:24]
if sys.argv[1] == "bug":
    rows.mul_(0.5)            # through a view
else:
    print(float(rows.sum()))  # reads only
'''


def test_guard_command_runs_a_script_and_exits_by_what_it_found(tmp_path):
    import json
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    runs = {mode: subprocess.run([sys.executable, "-m", "tensordiff", "guard", str(script), "--json", "--", mode],
                                 capture_output=True, text=True) for mode in ("bug", "clean")}
    bug, clean = runs["bug"], runs["clean"]
    assert bug.returncode == 1, bug.stderr
    doc = json.loads(bug.stdout)
    (writer,) = doc["findings"]
    assert writer["kind"] == "writer" and writer["evidence"]["op"] == "aten::mul_"
    assert f"{script}:8 " in writer["evidence"]["source"] and writer["evidence"]["changed"] == 64
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout[clean.stdout.index("{"):])["clean"] is True


def test_buffer_expected_zero_is_checked_before_its_first_write():
    """The story's LoRA B buffer: zeros after init, but a pooled allocator gave its memory to another
    live buffer that wrote there first. Its first own write (here an in-place copy_, as from_mat's
    write) checks it and reports the counts; a buffer left zero until then raises nothing."""
    pool = torch.zeros(2, 4096)
    lora_b, other = pool[0], pool[0, 1024:2048]  # the pool handed the same bytes out twice
    clean_b = pool[1]
    g = Guard()
    g.register("lora_b of expert 17", lora_b, site="pool.cpp:10")
    g.register("scratch", other, site="pool.cpp:22")
    g.register("lora_b of expert 18", clean_b, site="pool.cpp:10")
    g.seal(lora_b, "lora_b of expert 17", expect=0.0)
    g.seal(clean_b, "lora_b of expert 18", expect=0.0)
    with g:
        other.copy_(torch.full((1024,), float("nan")))   # the other owner writes its data
        other[:10] = 3.0e38
        lora_b.copy_(torch.randn(4096))                  # the kernel writes the LoRA B weights
        clean_b.copy_(torch.randn(4096))
    kinds = [(f.kind, f.buffer) for f in g.findings]
    assert ("overlap", "scratch") in kinds and ("writer", "lora_b of expert 17") in kinds
    (polluted,) = [f for f in g.findings if f.kind == "polluted"]
    assert polluted.buffer == "lora_b of expert 17" and polluted.evidence["where"] == "before aten::copy_ writes it"
    ev = polluted.evidence
    assert (ev["nan"], ev["changed"], ev["first_changed_index"], ev["zeros"]) == (1014, 1024, 1024, 3072)
    assert ev["range"] == [0.0, pytest.approx(3.0e38)]
    assert not [f for f in g.findings if f.buffer == "lora_b of expert 18"]
