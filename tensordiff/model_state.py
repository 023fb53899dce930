"""A model's state (every parameter and buffer, non-persistent ones too) as one file, and the check of
a prepared model's state against the state it was prepared from.

Reference, target and replay must start from bit-identical state, also across the process boundary
of an isolated target: the parent writes the state once (safetensors, memory-mapped by the reader)
and the child loads it into the model it built, instead of trusting that rebuilding gives the same
numbers (a checkpoint with missing tensors is initialised at random in every process).

    save_state(model, "run/state.safetensors")
    load_state(other_model, "run/state.safetensors")           # bit-identical afterwards
    rows = state_rows(prepared_model, base_tensors(model))      # what a backend changed
"""
from __future__ import annotations

from pathlib import Path

import torch

from tensordiff.errors import TensordiffError


def named_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor of every parameter and buffer; a tied tensor appears under its first name."""
    out: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None:
            out.setdefault(name, t)
    return out


def non_persistent_names(model: torch.nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            names.add(f"{mod_name}.{b}" if mod_name else b)
    return names


def save_state(model: torch.nn.Module, path) -> None:
    import json

    from safetensors.torch import save_file

    tensors, seen, aliases = {}, {}, {}
    for name, t in named_state(model).items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:  # safetensors refuses shared memory: the same view is written once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        # a view into a larger storage (or a strided one) is written as its own contiguous copy
        whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        tensors[name] = t if whole else t.clone(memory_format=torch.contiguous_format)
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_state(model: torch.nn.Module, path) -> None:
    """Copy the saved state into ``model`` by name (a tensor saved as an alias of another name gets
    that one's value)."""
    import json

    from safetensors import safe_open

    own = named_state(model)
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        source = {n: aliases.get(n, n) for n in own}
        saved = set(f.keys())
        missing = [n for n, src in source.items() if src not in saved]
        if missing:
            raise TensordiffError(f"{path}: the model built here has tensors the saved state lacks "
                                  f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        with torch.no_grad():
            for name, t in own.items():
                value = f.get_tensor(source[name])
                if tuple(value.shape) != tuple(t.shape):
                    raise TensordiffError(f"{path}: {name} has shape {tuple(value.shape)} there, "
                                          f"{tuple(t.shape)} in the model built here")
                t.copy_(value)


def save_inputs(inputs, path) -> None:
    torch.save((inputs.args, inputs.kwargs), str(path))


def load_inputs(path):
    from tensordiff.models import Inputs

    try:
        args, kwargs = torch.load(str(path), weights_only=True)
    except Exception as exc:
        raise TensordiffError(f"{path}: cannot read the saved inputs: {type(exc).__name__}: {exc}") from None
    return Inputs(tuple(args), dict(kwargs))


def _common_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two float dtypes: where both sides can be compared exactly."""
    if not (a.is_floating_point and b.is_floating_point):
        return a if a == b else torch.float64
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


def _read(t: torch.Tensor) -> torch.Tensor:
    """The tensor where it can be compared: CUDA and CPU tensors stay, any other device's bytes are
    read back to the host (never trust a device under test to copy its own tensor)."""
    from tensordiff.probes.snapshot import read_back

    return t.detach() if t.device.type in ("cpu", "cuda") else read_back(t).materialize()


def _rel_l2(s: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    if not (s.is_floating_point() and b.is_floating_point()) or s.numel() == 0:
        d = (s.double() - b.double()).abs() if s.numel() else s.double()
        return (float(d.sum() > 0), float(d.max()) if d.numel() else 0.0)
    d = torch.nan_to_num(s.float() - b.float())
    norm = float(torch.linalg.vector_norm(b.float()))
    dn = float(torch.linalg.vector_norm(d))
    return (dn / norm if norm else dn), float(d.abs().max())


def compare_tensor(side: torch.Tensor, base: torch.Tensor, cast_error: bool = True) -> dict:
    """Status of a prepared tensor against its base: same (bit-identical), cast (equal after rounding
    the base to the common dtype), value (beyond one unit of that rounding), shape. Compared on the
    side's GPU when it has one: a 0.6B model is checked in well under a second there.
    ``cast_error=False``: a plain cast gets no rel L2 / max |diff| (the rounding error of every
    parameter of a bf16 model: 10 of the 11 s its state check took on 2 host cores, and unused)."""
    if tuple(side.shape) != tuple(base.shape):
        return {"status": "shape", "rel_l2": None, "max_abs": None}
    s = _read(side)
    b = base.detach().to(s.device)
    if s.dtype == b.dtype and torch.equal(s, b):
        return {"status": "same", "beyond_rounding": 0, "rel_l2": 0.0, "max_abs": 0.0}
    common = _common_dtype(s.dtype, b.dtype)
    sc, bc = s.to(common), b.to(common)
    if torch.equal(sc, bc):
        rel, max_abs = _rel_l2(s, b) if cast_error else (None, None)
        return {"status": "cast", "beyond_rounding": 0, "rel_l2": rel, "max_abs": max_abs}
    rel, max_abs = _rel_l2(s, b)
    d = (sc.double() - bc.double()).abs()
    if common.is_floating_point:
        slack = torch.finfo(common).eps * bc.double().abs()  # one unit of the common dtype's rounding
        both_nan = torch.isnan(sc) & torch.isnan(bc)
        beyond = int(((d > slack) & ~both_nan).sum()) + int((torch.isnan(sc) ^ torch.isnan(bc)).sum())
    else:
        beyond = int((sc != bc).sum())
    status = "value" if beyond else "cast"
    out = {"status": status, "beyond_rounding": beyond, "rel_l2": rel, "max_abs": max_abs}
    if beyond and common.is_floating_point and s.ndim >= 3:
        # a stacked tensor (fused experts [E, 2I, H]): which slices along dim 0 differ
        bad = ((d > slack) & ~both_nan) | (torch.isnan(sc) ^ torch.isnan(bc))
        out["slices"] = torch.nonzero(bad.reshape(s.shape[0], -1).any(1)).flatten().tolist()
    return out


def state_rows(prepared: torch.nn.Module, base: dict[str, torch.Tensor],
               non_persistent: set[str] | None = None) -> list[dict]:
    """One row per tensor of the prepared model or the base: name, shape, dtype, device, status
    (same / cast / value / shape / missing / extra) against the base, and the value error."""
    from tensordiff.observers.experts import expert_containers

    own = named_state(prepared)
    fused = expert_containers(prepared)[1]
    non_persistent = non_persistent if non_persistent is not None else non_persistent_names(prepared)
    rows = []
    for name, t in own.items():
        row = {"name": name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
               "device": str(t.device), "kind": "parameter" if isinstance(t, torch.nn.Parameter) else "buffer",
               "persistent": name not in non_persistent}
        if name in base:
            row.update(compare_tensor(t, base[name], cast_error=row["kind"] == "buffer"))
            if "slices" in row:
                row["slices_of"] = int(t.shape[0])
                row["slice_noun"] = "experts" if name.rpartition(".")[0] in fused else "dim-0 slices"
            row["base_dtype"] = str(base[name].dtype).replace("torch.", "")
        else:
            row["status"] = "extra"
        rows.append(row)
    for name, t in base.items():
        if name not in own:
            rows.append({"name": name, "shape": list(t.shape), "dtype": None, "device": None,
                         "base_dtype": str(t.dtype).replace("torch.", ""), "status": "missing"})
    return rows


def base_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach() for n, t in named_state(model).items()}


def state_file_paths(out_dir) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / "state.safetensors", out / "inputs.pt"
