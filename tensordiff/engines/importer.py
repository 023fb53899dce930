"""``tensordiff import DUMP --map MAP -o target.h5``: an engine outside PyTorch (a C++ runtime, a
llama.cpp-style engine, ONNX Runtime) dumps its tensors under its own names; a map turns them into
records of the standard trace, so ``tensordiff diff reference.h5 target.h5`` works as for any target.

A map (TOML or JSON) is a list of rules, tried in order; a name's first full match wins:

    [[rule]]
    name = 'blk\\.(\\d+)\\.attn_norm'                             # regex on the engine's name, full match
    record = 'model.layers.\\1.input_layernorm'                   # a module (its forward#0/output.0), a key, or a list
    transform = ["unsqueeze(0)"]                                  # layout: transpose, permute, reshape, ...

    [[rule]]
    name = 'blk\\.(\\d+)\\.ffn_gate_up'                            # a fused tensor split in parts
    split = {dim = -1, records = ['model.layers.\\1.mlp.gate_proj', 'model.layers.\\1.mlp.up_proj']}

    [[rule]]
    name = 'blk\\.(\\d+)\\.expert_(\\d+)_out'                       # one expert's slice, by a group
    record = 'model.layers.\\1.mlp.experts.\\2'

Transforms: transpose(a, b), permute(...), reshape(...) (-1 allowed), unsqueeze(d), squeeze(d),
select(dim, index), slice(dim, start, stop), flatten(start, end), float(); arguments may use groups
(``select(0, \\2)``). Names no rule maps, and records the reference has that nothing maps to, are
listed in the trace's metadata and by the command, never dropped silently. A rule naming a group its
pattern lacks, a record mapped twice, a transform that does not fit: one line naming the map and the
rule (or the dump and the tensor), exit 2.

Offline replay (``reference_model``): a module whose inputs and output are all imported gets its
local error: the reference module run on the engine's own inputs, against the engine's output. Without
inputs, the diff falls back to the first divergence, and says so.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tensordiff.engines.tensor_files import read_dump
from tensordiff.errors import TensordiffError

_CALL = re.compile(r"^(\w+)\((.*)\)$")
_ARITY = {"transpose": (2, 2), "permute": (1, 16), "reshape": (1, 16), "unsqueeze": (1, 1), "squeeze": (0, 1),
          "select": (2, 2), "slice": (3, 3), "flatten": (0, 2), "float": (0, 0), "contiguous": (0, 0)}


@dataclass
class Rule:
    index: int
    pattern: re.Pattern
    records: list           # record templates (one, or one per split part)
    transform: list = field(default_factory=list)
    split_dim: int | None = None

    def describe(self) -> str:
        return f"rule {self.index + 1} ({self.pattern.pattern!r})"


def _load_map_file(path: Path) -> dict:
    if not path.exists():
        raise TensordiffError(f"--map {path}: no such file")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise TensordiffError(f"{path}: not JSON ({exc})") from None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise TensordiffError(f"{path}: TOML maps need Python 3.11 or the tomli package; a .json map "
                                  "works everywhere") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TensordiffError(f"{path}: not TOML ({exc})") from None


def load_map(path) -> list[Rule]:
    path = Path(path)
    data = _load_map_file(path)
    entries = data.get("rule") or data.get("rules")
    if not isinstance(entries, list) or not entries:
        raise TensordiffError(f"{path}: no [[rule]] entries")
    rules = []
    for i, entry in enumerate(entries):
        where = f"{path}: rule {i + 1}"
        if not isinstance(entry, dict) or "name" not in entry:
            raise TensordiffError(f"{where}: needs a name (a regex on the engine's tensor names)")
        try:
            pattern = re.compile(entry["name"])
        except re.error as exc:
            raise TensordiffError(f"{where}: bad regex {entry['name']!r}: {exc}") from None
        split = entry.get("split")
        if split is not None:
            if not isinstance(split, dict) or not isinstance(split.get("records"), list) or len(split["records"]) < 2:
                raise TensordiffError(f"{where}: split needs {{dim = D, records = [two or more]}}")
            records, split_dim = list(split["records"]), int(split.get("dim", -1))
        elif "record" in entry:  # one record, or a list: the same tensor is each (a block's input is its norm's)
            records = entry["record"] if isinstance(entry["record"], list) else [entry["record"]]
            split_dim = None
        else:
            raise TensordiffError(f"{where}: needs a record (or a split)")
        transform = entry.get("transform") or []
        if isinstance(transform, str):
            transform = [transform]
        for text in [*records, *transform]:
            for g in re.findall(r"\\(\d+)", text):
                if int(g) > pattern.groups:
                    raise TensordiffError(f"{where} ({entry['name']!r}): {text!r} uses group \\{g}, the pattern has "
                                          f"{pattern.groups}")
        for t in transform:
            _parse_transform(t, where)
        rules.append(Rule(i, pattern, records, list(transform), split_dim))
    return rules


def _parse_transform(text: str, where: str) -> tuple[str, list[str]]:
    m = _CALL.match(text.strip())
    if not m or m.group(1) not in _ARITY:
        raise TensordiffError(f"{where}: unknown transform {text!r}; use {', '.join(f'{k}(...)' for k in _ARITY)}")
    args = [a.strip() for a in m.group(2).split(",") if a.strip()]
    lo, hi = _ARITY[m.group(1)]
    if not lo <= len(args) <= hi:
        raise TensordiffError(f"{where}: {text!r}: {m.group(1)} takes {lo}..{hi} arguments")
    return m.group(1), args


def _apply(t: torch.Tensor, text: str, groups: re.Match, where: str) -> torch.Tensor:
    op, args = _parse_transform(groups.expand(text) if "\\" in text else text, where)
    try:
        n = [int(a) for a in args]
    except ValueError:
        raise TensordiffError(f"{where}: {text!r}: arguments must be integers") from None
    try:
        if op == "transpose":
            return t.transpose(n[0], n[1])
        if op == "permute":
            return t.permute(*n)
        if op == "reshape":
            return t.reshape(*n)
        if op == "unsqueeze":
            return t.unsqueeze(n[0])
        if op == "squeeze":
            return t.squeeze(*n)
        if op == "select":
            return t.select(n[0], n[1])
        if op == "slice":
            return t.narrow(n[0], n[1], n[2] - n[1])
        if op == "flatten":
            return t.flatten(*n)
        if op == "float":
            return t.float()
        return t.contiguous()
    except (RuntimeError, IndexError) as exc:
        raise TensordiffError(f"{where}: {text!r} does not fit shape {list(t.shape)}: "
                              f"{str(exc).splitlines()[0]}") from None


def _key(template: str, m: re.Match) -> str:
    name = m.expand(template)
    return name if "/" in name else f"{name}/forward#0/output.0"


@dataclass
class Imported:
    records: dict                # key -> tensor (after transforms)
    sources: dict                # key -> engine name
    unmapped: list               # engine names no rule matched
    missing: list = field(default_factory=list)   # reference records nothing maps to (given a reference)
    local: dict = field(default_factory=dict)     # key -> {"local_rel_l2", "local_max_abs"} (offline replay)


def map_dump(dump_dir, rules: list[Rule], map_path: str = "map") -> Imported:
    tensors, files = read_dump(dump_dir)
    records, sources, unmapped = {}, {}, []
    for name, t in tensors.items():
        rule = m = None
        for r in rules:
            m = r.pattern.fullmatch(name)
            if m:
                rule = r
                break
        if rule is None:
            unmapped.append(name)
            continue
        where = f"{map_path}: {rule.describe()} on {files[name]}: tensor {name!r}"
        for text in rule.transform:
            t = _apply(t, text, m, where)
        parts = [t] * len(rule.records) if rule.split_dim is None else \
            list(torch.chunk(t, len(rule.records), dim=rule.split_dim))
        if rule.split_dim is not None and (t.shape[rule.split_dim] % len(rule.records)):
            raise TensordiffError(f"{where}: dim {rule.split_dim} of size {t.shape[rule.split_dim]} does not split "
                                  f"into {len(rule.records)} equal parts")
        for template, part in zip(rule.records, parts):
            key = _key(template, m)
            if key in records:
                raise TensordiffError(f"{map_path}: record {key!r} is mapped twice: from {sources[key]!r} and "
                                      f"{name!r} ({rule.describe()})")
            records[key], sources[key] = part.contiguous(), name
    return Imported(records, sources, unmapped)


def _module_slots(keys) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        scope, _, slot = key.rpartition("/")
        module, _, call = scope.rpartition("/")
        if call == "forward#0":
            out.setdefault(module, {})[slot] = key
    return out


def replay_locals(imported: Imported, model: torch.nn.Module) -> None:
    """Local error of each module whose output.0 and every positional input up to the last imported
    one are imported: the reference module on the engine's inputs against the engine's output."""
    from tensordiff.probes.local_error import local_error

    for module, slots in _module_slots(imported.records).items():
        if "output.0" not in slots:
            continue
        ins = sorted((int(s.split(".")[1]), k) for s, k in slots.items() if re.fullmatch(r"input\.\d+", s))
        if not ins or [i for i, _ in ins] != list(range(len(ins))):
            continue
        try:
            sub = model.get_submodule("" if module == "__root__" else module)
        except AttributeError:
            continue
        args = [imported.records[k] for _, k in ins]
        params = list(sub.parameters())
        if params:
            args = [a.to(params[0].dtype) if a.is_floating_point() else a for a in args]
        with torch.no_grad():
            try:
                out = sub(*args)
            except Exception:  # the module wants other arguments than the dump holds: no local error
                continue
        out = out[0] if isinstance(out, (tuple, list)) else out
        got = imported.records[slots["output.0"]]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(got.shape):
            continue
        result = local_error(got, out)
        if result is not None:
            imported.local[slots["output.0"]] = {"local_rel_l2": result[0], "local_max_abs": result[1]}


def import_dump(dump_dir, map_path, out_path, reference=None, reference_model=None) -> Imported:
    """Write the engine's dump as a trace. ``reference``: a reference trace whose record order the
    imported records follow (and whose unmapped records are listed); ``reference_model``: the
    model for offline replay."""
    from tensordiff.trace import TraceWriter, open_trace

    rules = load_map(map_path)
    imported = map_dump(dump_dir, rules, str(map_path))
    order = list(imported.records)
    if reference is not None:
        with open_trace(reference) as ref:
            ref_keys = list(ref.index.sort_values("seq")["key"])
            ref_shapes = {r["key"]: list(r["shape"]) for r in ref.index[["key", "shape"]].to_dict("records")}
        rank = {k: i for i, k in enumerate(ref_keys)}
        order.sort(key=lambda k: rank.get(k, len(rank)))
        for key in order:
            if key in ref_shapes and list(imported.records[key].shape) != ref_shapes[key]:
                raise TensordiffError(f"{map_path}: {imported.sources[key]!r} -> {key!r} has shape "
                                      f"{list(imported.records[key].shape)}, the reference's record "
                                      f"{ref_shapes[key]}: add a transform to the rule")
        module_keys = [k for k in ref_keys if "/op" not in k.rsplit("/", 2)[-2] and
                       k.rsplit("/", 1)[-1].startswith(("output", "input"))]
        imported.missing = [k for k in module_keys if k not in imported.records and k.endswith("/output.0")]
    if reference_model is not None:
        replay_locals(imported, reference_model)
    meta = {"role": "target", "backend": {"name": "import", "dump": str(dump_dir), "map": str(map_path)},
            "import": {"records": len(imported.records), "unmapped_names": imported.unmapped,
                       "reference_outputs_not_mapped": len(imported.missing),
                       "local_error": "offline replay of the reference model" if imported.local else
                       "none (outputs only, or no reference model): first divergence"}}
    with TraceWriter(out_path, meta, synchronous=True) as writer:
        for key in order:
            record = {"key": key, **_fields(key), **imported.local.get(key, {})}
            writer.add(record, imported.records[key])
    return imported


def _fields(key: str) -> dict:
    scope, _, slot = key.rpartition("/")
    module, _, call = scope.rpartition("/")
    direction, _, n = call.partition("#")
    return {"module": module, "direction": direction or "forward", "call": int(n or 0), "slot": slot}


def suggest_map(dump_dir, reference) -> str:
    """A starting map (TOML): each engine name pattern (digits as a group) paired with the first
    unused reference record pattern of the same per-layer shape (size-1 dims ignored) and layer
    count, in the reference's order. A guess to edit, each rule says what it matched on."""
    from tensordiff.trace import open_trace

    tensors, _ = read_dump(dump_dir)
    squeeze = lambda shape: tuple(d for d in shape if d != 1)  # noqa: E731
    eng: dict[str, dict] = {}
    for name, t in tensors.items():
        pat = re.sub(r"\d+", "#", name)
        eng.setdefault(pat, {"names": [], "shape": squeeze(t.shape), "float": t.is_floating_point()})["names"].append(name)
    with open_trace(reference) as ref:
        rows = ref.index[ref.index["kind"] == "module"].sort_values("seq")[["key", "shape", "dtype"]].to_dict("records")
    refs: dict[str, dict] = {}
    for r in rows:
        pat = re.sub(r"\.\d+(?=[./])", ".#", r["key"])
        refs.setdefault(pat, {"keys": [], "shape": squeeze(r["shape"]),
                              "float": r["dtype"].startswith(("float", "bfloat"))})["keys"].append(r["key"])
    used, lines = set(), ["# suggested by tensordiff import --suggest-map: check every rule", ""]
    for pat, e in eng.items():
        match = next((rp for rp, r in refs.items() if rp not in used and r["shape"] == e["shape"]
                      and r["float"] == e["float"] and len(r["keys"]) == len(e["names"])), None)
        regex = re.escape(pat).replace("\\#", "#").replace("#", r"(\d+)")
        if match is None:
            lines += [f"# no reference record of shape {list(e['shape'])} x {len(e['names'])} for {pat!r}", ""]
            continue
        used.add(match)
        n = 0

        def group(_m):
            nonlocal n
            n += 1
            return f".\\{n}"

        record = re.sub(r"\.#", group, match)
        lines += ["[[rule]]", f"name = '{regex}'", f"record = '{record}'",
                  f"# matched on shape {list(e['shape'])}, {'float' if e['float'] else 'integer'} values and count "
                  f"{len(e['names'])}", ""]
    return "\n".join(lines)
