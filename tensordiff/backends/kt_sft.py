"""kt-kernel's SFT MoE (``kt_kernel.sft.AMXSFTMoEWrapper``): one routed-experts layer with LoRA on
gate, up and down, forward with ``save_for_backward`` and backward, judged against the golden
reference of ``backends.moe_lora`` on the same inputs.

Which SFT method runs depends on the CPU (``sft_methods``): ``AMXBF16_SFT`` needs AMX (bf16 weights,
the reference is the float weights); ``MXFP4_SFT`` runs on AVX2 / AVX512-BF16 hosts (weights quantised
to MXFP4 here, the reference runs on the same dequantised weights: the quantisation is the kernel's
input, not its error). The kernel takes a LoRA rank that is a multiple of 32: the user's rank is padded
(``moe_lora.pad_rank``) and alpha scaled so that alpha / rank is unchanged.

    result = run_sft_layer(weights, x, expert_ids, routing, grad_output, method="MXFP4_SFT")
    verdicts = judge_sft(result, reference_sft_step(...))
"""
from __future__ import annotations

import contextlib
import math

import torch

from tensordiff.backends.moe_blocks import fused_experts_blocks
from tensordiff.backends.moe_lora import (MoELoRAWeights, mxfp4_dequantize, mxfp4_quantize, pad_rank,
                                          reference_sft_step)
from tensordiff.errors import TensordiffError

KERNEL_RANK_MULTIPLE = 32
# A SwiGLU limit far above any activation here: MXFP4_SFT insists on a finite positive one, and with it
# the kernel's activation is plain silu(gate) * up, as in Qwen3-MoE.
NO_LIMIT = 1.0e4


def sft_methods() -> list[str]:
    """The bf16-capable SFT methods this host's kt-kernel extension provides, best first."""
    from tensordiff.backends.kt_moe import load_kt_kernel

    load_kt_kernel()  # the install hint when the package is missing
    from kt_kernel.sft import amx

    order = ("AMXBF16_SFT", "MXFP4_SFT")
    return [m for m in order if amx._SFT_METHOD_TO_CLASS.get(m) is not None]


def quantised_weights(weights: MoELoRAWeights, method: str) -> MoELoRAWeights:
    """The weights the kernel really computes with: bf16 LoRA, and MXFP4_SFT's dequantised base
    weights or bf16 ones."""
    def bf16(t):
        return t.to(torch.bfloat16).float()

    base = [mxfp4_dequantize(*_mxfp4(t)) if method == "MXFP4_SFT" else bf16(t)
            for t in (weights.gate, weights.up, weights.down)]
    return MoELoRAWeights(*base, {p: (bf16(a), bf16(b)) for p, (a, b) in weights.lora.items()}, weights.scaling)


_MXFP4_CACHE: dict = {}


def _mxfp4(tensor: torch.Tensor):
    """Quantised once per weight tensor (the reference and the kernel both need it; 0.1 G elements)."""
    key = (tensor.data_ptr(), tuple(tensor.shape), tensor._version)
    if key not in _MXFP4_CACHE:
        if len(_MXFP4_CACHE) > 6:  # one layer's three projections, twice: no more is ever reused
            _MXFP4_CACHE.clear()
        _MXFP4_CACHE[key] = mxfp4_quantize(tensor)
    return _MXFP4_CACHE[key]


def build_wrapper(weights: MoELoRAWeights, tokens: int, top_k: int, method: str, layer_idx: int = 0):
    """An AMXSFTMoEWrapper with the weights loaded and LoRA (rank padded) registered. Returns the
    wrapper and the tensors it holds pointers to (they must stay alive with it)."""
    padded = pad_rank(weights, KERNEL_RANK_MULTIPLE)
    experts, inter, hidden = weights.gate.shape
    projections = (weights.gate, weights.up, weights.down)
    base = ([_mxfp4(t) for t in projections] if method == "MXFP4_SFT"
            else [t.to(torch.bfloat16).contiguous() for t in projections])
    lora = {f"{p}_lora_{side}": t.to(torch.bfloat16).contiguous()
            for p in ("gate", "up", "down") for side, t in zip("ab", padded.lora[p])}
    grads = {f"grad_{k}": torch.zeros_like(v) for k, v in lora.items()}
    return _wrapper_from_parts(base, lora, grads, experts, inter, hidden, padded.rank, top_k, weights.scaling,
                               method, layer_idx, max_tokens=max(tokens, 1))


