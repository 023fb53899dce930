"""Backend names -> Backend objects (built-ins, ``file.py:NAME`` plugins, entry points)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from tensordiff.backends.casting import cast_like_deployment, converted_copy  # noqa: F401 (plugins use them)
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


@dataclass
class Backend:
    """Prepares a deep copy of the reference model to run somewhere; moves inputs there."""
    name: str
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    plugin: object = None          # callable(model) -> nn.Module, for plugin / entry-point backends
    info: dict = field(default_factory=dict)
    adapt: object = None           # callable(model) -> nn.Module, after a built-in's conversion (``+sdpa-*``)

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.plugin is None:
            low = self.dtype in (torch.bfloat16, torch.float16)
            converted = converted_copy(model, self.device, self.dtype, like_deployment=low, share=True)
            return (converted if self.adapt is None else self.adapt(converted)).eval()
        try:
            result = self.plugin(copy.deepcopy(model))
        except TensordiffError:
            raise
        except Exception as exc:
            raise TensordiffError(f"backend {self.name!r} raised {type(exc).__name__}: {exc}") from None
        if not isinstance(result, torch.nn.Module):
            raise TensordiffError(f"backend {self.name!r} returned {type(result).__name__}, "
                                  "expected an nn.Module")
        return result.eval()

    def inputs(self, inputs):
        from tensordiff.models import Inputs

        return Inputs(*_cast_floats((inputs.args, inputs.kwargs), self.device, self.dtype))

    def describe(self) -> dict:
        return {"name": self.name, "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                **self.info}


def _builtin(name: str) -> Backend | None:
    if not is_builtin(name) and not _is_device_and_kernel(name):
        return None
    base, _, attention = name.partition("+")
    device, _, suffix = base.partition("-")
    if device == "cuda" and not torch.cuda.is_available():
        raise TensordiffError(f"backend {name!r} needs CUDA, and torch sees no CUDA device here")
    if not attention:
        return Backend(name, device, _DTYPES[suffix])
    if ".py:" in attention:  # a user's attention kernel, on this device in this dtype
        from tensordiff.backends.flash_attn import is_attention_kernel, use_attention_kernel
        from tensordiff.models import _from_file

        fn = _from_file(attention)
        if not is_attention_kernel(fn):
            raise TensordiffError(f"--target {name}: {attention} is not an attention kernel "
                                  "fn(q, k, v, causal, scale[, mask])")
        return Backend(name, device, _DTYPES[suffix], adapt=lambda model: use_attention_kernel(model, fn, attention),
                       info={"plugin": attention, "kernel": f"attention kernel {attention}", "attention_kernel": True})
    from tensordiff.backends.sdpa import describe, use_sdpa_backend

    kind = attention.removeprefix("sdpa-")
    return Backend(name, device, _DTYPES[suffix], adapt=lambda model: use_sdpa_backend(model, kind),
                   info=describe(kind))


def _is_device_and_kernel(name: str) -> bool:
    """``cuda-bf16+kernels.py:NAME``: a user's attention kernel in a built-in device and dtype."""
    base, _, attention = name.partition("+")
    device, _, suffix = base.partition("-")
    return device in ("cpu", "cuda") and suffix in _DTYPES and ".py:" in attention


def is_builtin(name: str) -> bool:
    """cpu, cpu-bf16, cuda-fp16, ...: torch's own kernels in a dtype, no code under test; with
    ``+sdpa-flash`` (``-efficient``, ``-cudnn``, ``-math``) the model's attention forced onto one of
    torch's scaled_dot_product_attention backends."""
    from tensordiff.backends.sdpa import SDPA_KINDS

    base, plus, attention = name.partition("+")
    device, _, suffix = base.partition("-")
    return (device in ("cpu", "cuda") and suffix in _DTYPES
            and (not plus or attention.removeprefix("sdpa-") in SDPA_KINDS and attention.startswith("sdpa-")))


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
        from tensordiff import guard as guards

        guard = guards.active()
        if guard is not None:  # --guard: red zones and poison from the first block on
            from tensordiff.backends.echo_npu import guard_allocator

            guard_allocator(guard)
            with guard:
                model = model.to(DEVICE)
                use_echo_npu_attention(model)
            return model
        model = model.to(DEVICE)
        use_echo_npu_attention(model)  # the port's own attention path (device bmm + masked_fill_)
        return model

    return Backend(name, DEVICE, torch.float32, plugin=to_device, info={"fault": fault})


