"""Target ``kt_moe``: every fused-experts MoE block runs its experts through kt-kernel, KTransformers'
CPU MoE kernel (the real extension, called with raw ``data_ptr()``s as KTransformers does); the
router, attention and norms stay torch in bf16, as in a KTransformers deployment.

    backend = get_backend("kt_moe")            # needs: pip install --no-deps kt-kernel
    model = backend(bundle.model)               # experts modules replaced by KtMoEExperts

Which kernel runs depends on the CPU (detected from its flags, not from the extension's name list:
kt-kernel's AVX-512 build also exposes the AMX class names): AMX tiles -> ``AMXBF16_MOE``, otherwise
``AVX2BF16_MOE``. The kernel copies the expert weights into its own layout when they are loaded; the
weights are staged first in one arena per layer (bf16, the kernel's per-expert gate / up / down
matrices), through a float32 conversion scratch buffer.

Fault ``shared-pool-alias``: the arena hands the conversion scratch the bytes of a contiguous run of
experts' staged weights (one block handed out twice while both are live), so converting the experts
after them leaves float32 bytes in those experts' bf16 weights before the kernel loads them: the
mechanism of the AMX MoE+LoRA NaN story (a pooled allocator giving two live buffers one memory).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tensordiff.backends.moe_blocks import fused_experts_blocks
from tensordiff.errors import TensordiffError

FAULTS = {
    "none": "the kernel as shipped, weights staged in a correct arena",
    "shared-pool-alias": "the arena gives the conversion scratch the staged weights of experts "
                         "E/4+1 .. E/4+8 (17-24 of 64) while they are live",
    "stale-scale": "the staged gate/up weights of experts E/4+1 .. E/4+8 (17-24 of 64) keep a dequant "
                   "scale of 1.5 from another tensor: finite, plausible, wrong",
    "lora-grad-tail": "(--lora-rank) the LoRA A gradients read back from the tail of the kernel's padded "
                      "rank (the zero padding) instead of its head: forward and input gradient exact, every "
                      "LoRA A gradient wrong",
}
INSTALL_HINT = ("--target kt_moe needs kt-kernel: pip install --no-deps kt-kernel && "
                "pip install gguf packaging numpy safetensors (never let pip resolve kt-kernel's "
                "pinned torch)")
CONVERT_EXPERTS = 4  # experts converted per pass through the scratch buffer
MAX_TOKENS = 1024    # tokens per kernel call (its buffers are sized for this; longer inputs go in pieces)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kernel_name(flags: set[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    return "AMXBF16_MOE" if {"amx_tile", "amx_bf16"} <= flags else "AVX2BF16_MOE"


def load_kt_kernel():
    """The kt_kernel package, or a one-line install hint (exit 2)."""
    try:
        import kt_kernel
    except ImportError:
        raise TensordiffError(INSTALL_HINT) from None
    except Exception as exc:  # a wheel for another CPU / Python: say what failed
        raise TensordiffError(f"kt-kernel failed to load: {type(exc).__name__}: {exc}") from None
    return kt_kernel


_CPU_INFER = None


def _cpu_infer(ext):
    """One kt-kernel worker pool per process (its threads are process-wide, as in KTransformers)."""
    global _CPU_INFER
    if _CPU_INFER is None:
        config = ext.WorkerPoolConfig()
        config.subpool_count = 1
        config.subpool_numa_map = [0]
        config.subpool_thread_count = [max(1, torch.get_num_threads())]
        with _stdout_to_stderr():
            _CPU_INFER = ext.CPUInfer(config)
        import atexit

        atexit.register(_quiet_exit)
    return _CPU_INFER


def _quiet_exit() -> None:
    """kt-kernel's pool prints "Goodbye" to stdout when it is destroyed at exit: keep stdout clean
    for ``--json`` and pipes."""
    import sys

    sys.stdout.flush()
    os.dup2(2, 1)


class _stdout_to_stderr:
    """kt-kernel's C++ prints progress lines on file descriptor 1; they belong on stderr."""

    def __enter__(self):
        import sys

        sys.stdout.flush()
        self.saved = os.dup(1)
        os.dup2(2, 1)

    def __exit__(self, *exc):
        os.dup2(self.saved, 1)
        os.close(self.saved)


@dataclass
class Block:
    """One buffer handed out by an Arena: its owner's name, byte range and purpose."""
    name: str
    offset: int
    nbytes: int
    site: str


