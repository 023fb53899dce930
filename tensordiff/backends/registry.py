"""Backend names -> Backend objects (built-ins, ``file.py:NAME`` plugins, entry points)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from tensordiff.errors import TensordiffError

_DTYPES = {"": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _cast_floats(obj, device, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(x, device, dtype) for x in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, device, dtype) for k, v in obj.items()}
    return obj


def _keeps_fp32(module_name: str, keep: list) -> bool:
    parts = module_name.split(".")
    return any(k in parts or module_name.endswith(k) for k in keep)


def cast_like_deployment(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast as a real low-precision deployment is (``from_pretrained(..., dtype=bf16)``): parameters
    and persistent buffers to ``dtype``; non-persistent float buffers (rotary ``inv_freq``, computed in
    float32 at build time) and the modules listed in ``_keep_in_fp32_modules`` stay float32.
    ``model.to(dtype)`` casts ``inv_freq`` too: at 2048 positions that alone is a 0.13 relative error
    on every layer of a bf16 Qwen3, which is not the target's fault. In place; ties are kept."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) + \
        list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    for mod_name, mod in model.named_modules():
        if keep and _keeps_fp32(mod_name, keep):
            continue
        for param in mod._parameters.values():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for attr, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_floating_point() and attr not in mod._non_persistent_buffers_set:
                mod._buffers[attr] = buf.to(dtype)
    return model


@dataclass
class Backend:
    """Prepares a deep copy of the reference model to run somewhere; moves inputs there."""
    name: str
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    plugin: object = None          # callable(model) -> nn.Module, for plugin / entry-point backends
    info: dict = field(default_factory=dict)

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        model = copy.deepcopy(model)
        if self.plugin is not None:
            try:
                result = self.plugin(model)
            except TensordiffError:
                raise
            except Exception as exc:
                raise TensordiffError(f"backend {self.name!r} raised {type(exc).__name__}: {exc}") from None
            if not isinstance(result, torch.nn.Module):
                raise TensordiffError(f"backend {self.name!r} returned {type(result).__name__}, "
                                      "expected an nn.Module")
            return result.eval()
        if self.dtype in (torch.bfloat16, torch.float16):
            cast_like_deployment(model, self.dtype)
            return model.to(device=self.device).eval()
        return model.to(device=self.device, dtype=self.dtype).eval()

    def inputs(self, inputs):
        from tensordiff.models import Inputs

        return Inputs(*_cast_floats((inputs.args, inputs.kwargs), self.device, self.dtype))

    def describe(self) -> dict:
        return {"name": self.name, "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                **self.info}


def _builtin(name: str) -> Backend | None:
    device, _, suffix = name.partition("-")
    if device not in ("cpu", "cuda") or suffix not in _DTYPES:
        return None
    if device == "cuda" and not torch.cuda.is_available():
        raise TensordiffError(f"backend {name!r} needs CUDA, and torch sees no CUDA device here")
    return Backend(name, device, _DTYPES[suffix])


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="tensordiff.backends")}


def _echo_npu(name: str, fault: str) -> Backend | None:
    if name != "echo_npu":
        return None
    from tensordiff.backends.echo_npu import DEVICE, set_fault

    from tensordiff.backends.echo_npu.attention import use_echo_npu_attention

    set_fault(fault)  # builds / loads the extension and registers the device

    def to_device(model):
        model = model.to(DEVICE)
        use_echo_npu_attention(model)  # the port's own attention path (device bmm + masked_fill_)
        return model

    return Backend(name, DEVICE, torch.float32, plugin=to_device, info={"fault": fault})


def _device_module(name: str) -> Backend | None:
    """``device:MODULE``: import a PrivateUse1 extension (importing it registers its device, as
    torch_npu does) and run on that device. One PrivateUse1 backend per process: `trace` runs the
    target in its own child process."""
    if not name.startswith("device:"):
        return None
    import importlib
    import sys

    module = name.split(":", 1)[1]
    if "" not in sys.path:
        sys.path.insert(0, "")  # modules next to where the user runs the command
    try:
        importlib.import_module(module)
    except Exception as exc:
        raise TensordiffError(f"--target {name}: cannot import {module!r}: {type(exc).__name__}: {exc}") from None
    device = torch._C._get_privateuse1_backend_name()
    try:
        torch.empty(1, device=device)
    except Exception as exc:
        raise TensordiffError(f"--target {name}: importing {module!r} registered no usable PrivateUse1 device "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return Backend(name, device, torch.float32, info={"module": module})


def get_backend(name: str, fault: str = "none") -> Backend:
    if fault != "none" and name != "echo_npu":
        raise TensordiffError(f"--fault applies to the echo_npu target only (target is {name!r})")
    device = _echo_npu(name, fault) or _device_module(name)
    if device is not None:
        return device
    builtin = _builtin(name)
    if builtin is not None:
        return builtin
    if ":" in name and name.rsplit(":", 1)[0].endswith(".py"):
        from tensordiff.models import _from_file

        return Backend(name, plugin=_from_file(name), info={"plugin": name})
    eps = _entry_points()
    if name in eps:
        try:
            obj = eps[name].load()
        except Exception as exc:
            raise TensordiffError(f"backend {name!r}: cannot load entry point {eps[name].value}: {exc}") from None
        if isinstance(obj, Backend):
            return obj
        return Backend(name, plugin=obj, info={"entry_point": eps[name].value})
    raise TensordiffError(f"unknown backend {name!r}; choose one of {', '.join(list_backends())}, "
                          "or path/to/file.py:NAME")


def list_backends() -> list[str]:
    names = [f"{d}{'-' + s if s else ''}" for d in ("cpu", "cuda") for s in _DTYPES] + ["echo_npu"]
    return names + sorted(_entry_points())