def _kt_moe(name: str, fault: str) -> Backend | None:
    if name != "kt_moe":
        return None
    from tensordiff.backends.kt_moe import FAULTS, describe, to_kt_moe

    if fault not in FAULTS:
        raise TensordiffError(f"unknown --fault {fault!r} for kt_moe; choose one of {', '.join(FAULTS)}")
    info = {**describe(), "fault": fault}  # also: the missing-package hint, before any work

    def plugin(model):
        from tensordiff.backends.kt_sft import to_kt_sft

        if fault == "lora-grad-tail" and not any(hasattr(m, "lora_gate_a") for m in model.modules()):
            raise TensordiffError("--fault lora-grad-tail plants a bug in kt_moe's SFT path: add --lora-rank R")
        to_kt_sft(model, fault)  # --lora-rank blocks: the SFT kernel
        prepared = to_kt_moe(model, fault)
        sft = sorted({m.method for m in prepared.modules() if hasattr(m, "kernel_backward")})
        if sft:  # --lora-rank: the SFT kernel ran, not the inference one
            info.update(kernel=f"{'/'.join(sft)} (SFT, LoRA)", sft=True)
        return prepared

    return Backend(name, "cpu", torch.bfloat16, plugin=plugin, info=info)


def _flash_attn(name: str, fault: str) -> Backend | None:
    if name != "flash_attn":
        return None
    from tensordiff.backends.flash_attn import BLOCK_K, BLOCK_Q, FAULTS, use_flash_attention

    if fault not in FAULTS:
        raise TensordiffError(f"unknown --fault {fault!r} for flash_attn; choose one of {', '.join(FAULTS)}")
    info = {"kernel": "tensordiff tiled online-softmax FlashAttention (CPU)", "attention_kernel": True, "block_q": BLOCK_Q,
            "block_k": BLOCK_K, "fault": fault}
    return Backend(name, "cpu", torch.float32, plugin=lambda model: use_flash_attention(model, fault), info=info)


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


# Backends handed over in this process (``register``): a pytest helper's kernel, a notebook's module.
# They exist only here, so a trace job naming one runs in this process (no isolated child).
_REGISTERED: dict[str, object] = {}


def register(name: str, obj) -> None:
    """Make ``obj`` (a Backend, a plugin ``fn(model) -> nn.Module`` or an attention kernel
    ``fn(q, k, v, causal, scale[, mask])``) the backend called ``name`` in this process."""
    _REGISTERED[name] = obj


def is_registered(name: str) -> bool:
    return name in _REGISTERED


def _registered(name: str) -> Backend | None:
    obj = _REGISTERED.get(name)
    if obj is None:
        return None
    if isinstance(obj, Backend):
        return obj
    from tensordiff.backends.flash_attn import is_attention_kernel, use_attention_kernel

    if is_attention_kernel(obj):
        return Backend(name, plugin=lambda model: use_attention_kernel(model, obj, name),
                       info={"plugin": name, "kernel": f"attention kernel {name}", "attention_kernel": True})
    return Backend(name, plugin=obj, info={"plugin": name})


def get_backend(name: str, fault: str = "none") -> Backend:
    if name in _REGISTERED and fault == "none":
        return _registered(name)
    if fault != "none" and name not in ("echo_npu", "kt_moe", "flash_attn"):
        raise TensordiffError(f"--fault applies to the echo_npu, kt_moe and flash_attn targets only (target is {name!r})")
    device = _echo_npu(name, fault) or _kt_moe(name, fault) or _flash_attn(name, fault) or _device_module(name)
    if device is not None:
        return device
    builtin = _builtin(name)
    if builtin is not None:
        return builtin
    if ":" in name and name.rsplit(":", 1)[0].endswith(".py"):
        from tensordiff.backends.flash_attn import is_attention_kernel, use_attention_kernel
        from tensordiff.models import _from_file

        fn = _from_file(name)
        if is_attention_kernel(fn):  # kernel(q, k, v, causal, scale): it computes the model's attention
            return Backend(name, plugin=lambda model: use_attention_kernel(model, fn, name),
                           info={"plugin": name, "kernel": f"attention kernel {name}", "attention_kernel": True})
        return Backend(name, plugin=fn, info={"plugin": name})
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
    names = [f"{d}{'-' + s if s else ''}" for d in ("cpu", "cuda") for s in _DTYPES] + ["echo_npu", "kt_moe", "flash_attn"]
    return names + ["cuda-bf16+sdpa-flash (a device-dtype target + sdpa-flash / -efficient / -cudnn / -math, "
                    "or + path/to/kernels.py:NAME)"] + sorted(_entry_points())