def run_sft_layer(weights: MoELoRAWeights, x, expert_ids, routing, grad_output, method: str,
                  output_device=None) -> dict:
    """Forward (save_for_backward) and backward through kt-kernel: output, grad of the input and of the
    routing weights, and the LoRA gradients cut back to the user's rank."""
    wrapper, keep = build_wrapper(weights, x.shape[0], expert_ids.shape[1], method)
    out = wrapper.forward(x.to(torch.bfloat16), expert_ids, routing.float(), save_for_backward=True,
                          output_device=output_device)
    out = out.clone()  # the wrapper's buffers are reused by the next call
    grad_input, grad_routing = wrapper.backward(grad_output.to(torch.bfloat16), output_device=output_device)
    rank = weights.rank
    result = {"output": out.float(), "grad_input": grad_input.float().clone(), "grad_routing": grad_routing.float().clone(),
              "method": method}
    for p in ("gate", "up", "down"):
        ga, gb = keep["grads"][f"grad_{p}_lora_a"], keep["grads"][f"grad_{p}_lora_b"]
        result[f"grad_{p}_lora_a"] = ga[:, :rank].float().clone()
        result[f"grad_{p}_lora_b"] = gb[:, :, :rank].float().clone()
    return result


def judge_sft(kernel: dict, reference: dict, budget: float = 0.06) -> list[dict]:
    """Per result (output, grads): our rel L2 against the reference and kernel authors' figure
    mean|diff| / mean|ref| (kt-kernel's tests: < 0.05 for bf16)."""
    rows = []
    for name, ref in reference.items():
        got = kernel.get(name)
        if not isinstance(ref, torch.Tensor) or got is None:
            continue
        ref64, got64 = ref.double(), got.double()
        if ref64.shape != got64.shape:
            raise TensordiffError(f"kt-kernel SFT {name}: shape {tuple(got64.shape)}, reference {tuple(ref64.shape)}")
        diff = got64 - ref64
        norm = float(ref64.norm())
        rel = float(diff.norm()) / norm if norm else (0.0 if float(diff.norm()) == 0 else math.inf)
        mean_ratio = float(diff.abs().mean() / ref64.abs().mean()) if float(ref64.abs().mean()) else rel
        finite = bool(torch.isfinite(got64).all())
        rows.append({"name": name, "rel_l2": rel, "mean_ratio": mean_ratio, "finite": finite,
                     "passes": finite and rel <= budget, "authors_pass": finite and mean_ratio < 0.05})
    return rows


