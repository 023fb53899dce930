"""echo_npu: a real PrivateUse1 device (C++ extension, compiled on first use and cached) whose chip is
host memory, with the fault modes NPU ports really had.

    backend = echo_npu_backend(fault="noncontig-copy")
    model = backend(reference_model); model(**backend.inputs(inputs).kwargs)

Only one PrivateUse1 backend can live in a process: ``trace`` runs targets in a child process.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from tensordiff.errors import TensordiffError
from tensordiff.progress import status
from tensordiff.build_cache import build_cache

DEVICE = "echo_npu"
FAULTS = {
    "none": (0, "a correct device"),
    "noncontig-copy": (1, "device copies ignore strides and copy the storage in memory order, so a "
                          "transposed or sliced tensor arrives scrambled"),
    "alloc-round-up": (2, "the allocator rounds sizes up to 64 bytes and hands out a block its free() "
                          "does not know: a later free aborts inside glibc (free(): invalid pointer)"),
    "inplace-fallback": (3, "in-place ops routed through the CPU fallback (masked_fill_ and friends) write "
                            "into a temporary and never back to the device tensor"),
}
_EXT = None


def build_dir() -> Path:
    root = build_cache()
    path = root / f"echo_npu-torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_extension(verbose: bool = False):
    """Compile (first time, ~20 s on 2 cores) or load the cached extension and register the device."""
    global _EXT
    if _EXT is not None:
        return _EXT
    from torch.utils.cpp_extension import load

    src = Path(__file__).with_name("echo_npu.cpp")
    out = build_dir()
    cached = any(out.glob("*.so"))
    if not cached:
        status(f"compiling the echo_npu device extension into {out} (first use only, ~20-50 s)")
    start = time.perf_counter()
    try:
        ext = load(name="tensordiff_echo_npu", sources=[str(src)], build_directory=str(out),
                   extra_cflags=["-O2"], verbose=verbose)
    except (RuntimeError, OSError) as exc:
        raise TensordiffError(f"cannot build the echo_npu extension in {out}: {str(exc).splitlines()[-1]}") from None
    if not cached:
        status(f"echo_npu built in {time.perf_counter() - start:.0f} s")
    torch.utils.rename_privateuse1_backend(DEVICE)
    torch._register_device_module(DEVICE, _device_module())
    torch.utils.generate_methods_for_privateuse1_backend()
    ext.register_hooks()
    _EXT = ext
    return ext


def _device_module():
    """The ``torch.echo_npu`` namespace torch looks up for device queries and RNG."""
    import types

    mod = types.ModuleType(f"torch.{DEVICE}")
    mod.is_available = lambda: True
    mod.device_count = lambda: 1
    mod.current_device = lambda: 0
    mod.set_device = lambda index: None
    mod._is_in_bad_fork = lambda: False
    mod.manual_seed_all = lambda seed: None
    mod.manual_seed = lambda seed: None
    mod.get_rng_state = lambda device=None: torch.get_rng_state()
    mod.set_rng_state = lambda state, device=None: None
    mod.synchronize = lambda device=None: None
    return mod


def set_fault(name: str) -> None:
    if name not in FAULTS:
        raise TensordiffError(f"unknown --fault {name!r}; choose one of {', '.join(FAULTS)}")
    load_extension().set_fault(FAULTS[name][0])


def op_counts() -> dict:
    ext = load_extension()
    return {"native": dict(ext.native_counts()), "fallback": dict(ext.fallback_counts())}


def guard_allocator(guard) -> None:
    """``--guard`` on echo_npu: red zones and a NaN poison payload around every device block, and the
    allocator's events (a block handed out at another address than its allocation, a size other than
    asked, a red zone overwritten) reported at the op after which they appear, before a free() could
    abort the process."""
    ext = load_extension()
    ext.set_guard(True)

    def drain(func) -> None:
        from tensordiff.source_lines import user_source_line

        events = ext.guard_events(True)
        if not events:
            return
        source = user_source_line(start=2)  # past this hook: the line whose op allocated
        for event in events:
            guard.report("allocator", "echo_npu allocator", f"{event}; after {func._schema.name} at {source}",
                         {"event": event, "kind_of_event": event.split(":")[0], "op": func._schema.name,
                          "source": source})

    guard.op_hooks.append(drain)
