"""The record schema in one place: what a trace record is called and which fields its index row and
stats row hold. The probes, the observers, the trace writer and reader, and importers of foreign
dumps all build records from here.

Keys (stable between backends, so the diff can pair them):

    model.layers.0.mlp/forward#0/output.0                              module record: module, call, slot
    model.layers.0.input_layernorm/forward#0/op0003.mul.Tensor/out.0   op record in that module's scope
    __backward__/backward#0/op0012.mm/in.1                             op run by autograd (no module scope)

    rec = module_record("model.norm", "forward", 0, "output.0")
    rec["key"]   # 'model.norm/forward#0/output.0'
"""
from __future__ import annotations

FORMAT = "tensordiff-trace"
SCHEMA_VERSION = 2
ROOT = "__root__"  # the root module (named_modules() gives it the empty name)
INDEX_FIELDS = ("key", "seq", "kind", "direction", "module", "call", "scope", "op", "op_index", "slot",
                "source", "shape", "dtype", "device", "stride", "storage_offset", "contiguous", "has_data")
# /stats columns: moments over the finite elements; counts of NaN, Inf and exact zeros
STAT_NAMES = ("min", "max", "mean", "mean_abs", "std", "l2", "nan", "inf", "zero")


def module_record(module: str, direction: str, call: int, slot: str, source: str = "") -> dict:
    """The index fields of a module record."""
    scope = f"{module}/{direction}#{call}"
    return {"key": f"{scope}/{slot}", "kind": "module", "direction": direction, "module": module,
            "call": call, "scope": scope, "op": "", "op_index": -1, "slot": slot, "source": source}


def op_prefix(scope: str, index: int, short_name: str) -> str:
    """The key of an op call in a scope, before its slot (``/in.N``, ``/out.N``)."""
    return f"{scope}/op{index:04d}.{short_name}"