def sft_check(experts: int = 64, top_k: int = 6, hidden: int = 1024, inter: int = 512, tokens: int = 64,
              rank: int = 16, method: str | None = None, seed: int = 0) -> dict:
    """One clean layer, kernel against the fp32 reference on the weights the kernel computes with."""
    method = method or (sft_methods() or [None])[0]
    if method is None:
        raise TensordiffError("this kt-kernel build has no bf16 SFT method on this CPU (AMXBF16_SFT needs AMX; "
                              "MXFP4_SFT needs AVX2 or AVX512-BF16)")
    weights = _random_weights(experts, hidden, inter, rank, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    logits = torch.randn(tokens, experts, generator=gen)
    routing, expert_ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    routing = (routing / routing.sum(-1, keepdim=True)).float()
    grad_output = (torch.randn(tokens, hidden, generator=gen) * 0.1).to(torch.bfloat16)
    kernel = run_sft_layer(weights, x, expert_ids, routing, grad_output, method)
    reference = reference_sft_step(x.float(), expert_ids, routing, quantised_weights(weights, method),
                                   grad_output.float())
    result = {"method": method, "rows": judge_sft(kernel, reference), "kernel": kernel, "reference": reference}
    if method == "MXFP4_SFT":  # what plain fp32 weights would have said: the quantisation, not the kernel
        plain = reference_sft_step(x.float(), expert_ids, routing, weights, grad_output.float())
        result["vs_unquantised"] = judge_sft(kernel, plain)
    return result


def _random_weights(experts, hidden, inter, rank, seed):
    from tensordiff.backends.moe_lora import random_moe_lora

    # Scales that keep every step's values O(1) (as trained weights do): base weights ~1/sqrt(fan-in),
    # LoRA A ~1/sqrt(fan-in), B small.
    w = random_moe_lora(experts, hidden, inter, rank, seed=seed, scale=1.0)
    w.gate.mul_(hidden ** -0.5), w.up.mul_(hidden ** -0.5), w.down.mul_(inter ** -0.5)
    for p, (a, b) in w.lora.items():
        a.mul_(a.shape[2] ** -0.5)
        b.mul_(0.1 * rank ** -0.5)
    return w


class _KtSFTStep(torch.autograd.Function):
    """The kernel's forward (save_for_backward) and backward as one autograd node; the LoRA parameters
    are inputs, so their gradients land where the optimizer (and the capture) looks for them."""

    @staticmethod
    def forward(ctx, module, x, expert_ids, routing, *lora):
        ctx.module = module
        return module.kernel_forward(x, expert_ids, routing, save=True)

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_routing, lora_grads = ctx.module.kernel_backward(grad_output)
        return (None, grad_x, None, grad_routing, *lora_grads)


class KtSFTExperts(torch.nn.Module):
    """Drop-in for the golden ``MoELoRAExperts``: kt-kernel's SFT MoE computes the experts with LoRA,
    forward and backward. Base weights, LoRA and the conversion scratch are staged in one arena per
    layer (kt_moe.Arena); fault ``shared-pool-alias`` hands the scratch the bytes of the gate LoRA B of
    experts E/4+1 .. E/4+8 while they are live, so converting the base weights leaves float32 bytes in
    them before the kernel reads them (the story's LoRA B buffer that held garbage before the kernel's
    write)."""

    def __init__(self, golden, layer_idx: int, top_k: int, method: str, fault: str = "none", guard=None):
        super().__init__()
        from tensordiff.backends.kt_moe import Arena
        from tensordiff.backends.moe_lora import LORA_PROJECTIONS

        self.gate_up_proj, self.down_proj = golden.gate_up_proj, golden.down_proj
        for p in LORA_PROJECTIONS:
            for side in ("a", "b"):
                setattr(self, f"lora_{p}_{side}", getattr(golden, f"lora_{p}_{side}"))
        self.rank, self.scaling, self.layer_idx, self.top_k, self.method = golden.rank, golden.scaling, layer_idx, top_k, method
        self.fault = fault
        self.tensordiff_kernel = f"kt-kernel {method}"
        weights = golden.weights()
        e, i, h = weights.gate.shape
        padded = pad_rank(weights, KERNEL_RANK_MULTIPLE)
        r = padded.rank
        lora_bytes = {p: (e * r * (h if p != "down" else i) * 2, e * (i if p != "down" else h) * r * 2)
                      for p in LORA_PROJECTIONS}
        total_lora = sum(a + b for a, b in lora_bytes.values())
        self._arena = arena = Arena(total_lora + 8 * i * r * 2 + 4096, f"kt_sft layer {layer_idx} arena", guard=guard)
        self._lora, self._grads = {}, {}
        with torch.no_grad(), (guard if guard is not None else contextlib.nullcontext()):
            for p in LORA_PROJECTIONS:
                a, b = padded.lora[p]
                for side, src in (("a", a), ("b", b)):
                    view = arena.alloc(f"lora {p} {side}", src.numel() * 2, None).view(torch.bfloat16).view(src.shape)
                    view.copy_(src.detach())
                    self._lora[f"{p}_lora_{side}"] = view
                    self._grads[f"grad_{p}_lora_{side}"] = torch.zeros(src.shape, dtype=torch.bfloat16)
            first = e // 4 + 1 if e >= 16 else 1
            if guard is not None:  # LoRA B must hold what was written until the kernel reads it
                for expert in range(e):
                    guard.seal(self._lora["gate_lora_b"][expert], f"layer {layer_idx} gate LoRA B of expert {expert}",
                               group=f"layer {layer_idx} gate LoRA B", unit=("experts", expert, e))
            over = ("lora gate b", first * i * r * 2) if fault == "shared-pool-alias" else None
            # The staging scratch is the size of 8 experts' LoRA B: the kernel's inputs pass through it
            # in pieces (float32 before the bf16 conversion; MXFP4's packed codes)
            scratch = arena.alloc("staging scratch", 8 * i * r * 2, None, over=over)
            base = []
            for tensor in (weights.gate, weights.up, weights.down):
                if method == "MXFP4_SFT":
                    packed, scale = mxfp4_quantize(tensor.detach())
                    out = torch.empty_like(packed)
                    _through(scratch, packed.view(-1), out.view(-1))
                    base.append((out, scale))
                else:
                    out = torch.empty(tensor.shape, dtype=torch.bfloat16)
                    _through(scratch.view(torch.float32), tensor.detach().float().reshape(-1), out.view(-1))
                    base.append(out)
        if guard is not None:
            guard.check_all(f"before kt-kernel {method} (layer {layer_idx}) reads its LoRA")
        self._wrapper, self._keep = _wrapper_from_parts(base, self._lora, self._grads, e, i, h, r, top_k,
                                                        self.scaling, method, layer_idx)

    def kernel_forward(self, x, expert_ids, routing, save: bool):
        if x.shape[0] > MAX_SFT_TOKENS:
            raise TensordiffError(f"kt-kernel SFT: {x.shape[0]} tokens in one call; at most {MAX_SFT_TOKENS} here")
        out = self._wrapper.forward(x.detach().to(torch.bfloat16).contiguous(), expert_ids.detach().to(torch.int64).contiguous(),
                                    routing.detach().float().contiguous(), save_for_backward=save)
        return out.to(x.dtype)

    def kernel_backward(self, grad_output):
        for g in self._grads.values():
            g.zero_()
        grad_x, grad_routing = self._wrapper.backward(grad_output.detach().to(torch.bfloat16).contiguous())
        lora_grads = []
        for p in ("gate", "up", "down"):
            for side in ("a", "b"):
                g = self._grads[f"grad_{p}_lora_{side}"]
                if side == "a" and self.fault == "lora-grad-tail":  # the planted read-back bug
                    g = g[:, g.shape[1] - self.rank:]
                else:
                    g = g[:, :self.rank] if side == "a" else g[:, :, :self.rank]
                lora_grads.append(g.to(getattr(self, f"lora_{p}_{side}").dtype).clone())
        return grad_x.to(grad_output.dtype).clone(), grad_routing.clone(), lora_grads

    def forward(self, hidden_states, top_k_index, top_k_weights):
        lora = [getattr(self, f"lora_{p}_{s}") for p in ("gate", "up", "down") for s in ("a", "b")]
        wants_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or top_k_weights.requires_grad
                                                  or any(t.requires_grad for t in lora))
        if not wants_grad:
            return self.kernel_forward(hidden_states, top_k_index, top_k_weights, save=False)
        return _KtSFTStep.apply(self, hidden_states, top_k_index, top_k_weights, *lora)