class Arena:
    """A bump allocator over one host buffer, as a kernel runtime's memory pool. ``alias`` (the
    planted fault): ``alloc(name, ..., over=BLOCK_NAME, at=OFFSET)`` hands out bytes another live
    block already owns."""

    def __init__(self, nbytes: int, name: str, guard=None):
        self.memory = torch.empty(nbytes, dtype=torch.uint8)
        self.name = name
        self.end = 0
        self.blocks: dict[str, Block] = {}
        self.guard = guard

    def alloc(self, name: str, nbytes: int, site: str, over: tuple[str, int] | None = None) -> torch.Tensor:
        if over is None:
            offset = -(-self.end // 64) * 64
            self.end = offset + nbytes
        else:  # the fault: the same bytes handed out twice
            owner, within = over
            offset = self.blocks[owner].offset + within
        if offset + nbytes > self.memory.numel():
            raise TensordiffError(f"arena {self.name}: {name} needs {nbytes} bytes past its end")
        if site is None:
            import sys

            caller = sys._getframe(1)
            site = f"{caller.f_code.co_filename}:{caller.f_lineno} in {caller.f_code.co_name}"
        self.blocks[name] = Block(name, offset, nbytes, site)
        view = self.memory[offset:offset + nbytes]
        if self.guard is not None:
            self.guard.register(f"{self.name}/{name}", view, site=site)
        return view


    def release(self) -> None:
        """The arena's memory goes back: its blocks are no longer live."""
        if self.guard is not None:
            for name in self.blocks:
                self.guard.release(f"{self.name}/{name}")
        self.blocks.clear()


class KtMoEExperts(torch.nn.Module):
    """Drop-in for a fused experts module (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I],
    forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])): the kernel computes it. The
    parameters stay (the state check and replay see them); the kernel holds its own copy."""

    def __init__(self, experts: torch.nn.Module, layer_idx: int, top_k: int, kernel: str, fault: str = "none",
                 guard=None):
        super().__init__()
        kt = load_kt_kernel()
        ext = kt.kt_kernel_ext
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj
        self.num_experts, two_i, self.hidden = (int(s) for s in self.gate_up_proj.shape)
        self.inter = two_i // 2
        self.top_k, self.kernel, self.layer_idx = top_k, kernel, layer_idx
        self.tensordiff_kernel = f"kt-kernel {kernel}"  # the capture reports kernel authors' figure for it
        act = getattr(experts, "act_fn", None)
        if act is not None and type(act).__name__ not in ("SiLU", "SiLUActivation"):
            raise TensordiffError(f"kt_moe: layer {layer_idx}'s experts use {type(act).__name__}; "
                                  "kt-kernel's bf16 MoE computes SiLU(gate) * up")
        if guard is not None:
            with guard:  # ops of the staging pass are watched: a write into another buffer's bytes is named
                self._staged = self._stage_weights(fault, guard)
        else:
            self._staged = self._stage_weights(fault, guard)
        infer = _cpu_infer(ext)
        self._mask = torch.zeros(self.num_experts, dtype=torch.bool)  # no expert on a GPU
        config = ext.moe.MOEConfig(self.num_experts, top_k, self.hidden, self.inter, self._mask.data_ptr())
        config.layer_idx = layer_idx
        config.pool = infer.backend_
        config.max_len = MAX_TOKENS
        gate_up, down = self._staged
        config.gate_projs = [[gate_up[e, :self.inter].data_ptr() for e in range(self.num_experts)]]
        config.up_projs = [[gate_up[e, self.inter:].data_ptr() for e in range(self.num_experts)]]
        config.down_projs = [[down[e].data_ptr() for e in range(self.num_experts)]]
        config.gate_scales = config.up_scales = config.down_scales = [[0] * self.num_experts]
        self._infer = infer
        with _stdout_to_stderr():
            self._moe = getattr(ext.moe, kernel)(config)
            if guard is not None:  # the probe point around the external call: what it will read
                guard.check_all(f"before {kernel}.load_weights_task (layer {layer_idx})")
            self._p2l = torch.arange(self.num_experts, dtype=torch.int64)
            infer.submit(self._moe.load_weights_task(self._p2l.data_ptr()))
            infer.sync()
        if guard is not None:  # the kernel copied the weights into its own layout: the arena is freed
            for name in [n for n in guard.seals if n.startswith(f"layer {layer_idx} ")]:
                guard.release(name)
            self._arena.release()
        self._staged = self._arena = None

    def _stage_weights(self, fault: str, guard) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 per-expert weights in an arena, converted CONVERT_EXPERTS experts at a time through a
        float32 scratch block."""
        e, i, h = self.num_experts, self.inter, self.hidden
        per_expert = 2 * i * h * 2  # gate + up, bf16
        scratch_bytes = CONVERT_EXPERTS * 2 * i * h * 4
        total = e * per_expert + e * h * i * 2 + scratch_bytes + 256
        arena = self._arena = Arena(total, f"kt_moe layer {self.layer_idx} arena", guard=guard)
        site = None  # the line that asked for the block
        gate_up = arena.alloc("gate_up staging", e * per_expert, site).view(torch.bfloat16).view(e, 2 * i, h)
        down = arena.alloc("down staging", e * h * i * 2, site).view(torch.bfloat16).view(e, h, i)
        over = None
        if fault == "shared-pool-alias":
            first = e // 4 + 1 if e >= 16 else 1
            over = ("gate_up staging", first * per_expert)
        scratch = arena.alloc("conversion scratch", scratch_bytes, site, over=over).view(torch.float32)
        with torch.no_grad():
            for start in range(0, e, CONVERT_EXPERTS):
                n = min(CONVERT_EXPERTS, e - start)
                block = scratch[:n * 2 * i * h].view(n, 2 * i, h)
                block.copy_(self.gate_up_proj[start:start + n].detach())
                if fault == "stale-scale":  # the planted numeric bug: a scale left over for some experts
                    first = e // 4 + 1 if e >= 16 else 1
                    for expert in range(max(start, first), min(start + n, first + 8)):
                        block[expert - start].mul_(1.5)
                gate_up[start:start + n].copy_(block.to(torch.bfloat16))
                if guard is not None:  # each expert's staged weights must stay as written until loaded
                    for expert in range(start, start + n):
                        guard.seal(gate_up[expert], f"layer {self.layer_idx} gate/up weights of expert {expert}",
                                   group=f"layer {self.layer_idx} staged gate/up weights", unit=("experts", expert, e))
            down.copy_(self.down_proj.detach().to(torch.bfloat16))
        return gate_up, down

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad):
            raise TensordiffError(BACKWARD_REFUSED)  # never a silent zero gradient
        out_dtype = hidden_states.dtype
        x = hidden_states.detach().to(torch.bfloat16).contiguous()
        ids = top_k_index.detach().to(torch.int64).contiguous()
        weights = top_k_weights.detach().to(torch.float32).contiguous()
        out = torch.empty_like(x)  # the kernel writes every row
        for start in range(0, x.shape[0], MAX_TOKENS):
            stop = min(start + MAX_TOKENS, x.shape[0])
            count = torch.tensor([stop - start], dtype=torch.int32)
            row = lambda t: t.data_ptr() + start * t.stride(0) * t.element_size()  # noqa: E731
            self._infer.submit(self._moe.forward_task(
                count.data_ptr(), self.top_k, row(ids), row(weights), row(x), row(out), False))
            self._infer.sync()
        return out.to(out_dtype)


def to_kt_moe(model: torch.nn.Module, fault: str = "none", guard=None) -> torch.nn.Module:
    """Cast like a bf16 deployment, then hand every fused experts module to the kernel. ``guard``
    (default: the ``--guard`` one, if on): arena blocks registered, staged weights sealed and checked
    before the kernel loads them, the staging pass's writers watched."""
    from tensordiff import guard as guards
    from tensordiff.backends.casting import cast_like_deployment

    guard = guard if guard is not None else guards.active()
    if fault not in FAULTS:
        raise TensordiffError(f"unknown --fault {fault!r} for kt_moe; choose one of {', '.join(FAULTS)}")
    blocks = fused_experts_blocks(model)
    if not blocks:
        raise TensordiffError("--target kt_moe: the model has no fused-experts MoE block "
                              "(experts.gate_up_proj [E, 2I, H] beside a top-k router); try --model qwen-moe")
    kernel = kernel_name()
    for layer_idx, (name, block, experts) in enumerate(blocks):
        if getattr(experts, "tensordiff_kernel", None):  # already a kernel's (kt_sft.to_kt_sft: --lora-rank)
            continue
        block.experts = KtMoEExperts(experts, layer_idx, int(block.gate.top_k), kernel, fault, guard)
    cast_like_deployment(model, torch.bfloat16)
    return model


BACKWARD_REFUSED = ("--target kt_moe runs kt-kernel's inference MoE kernel, which has no backward: drop "
                    "--backward, or add --lora-rank R for its SFT kernel (LoRA on the experts, forward and backward)")


def describe() -> dict:
    """What ran, for the trace metadata and the report."""
    kt = load_kt_kernel()
    flags = cpu_flags()
    return {"kernel": kernel_name(flags), "kt_kernel": getattr(kt, "__version__", "?"),
            "extension_variant": getattr(kt, "__cpu_variant__", "?"),
            "cpu_amx": {"amx_tile", "amx_bf16"} <= flags, "cpu_avx512": "avx512f" in flags}
