"""Local error: while the target runs, run the *reference* implementation on the target's own inputs.

Output error alone says where error is visible, not who made it: a layer norm fed a scrambled tensor
has a large output error and is innocent. Here every module call (and, at op level, every aten op)
of the target is re-run on the reference model (fp32, CPU) with the target's actual inputs, read back
from the device bytes. The difference between the target's output and that replay is the error the
call made by itself (torch's minifier calls this ``accumulate_error=False``). It is stored with the
output record as ``local_rel_l2`` / ``local_max_abs``.

    replayer = Replayer(reference_model)
    ref_inputs = replayer.to_reference((args, kwargs))     # before the target call (in-place safe)
    local = replayer.module_local_error(name, ref_inputs, target_output)
"""
from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_flatten, tree_map

from tensordiff.probes.session import ROOT
from tensordiff.probes.snapshot import read_back

# Ops whose result is not a function of their inputs: replaying them proves nothing.
NONDETERMINISTIC = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "rand", "randn",
                    "rand_like", "randn_like", "randint", "randperm", "normal", "bernoulli", "uniform_",
                    "normal_", "dropout", "native_dropout", "set_", "resize_", "_local_scalar_dense",
                    "detach", "alias", "lift_fresh")


def local_error(tgt: torch.Tensor, ref: torch.Tensor) -> tuple[float, float] | None:
    """(rel_l2, max_abs) of tgt against ref over finite elements; None if shapes differ."""
    if tuple(tgt.shape) != tuple(ref.shape) or not (tgt.is_floating_point() or tgt.is_complex()):
        return None
    if tgt.device.type != "cpu":  # read the device's bytes back ourselves: never trust its copy
        tgt = read_back(tgt).materialize()
    t, r = tgt.detach().to(torch.float64), ref.detach().to(torch.float64)
    both = torch.isfinite(t) & torch.isfinite(r)
    mismatch = int((~both & ~(torch.isnan(t) & torch.isnan(r))).sum()) if not bool(both.all()) else 0
    d = torch.where(both, t - r, 0.0)
    norm_r = float(torch.linalg.vector_norm(torch.where(both, r, 0.0)))
    norm_d = float(torch.linalg.vector_norm(d))
    rel = norm_d / norm_r if norm_r > 0 else (0.0 if norm_d == 0 else math.inf)
    if mismatch:
        rel = math.inf
    return rel, float(d.abs().max()) if d.numel() else 0.0


class Replayer:
    def __init__(self, reference_model: torch.nn.Module, dtype: torch.dtype = torch.float32):
        self.modules = {(name or ROOT): mod for name, mod in reference_model.named_modules()}
        self.dtype = dtype
        self.failures: dict[str, str] = {}  # module or op -> why its replay could not run

    def _to_ref_tensor(self, t: torch.Tensor) -> torch.Tensor:
        host = read_back(t).materialize()
        if host.is_floating_point() and host.dtype != self.dtype:
            host = host.to(self.dtype)
        return host

    def to_reference(self, obj):
        """Tensors -> host copies in the reference dtype; devices -> cpu; everything else unchanged."""
        def convert(x):
            if isinstance(x, torch.Tensor):
                return self._to_ref_tensor(x)
            if isinstance(x, torch.device):
                return torch.device("cpu")
            if isinstance(x, torch.dtype) and x in (torch.bfloat16, torch.float16):
                return self.dtype
            return x

        return tree_map(convert, obj)

    def run_module(self, name: str, ref_inputs):
        mod = self.modules.get(name)
        if mod is None:
            self.failures.setdefault(name, "no module of that name in the reference model")
            return None
        args, kwargs = ref_inputs
        try:
            with torch.no_grad():
                return mod(*args, **kwargs)
        except Exception as exc:  # a plugin may change a module's signature: no local error then
            self.failures.setdefault(name, f"{type(exc).__name__}: {exc}"[:200])
            return None

    def run_op(self, func, ref_inputs):
        args, kwargs = ref_inputs
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            self.failures.setdefault(func.name(), f"{type(exc).__name__}: {exc}"[:200])
            return None


def replayable(func) -> bool:
    name = func.name().split("::", 1)[-1].split(".", 1)[0]
    return name not in NONDETERMINISTIC and not getattr(func, "is_view", False)


def output_tensors(output) -> list:
    flat, _ = tree_flatten(output)
    return [x for x in flat if isinstance(x, torch.Tensor)]


def mutates_inputs(func) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


def strided_device_inputs(args, kwargs) -> bool:
    flat, _ = tree_flatten((args, kwargs))
    return any(isinstance(x, torch.Tensor) and x.device.type != "cpu" and not x.is_contiguous() for x in flat)


def layout_experiment(func, args, kwargs, ref_out: torch.Tensor, budget: float) -> str | None:
    """An op went wrong on the device and some input is strided. Run it again on the device with those
    inputs made contiguous (read back as bytes, re-uploaded contiguously): if the result becomes right,
    the device mishandles strided tensors (its strided copy, _copy_from, or the kernel's stride logic)."""
    if mutates_inputs(func) or not strided_device_inputs(args, kwargs):
        return None

    def contiguous_copy(x):
        if isinstance(x, torch.Tensor) and x.device.type != "cpu" and not x.is_contiguous():
            return read_back(x).materialize().to(x.device)
        return x

    try:
        out = output_tensors(func(*tree_map(contiguous_copy, (args, kwargs))[0],
                                  **tree_map(contiguous_copy, (args, kwargs))[1]))
    except Exception as exc:
        return f"re-run with contiguous inputs failed: {type(exc).__name__}"
    err = local_error(out[0], ref_out) if out else None
    if err is None:
        return None
    if err[0] <= budget:
        return (f"correct when its strided inputs are made contiguous (local error {err[0]:.2g}): the device "
                "mishandles strided tensors, e.g. a _copy_from / copy_ that ignores strides")
    return f"still wrong with contiguous inputs (local error {err[0]:.2g}): not a layout problem"