MAX_SFT_TOKENS = 4096


def _through(scratch: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """src -> scratch -> dst (converting to dst's dtype), one scratch-full at a time."""
    step = scratch.numel()
    for start in range(0, src.numel(), step):
        n = min(step, src.numel() - start)
        scratch[:n].copy_(src[start:start + n])
        dst[start:start + n].copy_(scratch[:n])


def _wrapper_from_parts(base, lora, grads, e, i, h, r, top_k, scaling, method, layer_idx,
                        max_tokens: int = MAX_SFT_TOKENS):
    """The kernel's wrapper over staged bf16 base weights (MXFP4_SFT: packed codes and scales) and LoRA."""
    from kt_kernel.sft.amx import AMXSFTMoEWrapper

    import atexit

    from tensordiff.backends.kt_moe import _quiet_exit, _stdout_to_stderr

    atexit.unregister(_quiet_exit)
    atexit.register(_quiet_exit)  # its pool says "Goodbye" on stdout at exit: keep --json clean
    with _stdout_to_stderr():
        wrapper = AMXSFTMoEWrapper(
            layer_idx=layer_idx, num_experts=e, num_experts_per_tok=top_k, hidden_size=h, moe_intermediate_size=i,
            num_gpu_experts=0, cpuinfer_threads=max(1, torch.get_num_threads()), threadpool_count=1, weight_path="",
            chunked_prefill_size=max_tokens, lora_rank=r, lora_alpha=scaling * r, method=method, max_cache_depth=2,
            **({"group_size": 32, "zero_point": False, "swiglu_limit": NO_LIMIT} if method == "MXFP4_SFT" else {}))
        keep = {"lora": lora, "grads": grads}
        mapping = torch.arange(e, dtype=torch.int64)
        if method == "MXFP4_SFT":  # base: (packed codes, scales) per projection
            data = {}
            for name, (packed, scale) in zip(("gate", "up", "down"), base):
                data[name] = [packed[x].contiguous() for x in range(e)]
                data[f"{name}_scale"] = [scale[x].to(torch.bfloat16).contiguous() for x in range(e)]
            keep["mxfp4"] = data
            wrapper.load_mxfp4_weights(data, mapping)
        else:
            wrapper.load_weights_from_tensors(*base, mapping)
        wrapper.init_lora_weights(**lora, **grads)
    return wrapper, keep


def prepare_lora_model(model: torch.nn.Module, rank: int, target: str, seed: int = 0) -> str | None:
    """``--lora-rank R``: LoRA on every fused-experts block (the golden ``MoELoRAExperts`` on both
    sides). When the target is kt_moe and this CPU's SFT method is MXFP4_SFT, the experts' base weights
    are rounded to MXFP4 first, on both sides: the kernel's weight format is its input, not its error
    (the reference applies the same quantisation). Returns a note saying so, or None."""
    from tensordiff.backends.moe_lora import add_lora

    note = None
    if target == "kt_moe" and (sft_methods() or [None])[0] == "MXFP4_SFT":
        with torch.no_grad():
            for _, _, experts in fused_experts_blocks(model):
                for p in (experts.gate_up_proj, experts.down_proj):
                    p.copy_(mxfp4_dequantize(*mxfp4_quantize(p.detach())).to(p.dtype))
        note = ("kt-kernel's SFT path on this CPU is MXFP4_SFT: the experts' base weights were rounded to MXFP4 "
                "(E2M1, one power-of-two scale per 32) on both sides, so the reference applies the kernel's "
                "quantisation")
    add_lora(model, rank, seed=seed)
    return note


def to_kt_sft(model: torch.nn.Module, fault: str = "none", guard=None) -> int:
    """Every ``MoELoRAExperts`` block (``--lora-rank``) runs kt-kernel's SFT kernel instead; returns how
    many. kt_moe.to_kt_moe then hands the remaining blocks to the inference kernel and casts."""
    from tensordiff import guard as guards
    from tensordiff.backends.moe_lora import MoELoRAExperts

    blocks = [(i, block, experts) for i, (_, block, experts) in enumerate(fused_experts_blocks(model))
              if isinstance(experts, MoELoRAExperts)]
    if not blocks:
        return 0
    methods = sft_methods()
    if not methods:
        raise TensordiffError("--lora-rank on kt_moe: this kt-kernel build has no bf16 SFT method on this CPU "
                              "(AMXBF16_SFT needs AMX; MXFP4_SFT needs AVX2 or AVX512-BF16)")
    guard = guard if guard is not None else guards.active()
    for layer_idx, block, experts in blocks:
        block.experts = KtSFTExperts(experts, layer_idx, int(block.gate.top_k), methods[0], fault, guard)
    return len(blocks)
