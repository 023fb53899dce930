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


import torch
from torch.utils._pytree import tree_flatten, tree_map

from tensordiff.probes.local_error import local_error
from tensordiff.probes.session import ROOT
from tensordiff.tensors import flatten_tensors
from tensordiff.probes.snapshot import read_back

# Ops whose result is not a function of their inputs: replaying them proves nothing.
NONDETERMINISTIC = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "rand", "randn",
                    "rand_like", "randn_like", "randint", "randperm", "normal", "bernoulli", "uniform_",
                    "normal_", "dropout", "native_dropout", "set_", "resize_", "_local_scalar_dense",
                    "detach", "alias", "lift_fresh")


LOW_PRECISION = (torch.bfloat16, torch.float16)


def default_budget(key: str, dtype: str) -> float:
    from tensordiff.metrics import tolerance_for

    return tolerance_for(dtype).rel_l2


class Replayer:
    """Runs reference modules and ops on copies of the target's inputs, on ``device`` in ``dtype``.

    The noise floor: a low-precision call whose local error is over budget is run once more by the
    reference implementation in the target's own dtype (``floor``). Deep bf16 models accumulate
    rounding in every composite module (a decoder stack of 28 layers at 2048 tokens): that is not a
    bug when the reference code in bf16 has the same error (torch's accuracy check and
    FlashAttention's tests judge the same way: error <= 2 x that of the same-dtype reference)."""

    def __init__(self, reference_model: torch.nn.Module, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", budget=default_budget):
        self.model = reference_model
        self.modules = {(name or ROOT): mod for name, mod in reference_model.named_modules()}
        self.dtype = dtype
        self.device = torch.device(device)
        self.failures: dict[str, str] = {}  # module or op -> why its replay could not run
        self._floor_models: dict = {}       # low dtype -> {name: module} of a deployment-cast copy
        # (record key, dtype name) -> rel L2 budget: the diff's tolerance policy (--tol included), so
        # the capture's decisions (noise floor, drill-down) agree with the verdict
        self._budget = budget

    def budget(self, key: str, t: torch.Tensor) -> float:
        return self._budget(key, str(t.dtype).replace("torch.", ""))

    def _to_ref_tensor(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == self.device.type == "cuda":  # a trusted device: copy there, no trip via the host
            host = t.detach().to(self.dtype if t.is_floating_point() else t.dtype, copy=True)
        else:
            host = read_back(t).materialize()
            if host.device != self.device:
                host = host.to(self.device)
        if host.is_floating_point() and host.dtype != self.dtype:
            host = host.to(self.dtype)
        return host

    def to_reference(self, obj):
        """Tensors -> copies in the reference dtype on the replay device; devices -> that device."""
        def convert(x):
            if isinstance(x, torch.Tensor):
                return self._to_ref_tensor(x)
            if isinstance(x, torch.device):
                return self.device
            if isinstance(x, torch.dtype) and x in LOW_PRECISION:
                return self.dtype
            return x

        return tree_map(convert, obj)

    def run_module(self, name: str, ref_inputs, modules: dict | None = None):
        mod = (modules or self.modules).get(name)
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

    def run_call(self, name: str, ref_inputs, children: list | None, dtype: torch.dtype | None = None):
        """(output, feed error) of one call replayed: its own code with the children answering from
        ``children`` (probes/own_code.py), or, where the reference calls them otherwise, in full
        (feed error None). ``dtype``: on the noise-floor copy in that low dtype, the children's
        answers handed over in the target's own dtypes."""
        from tensordiff.probes.own_code import ChildMismatch, run_own_code

        modules = self._floor_modules(dtype) if dtype is not None else self.modules
        mod = modules.get(name)
        args_kwargs = ref_inputs if dtype is None else self.in_target_dtypes(*ref_inputs)
        if mod is not None and children:
            answer = None if dtype is None else (lambda call: self.in_target_dtypes(call.output, call.dtypes))
            try:
                return run_own_code(mod, modules, args_kwargs, children, answer)
            except ChildMismatch:
                pass
            except Exception as exc:
                self.failures.setdefault(name, f"{type(exc).__name__}: {exc}"[:200])
                return None, None
        return self.run_module(name, args_kwargs, modules), None

    def run_op(self, func, ref_inputs):
        args, kwargs = ref_inputs
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            self.failures.setdefault(func.name(), f"{type(exc).__name__}: {exc}"[:200])
            return None

    def module_vjp(self, name: str, ref_inputs, grad_output, floor: tuple | None = None) -> tuple[list, dict] | None:
        """The reference module's backward at the target's inputs with the target's grad_output:
        (gradients for the module's positional tensor inputs, in grad_input order; {param attr:
        gradient} of the module's own parameters). None where it cannot run. ``floor`` = (input
        dtypes, low dtype): the same on the noise-floor copy, inputs and grad_output in the target's
        dtypes (a composite's backward holds its whole subtree's rounding)."""
        modules = self.modules
        if floor is not None:
            modules = self._floor_modules(floor[1])
            ref_inputs = self.in_target_dtypes(ref_inputs, floor[0])
        mod = modules.get(name)
        if mod is None:
            return None
        args, kwargs = ref_inputs
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
        # frozen parameters (a LoRA fine-tuning's base weights) get no gradient on either side
        params = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.is_floating_point() and p.requires_grad]
        try:
            with torch.enable_grad():
                outs = direct_tensors(mod(*args, **kwargs))
                pairs = [(o, self._to_ref_tensor(g)) for o, g in zip(outs, grad_output)
                         if isinstance(g, torch.Tensor) and o.requires_grad]
                if floor is not None:
                    pairs = [(o, g.to(t.dtype)) for (o, g), t in
                             zip(pairs, [t for t in grad_output if isinstance(t, torch.Tensor)])]
                tensor_args = [a for a in args if isinstance(a, torch.Tensor)]
                wants = [a for a in tensor_args if a.requires_grad] + [p for _, p in params]
                if not pairs or not wants:
                    return None
                grads = torch.autograd.grad([o for o, _ in pairs], wants, [g.to(o.dtype) for o, g in pairs],
                                            allow_unused=True)
        except Exception as exc:
            self.failures.setdefault(f"{name} (backward)", f"{type(exc).__name__}: {exc}"[:200])
            return None
        it = iter(grads)
        arg_grads = [next(it) if a.requires_grad else None for a in tensor_args]
        return arg_grads, {n: g for (n, _), g in zip(params, it) if g is not None}

    def _floor_modules(self, dtype: torch.dtype) -> dict:
        if dtype not in self._floor_models:
            from tensordiff.backends.casting import converted_copy

            low = converted_copy(self.model, self.device, dtype, like_deployment=True)
            self._floor_models[dtype] = {(name or ROOT): mod for name, mod in low.named_modules()}
        return self._floor_models[dtype]

    @staticmethod
    def in_target_dtypes(ref_inputs, dtypes):
        """The reference copies cast back to the dtypes the target's call had (what its bf16 code saw)."""
        return tree_map(lambda x, d: x.to(d) if isinstance(x, torch.Tensor) and isinstance(d, torch.dtype)
                        and x.dtype != d else x, ref_inputs, dtypes)

    def module_floor(self, name: str, ref_inputs, dtypes, dtype: torch.dtype, ref_out: torch.Tensor,
                     slot: str, children: list | None = None) -> float | None:
        """rel L2 of the reference module run in ``dtype`` on the target's inputs (children answering
        as in the fp32 replay), against its fp32 run; a feed error of that run counts too."""
        out, feed = self.run_call(name, (ref_inputs, dtypes), children, dtype)
        if out is None:
            return None
        out = (out,) if isinstance(out, torch.Tensor) else out
        low = dict(flatten_tensors(out, "output")).get(slot)
        err = local_error(low, ref_out) if isinstance(low, torch.Tensor) else None
        return max(err[0], feed or 0.0) if err else None

    def op_floor(self, func, ref_inputs, dtypes, ref_out: torch.Tensor) -> float | None:
        out = self.run_op(func, self.in_target_dtypes(ref_inputs, dtypes))
        outs = output_tensors(out) if out is not None else []
        err = local_error(outs[0], ref_out) if outs else None
        return err[0] if err else None


def direct_tensors(obj) -> list:
    """Tensors a full backward hook pairs with gradients: the object itself, or a tuple's elements."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [x for x in obj if isinstance(x, torch.Tensor)]
    return []


def dtypes_of(obj):
    """The same structure with each tensor replaced by its dtype (for Replayer.in_target_dtypes)."""
    # False, not None, for other leaves: pytree treats None as an empty node, not a leaf
    return tree_map(lambda x: x.dtype if isinstance(x, torch.Tensor) else False, obj)


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
